"""Orbax checkpoints of a training run: parameters, optimizer state and the data iterator's state.

Saves are asynchronous (training continues while arrays are written) and every process writes its own
shards. Restoring takes an abstract tree with the target shardings, so a run can resume on a different
mesh. A step directory is complete only once orbax has committed it; a save interrupted by a crash is
ignored on restart and the previous step is used.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """(state, data_state); `abstract_state` holds ShapeDtypeStructs with the shardings to restore into."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
