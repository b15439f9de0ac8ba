"""Checkpoints: restoring onto a different mesh shape works, a non-finite loss stops the run and leaves the
last good checkpoint intact, and the towers are rebuilt from a workdir alone. (A run SIGKILLed mid-way and
resumed equals an uninterrupted one: tests/test_multiprocess.py.)"""

import jax
import numpy as np
import pytest

from conftest import ROOT


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
