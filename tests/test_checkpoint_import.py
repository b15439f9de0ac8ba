"""Checkpoint import: sharded safetensors, clear errors naming the tensor and file, logical axis names."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import fixture
from scalingnote_jax.models import bert, llm, load_backbone
from scalingnote_jax.models.checkpoint import CheckpointError

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)

AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "positions", None}


def copy_fixture(name, tmp_path, edit=None, config_edit=None):
  src, _ = fixture(name)
  dst = tmp_path / name
  shutil.copytree(src, dst)
  if edit:
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
  if config_edit:
    cfg = json.loads((dst / "config.json").read_text())
    config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  return str(dst)


def test_sharded_safetensors_equal_single_file(tmp_path):
  d, e = fixture("qwen2")
  tensors = load_file(os.path.join(d, "model.safetensors"))
  out = tmp_path / "sharded"
  shutil.copytree(d, out)
  os.remove(out / "model.safetensors")
  names = sorted(tensors)
  weight_map = {}
  for k, part in enumerate((names[::2], names[1::2])):
    fn = f"model-{k + 1:05d}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, out / fn)
    weight_map.update({n: fn for n in part})
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  single, _ = load_backbone(d)
  sharded, _ = load_backbone(str(out))
  np.testing.assert_array_equal(np.asarray(sharded(e["ids"], e["mask"])), np.asarray(single(e["ids"], e["mask"])))


def test_missing_tensor_is_named(tmp_path):
  d = copy_fixture("llama", tmp_path, edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    load_backbone(d)


def test_unexpected_tensor_is_named(tmp_path):
  d = copy_fixture("qwen3", tmp_path, edit=lambda t: t.update({"model.layers.0.mystery.weight": np.ones(3)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mystery\.weight"):
    load_backbone(d)


def test_shape_mismatch_is_named(tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :32].copy()
  d = copy_fixture("qwen2", tmp_path, edit=shrink)
  with pytest.raises(CheckpointError, match=r"o_proj\.weight.*shape \(32, 64\).*expects \(64, 64\)"):
    load_backbone(d)


def test_unknown_architecture_is_refused(tmp_path):
  d = copy_fixture("llama", tmp_path, config_edit=lambda c: c.update(model_type="mamba"))
  with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture model_type='mamba'"):
    load_backbone(d)


def test_invalid_config_json_names_file_and_line(tmp_path):
  d = copy_fixture("bert", tmp_path)
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write('{\n  "model_type": "bert",\n  "hidden_size": 64,,\n}')
  with pytest.raises(CheckpointError, match=r"config\.json:3: invalid JSON"):
    load_backbone(d)


def test_lm_head_of_causal_lm_is_knowingly_skipped():
  d, _ = fixture("llama")  # untied LlamaForCausalLM: lm_head.weight present
  model, _ = load_backbone(d)
  assert model.lm_head is None


@pytest.mark.parametrize("cfg", [
    llm.LLMConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=32, attention_bias=True, qk_norm=True, lm_head=True),
    bert.BertConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
])
def test_every_parameter_has_logical_axis_names(cfg):
  from scalingnote_jax.models import create_backbone

  model = nnx.eval_shape(lambda: create_backbone(cfg, nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) > 10
  for path, var in flat:
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
    assert set(axes) <= AXIS_NAMES, (path, axes)


def test_bf16_compute_is_close_to_f32():
  d, e = fixture("qwen2")
  f32, _ = load_backbone(d)
  bf16, cfg = load_backbone(d, dtype="bfloat16")
  h32, h16 = np.asarray(f32(e["ids"], e["mask"])), np.asarray(bf16(e["ids"], e["mask"]))
  assert h16.dtype.name == "bfloat16"
  m = e["mask"].astype(bool)
  cos = (h32 * h16.astype(np.float32)).sum(-1) / np.linalg.norm(h32, axis=-1) / np.linalg.norm(
      h16.astype(np.float32), axis=-1)
  assert cos[m].min() > 0.99


def test_first_layers_of_a_checkpoint(minilm_dir):
  """A student from a checkpoint's first L layers holds exactly those layers' weights; more layers than the
  checkpoint has is refused."""
  full, _ = load_backbone(minilm_dir)
  two, cfg = load_backbone(minilm_dir, num_layers=2)
  assert cfg.num_layers == 2 and len(two.layers) == 2
  want = {k: v for k, v in nnx.to_flat_state(nnx.state(full)) if not (k[0] == "layers" and k[1] >= 2)}
  got = dict(nnx.to_flat_state(nnx.state(two)))
  assert set(got) == set(want)
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[k][...]))
  with pytest.raises(CheckpointError, match="num_layers=7, but the checkpoint has 6 layers"):
    load_backbone(minilm_dir, num_layers=7)
