"""Orbax checkpoints of a training run: parameters, optimizer state and the data iterator's state.

Saves are asynchronous (training continues while arrays are written) and every process writes its own
shards. Restoring takes an abstract tree with the target shardings, so a run can resume on a different
mesh. A step directory is complete only once orbax has committed it; a save interrupted by a crash is
ignored on restart and the previous step is used. A save that fails in the background (a full disk) stops
the run at the next save or wait with CheckpointWriteError, naming the directory and the last complete step.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointWriteError(RuntimeError):
  """An asynchronous save failed; the checkpoints committed before it are intact."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),  # orbax refuses relative paths
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, data_state: dict) -> None:
    with self.reporting_failed_saves():  # orbax first waits for the previous save, and raises its error
      self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      opt_state=ocp.args.StandardSave(opt_state),
                                                      data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_params, abstract_opt_state=None):
    """(params, opt_state, data_state). Abstract trees hold ShapeDtypeStructs with the shardings to restore
    into; without `abstract_opt_state` only the parameters are read (for encoding, export, distillation)."""
    items = dict(params=ocp.args.StandardRestore(abstract_params))
    if abstract_opt_state is not None:
      items.update(opt_state=ocp.args.StandardRestore(abstract_opt_state), data=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out.params, out.get("opt_state"), out.get("data")

  def wait(self) -> None:
    with self.reporting_failed_saves():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def reporting_failed_saves(self):
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- orbax raises whatever its writer raised (ValueError, OSError...)
      last = self.manager.latest_step()
      kept = f"the last complete checkpoint is step {last}" if last is not None else "no checkpoint is complete"
      raise CheckpointWriteError(f"{self.manager.directory}: a checkpoint could not be written ({e}); {kept}. Free "
                                 "space (or fix the cause) and rerun with --resume") from e

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def fingerprint(params) -> str:
  """A content hash of a parameter tree (paths, shapes, dtypes and exact values): equal for the same
  weights on any mesh and any number of processes. Bundles use it to tie a student and a document index to
  the teacher they came from. Reads one leaf at a time onto the host."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape};".encode())
    h.update(x.tobytes())
  return h.hexdigest()[:32]
