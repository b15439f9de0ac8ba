"""LoRA adapters on the decoder's projections (models/lora.py): a fresh adapter leaves the model's output exactly
as it was, merging computes the same function, adapters shard along their kernel's logical axes, and a gradient
taken by parameter type reaches the adapters only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalingnote_jax.models import create_backbone, lora
from scalingnote_jax.models.llm import LLMConfig
from scalingnote_jax.sharding import DEFAULT_RULES, create_sharded, make_mesh

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)

CFG = LLMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=64, attention_bias=True)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 7)), jnp.int32)
MASK = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5], jnp.int32)


def with_lora(rank=4, targets=lora.TARGETS):
  model = create_backbone(CFG, nnx.Rngs(0))
  n = lora.add(model, lora.LoRAConfig(rank=rank, alpha=8.0, targets=targets), nnx.Rngs(1))
  return model, n


def test_a_fresh_adapter_changes_nothing_and_merging_changes_nothing():
  base = create_backbone(CFG, nnx.Rngs(0))(IDS, MASK)
  model, n = with_lora()
  assert n == 7 * CFG.num_layers  # q, k, v, o, gate, up, down of every block
  np.testing.assert_array_equal(np.asarray(model(IDS, MASK)), np.asarray(base))  # B = 0: exactly the base model
  rng = np.random.default_rng(1)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam) and var.shape[0] == 4:  # the B matrices [r, out]
      var[...] = jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32)
  adapted = np.asarray(model(IDS, MASK))
  assert np.abs(adapted - np.asarray(base)).max() > 1e-2  # the adapters now matter
  assert lora.merge(model) == n
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))  # nothing left to merge
  np.testing.assert_allclose(np.asarray(model(IDS, MASK)), adapted, atol=1e-5)


def test_adapters_carry_logical_axes_and_are_created_sharded():
  mesh = make_mesh((2, 2, 2))
  model = create_sharded(lambda: with_lora()[0], mesh, DEFAULT_RULES)
  q = model.layers[0].attn.q  # kernel (embed, heads) -> (fsdp, tensor)
  assert q.lora_a[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q.lora_b[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  down = model.layers[1].mlp.down  # kernel (mlp, embed) -> (tensor, fsdp)
  assert down.lora_a[...].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
  assert down.lora_b[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_a_gradient_by_parameter_type_reaches_the_adapters_only():
  model, _ = with_lora(targets=("q", "v"))
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  sizes = [x.size for x in jax.tree.leaves(adapters)]
  assert len(sizes) == 2 * 2 * CFG.num_layers  # A and B of q and v in each block
  assert sum(sizes) == CFG.num_layers * 4 * (32 + 32 + 32 + 16)  # r x (in + out) for q [32, 32] and v [32, 16]

  def loss(adapters):
    return jnp.mean(nnx.merge(graphdef, adapters, frozen)(IDS, MASK) ** 2)

  grads = jax.grad(loss)(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  b_grads = [g for g in jax.tree.leaves(grads) if g.shape[0] == 4]
  assert all(np.abs(np.asarray(g)).max() > 0 for g in b_grads)  # B (zero) learns first: dL/dB = (x A)^T dL/dy


def test_a_target_the_model_lacks_is_named():
  with pytest.raises(ValueError, match=r"lora.targets=\('q_proj',\): no such projection .*'gate'"):
    with_lora(targets=("q_proj",))
  with pytest.raises(ValueError, match="rank=0"):
    lora.LoRAConfig(rank=0)
