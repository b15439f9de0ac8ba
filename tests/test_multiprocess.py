"""Multi-process on loopback through launch/local.sh: Stage 1 as 2 processes gives the per-step losses,
evaluation and final parameters of 1 process with the same devices in all; one process SIGKILLed mid-run
and both restarted with --resume match the uninterrupted run; encoding a corpus with 2 processes writes
the same embeddings as 1.

Each process has two CPU devices and the mesh is data=2 x fsdp=2: the data axis crosses processes (as hosts
do), fsdp stays within one. (A data=4 mesh over 2 x 2 devices gives the same losses but ~24 s per step in
XLA:CPU's gloo all-reduce here, against ~0.7 s for data=2 x fsdp=2: see BENCHMARKS.md.)"""

import contextlib
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

from helpers import ROOT

pytestmark = pytest.mark.slow  # trains, encodes a real corpus or runs processes: in `make test`, not test-fast

STEPS, EVERY, KILL_AFTER = 8, 2, 4
PROCESSES, DEVICES, MESH = "2", "2", "--config.mesh=(2,2,1)"  # 2 processes x 2 devices == 1 process x 4
LAUNCH = os.path.join(ROOT, "launch", "local.sh")


def env(**extra):
  # Devices come from SCALINGNOTE_CPU_DEVICES. No persistent compilation cache: every hang of these 2-process
  # runs seen so far (both processes stuck in a gloo all-gather; twice in CI, once in a loaded repro) had the
  # session's shared cache, none of 6 loaded runs without it; other loaded runs with it passed, so this is a
  # precaution, not a found cause (BENCHMARKS.md, multi-process notes).
  e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  # PYTHONFAULTHANDLER: a process sent SIGABRT prints every thread's Python stack (what `run` does on a timeout)
  return {**e, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "JAX_PLATFORMS": "cpu", **extra}


def cli(*args):
  return [sys.executable, "-m", "scalingnote_jax.cli", *args]


def train(workdir, *extra):
  return cli("train", "--config", f"{ROOT}/configs/tiny.py:smoke", "--workdir", str(workdir),
             f"--config.num_steps={STEPS}", f"--config.checkpoint.every={EVERY}", "--config.log_every=1",
             f"--config.eval.every={STEPS}", "--config.eval.at_start=False", MESH, *extra)


def run(cmd, timeout=400, **kw):
  """`cmd` to completion; on a timeout, the stacks of every process it started are in the failure message."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    pids = descendants(proc.pid)
    proc.kill()  # first, so that it does not stop the others while they print
    for pid in pids:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGABRT)
    _, stderr = proc.communicate()
    pytest.fail(f"{' '.join(map(str, cmd))} still running after {timeout} s; its processes' stacks:\n{stderr[-20000:]}")
  assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{stderr[-3000:]}"
  return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
  """The python processes started (at any depth) by process `pid`."""
  children = {}
  for p in filter(str.isdigit, os.listdir("/proc")):
    with contextlib.suppress(OSError, IndexError):
      with open(f"/proc/{p}/stat") as f:
        children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
  out, todo = [], [pid]
  while todo:
    for c in children.get(todo.pop(), []):
      todo.append(c)
      with contextlib.suppress(OSError):
        if b"python" in open(f"/proc/{c}/cmdline", "rb").read().split(b"\0")[0]:
          out.append(c)
  return out


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return ({r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
          [r["val/recall_at_10"] for r in rows if "val/recall_at_10" in r])


def final_params(workdir):
  """The last checkpoint's parameters as numpy (whatever devices wrote them)."""
  path, checkpointer = os.path.join(workdir, "checkpoints", str(STEPS), "params"), ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return jax.tree.leaves(checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)))


def pid_of_process(process_id: int, workdir) -> int:
  """The pid of the launched process with SCALINGNOTE_PROCESS_ID=process_id training in `workdir`."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
      with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    except OSError:
      continue
    if str(workdir).encode() in cmdline and f"SCALINGNOTE_PROCESS_ID={process_id}".encode() in environ:
      return int(pid)
  raise LookupError(f"no process {process_id} training in {workdir}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """The reference: one process with all four devices."""
  workdir = tmp_path_factory.mktemp("single") / "run"
  run(train(workdir), env=env(SCALINGNOTE_CPU_DEVICES="4"))
  return workdir


def test_two_processes_equal_one_then_kill_and_resume(single, tmp_path):
  from scalingnote_jax.config import load_config
  from scalingnote_jax.train import stage1

  workdir = tmp_path / "run"
  launcher = subprocess.Popen([LAUNCH, PROCESSES, DEVICES, *train(workdir)], env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
  marker = workdir / "checkpoints" / str(KILL_AFTER)
  deadline = time.time() + 300
  while not marker.exists() and launcher.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  os.kill(pid_of_process(1, workdir), signal.SIGKILL)
  _, err = launcher.communicate(timeout=60)  # peers stuck in a collective are SIGKILLed after 10 s
  assert launcher.returncode != 0, f"the run finished before it could be killed:\n{err[-2000:]}"
  steps_on_disk = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps_on_disk and max(steps_on_disk) < STEPS

  with pytest.raises(FileExistsError, match="already holds checkpoints"):  # without --resume: refused, untouched
    stage1.train(load_config(f"{ROOT}/configs/tiny.py:smoke"), str(workdir))
  run([LAUNCH, PROCESSES, DEVICES, *train(workdir, "--resume")], env=env())

  (want, want_val), (got, got_val) = metrics(single), metrics(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))  # every step logged once, by process 0 only
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], atol=1e-5)
  assert len(got_val) == 1 and got_val == pytest.approx(want_val, abs=1e-6)  # evaluation over both processes
  for a, b in zip(final_params(workdir), final_params(single)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_two_processes_encode_the_same_corpus_as_one(single, tmp_path):
  from scalingnote_jax.data import synthetic
  from scalingnote_jax.artifacts.store import load_embeddings

  data = synthetic.generate(40, queries_per_doc=1, seed=3)
  beir_dir = tmp_path / "beir"
  beir_dir.mkdir()
  with open(beir_dir / "corpus.jsonl", "w") as f:
    for doc_id, doc in data.corpus.items():
      f.write(json.dumps({"_id": doc_id, **doc}) + "\n")
  encode = lambda out: cli("encode", "--checkpoint", str(single), "--data", str(beir_dir), "--out", str(out),  # noqa: E731
                           "--chunk-size=8", "--batch-size=4")
  run(encode(tmp_path / "one"), env=env(SCALINGNOTE_CPU_DEVICES="4"))
  run([LAUNCH, PROCESSES, DEVICES, *encode(tmp_path / "two")], env=env())
  ids_one, emb_one = load_embeddings(str(tmp_path / "one"))
  ids_two, emb_two = load_embeddings(str(tmp_path / "two"))
  assert ids_two == ids_one == list(data.corpus)
  assert sorted(os.listdir(tmp_path / "two" / "done")) == sorted(map(str, range(5)))  # 40 docs / 8
  np.testing.assert_allclose(emb_two, emb_one, atol=1e-5)
