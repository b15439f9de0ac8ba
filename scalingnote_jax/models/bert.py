"""BERT encoder (absolute positions, token types, post-LayerNorm) for the small query tower, and its HF
import table."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from scalingnote_jax.models import layers
from scalingnote_jax.models.checkpoint import Table, expand_table


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False  # recompute each layer in the backward pass

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> BertConfig:
    if hf.get("model_type") != "bert":
      raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'bert'")
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("config.json: only position_embedding_type='absolute' is supported")
    cfg = cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
              num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
              max_position_embeddings=hf.get("max_position_embeddings", 512),
              type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
              pad_token_id=hf.get("pad_token_id") or 0)
    return dataclasses.replace(cfg, **overrides)

  def to_hf(self) -> dict:
    """The HF config.json of a `BertModel` (`from_hf` reads it back to this config)."""
    return dict(model_type="bert", architectures=["BertModel"], vocab_size=self.vocab_size,
                hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                intermediate_size=self.intermediate_size, hidden_act="gelu", position_embedding_type="absolute",
                max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
                layer_norm_eps=self.layer_norm_eps, pad_token_id=self.pad_token_id, torch_dtype="float32")


class Layer(nnx.Module):
  """Self-attention + GELU MLP, each followed by residual and LayerNorm (post-LN)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    nkw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.q = layers.Dense(e, e, ("embed", "heads"), **kw)
    self.k = layers.Dense(e, e, ("embed", "heads"), **kw)
    self.v = layers.Dense(e, e, ("embed", "heads"), **kw)
    self.o = layers.Dense(e, e, ("heads", "embed"), **kw)
    self.attn_norm = layers.LayerNorm(e, cfg.layer_norm_eps, **nkw)
    self.up = layers.Dense(e, m, ("embed", "mlp"), **kw)
    self.down = layers.Dense(m, e, ("mlp", "embed"), **kw)
    self.mlp_norm = layers.LayerNorm(e, cfg.layer_norm_eps, **nkw)
    self.num_heads = cfg.num_heads

  def __call__(self, x_BxTxE, mask_BxT):
    b, t, e = x_BxTxE.shape
    split = lambda y: y.reshape(b, t, self.num_heads, e // self.num_heads)  # noqa: E731
    ctx = layers.attention(split(self.q(x_BxTxE)), split(self.k(x_BxTxE)), split(self.v(x_BxTxE)), mask_BxT,
                           causal=False)
    x = self.attn_norm(x_BxTxE + self.o(ctx.reshape(b, t, e)))
    return self.mlp_norm(x + self.down(nnx.gelu(self.up(x), approximate=False)))


class Bert(nnx.Module):
  """Token ids [B, T] + padding mask [B, T] (+ token types) -> hidden states [B, T, E]."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    init = nnx.initializers.normal(0.02)
    self.tok_embed = layers.param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
    self.pos_embed = layers.param(rngs, init, (cfg.max_position_embeddings, cfg.hidden_size),
                                  ("positions", "embed"), pdt)
    self.type_embed = layers.param(rngs, init, (cfg.type_vocab_size, cfg.hidden_size), (None, "embed"), pdt)
    self.embed_norm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, ids_BxT, mask_BxT, type_ids_BxT=None):
    t = ids_BxT.shape[1]
    if t > self.cfg.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
    type_ids_BxT = jnp.zeros_like(ids_BxT) if type_ids_BxT is None else type_ids_BxT
    x = self.tok_embed[...][ids_BxT] + self.pos_embed[...][:t][None] + self.type_embed[...][type_ids_BxT]
    x = layers.shard_batch(self.embed_norm(x.astype(self.cfg.dtype)))
    run = layers.maybe_remat(lambda layer, x: layer(x, mask_BxT), self.cfg.remat)
    for layer in self.layers:
      x = layers.shard_batch(run(layer, x))
    return x


# HF tensor name -> module path, transpose. Names are HF `BertModel`'s; `BertFor*` checkpoints put `bert.`
# before them (detected at load).
HF_TABLE: Table = (
    ("embeddings.word_embeddings.weight", "tok_embed", False),
    ("embeddings.position_embeddings.weight", "pos_embed", False),
    ("embeddings.token_type_embeddings.weight", "type_embed", False),
    ("embeddings.LayerNorm.weight", "embed_norm.scale", False),
    ("embeddings.LayerNorm.bias", "embed_norm.bias", False),
    ("encoder.layer.{i}.attention.self.query.weight", "layers.{i}.q.kernel", True),
    ("encoder.layer.{i}.attention.self.query.bias", "layers.{i}.q.bias", False),
    ("encoder.layer.{i}.attention.self.key.weight", "layers.{i}.k.kernel", True),
    ("encoder.layer.{i}.attention.self.key.bias", "layers.{i}.k.bias", False),
    ("encoder.layer.{i}.attention.self.value.weight", "layers.{i}.v.kernel", True),
    ("encoder.layer.{i}.attention.self.value.bias", "layers.{i}.v.bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers.{i}.o.kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers.{i}.o.bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers.{i}.attn_norm.scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers.{i}.attn_norm.bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers.{i}.up.kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers.{i}.up.bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers.{i}.down.kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers.{i}.down.bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers.{i}.mlp_norm.scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers.{i}.mlp_norm.bias", False),
)


def hf_rows(cfg: BertConfig, prefix: str) -> dict[str, tuple[str, bool]]:
  return expand_table(HF_TABLE, cfg.num_layers, prefix)


def hf_ignored(name: str) -> bool:
  """Tensors the encoder knowingly does not use: the pooler, MLM/NSP heads, position_ids buffers."""
  return (name.split(".")[0] in ("pooler", "cls") or name.startswith("bert.pooler.")
          or name.endswith("embeddings.position_ids"))
