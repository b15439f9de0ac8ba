"""A tower = backbone + pooling + optional projection + L2 normalisation. Prompt templates and lengths are
configuration (`TowerConfig`), applied by the encoder before tokenisation. A cross-encoder reranker is the
same tower over a query-document pair with a projection to one output (with bias) and no normalisation."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from scalingnote_jax.models import BackboneConfig, bert, create_backbone, layers
from scalingnote_jax.models.st_folder import (TOWER_FILE, SentenceTransformersFolder, read_saved_tower,
                                              sentence_transformers_folder)

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
  def default_for(cls, backbone: BackboneConfig, model_dir: str | None = None, *,
                  st: SentenceTransformersFolder | None = None, **overrides) -> TowerConfig:
    """The settings a folder `model_dir` records (`st_folder.TOWER_FILE`, written by export: exactly), else
    what its sentence-transformers files say (pooling, length, Dense, Normalize, prompts; `st`: the folder as
    the caller read it already), else the defaults: decoders last-token pooling with EOS, BERT mean pooling."""
    saved = read_saved_tower(model_dir) if model_dir else None
    if saved is not None:
      unknown = set(saved) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f"{model_dir}/{TOWER_FILE}: unknown field(s) {sorted(unknown)}")
      return dataclasses.replace(cls(**saved), **overrides)
    if st is None and model_dir:
      st = sentence_transformers_folder(model_dir)
    if isinstance(backbone, bert.BertConfig):
      fields = st.fields if st else {}
      base = cls(**{"pooling": "mean", "append_eos": False, "document_prompt": "{title} {text}", **fields,
                    "max_length": min(fields.get("max_length") or 512, backbone.max_position_embeddings)})
    elif st is not None and st.modules:  # the tokenizer's own template does what the folder's users get
      base = cls(**{"pooling": "last", "append_eos": False, **st.fields})
    else:
      base = cls(pooling="last", append_eos=True)
    return dataclasses.replace(base, **overrides)


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
