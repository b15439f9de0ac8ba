"""scalingnote_jax: LLM-scale dense retrieval in JAX/Flax.

Importing the package applies the library's XLA:CPU defaults (`XLA_CPU_DEFAULTS`) to the `XLA_FLAGS`
environment variable, before JAX creates its CPU backend:

- `--xla_cpu_experimental_ynn_fusion_type=-reduce`: jaxlib 0.10's CPU backend hands dots to YNNPACK together
  with neighbouring elementwise ops *and reductions*, so each BERT output projection became one YNNPACK graph
  "dot + bias + residual + LayerNorm" (and softmax went to YNNPACK too); those fused graphs were the slowest
  part of the encoder. Leaving reductions (LayerNorm, softmax) to XLA's own fusions gave the BERT encoder
  ~1.1-1.2x throughput at batch >= 32 x 128 tokens on a 2-core CPU (small batches unchanged); a BERT training
  step was unchanged and the decoder LLM forward 0-7% slower (BENCHMARKS.md). Only float rounding changes.

The defaults never override the user: a flag already named in `XLA_FLAGS` is left as it is, and
`SCALINGNOTE_XLA_DEFAULTS=0` turns the defaults off. They only take effect if JAX's backend has not been
initialised yet (import scalingnote_jax before running any JAX computation), and are applied only on the
jaxlib versions whose XLA is known to accept them (XLA aborts on unknown flags): 0.10.x and 0.12.x (0.11 was
never run here). On jaxlib 0.12 and an Intel Xeon (family 6) host the flag measured 34.7 / 36.4 seq/s against
31.9 / 35.0 without it, and 1x32 latency 10.6 / 9.9 ms against 20.7 / 11.1 (BENCHMARKS.md): no loss, so kept.
"""

from __future__ import annotations

import os
import sys

XLA_CPU_DEFAULTS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "-reduce"}


def _apply_xla_cpu_defaults() -> None:
  if os.environ.get("SCALINGNOTE_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
    return
  try:
    from importlib.metadata import version

    if not version("jaxlib").startswith(("0.10.", "0.12.")):
      return
  except Exception:  # noqa: BLE001  (jaxlib missing or unreadable metadata: leave XLA alone)
    return
  xb = sys.modules.get("jax._src.xla_bridge")
  if xb is not None and getattr(xb, "backends_are_initialized", lambda: False)():
    return  # too late: XLA has already read XLA_FLAGS
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in XLA_CPU_DEFAULTS.items() if name not in flags]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([flags.strip(), *extra]).strip()


_apply_xla_cpu_defaults()
