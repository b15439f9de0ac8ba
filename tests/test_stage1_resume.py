"""Checkpoints: a training process SIGKILLed mid-run and resumed matches an uninterrupted run (per-step
losses and final parameters); restoring onto a different mesh shape works; a workdir is never clobbered."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT

STEPS, EVERY, KILL_AFTER = 16, 4, 8


def command(workdir, *extra):
  return [sys.executable, "-m", "scalingnote_jax.cli", "train", "--config", f"{ROOT}/configs/tiny.py:smoke",
          "--workdir", str(workdir), f"--config.num_steps={STEPS}", f"--config.checkpoint.every={EVERY}",
          "--config.log_every=1", *extra]


def env():
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONUNBUFFERED": "1"}


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def final_params(workdir):
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(STEPS), "params"))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(command(straight), env=env(), check=True, capture_output=True, timeout=300)

  proc = subprocess.Popen(command(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = killed / "checkpoints" / str(KILL_AFTER)
  deadline = time.time() + 240
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  steps_on_disk = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert steps_on_disk and max(steps_on_disk) < STEPS

  with pytest.raises(subprocess.CalledProcessError):  # without --resume the workdir is refused, untouched
    subprocess.run(command(killed), env=env(), check=True, capture_output=True, timeout=300)
  subprocess.run(command(killed, "--resume"), env=env(), check=True, capture_output=True, timeout=300)

  want, got = losses(straight), losses(killed)
  assert sorted(got) == list(range(1, STEPS + 1))  # every step logged once: no gap, no duplicate
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], atol=1e-6)
  for a, b in zip(final_params(killed), final_params(straight)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_resume_onto_a_different_mesh_and_stop_on_nan(tmp_path, monkeypatch):
  from scalingnote_jax.config import load_config
  from scalingnote_jax.train import stage1

  monkeypatch.chdir(tmp_path)  # a relative --workdir, as users type it
  workdir = "run"

  cfg = lambda **kw: load_config(f"{ROOT}/configs/tiny.py:smoke", [f"--config.{k}={v}" for k, v in kw.items()])  # noqa: E731
  stage1.train(cfg(num_steps=3, mesh=(8, 1, 1), log_every=1), workdir)
  out = stage1.train(cfg(num_steps=5, mesh=(2, 2, 2), log_every=1), workdir, resume=True)
  assert [h["step"] for h in out["history"]] == [4, 5]
  kernel = out["model"].query.backbone.layers[0].mlp.up.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  # what later stages load: the towers of the latest checkpoint, rebuilt from the workdir alone
  model, tok, saved_cfg = stage1.load_trained(workdir)
  assert saved_cfg.num_steps == 5 and tok.eos_id == 2
  np.testing.assert_array_equal(np.asarray(model.doc.backbone.embed[...]),
                                np.asarray(out["model"].doc.backbone.embed[...]))
  assert np.isfinite(out["history"][-1]["loss"])

  # a non-finite loss stops the run with a clear message and leaves the last good checkpoint as it was
  with pytest.raises(FloatingPointError, match=r"step 6: loss is nan; stopped.*step 5"):
    stage1.train(cfg(num_steps=8, log_every=1, **{"loss.temperature": 1e-45}), workdir, resume=True)
  again = stage1.train(cfg(num_steps=6, log_every=1), workdir, resume=True)
  assert [h["step"] for h in again["history"]] == [6] and np.isfinite(again["history"][0]["loss"])
