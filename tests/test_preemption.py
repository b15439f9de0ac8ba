"""A preemption notice (SIGTERM, as TPU and SLURM send it) mid-training saves a checkpoint of the step the run
reached and exits 143; `--resume` continues from it and ends equal to the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, run_cli

pytestmark = pytest.mark.slow  # trains, encodes a real corpus or runs processes: in `make test`, not test-fast

ARGS = ["train", "--config", f"{ROOT}/configs/tiny.py:smoke", "--config.num_steps=16", "--config.log_every=1",
        "--config.checkpoint.every=100"]


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_sigterm_saves_the_step_reached_and_resume_equals_uninterrupted(tmp_path):
  from scalingnote_jax.artifacts import trained

  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  run_cli(*ARGS, "--workdir", whole)

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SCALINGNOTE_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "scalingnote_jax.cli", *ARGS, "--workdir", cut], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (os.path.exists(os.path.join(cut, "metrics.jsonl")) and max(losses(cut), default=0) >= 4):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  stopped = max(losses(cut))
  assert 4 <= stopped < 16, stopped
  assert f"step {stopped}: stopped on a preemption notice (SIGTERM) after saving checkpoint {stopped}" in err
  assert sorted(int(s) for s in os.listdir(os.path.join(cut, "checkpoints")) if s.isdigit()) == [stopped]

  run_cli(*ARGS, "--workdir", cut, "--resume")
  want, got = losses(whole), losses(cut)
  assert sorted(got) == list(range(1, 17))
  np.testing.assert_allclose([got[s] for s in range(1, 17)], [want[s] for s in range(1, 17)], rtol=1e-6)
  a, _, _ = trained.load_stage1(whole)
  b, _, _ = trained.load_stage1(cut)
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
