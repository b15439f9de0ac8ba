"""The embedded default (`make demo`): Stage 1 on the built-in synthetic corpus with a small random decoder
and SmolLM2's tokenizer (shipped as a pip package), then Stage 2 into MiniLM's first layer (also packaged),
export and search: no download, ~2.5 minutes on a 2-core CPU. Model, data and distillation settings are the
tests' (configs/tiny.py, tests/test_stage2.py), so what the demo shows is what the tests prove.

  scalingnote demo --config configs/demo.py                       # train, then encode and report
  scalingnote demo --config configs/demo.py:smoke                 # seconds
  scalingnote train --config configs/demo.py --workdir runs/demo  # the training alone
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from distill_tiny import get_config as distill_config  # noqa: E402
from tiny import get_config as tiny_config  # noqa: E402


def get_config(variant: str = ""):
  c = tiny_config(variant)
  c.stage2 = distill_config()  # its teacher is the Stage 1 run above
  if variant == "smoke":
    c.eval.every = c.num_steps  # before and after, even in the smoke run
    c.stage2.update(dict(num_steps=4, log_every=2))
    c.stage2.data.unlabelled_per_doc = 0
    c.stage2.eval.every = c.stage2.checkpoint.every = 4
  return c
