"""Checkpoints: a refused run writes nothing, restoring onto a different mesh shape works, a non-finite loss or
update stops the run before it is saved, and the towers are rebuilt from a workdir alone. (A run SIGKILLed mid-way and
resumed equals an uninterrupted one: tests/test_multiprocess.py.)"""

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT

pytestmark = pytest.mark.slow  # trains, encodes a real corpus or runs processes: in `make test`, not test-fast


def test_refused_runs_leave_the_workdir_intact_and_resume_onto_a_different_mesh(tmp_path, monkeypatch):
  from scalingnote_jax.config import load_config
  from scalingnote_jax.artifacts import trained
  from scalingnote_jax.train import stage1

  monkeypatch.chdir(tmp_path)  # a relative --workdir, as users type it
  workdir = tmp_path / "run"

  cfg = lambda **kw: load_config(f"{ROOT}/configs/tiny.py:smoke", [f"--config.{k}={v}" for k, v in kw.items()])  # noqa: E731
  stage1.train(cfg(num_steps=3, mesh=(8, 1, 1), log_every=1), "run")
  saved = (workdir / "config.json").read_bytes()
  # a second run without --resume, and a --resume that would change the model, are refused before writing
  with pytest.raises(FileExistsError, match="pass --resume"):
    stage1.train(cfg(num_steps=3, **{"tower.pooling": "mean"}), "run")
  with pytest.raises(ValueError, match=r"config\.json: --resume with a different configuration \(loss\.temperature: "
                                       r"0\.05 -> 0\.5; tower\.pooling: 'last' -> 'mean'\)"):
    stage1.train(cfg(num_steps=5, **{"tower.pooling": "mean", "loss.temperature": 0.5}), "run", resume=True)
  assert (workdir / "config.json").read_bytes() == saved and not (workdir / "resumes.jsonl").exists()

  # longer, on another mesh: allowed, and recorded; a metrics line torn by a kill does not block it
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/lo')
  out = stage1.train(cfg(num_steps=5, mesh=(2, 2, 2), log_every=1), "run", resume=True)
  assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()] == [1, 2, 3, 4, 5]
  assert [h["step"] for h in out["history"]] == [4, 5]
  resumes = [json.loads(line) for line in (workdir / "resumes.jsonl").open()]
  assert resumes == [{"step": 3, "time": resumes[0]["time"], "changed": {"mesh": [[8, 1, 1], [2, 2, 2]],
                                                                         "num_steps": [3, 5]}}]
  kernel = out["model"].query.backbone.layers[0].mlp.up.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  # what later stages load: the towers of the latest checkpoint, rebuilt from the workdir alone
  model, tok, saved_cfg = trained.load_stage1("run")
  assert saved_cfg.num_steps == 5 and tok.eos_id == 2
  np.testing.assert_array_equal(np.asarray(model.doc.backbone.embed[...]),
                                np.asarray(out["model"].doc.backbone.embed[...]))
  assert np.isfinite(out["history"][-1]["loss"])


def test_a_non_finite_update_stops_the_run_before_it_is_saved(tmp_path):
  """lr 1e30: the loss of a step (computed before its update) is still finite when the update has already
  made the parameters non-finite; the guard checks what a checkpoint would save."""
  from scalingnote_jax.config import load_config
  from scalingnote_jax.artifacts import trained
  from scalingnote_jax.train import stage1

  cfg = load_config(f"{ROOT}/configs/tiny.py:smoke", ["--config.num_steps=12", "--config.optim.lr=1e30",
                                                       "--config.checkpoint.every=1", "--config.log_every=1",
                                                       "--config.checkpoint.keep=20", "--config.mesh=(8,1,1)"])
  with pytest.raises(FloatingPointError, match=r"stopped, nothing of this step saved\. The last good checkpoint "
                                               r"\(step (\d+)\)") as err:
    stage1.train(cfg, str(tmp_path))
  last = int(re.search(r"checkpoint \(step (\d+)\)", str(err.value)).group(1))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved and saved[-1] == last
  for step in saved:  # every checkpoint loads, and holds finite parameters
    model, _, _ = trained.load_stage1(str(tmp_path), step=step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_a_failed_background_save_stops_with_the_directory_and_the_last_complete_step(tmp_path):
  """A save that fails while written in the background (here: a file-size limit, as a full disk does) is
  reported at the next wait as one CheckpointWriteError naming the directory and the last complete step, which
  still restores."""
  import resource
  import signal

  from scalingnote_jax.artifacts.checkpoint import Checkpointer, CheckpointWriteError

  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  small = {"w": jax.numpy.arange(8.0)}
  ckpt.save(1, small, small, {"step": 1})
  ckpt.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
  try:
    big = {"w": jax.numpy.asarray(np.random.default_rng(0).normal(size=1 << 20), jax.numpy.float32)}  # 4 MB
    ckpt.save(2, big, big, {"step": 2})
    with pytest.raises(CheckpointWriteError, match=re.escape(str(tmp_path / "checkpoints")) +
                       r": a checkpoint could not be written \(.*File too large.*\); the last complete checkpoint "
                       r"is step 1\. Free space"):
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  params, _, _ = ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small))
  np.testing.assert_array_equal(params["w"], np.arange(8.0))
  ckpt.close()


def test_a_checkpoint_changed_on_disk_is_refused_naming_its_step(tmp_path):
  """Each step records checksums of what it holds (computed where the arrays live, equal on any mesh) and a
  restore verifies them: a step whose parameters were replaced by another step's (well-formed, other values)
  and a step with flipped bytes are both refused naming the step directory, never loaded."""
  import shutil

  from jax.sharding import NamedSharding, PartitionSpec
  from scalingnote_jax.artifacts.checkpoint import Checkpointer, CheckpointCorruptError

  mesh = jax.make_mesh((8,), ("x",))
  rng = np.random.default_rng(0)
  tree = lambda: {"w": jax.device_put(rng.normal(size=(64, 128)).astype(np.float32),  # noqa: E731
                                      NamedSharding(mesh, PartitionSpec("x"))),
                  "n": jax.numpy.asarray(rng.integers(0, 9, size=(5,)), jax.numpy.int32),
                  "h": jax.numpy.asarray(rng.normal(size=(4, 6)), jax.numpy.bfloat16)}
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), keep=5)
  saved = {step: (tree(), tree()) for step in (1, 2, 3)}
  for step, (params, opt_state) in saved.items():
    ckpt.save(step, params, opt_state, {"step": step})
  ckpt.wait()
  # saved sharded over 8 devices, restored onto one: the checksums agree, the values are the saved ones
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved[1][0])
  params, opt_state, data = ckpt.restore(3, abstract, abstract)
  assert data == {"step": 3}
  for got, want in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves(saved[3])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  # step 2's parameters replaced by step 1's: a well-formed checkpoint of other values
  shutil.rmtree(directory / "2" / "params")
  shutil.copytree(directory / "1" / "params", directory / "2" / "params")
  with pytest.raises(CheckpointCorruptError, match=re.escape(f"{directory}/2: params ") + r".* does not match the "
                     r"checksum recorded when step 2 was saved .*; the checkpoint before it is step 1 \(remove "):
    ckpt.restore(2, abstract)
  # bytes flipped in the largest file of step 3's optimizer state: unreadable or not matching, refused either way
  files = [os.path.join(d, f) for d, _, names in os.walk(directory / "3" / "opt_state") for f in names]
  victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, "rb").read())
  data[len(data) // 2: len(data) // 2 + 40] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 40])
  open(victim, "wb").write(bytes(data))
  with pytest.raises(CheckpointCorruptError, match=re.escape(f"{directory}/3: ")):
    ckpt.restore(3, abstract, abstract)
  np.testing.assert_array_equal(np.asarray(ckpt.restore(3, abstract)[0]["w"]), np.asarray(saved[3][0]["w"]))
  ckpt.close()


def test_pruning_a_finished_run_keeps_its_latest_checkpoint_only(tmp_path):
  """`checkpoint.prune` (a pipeline stage once it is done): every step but the latest complete one is deleted,
  the latest still restores, a save in progress is not a step; each step is renamed aside before it is deleted,
  and what a crash left aside (no step to orbax) goes with the next prune."""
  from scalingnote_jax.artifacts.checkpoint import Checkpointer, prune

  directory = tmp_path / "checkpoints"
  assert prune(str(directory)) == []  # (a stage without checkpoints)
  ckpt = Checkpointer(str(directory), keep=3, async_save=False)
  tree = lambda step: {"w": jax.numpy.full(4, float(step))}  # noqa: E731
  for step in (2, 4, 6):
    ckpt.save(step, tree(step), tree(step), {"step": step})
  ckpt.close()
  (directory / "8.orbax-checkpoint-tmp-1").mkdir()  # a save a kill interrupted: never a step
  (directory / ".2.pruned").mkdir()  # what a crash mid-prune left
  assert prune(str(directory)) == [2, 4]
  assert sorted(os.listdir(directory)) == ["6", "8.orbax-checkpoint-tmp-1"]
  assert prune(str(directory)) == []
  ckpt = Checkpointer(str(directory), keep=3)
  assert ckpt.manager.all_steps() == [6]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree(6))
  params, opt_state, data = ckpt.restore(6, abstract, abstract)
  assert data == {"step": 6} and np.asarray(params["w"]).tolist() == [6.0] * 4
  ckpt.close()


def test_a_full_disk_is_one_line_not_a_wall_of_tracebacks(tmp_path):
  """`scalingnote train` whose checkpoint cannot be written (a file-size limit, as a full disk): exit 1 with one
  line naming the directory; orbax's per-thread error logs and tensorstore's tracebacks for every pending write
  (~500 lines) are kept for --debug."""
  import resource
  import signal
  import subprocess
  import sys

  def limited():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SCALINGNOTE_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "scalingnote_jax.cli", "train", "--config",
                        f"{ROOT}/configs/tiny.py:smoke", "--workdir", str(tmp_path / "run"), "--config.num_steps=4",
                        "--config.checkpoint.every=2"], env=env, capture_output=True, text=True, preexec_fn=limited,
                       timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("stage1:")]  # (progress)
  assert len(lines) == 1 and re.fullmatch(re.escape(f"scalingnote: error: {tmp_path}/run/checkpoints: a checkpoint "
                                                    "could not be written (") + r".*File too large.*no checkpoint is "
                                          r"complete\. Free space .*", lines[0]), out.stderr[-3000:]
