"""Stage 2 on the synthetic corpus: MiniLM's first layer distilled from a Stage 1 teacher (configs/tiny.py); the
test and demo config (~1 minute on 2 cores).

  scalingnote train --config configs/tiny.py --workdir /tmp/tiny
  scalingnote distill --config configs/distill_tiny.py --config.teacher=/tmp/tiny --workdir /tmp/tiny-student
"""

from scalingnote_jax.config import distill_defaults


def get_config(variant: str = ""):
  c = distill_defaults()  # the defaults are this test-size run
  if variant == "smoke":
    c.num_steps, c.eval.every, c.data.unlabelled_per_doc = 4, 0, 0
  elif variant:
    raise ValueError(f"configs/distill_tiny.py: unknown variant {variant!r} (known: smoke)")
  return c
