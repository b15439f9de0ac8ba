"""Mesh building and logical-axis sharding of parameters (8 simulated CPU devices)."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import fixture
from scalingnote_jax.models import create_backbone, load_backbone
from scalingnote_jax.models.llm import LLMConfig
from scalingnote_jax.sharding import DEFAULT_RULES, create_sharded, make_mesh, param_sharding_fn

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)

CFG = LLMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=64)


def test_mesh_autofill_and_errors():
  assert jax.device_count() == 8
  assert dict(make_mesh((-1, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(make_mesh((1, 1, 1), jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="not divisible"):
    make_mesh((-1, 3, 1))
  with pytest.raises(ValueError, match="needs 4 devices, have 8"):
    make_mesh((2, 2, 1))


def test_parameters_are_created_sharded_by_rules():
  mesh = make_mesh((2, 2, 2))
  model = create_sharded(lambda: create_backbone(CFG, nnx.Rngs(0)), mesh, DEFAULT_RULES)
  q = model.layers[0].attn.q.kernel[...]  # (embed, heads) -> (fsdp, tensor)
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in q.addressable_shards} == {(16, 16)}  # a quarter on each device
  assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  # same values as an unsharded initialisation with the same seed
  plain = create_backbone(CFG, nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(q), np.asarray(plain.layers[0].attn.q.kernel[...]), atol=1e-7)


def test_checkpoint_import_straight_into_shards():
  d, e = fixture("qwen2")
  mesh = make_mesh((1, 4, 2))
  sharded, _ = load_backbone(d, sharding=param_sharding_fn(mesh, DEFAULT_RULES))
  plain, _ = load_backbone(d)
  k = sharded.layers[1].attn.k.kernel[...]
  assert len({s.device for s in k.addressable_shards}) == 8 and k.sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(np.asarray(sharded(e["ids"], e["mask"])), np.asarray(plain(e["ids"], e["mask"])),
                             atol=1e-5)


def test_indivisible_dimension_is_replicated():
  mesh = make_mesh((1, 1, 8))
  cfg = LLMConfig(vocab_size=30, hidden_size=32, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=4,
                  intermediate_size=64)
  model = create_sharded(lambda: create_backbone(cfg, nnx.Rngs(0)), mesh, DEFAULT_RULES)
  assert model.embed[...].sharding.spec[0] is None  # 30 rows cannot split 8 ways
  assert model.layers[0].mlp.up.kernel[...].sharding.spec[1] == "tensor"


def test_trainers_refuse_a_batch_the_mesh_cannot_split_before_writing(tmp_path):
  """A global batch of 6 on the 8-device mesh: each trainer names the field and the mesh, and the workdir holds
  nothing but its lock (jax's own error came from the first step, after the run had written its files)."""
  from scalingnote_jax.artifacts.lock import LOCK_FILE
  from scalingnote_jax.config import load_config
  from scalingnote_jax.train import rerank, stage1, stage2

  for name, train, config in (("stage1", stage1.train, "tiny"), ("distill", stage2.distill, "distill_tiny"),
                              ("rerank", rerank.train, "rerank_tiny")):
    cfg = load_config(f"configs/{config}.py")
    cfg.batch_size = 6
    with pytest.raises(ValueError, match=r"batch_size=6: not divisible by the 8 devices of the batch axes"):
      train(cfg, str(tmp_path / name))
    assert os.listdir(tmp_path / name) == [LOCK_FILE], name
  cfg = load_config("configs/tiny.py")
  cfg.batch_size, cfg.chunks = 8, 3
  with pytest.raises(ValueError, match=r"chunks=3: GradCache splits batch_size=8 into equal chunks"):
    stage1.train(cfg, str(tmp_path / "chunks"))
  assert os.listdir(tmp_path / "chunks") == [LOCK_FILE]
