"""The frozen trunk's cache (data/trunk.py): the forward from cached states equals the full forward, each trunk
has its own fingerprint, and Stage 1 with the cache trains exactly as without it, resumes, and reuses the store
instead of recomputing it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT
from scalingnote_jax.config import load_config
from scalingnote_jax.data.trunk import Trunk
from scalingnote_jax.models import create_backbone
from scalingnote_jax.models.llm import LLMConfig
from scalingnote_jax.models.tower import Tower, TowerConfig

CFG = LLMConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=64, attention_bias=True)
ROWS = [list(np.random.default_rng(i).integers(1, 64, n)) for i, n in enumerate((7, 5, 2, 9))]  # 9: cut to 8


@pytest.mark.floor
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_the_forward_from_a_cached_trunk_equals_the_full_forward(pooling):
  tower = Tower(create_backbone(CFG, nnx.Rngs(0)), TowerConfig(pooling=pooling), rngs=nnx.Rngs(0))
  length = 8
  ids = np.zeros((len(ROWS), length), np.int32)
  mask = np.zeros((len(ROWS), length), np.int32)
  for r, row in enumerate(ROWS):
    ids[r, :min(len(row), length)], mask[r, :min(len(row), length)] = row[:length], 1
  full = np.asarray(tower(jnp.asarray(ids), jnp.asarray(mask)))
  for blocks in range(CFG.num_layers):
    # the store's encoder: rows cut / padded to the length, batches padded with filler rows (batch 3: 3 + 1)
    states = Trunk(tower, blocks, length, pad_id=0).encode(ROWS, batch_size=3)
    assert states.shape == (len(ROWS), length, CFG.hidden_size)
    cached = np.asarray(tower.from_trunk(jnp.asarray(states), jnp.asarray(mask), blocks))
    np.testing.assert_allclose(cached, full, atol=1e-5, err_msg=f"{blocks} cached blocks")
  # the states after K blocks are not those after K - 1: the cache holds what it says, and each trunk (depth,
  # padded length) has a fingerprint, so a store of its own
  assert np.abs(Trunk(tower, 2, length, 0).encode(ROWS) - Trunk(tower, 1, length, 0).encode(ROWS)).max() > 1e-3
  prints = {Trunk(tower, k, n, 0).fingerprint for k in (1, 2) for n in (8, 16)}
  assert len(prints) == 4 and Trunk(tower, 1, 8, 0).fingerprint in prints


def trunk_config(**fields):
  fields = {"model.freeze_layers": 1, "model.trunk_cache": True, "num_steps": 4, "log_every": 1,
            "checkpoint.every": 2, "data.n_neg": 2, "batch_size": 8, "mesh": "(2,2,2)", **fields}
  return load_config(f"{ROOT}/configs/tiny.py:smoke", [f"--config.{k}={v}" for k, v in fields.items()])


@pytest.mark.slow
def test_stage1_with_a_trunk_cache_trains_as_without_it_resumes_and_reuses_the_store(tmp_path, monkeypatch):
  from scalingnote_jax.train import stage1

  monkeypatch.setenv("SCALINGNOTE_CACHE_DIR", str(tmp_path / "cache"))
  plain = stage1.train(trunk_config(**{"model.trunk_cache": False}), str(tmp_path / "plain"))
  assert not os.path.exists(tmp_path / "cache")

  stage1.train(trunk_config(num_steps=2), str(tmp_path / "cached"))
  stores = sorted(str(p.parent) for p in (tmp_path / "cache" / "trunk").glob("*/*/COMPLETE"))
  assert sorted(os.path.basename(s) for s in stores) == ["documents", "queries"]
  written = {s: os.path.getmtime(os.path.join(s, "COMPLETE")) for s in stores}
  resumed = stage1.train(trunk_config(), str(tmp_path / "cached"), resume=True)
  assert {s: os.path.getmtime(os.path.join(s, "COMPLETE")) for s in stores} == written  # found, not recomputed

  np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in plain["history"][2:]],
                             atol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(resumed["model"])), jax.tree.leaves(nnx.state(plain["model"]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert plain["history"][-1]["loss"] < plain["history"][0]["loss"]  # (the comparison is of a run that learns)


@pytest.mark.parametrize("which, error", [
    ("no frozen layers", "model.trunk_cache=True needs model.freeze_layers > 0"),
    ("bert", "the towers' backbone is Bert; a trunk cache needs a decoder"),
])
def test_a_trunk_cache_the_run_cannot_have_is_refused_before_anything_is_written(tmp_path, which, error):
  from ml_collections import ConfigDict

  from scalingnote_jax.artifacts.lock import LOCK_FILE
  from scalingnote_jax.train import stage1

  cfg = trunk_config(**({"model.freeze_layers": 0} if which == "no frozen layers" else {}))
  if which == "bert":
    cfg.model.backbone = ConfigDict(dict(kind="bert", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                         intermediate_size=64))
  with pytest.raises(ValueError, match=error):
    stage1.train(cfg, str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == [LOCK_FILE]
