"""Multi-process start-up: `jax.distributed` from the environment the launch scripts set (launch/).

  SCALINGNOTE_COORDINATOR=host:port SCALINGNOTE_NUM_PROCESSES=N SCALINGNOTE_PROCESS_ID=i
      explicit (launch/local.sh, or any launcher that knows the ranks)
  SCALINGNOTE_DISTRIBUTED=auto
      jax detects the cluster itself: SLURM (launch/slurm_gpu.sbatch), Cloud TPU pod slices
      (launch/tpu_pod.sh), Open MPI, Kubernetes
  SCALINGNOTE_CPU_DEVICES=M
      CPU devices per process (development and tests: N processes x M devices on one machine)

With none of them set everything runs as one process on the local devices. After `initialize()` the
library's code is process-aware: meshes span every process's devices, each process feeds its rows of the
global batch, checkpoints are written and restored collectively, and logs and progress bars come from
process 0 only.
"""

from __future__ import annotations

import logging
import os
import sys

import jax

log = logging.getLogger(__name__)
_ENV = ("SCALINGNOTE_COORDINATOR", "SCALINGNOTE_NUM_PROCESSES", "SCALINGNOTE_PROCESS_ID")
_started = False  # whether initialize() started jax.distributed in this process


def initialize(environ=os.environ) -> None:
  """Starts the multi-controller runtime when the environment asks for it; call before any JAX work."""
  if environ.get("SCALINGNOTE_CPU_DEVICES"):
    jax.config.update("jax_num_cpu_devices", _int(environ, "SCALINGNOTE_CPU_DEVICES"))
  explicit = [k for k in _ENV if environ.get(k)]
  if explicit and len(explicit) != len(_ENV):
    missing = sorted(set(_ENV) - set(explicit))
    raise ValueError(f"multi-process environment: {', '.join(explicit)} set but {', '.join(missing)} missing")
  mode = environ.get("SCALINGNOTE_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise ValueError(f"SCALINGNOTE_DISTRIBUTED={mode!r}: expected 'auto' (or unset)")
  if explicit:
    jax.distributed.initialize(environ["SCALINGNOTE_COORDINATOR"], _int(environ, "SCALINGNOTE_NUM_PROCESSES"),
                               _int(environ, "SCALINGNOTE_PROCESS_ID"))
  elif mode == "auto":
    jax.distributed.initialize()
  else:
    return
  global _started
  _started = True
  log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())


def exit_now_if_distributed(status: int) -> None:
  """In a multi-process run, ends this process at once with `status`. A process that fails should not take the
  normal way out: jax.distributed's exit handler waits for every peer at a shutdown barrier, while a peer blocked
  in a collective that this process will never join cannot come, so the job lingers until the coordination
  service gives up (78 s measured on loopback, 2 processes, instead of 36 s). Exiting without it lets the
  launcher (or the cluster's scheduler) see the failure and stop the others."""
  if _started:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def is_main() -> bool:
  """Process 0: the one that logs, prints and writes the workdir's shared files."""
  return jax.process_index() == 0


def _int(environ, key: str) -> int:
  try:
    return int(environ[key])
  except ValueError:
    raise ValueError(f"{key}={environ[key]!r}: expected an integer") from None
