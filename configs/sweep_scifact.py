"""A model-size x data-size sweep of Stage 1 on BEIR SciFact: all-MiniLM-L6-v2 cut to its first 1, 2, 3 and 4
layers (both towers) x 25%, 50% and 100% of the training queries, plus the whole model (6 layers) at full data
only (the forecast target). Each run is validated every 10 steps, as the reranker paper (arXiv 2603.04816)
measures along training, on a dev split: 15% of the train queries held out (the 121 of every SciFact config);
the test split is untouched. Sized for a 2-core CPU (22 min alone on the machine):

  scalingnote sweep --config configs/sweep_scifact.py --workdir runs/sweep_scifact
  scalingnote fit-scaling runs/sweep_scifact/results.jsonl --law coupled --y contrastive_entropy
  scalingnote fit-scaling runs/sweep_scifact/curves.jsonl --protocol joint --y contrastive_entropy \\
      --where D=688
"""

from ml_collections import ConfigDict

from scalingnote_jax.config import sweep_defaults
from scalingnote_jax.configs.scifact_minilm import get_config as minilm_config


def get_config(variant: str = ""):
  c = sweep_defaults()
  c.base = minilm_config()
  # CPU-sized: half of scifact_minilm.py's documents; the dev split held out of train (as the rerankers').
  c.base.data.update(dict(query_len=32, doc_len=128, val_split="train", val_fraction=0.15))
  c.base.tower.max_length = 128
  c.base.update(dict(batch_size=16, num_steps=100, log_every=10))  # ~2 epochs of the full training set
  c.base.optim.warmup_steps = 10
  # 10 evaluations a run over the dev queries' judged documents plus a fixed sample of the corpus, 500 in all
  # (the whole corpus, 5,183 documents, costs 10x as much per evaluation); contrastive entropy against 256
  # sampled negatives (Fang et al.) at the model's temperature.
  c.base.eval.update(dict(every=10, at_start=False, batch_size=128, max_docs=500, num_negatives=256))
  c.base.checkpoint.every = 100
  c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2, 3, 4, 6)})
  c.data_fractions = (0.25, 0.5, 1.0)
  # The forecast target, at full data only: the whole model (the only size whose last layer is the one
  # MiniLM was trained to embed with).
  c.full_data_only = ("L6",)
  if variant == "smoke":
    c.base.update(dict(num_steps=2, batch_size=4, log_every=1))
    c.base.eval.update(dict(every=2, max_docs=200))
    c.base.checkpoint.every = 2
    c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2)})
    c.data_fractions = (0.5, 1.0)
    c.full_data_only = ()
  elif variant:
    raise ValueError(f"configs/sweep_scifact.py: unknown variant {variant!r} (known: smoke)")
  return c
