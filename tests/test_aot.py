"""Ahead-of-time compilation of the Stage 1 step for fake topologies: per-device memory from the shardings
equals the hand-computed shard sizes and the compiler's own argument sizes (8 simulated CPU devices; TPU
devices from libtpu, compile-only)."""

import importlib.util
import os

import pytest

from scalingnote_jax import aot
from scalingnote_jax.config import load_config
from scalingnote_jax.data.pipeline import BatchSpec

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def tiny_param_bytes(fsdp: int, tensor: int, layers: int = 2) -> int:
  """configs/tiny.py's two towers, bytes on one device: `embed` axes split over fsdp, vocab/heads/mlp over
  tensor (sharding.DEFAULT_RULES); fp32."""
  v, e, heads, kv, hd, ff = 49152, 64, 4, 2, 16, 128
  e_, q_, kv_, ff_ = e // fsdp, heads * hd // tensor, kv * hd // tensor, ff // tensor
  layer = e_ * q_ + 2 * e_ * kv_ + q_ * e_ + 3 * e_ * ff_ + 2 * e_  # q, k, v, o, gate/up/down, 2 norms
  tower = (v // tensor) * e_ + layers * layer + e_  # embedding, blocks, final norm
  return 2 * tower * 4


ONE_LAYER = {"model.backbone.num_layers": 1}  # compiles faster


def tiny(mesh, **fields):
  return load_config(TINY, [f"--config.mesh={mesh}"] + [f"--config.{k}={v}" for k, v in fields.items()])


def test_cpu_topology_memory_equals_sharded_sizes():
  r = aot.compile_report(tiny((2, 2, 2)), "cpu-8")
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and r["num_devices"] == 8
  params = tiny_param_bytes(fsdp=2, tensor=2)
  assert r["params_bytes"] == params
  assert 2 * params <= r["opt_state_bytes"] <= 2 * params + 64  # AdamW's two moments + step counters
  # per device the batch is 32 / (data 2 x fsdp 2) = 8 rows of int32: q ids+mask, 2 docs ids+mask, doc ids, positives
  assert r["batch_bytes"] == 8 * 4 * (2 * 32 + 2 * 2 * 64 + 2 + BatchSpec(32, 1, 32, 64).max_positives)
  # the compiled executable's inputs are exactly these shards, and the donated state is reused for outputs
  assert r["argument_bytes"] == params + r["opt_state_bytes"] + r["batch_bytes"]
  assert r["alias_bytes"] == params + r["opt_state_bytes"]
  assert r["temp_bytes"] > 0 and r["total_bytes"] > r["argument_bytes"]
  assert r["fits"] is None and "parameters" in aot.format_report(r)


def test_mesh_must_match_topology():
  with pytest.raises(ValueError, match="config field `mesh`.*cpu-8"):
    aot.compile_report(tiny((2, 2, 1)), "cpu-8")
  with pytest.raises(ValueError, match="unknown"):
    aot.compile_report(tiny((2, 2, 2)), "v9-1")


@pytest.mark.slow
def test_gpu_topology_compiles_with_what_is_installed():
  r = aot.compile_report(tiny((1, 8, 1), **ONE_LAYER), "h100-8")
  assert r["params_bytes"] == tiny_param_bytes(fsdp=8, tensor=1, layers=1) and r["temp_bytes"] > 0
  if aot._has_cuda_plugin():  # the GPU compiler, told about an H100
    assert r["platform"] == "gpu" and r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["fits"] is True
  else:  # 8 simulated CPU devices stand in, and the report says so
    assert r["platform"] == "cpu" and "CPU compiler" in r["note"] and "CPU compiler" in aot.format_report(r)


def require_libtpu():
  if importlib.util.find_spec("libtpu") is None:  # optional: see the `aot` extra in pyproject.toml
    pytest.skip("libtpu is not installed (compile-only TPU devices): pip install -e '.[aot]'")


def test_tpu_topology_without_a_tpu():
  require_libtpu()
  r = aot.compile_report(tiny((1, 4, 2), **ONE_LAYER), "v5e-8")
  assert r["platform"] == "tpu" and r["device_kind"] == "TPU v5 lite" and r["num_devices"] == 8
  assert r["params_bytes"] == tiny_param_bytes(fsdp=4, tensor=2, layers=1)
  # the TPU compiler pads small arrays to its tiles, so its inputs are at least the shards
  assert r["argument_bytes"] >= r["params_bytes"] + r["opt_state_bytes"] + r["batch_bytes"]
  assert r["temp_bytes"] > 0 and r["fits"] is True


def test_tpu_compiler_refuses_what_exceeds_hbm():
  require_libtpu()
  # 4.2B parameters replicated on every chip: 47 GiB of state on a 16 GiB v5e
  big = tiny((8, 1, 1), **{"model.backbone.hidden_size": 8192, "model.backbone.num_heads": 64,
                           "model.backbone.num_kv_heads": 8, "model.backbone.head_dim": 128,
                           "model.backbone.intermediate_size": 28672})
  r = aot.compile_report(big, "v5e-8")
  assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["error"]
  assert r["temp_bytes"] > 0 and r["total_bytes"] > r["hbm_bytes"]
  assert "fits: NO" in aot.format_report(r)


@pytest.mark.slow
def test_hidden_states_stay_split_by_rows(monkeypatch):
  """`layers.shard_batch` keeps each device's activations to its own rows: without it XLA lays the hidden
  states out like the embedding table and the step needs far more temporary memory per device."""
  from scalingnote_jax.models import layers

  cfg = tiny((1, 8, 1), chunks=2, **ONE_LAYER)
  pinned = aot.compile_report(cfg, "cpu-8")["temp_bytes"]
  monkeypatch.setattr(layers, "shard_batch", lambda x: x)
  free = aot.compile_report(cfg, "cpu-8")["temp_bytes"]
  assert pinned < 0.8 * free, (pinned, free)


@pytest.mark.slow
def test_lora_step_holds_optimizer_state_for_the_adapters_only():
  """With LoRA the compiled step takes the frozen backbone as an input of its own: no optimizer state for it,
  and the step's memory report shows the trained and the frozen parameters apart."""
  full = aot.compile_report(tiny((2, 2, 2), **ONE_LAYER), "cpu-8")
  r = aot.compile_report(tiny((2, 2, 2), **ONE_LAYER, **{"model.lora.rank": 4}), "cpu-8")
  assert r["frozen_bytes"] == full["params_bytes"] and full["frozen_bytes"] == 0  # the whole base, frozen
  assert r["trained_params"] < 0.05 * r["num_params"]
  assert 2 * r["params_bytes"] <= r["opt_state_bytes"] <= 2 * r["params_bytes"] + 64  # moments of the adapters
  assert r["argument_bytes"] == r["params_bytes"] + r["frozen_bytes"] + r["opt_state_bytes"] + r["batch_bytes"]
  assert r["alias_bytes"] == r["params_bytes"] + r["opt_state_bytes"]  # the base is read, never rewritten
  assert "frozen" in aot.format_report(r)
