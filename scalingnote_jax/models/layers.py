"""Building blocks shared by the model files: parameters with logical axis names, Dense, norms, RoPE,
attention.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, ...)
in its `out_sharding` metadata. Nothing is sharded here: a later mesh maps the names to mesh axes by rules
(`nnx.get_partition_spec` + logical rules) and creates the parameters already sharded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from scalingnote_jax.sharding import BATCH_AXES

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
  """A parameter initialised by `init`, annotated with logical `axes` (one name per dimension)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


# LoRA dropout's randomness: a key given by the training step for one forward (`dropout_key`); each adapter in
# call order folds in its own index. Without a key (evaluation, encoding, serving) nothing is dropped. Re-running
# the same forward under the same key (remat, GradCache's second pass) drops the same units.
_DROPOUT: dict = {"key": None, "count": 0}


class dropout_key:
  """`with dropout_key(key): model(...)`: the forward traced inside drops LoRA inputs at their adapters' rate."""

  def __init__(self, key):
    self.key = key

  def __enter__(self):
    self.saved = dict(_DROPOUT)
    _DROPOUT.update(key=self.key, count=0)

  def __exit__(self, *exc):
    _DROPOUT.update(self.saved)


def _dropped(x, rate: float):
  if not rate or _DROPOUT["key"] is None:
    return x
  key = jax.random.fold_in(_DROPOUT["key"], _DROPOUT["count"])
  _DROPOUT["count"] += 1
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Dense(nnx.Module):
  """y = x @ kernel (+ bias) (+ a LoRA adapter's (alpha / r) x @ A @ B, once `add_lora` gave it one). The
  kernel is stored [in, out] (the transpose of torch's Linear)."""

  def __init__(self, din: int, dout: int, axes: tuple[str, str], *, use_bias: bool, dtype, param_dtype,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.dtype, self.axes = dtype, tuple(axes)
    self.kernel = param(rngs, nnx.initializers.normal(init_std), (din, dout), axes, param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (dout,), axes[1:], param_dtype) if use_bias else None
    self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # (data: an adapter may take their place)
    self.lora_scale, self.lora_dropout = 0.0, 0.0

  def __call__(self, x):
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:  # the low-rank path: [..., in] -> [..., r] -> [..., out], its input dropped out
      h = jnp.dot(_dropped(x, self.lora_dropout), self.lora_a[...].astype(self.dtype))
      y = y + self.lora_scale * jnp.dot(h, self.lora_b[...].astype(self.dtype))
    return y

  def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs, dropout: float = 0.0) -> None:
    """A LoRA adapter (Hu et al., 2021): A [in, r] random (Kaiming-uniform, as peft), B [r, out] zero, so the
    layer computes what it did until B is trained. `LoRAParam`s, sharded along the kernel's own axes.
    `dropout`: peft's lora_dropout, on the adapter's input, only inside a training step (`dropout_key`)."""
    din, dout = self.kernel.shape
    init_a = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch's kaiming_uniform(a=sqrt(5))
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (din, rank), self.kernel.dtype),
                                out_sharding=(self.axes[0], None), eager_sharding=False)
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), self.kernel.dtype), out_sharding=(None, self.axes[1]),
                                eager_sharding=False)
    self.lora_scale, self.lora_dropout = alpha / rank, float(dropout)

  def merge_lora(self) -> None:
    """Folds the adapter into the kernel (kernel + (alpha / r) A B, computed in float32) and removes it."""
    if self.lora_a is None:
      return
    delta = self.lora_scale * jnp.dot(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
    self.kernel[...] = (self.kernel[...].astype(jnp.float32) + delta).astype(self.kernel.dtype)
    self.lora_a = self.lora_b = None
    self.lora_scale, self.lora_dropout = 0.0, 0.0


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, as Llama/Qwen do, then cast back to the compute dtype."""

  def __init__(self, dim: int, eps: float, axis: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis,), param_dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in float32."""

  def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> jnp.ndarray:
  """Inverse frequencies of rotary embeddings; `scaling` follows HF's `rope_parameters` ('llama3' only)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling or scaling.get("rope_type", "default") == "default":
    return inv_freq
  if scaling["rope_type"] != "llama3":
    raise ValueError(f"rope_type {scaling['rope_type']!r} is not supported (supported: default, llama3)")
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
  factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
  return jnp.where(is_medium, smoothed, out)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq):
  """Rotary embedding in the HF 'rotate_half' layout (first half / second half of head_dim)."""
  angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq  # B, T, H/2
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxS, *, causal: bool):
  """Scaled dot-product attention with a key padding mask; grouped-query when K < N heads."""
  mask = mask_BxS[:, None, None, :].astype(bool)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask, is_causal=causal)


def maybe_remat(fn, enabled: bool):
  """`fn(module, *args)` recomputed in the backward pass instead of storing its activations (when enabled).

  A plain `jax.checkpoint` of a pure function of the module's state: blocks mutate nothing, so no state has
  to flow back out. (`nnx.remat` writes state back into the module; from flax 0.12.10 on that write-back
  raises TraceContextError inside GradCache's `lax.map`: tests/test_stage1.py fails with it on flax 0.12.12.) The block's backward also finishes its weight
  gradients before the previous block's starts (`tie_cotangents`): the 7B step's temporaries on 8 H100s went
  from 57.7 to 23.6 GiB (README, "Does the 7B dual tower fit?")."""
  if not enabled:
    return fn

  def run(module, *args):
    graphdef, state = nnx.split(module)
    state, args = tie_cotangents((state, args))
    return jax.checkpoint(lambda state, *args: fn(nnx.merge(graphdef, state), *args))(state, *args)

  return run


@jax.custom_vjp
def _barrier_in_backward(leaves):
  return leaves


def _barrier_fwd(leaves):
  return leaves, None


def _barrier_bwd(_, cotangents):
  return (jax.lax.optimization_barrier(cotangents),)


_barrier_in_backward.defvjp(_barrier_fwd, _barrier_bwd)


def tie_cotangents(tree):
  """Identity in the forward pass; in the backward pass the cotangents of all of `tree`'s float leaves come
  out of one `optimization_barrier`, so none is available before all are computed.

  Applied to a block's (parameters, input): the gradient flowing on to the previous block waits for this
  block's weight gradients. Without it XLA's GPU scheduler defers the weight-gradient matmuls (and their
  reduce-scatters) of every block to the end of the backward pass, keeping each block's [tokens, mlp]
  activation gradients alive meanwhile, as long as its memory limit (the whole device) allows."""
  leaves, treedef = jax.tree.flatten(tree)
  idx = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  tied = _barrier_in_backward([leaves[i] for i in idx])
  for i, x in zip(idx, tied):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def shard_batch(x):
  """Pins activation `x`'s leading (batch) dimension to the mesh's batch axes, so each device keeps only its
  rows. Without it XLA may lay hidden states out like the parameters they meet (split over `embed`), and every
  device then holds the whole batch's activations. A no-op outside a mesh context
  (`jax.sharding.use_abstract_mesh`) and when the rows do not divide evenly over the batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if math.prod(mesh.shape[a] for a in axes) <= 1 or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))
