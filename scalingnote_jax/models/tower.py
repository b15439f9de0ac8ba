"""A tower = backbone + pooling + optional projection + L2 normalisation. Prompt templates and lengths are
configuration (`TowerConfig`), applied by the encoder before tokenisation. A cross-encoder reranker is the
same tower over a query-document pair with a projection to one output (with bias) and no normalisation."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
from flax import nnx

from scalingnote_jax.models import BackboneConfig, bert, create_backbone, layers

POOLINGS = ("last", "mean", "cls")


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  pooling: str = "last"  # last non-pad token (decoders), mean (BERT), cls
  append_eos: bool = True  # with 'last' pooling the EOS token's state becomes the embedding
  projection_dim: int | None = None  # linear map to this width after pooling
  projection_bias: bool = False
  normalize: bool = True
  max_length: int = 512
  query_prompt: str = "{text}"
  document_prompt: str = "{title}\n{text}"  # an empty title drops its line

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"TowerConfig.pooling={self.pooling!r}: expected one of {POOLINGS}")
    for field in ("query_prompt", "document_prompt"):
      if "{text}" not in getattr(self, field):
        raise ValueError(f"TowerConfig.{field}={getattr(self, field)!r} has no {{text}} slot")

  @classmethod
  def default_for(cls, backbone: BackboneConfig, model_dir: str | None = None, **overrides) -> TowerConfig:
    """Decoders: last-token pooling with EOS; BERT: mean pooling, or what a sentence-transformers folder
    `model_dir` says (`sentence_transformers_folder`: pooling, length, Dense, Normalize, prompts)."""
    if isinstance(backbone, bert.BertConfig):
      st = sentence_transformers_folder(model_dir).fields if model_dir else {}
      base = cls(**{"pooling": "mean", "append_eos": False, "document_prompt": "{title} {text}", **st,
                    "max_length": min(st.get("max_length") or 512, backbone.max_position_embeddings)})
    else:
      base = cls(pooling="last", append_eos=True)
    return dataclasses.replace(base, **overrides)


ST_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")  # sentence_transformers.models.<name>, in this order
IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


@dataclasses.dataclass(frozen=True)
class SentenceTransformersFolder:
  """What a sentence-transformers folder adds to its Transformer: `fields` (TowerConfig fields: pooling,
  max_length, normalize, projection, prompts) and `dense` (the directory of a Dense module's weights)."""
  fields: dict
  dense: str | None = None


def sentence_transformers_folder(model_dir: str) -> SentenceTransformersFolder:
  """Reads a sentence-transformers folder as its `modules.json` lists it. A module this tower cannot
  compute (another type, an activation, a pooling mode) is an error naming it, never dropped: the
  embeddings would silently differ. Without modules.json: `1_Pooling` and `sentence_bert_config.json` if present."""
  def read(*parts):
    fn = os.path.join(model_dir, *parts)
    if not os.path.exists(fn):
      return fn, None
    with open(fn) as f:
      return fn, json.load(f)

  fields, dense = {}, None
  max_length = (read("sentence_bert_config.json")[1] or {}).get("max_seq_length")
  if max_length:
    fields["max_length"] = max_length
  fn, modules = read("modules.json")
  if modules is None:  # a plain HF folder, perhaps with sentence-transformers' side files
    pooling = _pooling_mode(*read("1_Pooling", "config.json"))
    return SentenceTransformersFolder({**fields, **({"pooling": pooling} if pooling else {})})
  kinds = []
  for m in sorted(modules, key=lambda m: m.get("idx", 0)):
    kind = str(m.get("type", "")).rsplit(".", 1)[-1]
    if not str(m.get("type", "")).startswith("sentence_transformers.") or kind not in ST_TYPES:
      raise ValueError(f"{fn}: module {m.get('name')!r} of type {m.get('type')!r} is not supported (supported: "
                       f"{', '.join(ST_TYPES)}); loading the folder without it would change its embeddings")
    kinds.append(kind)
    path = m.get("path", "")
    if kind == "Pooling":
      pfn, pool_cfg = read(path, "config.json")
      fields["pooling"] = _pooling_mode(pfn, pool_cfg or {})
      if (pool_cfg or {}).get("include_prompt") is False:
        raise ValueError(f"{pfn}: include_prompt=false (the prompt's tokens left out of pooling) is not supported")
    elif kind == "Dense":
      dfn, d = read(path, "config.json")
      if d is None or d.get("activation_function", IDENTITY[0]) not in IDENTITY:
        raise ValueError(f"{dfn}: only a linear Dense module (activation Identity) is supported, got "
                         f"{(d or {}).get('activation_function', 'no config.json')!r}")
      if not os.path.exists(os.path.join(model_dir, path, "model.safetensors")):
        raise ValueError(f"{os.path.join(model_dir, path)}: a Dense module's weights are read from "
                         "model.safetensors only (pickled pytorch_model.bin is never loaded)")
      fields.update(projection_dim=d["out_features"], projection_bias=bool(d.get("bias", True)))
      dense = os.path.join(model_dir, path)
  if kinds[:1] != ["Transformer"] or kinds != sorted(kinds, key=ST_TYPES.index) or len(set(kinds)) != len(kinds):
    raise ValueError(f"{fn}: modules {kinds}: expected Transformer, then at most one each of Pooling, Dense, "
                     "Normalize in that order")
  fields["normalize"] = "Normalize" in kinds
  prompts = (read("config_sentence_transformers.json")[1] or {}).get("prompts") or {}
  escape = lambda p: p.replace("{", "{{").replace("}", "}}")  # noqa: E731  (the prompt is a format string)
  if prompts.get("query"):
    fields["query_prompt"] = escape(prompts["query"]) + "{text}"
  document = next((prompts[k] for k in ("document", "passage", "corpus") if prompts.get(k)), "")
  if document:
    fields["document_prompt"] = escape(document) + "{title} {text}"
  return SentenceTransformersFolder(fields, dense)


def _pooling_mode(fn: str, pool: dict | None) -> str | None:
  if not pool:
    return None
  modes = [name for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                                  ("pooling_mode_lasttoken", "last")) if pool.get(key)]
  others = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v and k not in (
      "pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_lasttoken")]
  if len(modes) != 1 or others:
    raise ValueError(f"{fn}: unsupported pooling mode {pool}")
  return modes[0]


def load_dense(tower: "Tower", dense_dir: str) -> None:
  """A sentence-transformers Dense module's weights (torch's linear [out, in]) into the tower's projection."""
  from safetensors.numpy import load_file

  weights = load_file(os.path.join(dense_dir, "model.safetensors"))
  kernel = weights["linear.weight"].T
  if tower.projection is None or kernel.shape != tower.projection.kernel.shape:
    raise ValueError(f"{dense_dir}/model.safetensors: linear.weight {weights['linear.weight'].shape} does not fit "
                     f"the projection {None if tower.projection is None else tower.projection.kernel.shape[::-1]}")
  tower.projection.kernel[...] = jnp.asarray(kernel, tower.projection.kernel.dtype)
  if tower.projection.bias is not None:
    tower.projection.bias[...] = jnp.asarray(weights["linear.bias"], tower.projection.bias.dtype)


def pool(hidden_BxTxE, mask_BxT, how: str):
  """Pools hidden states of right-padded sequences into one vector each (float32)."""
  hidden = hidden_BxTxE.astype(jnp.float32)
  if how == "cls":
    return hidden[:, 0]
  if how == "last":
    last_B = jnp.maximum(mask_BxT.sum(axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last_B[:, None, None], axis=1)[:, 0]
  m = mask_BxT[..., None].astype(jnp.float32)
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


class Tower(nnx.Module):
  """Token ids [B, T] + mask [B, T] -> embeddings [B, D] (float32, unit norm when `normalize`)."""

  def __init__(self, backbone: nnx.Module, cfg: TowerConfig, *, rngs: nnx.Rngs):
    self.backbone, self.cfg = backbone, cfg
    width = backbone.cfg.hidden_size
    self.projection = (layers.Dense(width, cfg.projection_dim, ("embed", "proj"), use_bias=cfg.projection_bias,
                                    dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
                       if cfg.projection_dim else None)

  @classmethod
  def create(cls, backbone_cfg: BackboneConfig, cfg: TowerConfig, rngs: nnx.Rngs) -> Tower:
    """A randomly initialised tower (for training from scratch and for `eval_shape`)."""
    return cls(create_backbone(backbone_cfg, rngs), cfg, rngs=rngs)

  @property
  def dim(self) -> int:
    return self.cfg.projection_dim or self.backbone.cfg.hidden_size

  def __call__(self, ids_BxT, mask_BxT, normalize: bool | None = None):
    """`normalize` overrides the config (distillation's MSE may compare unnormalised student vectors)."""
    return self._embed(self.backbone(ids_BxT, mask_BxT), mask_BxT, normalize)

  def from_trunk(self, trunk_BxTxE, mask_BxT, start: int):
    """The embeddings from a decoder's hidden states after its first `start` blocks (`LLM.trunk`): what a
    step with a frozen trunk's cache runs. Equal to the tower on the token ids those states came from."""
    if not hasattr(self.backbone, "top"):
      raise ValueError(f"{type(self.backbone).__name__}: a trunk cache needs a decoder backbone")
    return self._embed(self.backbone.top(trunk_BxTxE, mask_BxT, start), mask_BxT)

  def _embed(self, hidden_BxTxE, mask_BxT, normalize: bool | None = None):
    emb_BxD = pool(hidden_BxTxE, mask_BxT, self.cfg.pooling)
    if self.projection is not None:
      emb_BxD = self.projection(emb_BxD)
    if self.cfg.normalize if normalize is None else normalize:
      emb_BxD = emb_BxD / jnp.maximum(jnp.linalg.norm(emb_BxD, axis=-1, keepdims=True), 1e-12)
    return emb_BxD
