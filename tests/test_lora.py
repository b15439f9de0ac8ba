"""LoRA adapters on the decoder's projections (models/lora.py): a fresh adapter leaves the model's output exactly
as it was, merging computes the same function, adapters shard along their kernel's logical axes, and a gradient
taken by parameter type reaches the adapters only."""

import os

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


# ----------------------------------------------------------------------------------------------------------
# Stage 1 with LoRA: what trains, what is saved, resume, and the merged towers that encoding and serving use.

def lora_config(**fields):
  from helpers import ROOT
  from scalingnote_jax.config import load_config

  fields = {"model.lora.rank": 4, "model.lora.targets": "('q','v','up')", "num_steps": 4, "log_every": 1,
            "checkpoint.every": 2, "mesh": "(2,2,2)", **fields}
  return load_config(f"{ROOT}/configs/tiny.py:smoke", [f"--config.{k}={v}" for k, v in fields.items()])


@pytest.mark.slow
def test_stage1_with_lora_trains_the_adapters_only_saves_the_base_once_and_resumes(tmp_path):
  from scalingnote_jax.artifacts import trained
  from scalingnote_jax.encoder import Encoder
  from scalingnote_jax.train import common, stage1

  cfg = lora_config()
  whole = stage1.train(cfg, str(tmp_path / "whole"))
  model = whole["model"]
  fresh, _ = stage1.build_model(cfg, make_mesh((2, 2, 2)))
  is_adapter = lambda path, var: isinstance(var, nnx.LoRAParam)  # noqa: E731
  _, fresh_base = nnx.split(fresh, is_adapter, ...)[1:]
  _, adapters, base = nnx.split(model, is_adapter, ...)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(fresh_base)):  # the base never moved
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters) if x.shape[0] == 4)  # B learnt

  # The checkpoint holds the adapters and their optimizer state only; the base is in base/, saved once.
  workdir = str(tmp_path / "whole")
  assert os.path.isfile(os.path.join(workdir, trained.BASE_FILE))
  ckpt = trained.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  tx = common.make_optimizer(cfg.optim, cfg.num_steps)
  _, params, opt_state, _ = trained.restore(trained.abstract_dual_encoder(cfg), ckpt, 4, make_mesh((2, 2, 2)),
                                            cfg.rules, tx, trained.trainable(cfg))
  ckpt.close()
  n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
  assert sum(x.size for x in jax.tree.leaves(params)) == n_adapters
  assert sum(x.size for x in jax.tree.leaves(opt_state) if x.size > 1) == 2 * n_adapters  # AdamW's two moments

  # Stopped at step 2 and resumed: the same run.
  stage1.train(lora_config(num_steps=2), str(tmp_path / "cut"))
  resumed = stage1.train(cfg, str(tmp_path / "cut"), resume=True)
  np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in whole["history"][2:]],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(resumed["model"])), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

  # Read back for encoding and serving: adapters merged, the same embeddings.
  merged, tokenizer, _ = trained.load_stage1(workdir)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  texts = ["a query about entity 7", "another one"]
  np.testing.assert_allclose(Encoder(merged.query, tokenizer).encode_queries(texts),
                             Encoder(model.query, whole["tokenizer"]).encode_queries(texts), atol=1e-5)

  # Exported (export-hf) as two Hugging Face / sentence-transformers folders, the adapters merged in.
  from scalingnote_jax.artifacts.hf_export import export_hf
  out = str(tmp_path / "hf")
  assert export_hf(workdir, out) == {f"{out}/query": "query", f"{out}/document": "document"}
  for side, tower in (("query", merged.query), ("document", merged.doc)):
    np.testing.assert_allclose(Encoder.from_pretrained(f"{out}/{side}").encode_queries(texts),
                               Encoder(tower, tokenizer).encode_queries(texts), atol=1e-6)
  with pytest.raises(ValueError, match="exists and is not empty"):
    export_hf(workdir, out)

  # The base is verified when read: one whose recorded fingerprint differs is refused, naming the file.
  with open(os.path.join(workdir, trained.BASE_FILE), "w") as f:
    f.write('{"fingerprint": "0000"}')
  with pytest.raises(ValueError, match=r"whole/base: the frozen parameters do not match the fingerprint in base.json"):
    trained.load_stage1(workdir)


def test_frozen_layers_leave_the_embeddings_and_the_first_blocks_out_of_training():
  from scalingnote_jax.artifacts import trained

  cfg = lora_config(**{"model.lora.rank": 0, "model.freeze_layers": 1})
  _, params, frozen = nnx.split(trained.abstract_dual_encoder(cfg), trained.trainable(cfg), ...)
  paths = lambda state: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}  # noqa: E731
  assert {p.split(".backbone.")[1].split(".")[0] for p in paths(frozen)} == {"embed", "layers"}
  assert all(".layers.0." in p or ".embed" in p for p in paths(frozen))
  assert any(".layers.1." in p for p in paths(params)) and any(p.endswith("backbone.norm.scale") for p in paths(params))
  assert not any(".layers.0." in p for p in paths(params))


def test_frozen_parameters_are_stored_once_per_content(tmp_path, monkeypatch):
  """write_base with a shared directory (a pipeline's frozen/): the first run stores the base under its
  fingerprint, a second run with the same frozen parameters (a mining round) writes nothing but its base.json;
  both read back the same parameters in their shardings, also from a moved workdir; the towers' identical
  frozen leaves are stored once; a replaced or missing shared base is refused naming it; a crash's staging
  directory is no base; a base saved whole (before leaves were stored once) still reads."""
  import json
  import re
  import shutil

  import orbax.checkpoint as ocp

  from scalingnote_jax.artifacts import trained
  from scalingnote_jax.train import stage1

  cfg = lora_config(**{"model.lora.rank": 0, "model.freeze_layers": 1})
  cfg.model.doc_seed = cfg.model.seed  # both towers from one model, as the demo's from SmolLM2
  mesh = make_mesh((2, 2, 2))
  model, _ = stage1.build_model(cfg, mesh)
  _, _, frozen = nnx.split(model, trained.trainable(cfg), ...)
  abstract, is_trained = trained.abstract_dual_encoder(cfg), trained.trainable(cfg)
  pipeline = tmp_path / "pipeline"
  for run in ("teacher", "teacher_mined", "elsewhere"):
    (pipeline / run).mkdir(parents=True)

  def read(workdir):
    got = trained.read_base(str(workdir), abstract, is_trained, mesh, cfg.rules)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(frozen), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      assert x.sharding == y.sharding

  trained.write_base(str(pipeline / "teacher"), frozen, str(pipeline / "frozen"))
  [digest] = os.listdir(pipeline / "frozen")  # (no staging directory left beside it)
  base = pipeline / "frozen" / digest
  leaves = json.loads((base / trained.BASE_LEAVES).read_text())
  assert len(leaves) == len(jax.tree.leaves(frozen))
  tower = lambda name: {p.removeprefix(name): d for p, d in leaves.items() if p.startswith(name)}  # noqa: E731
  assert tower("['query']") == tower("['doc']")  # the towers' frozen leaves are the same arrays: stored once
  stored = ocp.StandardCheckpointer().metadata(str(base / trained.BASE_ARRAYS)).item_metadata
  assert set(stored) == set(leaves.values()) and len(stored) < len(leaves) / 2  # (the norms' ones: once too)
  with monkeypatch.context() as m:  # the second run's base is the first one's: nothing is written
    m.setattr(trained, "_save_base", lambda *_: pytest.fail("the same frozen parameters were saved again"))
    trained.write_base(str(pipeline / "teacher_mined"), frozen, str(pipeline / "frozen"))
  for run in ("teacher", "teacher_mined"):
    assert json.loads((pipeline / run / trained.BASE_FILE).read_text()) == {"fingerprint": digest,
                                                                             "dir": f"../frozen/{digest}"}
    assert not (pipeline / run / trained.BASE_DIR).exists()
    read(pipeline / run)
  moved = tmp_path / "moved"
  shutil.move(pipeline, moved)
  read(moved / "teacher_mined")  # base.json names the base relative to the run
  monkeypatch.chdir(tmp_path)
  read("moved/teacher")  # a relative workdir, as `make demo`'s runs/demo

  # a shared base replaced by other parameters (well-formed), or missing: refused, naming it
  other = jax.tree.map(lambda x: x + 1, frozen)
  trained.write_base(str(moved / "elsewhere"), other)  # a standalone run: its own base/, the same layout
  assert json.loads((moved / "elsewhere" / trained.BASE_FILE).read_text())["dir"] == trained.BASE_DIR
  shutil.rmtree(moved / "frozen" / digest)
  shutil.copytree(moved / "elsewhere" / trained.BASE_DIR, moved / "frozen" / digest)
  with pytest.raises(ValueError, match=re.escape(f"{moved}/frozen/{digest}: the frozen parameters do not match the "
                                                 f"fingerprint in base.json of {moved}/teacher")):
    read(moved / "teacher")
  shutil.rmtree(moved / "frozen" / digest)
  with pytest.raises(FileNotFoundError, match=re.escape(f"{moved}/frozen/{digest}: missing")):
    read(moved / "teacher")

  # a staging directory a crash left is no base: the next write stores the base whole
  (moved / "frozen" / f".{digest}.partial" / "arrays").mkdir(parents=True)
  trained.write_base(str(moved / "teacher"), frozen, str(moved / "frozen"))
  assert os.listdir(moved / "frozen") == [digest]
  read(moved / "teacher")

  # a base saved whole by earlier versions (base/ the orbax tree, base.json its fingerprint only) still reads
  old = moved / "old"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(old / trained.BASE_DIR), frozen)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (old / trained.BASE_FILE).write_text(json.dumps({"fingerprint": digest}))
  read(old)


@pytest.mark.parametrize("fields, error", [
    ({"model.lora.rank": 4, "model.freeze_layers": 1}, "LoRA freezes the whole backbone already"),
    ({"model.lora.rank": 0, "model.freeze_layers": 2}, r"freeze_layers=2: the backbone has 2 blocks; freeze at most 1"),
    ({"model.lora.rank": 0, "model.freeze_layers": -1}, "expected >= 0"),
])
def test_a_config_that_cannot_train_is_refused_before_anything_is_written(tmp_path, fields, error):
  from scalingnote_jax.artifacts.lock import LOCK_FILE
  from scalingnote_jax.train import stage1

  with pytest.raises(ValueError, match=error):
    stage1.train(lora_config(**fields), str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == [LOCK_FILE]


@pytest.mark.slow
def test_lora_dropout_acts_in_training_steps_only_and_replays_in_both_passes():
  """Dropout on the adapters' inputs happens only under a training step's key: encoding and evaluation (no key)
  compute the undropped function; the same key drops the same units; and a GradCache step, whose second pass
  re-runs each chunk, gives the gradients of the dropped-out forward it computed (its chunks keyed apart)."""
  from scalingnote_jax import sharding
  from scalingnote_jax.models import layers
  from scalingnote_jax.train import stage1
  from scalingnote_jax.train.losses import contrastive_loss

  plain = create_backbone(CFG, nnx.Rngs(0))
  lora.add(plain, lora.LoRAConfig(rank=4, alpha=8.0), nnx.Rngs(1))
  dropped = create_backbone(CFG, nnx.Rngs(0))
  lora.add(dropped, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.5), nnx.Rngs(1))
  rng = np.random.default_rng(1)
  for m in (plain, dropped):
    for _, var in nnx.iter_graph(m):
      if isinstance(var, nnx.LoRAParam) and var.shape[0] == 4:
        var[...] = jnp.asarray(np.random.default_rng(2).normal(0, 0.3, var.shape), jnp.float32)
  np.testing.assert_array_equal(np.asarray(dropped(IDS, MASK)), np.asarray(plain(IDS, MASK)))  # no key: no dropout
  run = jax.jit(lambda key: _keyed(dropped, key))
  a, b, c = (np.asarray(run(jax.random.key(k))) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3 and np.abs(a - np.asarray(plain(IDS, MASK))).max() > 1e-3

  # GradCache with dropout: its gradients are those of the forward it ran (each chunk under its own key)
  from scalingnote_jax.models.dual import DualEncoder
  from scalingnote_jax.models.tower import Tower, TowerConfig

  def tower(seed):
    backbone = create_backbone(CFG, nnx.Rngs(seed))
    lora.add(backbone, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.3, targets=("q", "v", "up")), nnx.Rngs(seed + 1))
    for _, var in nnx.iter_graph(backbone):
      if isinstance(var, nnx.LoRAParam) and var.shape[0] == 4:
        var[...] = jnp.asarray(rng.normal(0, 0.1, var.shape), jnp.float32)
    return Tower(backbone, TowerConfig(pooling="mean"), rngs=nnx.Rngs(0))

  dual = DualEncoder(tower(0), tower(2), 0.05, False)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  ids = lambda *shape: jnp.asarray(rng.integers(1, 64, shape), jnp.int32)  # noqa: E731
  doc_ids = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)  # a positive and a negative per query
  batch = {"q_ids": ids(4, 7), "q_mask": jnp.ones((4, 7), jnp.int32), "d_ids": ids(4, 2, 9),
           "d_mask": jnp.asarray(np.arange(9) < rng.integers(2, 10, (4, 2, 1)), jnp.int32), "doc_ids": doc_ids,
           "pos_ids": doc_ids[:, :1]}
  graphdef, params, frozen = nnx.split(dual, nnx.LoRAParam, ...)
  seed, step = 1234, np.int32(7)
  (loss, _), grads = jax.jit(stage1.make_grad_fn(graphdef, mesh, chunks=2, dropout_seed=seed))(params, batch, frozen,
                                                                                               step)

  def reference(p):  # the same forward, written out: chunk i = rows i, i + 2, ... under key fold_in(step key, i)
    model = nnx.merge(graphdef, p, frozen)
    key = jax.random.fold_in(jax.random.key(seed), step)
    qs, ds = [], []
    for i in range(2):
      rows = {k: v[i::2] for k, v in batch.items()}
      with layers.dropout_key(jax.random.fold_in(key, i)):
        qs.append(model.query(rows["q_ids"], rows["q_mask"]))
        b, g, t = rows["d_ids"].shape
        ds.append(model.doc(rows["d_ids"].reshape(b * g, t), rows["d_mask"].reshape(b * g, t)).reshape(b, g, -1))
    merge = lambda xs: jnp.stack(xs, 1).reshape(-1, *xs[0].shape[1:])  # noqa: E731  (back to batch order)
    return contrastive_loss(merge(qs), merge(ds), batch["doc_ids"], batch["pos_ids"], model.scale())[0]

  want_loss, want = jax.jit(jax.value_and_grad(reference))(params)  # (dropping nothing, or other units, would differ)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def _keyed(module, key):
  from scalingnote_jax.models import layers

  with layers.dropout_key(key):
    return module(IDS, MASK)
