"""A cross-encoder reranker of BM25's top 20 on BEIR SciFact, sized for a 2-core CPU: all-MiniLM-L6-v2 with a
score head on its mean-pooled tokens (its [CLS] was never trained to summarise: a [CLS] head stayed far below
BM25, BENCHMARKS.md), ListNet over groups of BM25's candidates for the training queries. Settings are chosen
on a dev split (15% of the train queries, the Stage 1 runs' own) where validation also reports the reranker's
score fused with BM25's (`eval.fuse`); the test split is reported once, by the commands below.

  scalingnote train-reranker --config configs/rerank_scifact.py --workdir runs/rerank_scifact
  scalingnote eval --bm25 --data ../shared/data/beir/scifact --split test --save-run runs/bm25_test.run
  scalingnote rerank --checkpoint runs/rerank_scifact --data ../shared/data/beir/scifact \\
      --run runs/bm25_test.run --out runs/rerank_scifact/test.run --top-k 20 [--fuse W]
  scalingnote eval --run runs/rerank_scifact/test.run --data ../shared/data/beir/scifact --split test
"""

from scalingnote_jax.config import rerank_defaults


def get_config(variant: str = ""):
  c = rerank_defaults()
  c.model.update(dict(init="all-MiniLM-L6-v2", num_layers=6))
  c.tower.update(dict(pooling="mean", max_length=128))
  c.data.update(dict(path="../shared/data/beir/scifact", train_split="train", val_split="train", val_fraction=0.15,
                     train_run="bm25", val_run="bm25", top_k=30, group_size=4, seed=0))
  c.num_steps, c.batch_size, c.log_every = 300, 8, 10
  c.optim.update(dict(lr=5e-4, warmup_steps=20))
  c.checkpoint.update(dict(every=100, keep=2))
  c.eval.update(dict(every=100, top_k=20, batch_size=64, fuse=(0.3, 0.5, 0.7)))
  if variant == "smoke":
    c.model.num_layers, c.tower.max_length, c.data.group_size = 1, 32, 2
    c.num_steps, c.batch_size, c.log_every, c.checkpoint.every, c.eval.every, c.eval.top_k = 2, 2, 1, 2, 2, 5
  elif variant:
    raise ValueError(f"configs/rerank_scifact.py: unknown variant {variant!r} (known: smoke)")
  return c
