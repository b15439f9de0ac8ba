"""Orbax checkpoints of a training run: parameters, optimizer state and the data iterator's state.

Saves are asynchronous (training continues while arrays are written) and every process writes its own
shards. Restoring takes an abstract tree with the target shardings, so a run can resume on a different
mesh. A step directory is complete only once orbax has committed it; a save interrupted by a crash is
ignored on restart and the previous step is used. A save that fails in the background (a full disk) stops
the run at the next save or wait with CheckpointWriteError, naming the directory and the last complete step.

Each step also records checksums of what it holds (`checksums`, computed on the devices where the arrays
live, in the same orbax commit), and a restore verifies them: a checkpoint changed on disk after it was saved
is a CheckpointCorruptError naming the step directory, never a silently different model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from scalingnote_jax.artifacts.faults import failpoint


class CheckpointWriteError(RuntimeError):
  """An asynchronous save failed; the checkpoints committed before it are intact."""


class CheckpointCorruptError(ValueError):
  """A checkpoint that cannot be read, or whose contents differ from the checksums recorded when it was saved."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),  # orbax refuses relative paths
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, data_state: dict) -> None:
    sums = dict(params=checksums(params), opt_state=checksums(opt_state))
    with self.reporting_failed_saves():  # orbax first waits for the previous save, and raises its error
      self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      opt_state=ocp.args.StandardSave(opt_state),
                                                      data=ocp.args.JsonSave(data_state),
                                                      checksums=ocp.args.JsonSave(sums)))
    failpoint("checkpoint.save")  # (the arrays are being written in the background)

  def restore(self, step: int, abstract_params, abstract_opt_state=None):
    """(params, opt_state, data_state), verified against the step's checksums. Abstract trees hold
    ShapeDtypeStructs with the shardings to restore into; without `abstract_opt_state` only the parameters
    are read (for encoding, export, distillation)."""
    where = os.path.join(str(self.manager.directory), str(step))
    items = dict(params=ocp.args.StandardRestore(abstract_params))
    if abstract_opt_state is not None:
      items.update(opt_state=ocp.args.StandardRestore(abstract_opt_state), data=ocp.args.JsonRestore())
    recorded = os.path.isdir(os.path.join(where, "checksums"))  # (checkpoints saved before checksums: none)
    if recorded:
      items.update(checksums=ocp.args.JsonRestore())
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- orbax / tensorstore raise many kinds for an unreadable file
      raise CheckpointCorruptError(f"{where}: checkpoint step {step} could not be read ({type(e).__name__}: "
                                   f"{e}); {self.earlier(step, where)}") from e
    for name in ("params", "opt_state") if recorded else ():
      if out.get(name) is not None and (bad := _first_difference(checksums(out[name]), out.checksums[name])):
        raise CheckpointCorruptError(f"{where}: {name} {bad} does not match the checksum recorded when step {step} "
                                     f"was saved (the checkpoint was corrupted or modified); {self.earlier(step, where)}")
    return out.params, out.get("opt_state"), out.get("data")

  def earlier(self, step: int, where: str) -> str:
    older = [s for s in self.manager.all_steps() if s < step]
    return (f"the checkpoint before it is step {max(older)} (remove {where} to resume from that one)" if older
            else "there is no earlier checkpoint")

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


def checksums(tree) -> dict[str, str]:
  """{leaf path: 16 hex digits}: two position-weighted sums of each leaf's bits, modulo 2**32. Each device sums
  the shards it holds (one copy of each: replica 0) and the hosts add the partial sums, so no leaf is gathered
  anywhere (unlike `fingerprint`) and no collective runs. Integer sums do not depend on the order they are
  added in: equal on any mesh and any number of processes; any one changed element changes them."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  partial, spans = [], []
  for _, x in flat:
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    spans.append(not x.is_fully_addressable)  # (else this process holds all of it, e.g. a per-process copy)
    partial.append([_shard_sums(shard.data, np.array([sl.indices(n)[0] for sl, n in zip(shard.index, x.shape)],
                                                     np.uint32), x.shape)
                    for shard in x.addressable_shards if shard.replica_id == 0])
  sums_Lx2 = np.array([np.sum(np.asarray(jax.device_get(p), np.uint64).reshape(-1, 2), axis=0) for p in partial],
                      np.uint64).reshape(-1, 2)
  if any(spans):  # an array over several processes: each summed the shards it holds (every process is here)
    total_Lx2 = np.sum(np.asarray(multihost_utils.process_allgather(sums_Lx2), np.uint64), axis=0)
    sums_Lx2 = np.where(np.array(spans)[:, None], total_Lx2, sums_Lx2)
  sums_Lx2 %= 1 << 32
  return {jax.tree_util.keystr(path): f"{int(a):08x}{int(b):08x}" for (path, _), (a, b) in zip(flat, sums_Lx2)}


@functools.partial(jax.jit, static_argnums=2)
def _shard_sums(x, offsets, global_shape):
  """The two sums over one shard whose first element sits at `offsets` of an array of `global_shape`."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize])
  bits = bits.astype(jnp.uint32)
  if x.dtype.itemsize == 8:  # (two 32-bit words per element: one more dimension)
    global_shape, offsets = (*global_shape, 2), jnp.concatenate([offsets, jnp.zeros(1, jnp.uint32)])
  index = jnp.zeros(bits.shape, jnp.uint32)  # each element's row-major position in the whole array
  for d in range(bits.ndim):
    index = index * jnp.uint32(global_shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) + offsets[d]
  w1 = index * jnp.uint32(2654435761) | jnp.uint32(1)  # odd weights: a changed element always shows
  w2 = (index ^ jnp.uint32(0x9E3779B9)) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
  rotated = (bits << 13) | (bits >> 19)
  return jnp.stack([jnp.sum(bits * w1, dtype=jnp.uint32), jnp.sum(rotated * w2, dtype=jnp.uint32)])


def _first_difference(got: dict[str, str], recorded: dict[str, str]) -> str | None:
  if got.keys() != recorded.keys():
    return f"(leaves {sorted(got.keys() ^ recorded.keys())[:3]})"
  return next((path for path in got if got[path] != recorded[path]), None)


def _host_leaves(params):
  """(leaf path, numpy copy) of each leaf, one at a time (an array over several processes gathered whole)."""
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    yield jax.tree_util.keystr(path), np.ascontiguousarray(np.asarray(x))


def fingerprint(params) -> str:
  """A content hash of a parameter tree (paths, shapes, dtypes and exact values): equal for the same
  weights on any mesh and any number of processes. Bundles use it to tie a student and a document index to
  the teacher they came from. Reads one leaf at a time onto the host."""
  h = hashlib.sha256()
  for path, x in _host_leaves(params):
    h.update(f"{path}:{x.dtype}:{x.shape};".encode())
    h.update(x.tobytes())
  return h.hexdigest()[:32]


def leaf_digests(params) -> dict[str, str]:
  """{leaf path: content hash of that leaf alone (dtype, shape, exact values)}: two leaves with the same hash
  hold the same array, wherever they sit in the tree (`trained.write_base` stores such leaves once)."""
  out = {}
  for path, x in _host_leaves(params):
    h = hashlib.sha256(f"{x.dtype}:{x.shape};".encode())
    h.update(x.tobytes())
    out[path] = "sha256_" + h.hexdigest()
  return out


PRUNED = ".pruned"  # the suffix of a step directory renamed aside to be deleted (no step name: orbax ignores it)


def prune(directory: str) -> list[int]:
  """Deletes every checkpoint in `directory` but the latest complete one, and returns the steps deleted. For a
  run that has finished: the older steps only served to resume it, and every reader loads the latest. Each step
  directory is renamed aside before it is deleted, so a crash leaves each step whole or gone (never a partial
  step that a reader would take for a checkpoint); what a crash left aside is deleted by the next prune."""
  if not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    steps, last = manager.all_steps(), manager.latest_step()
  finally:
    manager.close()
  older = sorted(s for s in steps if s != last)
  for step in older:
    os.rename(os.path.join(directory, str(step)), os.path.join(directory, f".{step}{PRUNED}"))
  for name in os.listdir(directory):
    if name.startswith(".") and name.endswith(PRUNED):
      shutil.rmtree(os.path.join(directory, name))
  return older
