"""A model-size x data-size sweep of Stage 1 on BEIR SciFact: all-MiniLM-L6-v2 truncated to its first 1, 2, 3
and 4 layers (both towers) x 25%, 50% and 100% of the 809 training queries, plus 5 and 6 layers at full data
only (forecast targets), evaluated on the test split over the full corpus. Sized for a 2-core CPU (about 2 h);
fit with the largest model held out:

  scalingnote sweep --config configs/sweep_scifact.py --workdir runs/sweep_scifact
  scalingnote fit-scaling runs/sweep_scifact/results.jsonl --law n --y contrastive_entropy --where D=809
"""

from ml_collections import ConfigDict

from scalingnote_jax.config import sweep_defaults
from scalingnote_jax.configs.scifact_minilm import get_config as minilm_config


def get_config(variant: str = ""):
  c = sweep_defaults()
  c.base = minilm_config()
  c.base.data.update(dict(query_len=32, doc_len=128))  # CPU-sized: half of scifact_minilm.py's documents
  c.base.tower.max_length = 128
  c.base.update(dict(batch_size=16, num_steps=100, log_every=10))  # 2 epochs of the full training set
  c.base.optim.warmup_steps = 10
  c.base.eval.update(dict(every=100, at_start=False, batch_size=128))
  c.base.checkpoint.every = 50
  c.sizes = ConfigDict({f"L{n}": dict(num_layers=n) for n in (1, 2, 3, 4, 5, 6)})
  c.data_fractions = (0.25, 0.5, 1.0)
  # Forecast targets, at full data only: 5 layers (still a cut checkpoint, like the ladder) and the whole
  # model (6 layers: the only size whose last layer is the one MiniLM was trained to embed with).
  c.full_data_only = ("L5", "L6")
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
