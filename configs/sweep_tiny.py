"""A model-size x data-size sweep of Stage 1 on the synthetic corpus: decoders of width 16 to 128 (2 layers)
trained on 25%, 50% and 100% of the training queries. ~15 min on a 2-core CPU; then fit the laws:

  scalingnote sweep --config configs/sweep_tiny.py --workdir runs/sweep_tiny
  scalingnote fit-scaling runs/sweep_tiny/results.jsonl --law n --y contrastive_entropy --plot runs/sweep_tiny/n.png
"""

from ml_collections import ConfigDict

from scalingnote_jax.config import sweep_defaults
from scalingnote_jax.configs.tiny import get_config as tiny_config


def width(h: int) -> dict:
  """A size of the ladder: `model` fields over the base config's."""
  return dict(backbone=dict(hidden_size=h, num_heads=4, num_kv_heads=2, head_dim=h // 4, intermediate_size=2 * h))


def get_config(variant: str = ""):
  c = sweep_defaults()
  c.base = tiny_config()
  c.base.optim.lr = 1e-3  # decoders of these widths learn fastest here (3e-3: slower, 1e-2: diverges)
  c.base.model.doc_seed = c.base.model.seed  # both towers from identical weights (as in BENCHMARKS.md)
  c.base.num_steps = 300
  c.base.eval.update(dict(every=300, at_start=False))
  c.base.checkpoint.every = 300
  c.sizes = ConfigDict({f"h{h}": width(h) for h in (16, 32, 64, 128)})
  c.data_fractions = (0.25, 0.5, 1.0)
  if variant == "smoke":
    c.base.data.num_docs = 64
    c.base.update(dict(num_steps=4, log_every=2))
    c.base.eval.every = c.base.checkpoint.every = 4
    c.sizes = ConfigDict({f"h{h}": width(h) for h in (8, 16)})
    c.data_fractions = (0.5, 1.0)
    c.full_data_only = ("h16",)
  elif variant:
    raise ValueError(f"configs/sweep_tiny.py: unknown variant {variant!r} (known: smoke)")
  return c
