"""Device mesh over (data, fsdp, tensor) and logical-axis sharding rules.

Parameters carry logical axis names (models/layers.py); a config's `rules` map them to mesh axes. Parameters
are created already sharded: the module is built abstractly (`eval_shape`), its shardings derived from the
names, and the real initialisation runs under jit with those `out_shardings`, so no host ever holds a whole
parameter set. Checkpoint import places each tensor straight into its sharding (`load_params(sharding=)`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits parameters
# Logical parameter/activation axis -> mesh axis (or None: replicated). FSDP over `fsdp`, TP over `tensor`.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("positions", None),
    ("proj", None),
)
log = logging.getLogger(__name__)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices of all processes; one entry may be -1 (filled in)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {tuple(shape)}: need {len(MESH_AXES)} positive sizes {MESH_AXES}, at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_batch(mesh: Mesh, batch_size: int, field: str = "batch_size") -> None:
  """Refuses a global batch that the mesh's batch axes cannot split evenly (before a run writes anything)."""
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % n:
    raise ValueError(f"{field}={batch_size}: not divisible by the {n} devices of the batch axes {BATCH_AXES} "
                     f"({describe(mesh)}); use a multiple of {n}")


def describe(mesh: Mesh) -> str:
  """One line for the logs: the mesh's axis sizes and what it spans."""
  axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  devices = f"{mesh.devices.size} {mesh.devices.flat[0].platform} devices"
  return f"mesh {axes} over {devices}, {jax.process_count()} process(es)"


def logical_sharding(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: Mesh, rules) -> NamedSharding:
  """The mesh sharding of one array with logical `axes`. A dimension its mesh axes do not divide evenly is
  replicated instead (logged), so odd vocabularies (BERT's 30522) still load on any mesh."""
  if axes is None:
    return NamedSharding(mesh, P())
  rules = tuple((name, tuple(m) if isinstance(m, list) else m) for name, m in rules)  # from JSON configs
  spec = nn.logical_to_mesh_axes(tuple(axes), rules)
  fixed = []
  for dim, entry in zip(shape, spec):
    names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    size = math.prod(mesh.shape[n] for n in names)
    if size > 1 and dim % size:
      log.info("dimension %d (%s) is not divisible by mesh axes %s=%d: replicated", dim, axes, names, size)
      entry = None
    fixed.append(entry)
  return NamedSharding(mesh, P(*fixed))


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> nnx.State:
  """Shardings for every variable of an (abstract) NNX state, from its `out_sharding` logical names."""
  def one(var):
    return var.replace(logical_sharding(var.shape, var.get_metadata().get("out_sharding"), mesh, rules))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(create: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
  """Builds `create()` with every parameter initialised directly in its sharding (never whole on a host)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def optimizer_shardings(tx, params, mesh: Mesh):
  """Shardings of `tx`'s state for `params` (arrays or abstract): moments follow their parameter, counters
  and other scalars are replicated. (`jit(tx.init)` alone would put the zero-initialised moments on one
  device, since they do not depend on the parameters' values.)"""
  import optax

  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def abstract_optimizer(tx, params, mesh: Mesh):
  """ShapeDtypeStructs of `tx.init(params)` carrying optimizer_shardings: a restore target, nothing allocated."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(tx.init, params), optimizer_shardings(tx, params, mesh))


def init_optimizer(tx, params, mesh: Mesh):
  """`tx.init(params)`, created already in its shardings (optimizer_shardings)."""
  return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)


def param_sharding_fn(mesh: Mesh, rules) -> Callable[[str, tuple], NamedSharding]:
  """For `load_params(sharding=...)`: places each imported tensor straight into its mesh sharding."""
  return lambda shape, axes: logical_sharding(shape, axes, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes (works across processes)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
