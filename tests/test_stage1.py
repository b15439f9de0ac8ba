"""Stage 1 training: the sharded step equals the single-device step, GradCache chunking (with or without remat)
equals the unchunked step, and a tiny teacher measurably learns on the synthetic corpus (8 simulated
devices)."""

import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import read_metrics
from scalingnote_jax import sharding
from scalingnote_jax.config import load_config
from scalingnote_jax.data.pipeline import BatchSpec, TrainData
from scalingnote_jax.data.training import load_data
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.train import common, stage1

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def one_batch(cfg, mesh):
  model, tok = stage1.build_model(cfg, mesh)
  examples, _, corpus = load_data(cfg.data)
  enc = Encoder(model.query, tok)
  spec = BatchSpec(cfg.batch_size, cfg.data.n_neg, cfg.data.query_len, cfg.data.doc_len)
  data = TrainData(examples, corpus, lambda qs: enc.tokenize(enc.query_texts(qs)),
                   lambda ds: enc.tokenize(enc.document_texts(ds)), tok.pad_id, spec)
  return model, next(data.iterator(seed=0))


def run_steps(overrides, mesh_shape, devices, steps=3):
  """Gradients of the first step, and the losses of `steps` AdamW steps (none: no step compiled)."""
  cfg = load_config(TINY, [f"--config.{k}={v}" for k, v in overrides.items()])
  mesh = sharding.make_mesh(mesh_shape, devices)
  model, local = one_batch(cfg, mesh)
  graphdef, params = nnx.split(model)
  tx = common.make_optimizer(cfg.optim, cfg.num_steps)
  opt_state = sharding.init_optimizer(tx, params, mesh)
  kw = dict(chunks=cfg.chunks, symmetric=cfg.loss.symmetric)
  batch = sharding.global_batch(mesh, local)
  _, grads = jax.jit(stage1.make_grad_fn(graphdef, mesh, **kw))(params, batch)
  # As training compiles it (outputs keep the inputs' shardings): a plain jit compiled the step twice.
  step = common.jit_step(stage1.make_train_step(graphdef, tx, mesh, **kw), mesh, params, opt_state) if steps else None
  losses = []
  for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, grads)


def assert_same(a, b, atol):
  (la, ga), (lb, gb) = a, b
  np.testing.assert_allclose(la, lb[:len(la)], atol=atol)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=atol)


BASE = {"batch_size": 16, "data.num_docs": 32, "data.n_neg": 2, "loss.learn_temperature": True,
        "loss.symmetric": True, "optim.warmup_steps": 0, "optim.lr": 3e-4}


@pytest.mark.slow
@pytest.mark.floor
def test_sharded_and_chunked_steps_equal_single_device():
  """Sharded gradients over data x fsdp x tensor, and the sharded step with GradCache chunking and
  rematerialisation on another mesh (the combination large runs use; each alone is a subset of its code
  path), give the single-device gradients and step losses."""
  single = run_steps(BASE, (1, 1, 1), jax.devices()[:1])
  assert single[0][2] < single[0][0]  # the steps learn
  assert_same(run_steps(BASE, (2, 2, 2), None, steps=0), single, atol=1e-5)
  assert_same(run_steps({**BASE, "chunks": 4, "model.remat": True}, (4, 2, 1), None), single, atol=1e-5)


@pytest.mark.slow
def test_tiny_teacher_learns_on_synthetic_corpus(tiny_teacher):
  """On 8 simulated devices, from chance to >= 0.9 Recall@10 over 1024 documents (chance: 10/1024 = 0.01)."""
  cfg = load_config(TINY)
  with open(os.path.join(tiny_teacher, "stdout.txt")) as f:
    assert "mesh data=2 fsdp=4 tensor=1 over 8 cpu devices" in f.read()
  evals = read_metrics(tiny_teacher, "val")
  first, last = evals[0], evals[-1]
  assert first["step"] == 0 and last["step"] == cfg.num_steps
  assert first["recall_at_10"] <= 0.05, first
  assert last["recall_at_10"] >= 0.9, last
  assert last["contrastive_entropy"] < 0.5 * first["contrastive_entropy"]


@pytest.mark.floor
def test_remat_wraps_every_block_and_tied_towers_share_parameters():
  cfg = load_config(TINY, ["--config.model.remat=True", "--config.data.num_docs=32"])
  model, _ = stage1.build_model(cfg, sharding.make_mesh((8, 1, 1)))
  graphdef, state = nnx.split(model.query)
  ids = np.ones((2, 8), np.int32)
  jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, ids))(state))
  remats = re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxpr)  # the primitive's name varies across jax versions
  assert len(remats) == cfg.model.backbone.num_layers  # one rematerialised block per layer
  grads = jax.make_jaxpr(jax.grad(lambda s: nnx.merge(graphdef, s)(ids, ids).sum()))(state)
  # each block's backward hands on its input's gradient only with its weights' (layers.tie_cotangents)
  assert str(grads).count("optimization_barrier") == cfg.model.backbone.num_layers
  cfg = load_config(TINY, ["--config.tied=True", "--config.data.num_docs=32"])
  model, _ = stage1.build_model(cfg, sharding.make_mesh((8, 1, 1)))
  assert model.doc is model.query
  assert len(jax.tree.leaves(nnx.state(model))) == len(jax.tree.leaves(nnx.state(model.query)))
