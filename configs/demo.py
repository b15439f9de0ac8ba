"""The embedded default (`make demo`): Stage 1 on the built-in synthetic corpus with a small random decoder
and SmolLM2's tokenizer (shipped as a pip package): no download, ~2 minutes on a 2-core CPU. The model and
data are the test config's (configs/tiny.py), so the demo's learning is what tests/test_stage1.py proves.

  scalingnote demo --config configs/demo.py                       # train, then encode and report
  scalingnote demo --config configs/demo.py:smoke                 # seconds
  scalingnote train --config configs/demo.py --workdir runs/demo  # the training alone
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tiny import get_config as tiny_config  # noqa: E402


def get_config(variant: str = ""):
  c = tiny_config(variant)
  if variant == "smoke":
    c.eval.every = c.num_steps  # before and after, even in the smoke run
  return c
