"""Checkpoint import (and export): a declarative table from checkpoint tensor names to NNX parameter paths.

A table is a tuple of `(checkpoint_name, module_path, transpose)` rows; `{i}` in both names stands for the
layer index. `load_params` creates the module abstractly (no memory), then reads one tensor at a time from
the checkpoint, transposes it, checks its shape against the parameter and places it on device, so a large
checkpoint never sits twice in memory. Missing, unexpected and mis-shaped tensors are errors naming the
tensor and the file. `save_params` runs the same table the other way (export to a HF folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from flax import nnx

Table = tuple[tuple[str, str, bool], ...]


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: names the file and the tensor."""


class TensorReader(Protocol):
  source: str  # the file or directory, for error messages

  def names(self) -> set[str]: ...

  def get(self, name: str) -> np.ndarray | jax.Array: ...


class SafetensorsReader:
  """Reads tensors lazily from `model.safetensors` or a sharded `model.safetensors.index.json`."""

  def __init__(self, model_dir: str):
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
    elif os.path.exists(single):
      files = None
    else:
      raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    self.source = model_dir
    self._handles = {}
    self._open = lambda fn: safe_open(fn, framework="flax")  # "np" cannot read bfloat16
    if files is None:
      handle = self._handle(single)
      files = {name: single for name in handle.keys()}
    self._files = files

  def _handle(self, fn):
    if fn not in self._handles:
      if not os.path.exists(fn):
        raise CheckpointError(f"{self.source}: shard {os.path.basename(fn)} named in the index is missing")
      self._handles[fn] = self._open(fn)
    return self._handles[fn]

  def names(self) -> set[str]:
    return set(self._files)

  def get(self, name: str):
    # Read into host memory, never onto an accelerator first.
    with jax.default_device(jax.devices("cpu")[0]):
      return self._handle(self._files[name]).get_tensor(name)


def expand_table(table: Table, num_layers: int, prefix: str = "") -> dict[str, tuple[str, bool]]:
  """Rows with `{i}` become one row per layer; `prefix` is prepended to checkpoint names."""
  out = {}
  for ckpt_name, path, transpose in table:
    layers = range(num_layers) if "{i}" in ckpt_name else [None]
    for i in layers:
      out[prefix + ckpt_name.format(i=i)] = (path.format(i=i), transpose)
  return out


def detect_prefix(names: set[str], probe: str, candidates: tuple[str, ...], source: str) -> str:
  """Which of `candidates` (e.g. '' or 'model.') the checkpoint puts before the table's names."""
  for prefix in candidates:
    if prefix + probe in names:
      return prefix
  raise CheckpointError(f"{source}: tensor {probe!r} not found under any prefix {candidates}; "
                        f"is this the right architecture? First tensors: {sorted(names)[:5]}")


def load_params(create: Callable[[], nnx.Module], rows: dict[str, tuple[str, bool]], reader: TensorReader,
                ignore: Callable[[str], bool] = lambda name: False,
                sharding: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None) -> nnx.Module:
  """Builds `create()` with every parameter read from `reader` through `rows` (see `expand_table`).

  `ignore(name)` marks checkpoint tensors the model knowingly does not use (e.g. a BERT pooler).
  `sharding(shape, logical_axes)` gives each parameter's target sharding (`sharding.param_sharding_fn`);
  default: the default device.
  """
  abstract = nnx.eval_shape(create)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  params = {".".join(map(str, path)): (path, var) for path, var in flat.items()}

  unknown_paths = sorted(p for p, _ in rows.values() if p not in params)
  if unknown_paths:  # a bug in the table, not in the checkpoint
    raise CheckpointError(f"import table names module paths that do not exist: {unknown_paths[:5]}")
  unmapped = sorted(set(params) - {p for p, _ in rows.values()})
  if unmapped:
    raise CheckpointError(f"import table leaves model parameters without a tensor: {unmapped[:5]}")
  available = reader.names()
  missing = sorted(set(rows) - available)
  if missing:
    raise CheckpointError(f"{reader.source}: missing tensor(s) {missing[:5]}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  extra = sorted(n for n in available - set(rows) if not ignore(n))
  if extra:
    raise CheckpointError(f"{reader.source}: unexpected tensor(s) {extra[:5]}"
                          + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                          + " (unknown to the import table for this architecture)")

  values = {}
  for name, (path, transpose) in rows.items():
    key, var = params[path]
    x = np.asarray(reader.get(name))  # host memory; zero-copy for CPU jax arrays
    if transpose:
      x = x.T
    if tuple(x.shape) != tuple(var.shape):
      raise CheckpointError(f"{reader.source}: tensor {name!r} has shape {tuple(x.shape)}"
                            f"{' (transposed)' if transpose else ''}, model parameter {path} expects "
                            f"{tuple(var.shape)}")
    target = sharding(tuple(var.shape), var.get_metadata().get("out_sharding")) if sharding is not None else None
    values[key] = jax.device_put(x.astype(var.dtype), target)
    del x
  for key, var in flat.items():
    var.set_value(values[key])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_params(module: nnx.Module, rows: dict[str, tuple[str, bool]], path: str) -> None:
  """Writes `module`'s parameters as the checkpoint tensors `rows` name (an import table run in reverse) into
  one safetensors file, float32 as torch lays it out; a parameter the table leaves out is an error."""
  from safetensors.numpy import save_file

  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  unmapped = sorted(set(flat) - {p for p, _ in rows.values()})
  if unmapped:
    raise CheckpointError(f"export table leaves model parameters out: {unmapped[:5]}")
  tensors = {}
  for name, (param_path, transpose) in rows.items():
    x = np.asarray(jax.device_get(flat[param_path][...]), np.float32)
    tensors[name] = np.ascontiguousarray(x.T if transpose else x)
  save_file(tensors, path, metadata={"format": "pt"})
