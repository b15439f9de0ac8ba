"""Configs are Python files with `get_config(variant: str = "") -> ConfigDict`; `configs/demo.py:smoke`
picks the variant. Any field can be overridden on the command line: `--config.num_docs=64`."""

from __future__ import annotations

import ast
import importlib.util
import os

from ml_collections import ConfigDict


def load_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"{path}: defines no get_config(variant)")
  cfg = module.get_config(variant)
  for item in overrides:
    apply_override(cfg, item, path)
  cfg.lock()
  return cfg


def apply_override(cfg: ConfigDict, item: str, source: str) -> None:
  """`key.sub=value`; the value is a Python literal, or a plain string when it is not one."""
  key, eq, raw = item.removeprefix("--config.").partition("=")
  if not eq:
    raise ValueError(f"override {item!r}: expected --config.field=value")
  *parents, leaf = key.split(".")
  node = cfg
  for name in parents + [leaf]:
    if not isinstance(node, ConfigDict) or name not in node:
      fields = sorted(node.keys()) if isinstance(node, ConfigDict) else []
      raise KeyError(f"{source}: no config field {key!r} (fields here: {', '.join(fields)})")
    if name != leaf:
      node = node[name]
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if old is not None and value is not None and type(old) is not type(value):
    raise TypeError(f"{source}: field {key!r} is {type(old).__name__}, got {raw!r}")
  node[leaf] = value
