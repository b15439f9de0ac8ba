"""Backbones (decoder LLM, BERT), their checkpoint import, tokenizers and towers.

`load_backbone(path)` reads a HF model directory (by `config.json`'s model_type) or a llama GGUF file.
"""

from __future__ import annotations

import json
import os

from flax import nnx

from scalingnote_jax.models import bert, llm
from scalingnote_jax.models.checkpoint import CheckpointError, SafetensorsReader, detect_prefix, load_params

BackboneConfig = llm.LLMConfig | bert.BertConfig


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
  if path.endswith(".gguf"):
    from scalingnote_jax.models.gguf import GGUFFile

    return GGUFFile(path).config(**overrides)
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
  """Backbone module with the checkpoint's weights; `overrides` replace config fields (e.g. dtype)."""
  cfg = backbone_config(path, **overrides)
  create = lambda: create_backbone(cfg, nnx.Rngs(0))  # noqa: E731
  if path.endswith(".gguf"):
    from scalingnote_jax.models.gguf import GGUFFile

    reader = GGUFFile(path)
    return load_params(create, llm.hf_rows(cfg, "model."), reader, llm.hf_ignored, sharding), cfg
  reader = SafetensorsReader(path)
  if isinstance(cfg, bert.BertConfig):
    prefix = detect_prefix(reader.names(), bert.HF_TABLE[0][0], ("", "bert."), path)
    return load_params(create, bert.hf_rows(cfg, prefix), reader, bert.hf_ignored, sharding), cfg
  prefix = detect_prefix(reader.names(), llm.HF_TABLE[0][0], ("", "model."), path)
  return load_params(create, llm.hf_rows(cfg, prefix), reader, llm.hf_ignored, sharding), cfg
