"""A ladder of cross-encoder rerankers on BEIR SciFact, one loss per run of the command (the variant):
all-MiniLM-L6-v2 cut to its first 1, 2, 3, 4 and 6 layers, mean-pooled with a score head (as
configs/rerank_scifact.py, at 128-token pairs), trained over BM25's top 30 for the training queries. As the
reranker paper (arXiv 2603.04816) measures: D is the training step, each run evaluated every 20 of its 200
steps (BM25's top 10 reranked for the 121 dev queries held out of the train split; the test split untouched),
written to curves.jsonl for `fit-scaling --protocol data|model|joint`:

  scalingnote sweep --config configs/sweep_rerank_scifact.py:listnet --workdir runs/sweep_rerank_listnet
  scalingnote fit-scaling runs/sweep_rerank_listnet/curves.jsonl --protocol joint --y ndcg_at_10
"""

from ml_collections import ConfigDict

from scalingnote_jax.config import sweep_defaults
from scalingnote_jax.configs.rerank_scifact import get_config as rerank_config

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
  # Sized for a 2-core CPU: 128-token pairs (256 in rerank_scifact.py: +0.02 nDCG@10 at twice the cost), 200
  # steps, 10 evaluations a run of 1,210 pairs each; the whole ladder ~25 min on 2 cores.
  c.base.tower.max_length = 128
  c.base.num_steps = 200
  c.base.checkpoint.every = 200
  c.base.eval.update(dict(every=20, top_k=10, fuse=()))
  c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2, 3, 4, 6)})
  c.data_fractions = (1.0,)
  if size == "smoke":
    c.base.update(dict(num_steps=2, batch_size=8, log_every=1))
    c.base.data.group_size = 2
    c.base.tower.max_length = 32
    c.base.checkpoint.every = c.base.eval.every = 2
    c.base.eval.top_k = 5
    c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2)})
  return c
