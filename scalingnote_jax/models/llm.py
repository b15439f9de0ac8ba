"""Decoder-only LLM backbone covering Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm), and its HF import
table.

The backbone returns last hidden states (after the final norm) like HF's `LlamaModel`; an LM head exists
only when `LLMConfig.lm_head` is set (towers do not need one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from scalingnote_jax.models import layers
from scalingnote_jax.models.checkpoint import Table, expand_table

ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_parameters beyond theta, as items
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False  # Qwen2: bias on q, k, v
  qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k
  tie_word_embeddings: bool = False
  lm_head: bool = False
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"
  remat: bool = False  # recompute each block in the backward pass (activation memory of one block)

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> LLMConfig:
    """From a HF config.json dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      raise ValueError(f"config.json: model_type {model_type!r} is not a supported decoder "
                       f"(supported: {', '.join(ARCHITECTURES)})")
    if hf.get("use_sliding_window"):
      raise ValueError("config.json: use_sliding_window=true is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None if rope_type == "default" else tuple(sorted({**rope, "rope_type": rope_type}.items()))
    first = lambda x: x[0] if isinstance(x, list) else x  # noqa: E731
    num_heads = hf["num_attention_heads"]
    cfg = cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"], rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=model_type == "qwen3", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        model_type=model_type, bos_token_id=first(hf.get("bos_token_id")),
        eos_token_id=first(hf.get("eos_token_id")), pad_token_id=first(hf.get("pad_token_id")))
    if hf.get("mlp_bias"):
      raise ValueError("config.json: mlp_bias=true is not supported")
    return dataclasses.replace(cfg, **overrides)


  def to_hf(self) -> dict:
    """The HF config.json of this architecture's base model (`from_hf` reads it back to this config)."""
    rope = {"rope_type": "default", **dict(self.rope_scaling or ())}
    arch = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}[self.model_type]
    return dict(model_type=self.model_type, architectures=[arch], vocab_size=self.vocab_size,
                hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                intermediate_size=self.intermediate_size, hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
                rope_theta=self.rope_theta, rope_scaling=None if self.rope_scaling is None else rope,
                attention_bias=self.attention_bias, mlp_bias=False, tie_word_embeddings=self.tie_word_embeddings,
                bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                max_position_embeddings=dict(self.rope_scaling or ()).get("original_max_position_embeddings", 8192),
                torch_dtype="float32")


class Attention(nnx.Module):

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(use_bias=cfg.attention_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.q = layers.Dense(e, n * h, ("embed", "heads"), **kw)
    self.k = layers.Dense(e, k * h, ("embed", "kv_heads"), **kw)
    self.v = layers.Dense(e, k * h, ("embed", "kv_heads"), **kw)
    self.o = layers.Dense(n * h, e, ("heads", "embed"), use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
    if cfg.qk_norm:
      nkw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
      self.q_norm = layers.RMSNorm(h, cfg.rms_norm_eps, "head_dim", **nkw)
      self.k_norm = layers.RMSNorm(h, cfg.rms_norm_eps, "head_dim", **nkw)
    else:
      self.q_norm = self.k_norm = None
    self.n, self.kv, self.h = n, k, h

  def __call__(self, x_BxTxE, mask_BxT, positions_BxT, inv_freq):
    b, t, _ = x_BxTxE.shape
    q = self.q(x_BxTxE).reshape(b, t, self.n, self.h)
    k = self.k(x_BxTxE).reshape(b, t, self.kv, self.h)
    v = self.v(x_BxTxE).reshape(b, t, self.kv, self.h)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = layers.apply_rope(q, positions_BxT, inv_freq)
    k = layers.apply_rope(k, positions_BxT, inv_freq)
    out = layers.attention(q, k, v, mask_BxT, causal=True)
    return self.o(out.reshape(b, t, self.n * self.h))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.gate = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.up = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down(nnx.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", **kw)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, mask_BxT, positions_BxT, inv_freq):
    x = x + self.attn(self.attn_norm(x), mask_BxT, positions_BxT, inv_freq)
    return x + self.mlp(self.mlp_norm(x))


class LLM(nnx.Module):
  """Token ids [B, T] + padding mask [B, T] -> final hidden states [B, T, E]. Expects right padding."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                              ("vocab", "embed"), pdt)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dt, param_dtype=pdt, rngs=rngs)
    untied_head = cfg.lm_head and not cfg.tie_word_embeddings
    self.lm_head = (layers.Dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dt,
                                 param_dtype=pdt, rngs=rngs) if untied_head else None)

  def __call__(self, ids_BxT, mask_BxT):
    return self.top(self.trunk(ids_BxT, mask_BxT, 0), mask_BxT, 0)

  def trunk(self, ids_BxT, mask_BxT, blocks: int):
    """The hidden states [B, T, E] after the embedding and the first `blocks` blocks (no final norm). With
    right padding and causal attention a real token's state does not depend on the padding after it."""
    x = layers.shard_batch(self.embed[...].astype(self.cfg.dtype)[ids_BxT])
    return self._blocks(x, mask_BxT, 0, blocks)

  def top(self, hidden_BxTxE, mask_BxT, start: int):
    """The rest of the forward from the states after block `start` (`trunk`): the blocks from `start` on and
    the final norm. `top(trunk(ids, mask, k), mask, k)` is the whole forward for any k."""
    return self.norm(self._blocks(hidden_BxTxE, mask_BxT, start, len(self.layers)))

  def _blocks(self, x_BxTxE, mask_BxT, start: int, stop: int):
    cfg = self.cfg
    positions_BxT = jnp.broadcast_to(jnp.arange(mask_BxT.shape[1]), mask_BxT.shape)
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
    run = layers.maybe_remat(lambda block, x: block(x, mask_BxT, positions_BxT, inv_freq), cfg.remat)
    for i in range(start, stop):
      x_BxTxE = layers.shard_batch(run(self.layers[i], x_BxTxE))
    return x_BxTxE

  def logits(self, hidden_BxTxE):
    if not self.cfg.lm_head:
      raise ValueError("this LLM was built without an LM head (LLMConfig.lm_head=False)")
    if self.lm_head is None:  # tied: reuse the input embedding
      return jnp.dot(hidden_BxTxE, self.embed[...].astype(self.cfg.dtype).T)
    return self.lm_head(hidden_BxTxE)


# HF tensor name -> module path, transpose. Names are those of HF's `LlamaModel` / `Qwen2Model` /
# `Qwen3Model`; `*ForCausalLM` checkpoints put `model.` before them (detected at load).
HF_TABLE: Table = (
    ("embed_tokens.weight", "embed", False),
    ("norm.weight", "norm.scale", False),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.scale", False),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale", False),
    ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q.kernel", True),
    ("layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k.kernel", True),
    ("layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v.kernel", True),
    ("layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o.kernel", True),
    ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate.kernel", True),
    ("layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up.kernel", True),
    ("layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down.kernel", True),
)
HF_BIAS_TABLE: Table = (  # Qwen2, and Llama with attention_bias
    ("layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q.bias", False),
    ("layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k.bias", False),
    ("layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v.bias", False),
)
HF_QK_NORM_TABLE: Table = (  # Qwen3
    ("layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale", False),
    ("layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale", False),
)
HF_HEAD_TABLE: Table = (("lm_head.weight", "lm_head.kernel", True),)  # never prefixed


def hf_rows(cfg: LLMConfig, prefix: str) -> dict[str, tuple[str, bool]]:
  """The import table for this config, expanded per layer."""
  table = HF_TABLE + (HF_BIAS_TABLE if cfg.attention_bias else ()) + (HF_QK_NORM_TABLE if cfg.qk_norm else ())
  rows = expand_table(table, cfg.num_layers, prefix)
  if cfg.lm_head and not cfg.tie_word_embeddings:
    rows.update(expand_table(HF_HEAD_TABLE, cfg.num_layers))
  return rows


def hf_ignored(name: str) -> bool:
  """Checkpoint tensors the backbone knowingly does not use: the LM head (towers pool hidden states)."""
  return name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")
