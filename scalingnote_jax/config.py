"""Configs are Python files with `get_config(variant: str = "") -> ConfigDict`; `configs/demo.py:smoke`
picks the variant. Any field can be overridden on the command line: `--config.num_docs=64`.

A spec that is not an existing file names a config shipped with the package (the repository's `configs/`,
installed as `scalingnote_jax.configs`): `demo`, `demo.py` and `configs/demo.py` all find it."""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import os

from ml_collections import ConfigDict


def resolve_config_path(path: str) -> str:
  """`path` itself when it exists, else the packaged config of that name."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  packaged = importlib.resources.files("scalingnote_jax.configs") / name
  if os.path.dirname(path) in ("", "configs") and packaged.is_file():
    return str(packaged)
  shipped = sorted(f.name[:-3] for f in importlib.resources.files("scalingnote_jax.configs").iterdir()
                   if f.name.endswith(".py") and "def get_config" in f.read_text())
  raise FileNotFoundError(f"{path}: no such config file, and no packaged config of that name "
                          f"(packaged: {', '.join(shipped)})")


def load_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
  path, _, variant = spec.partition(":")
  path = resolve_config_path(path)
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
