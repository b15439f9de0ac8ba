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


@pytest.mark.floor
@pytest.mark.parametrize("mesh", [None, (2, 2, 2)])
def test_an_encoder_reads_the_texts_a_trunk_cache_holds_and_encodes_the_rest_in_full(tmp_path, monkeypatch, mesh):
  """`Encoder.use_trunk`: rows some store of this trunk holds (found by content, in any of its stores) are
  encoded from their cached states, the rest in full, and every row equals the encoder without the cache."""
  from types import SimpleNamespace

  from scalingnote_jax.data.trunk import TrunkCache
  from scalingnote_jax.encoder import Encoder
  from scalingnote_jax.sharding import make_mesh

  monkeypatch.setenv("SCALINGNOTE_CACHE_DIR", str(tmp_path))
  tower = Tower(create_backbone(CFG, nnx.Rngs(0)), TowerConfig(pooling="mean", max_length=16), rngs=nnx.Rngs(0))
  assert TrunkCache.find(tower, 2) is None  # nothing cached yet
  Trunk(tower, 2, 8, 0).cache(ROWS, "documents")  # ROWS[3] (9 tokens) is stored as its first 8
  Trunk(tower, 2, 16, 0).cache([ROWS[3], ROWS[0]], "queries")  # another store, of another length
  Trunk(tower, 1, 8, 0).cache([[5, 6, 7]], "documents")  # another trunk's: not this one's to read
  other = list(np.random.default_rng(9).integers(1, 64, 6))
  rows = [*ROWS, ROWS[3][:8], other, ROWS[1]]
  cache = TrunkCache.find(tower, 2)
  assert len(cache.stores) == 2
  where, _ = cache.locate(rows)
  np.testing.assert_array_equal(where, [0, 0, 0, 1, 0, -1, 0])  # 9 tokens: only the 16-token store has them

  encoder = lambda: Encoder(tower, SimpleNamespace(pad_id=0), mesh and make_mesh(mesh))  # noqa: E731
  plain, cached = encoder(), encoder()
  cached.use_trunk(cache)
  calls = []
  from_trunk = cached._from_trunk
  cached._from_trunk = lambda *a: calls.append(a[1].shape) or from_trunk(*a)
  want = plain.encode_ids(rows, batch_size=4)
  np.testing.assert_allclose(cached.encode_ids(rows, batch_size=4), want, atol=1e-5)
  assert [shape[:2] for shape in calls] == ([(4, 8), (4, 8), (4, 16)] if mesh else [(4, 8), (1, 8), (1, 16)])
  assert cached.encode_ids([], 4).shape == (0, CFG.hidden_size)


def trunk_config(**fields):
  # (one negative candidate per query: the examples name 31 of the 32 documents, validation searches all 32)
  fields = {"model.freeze_layers": 1, "model.trunk_cache": True, "num_steps": 4, "log_every": 1,
            "checkpoint.every": 2, "data.n_neg": 1, "data.n_neg_candidates": 1, "batch_size": 8, "mesh": "(2,2,2)",
            "eval.every": 4, "eval.at_start": False, **fields}
  return load_config(f"{ROOT}/configs/tiny.py:smoke", [f"--config.{k}={v}" for k, v in fields.items()])


@pytest.mark.slow
def test_stage1_with_a_trunk_cache_trains_as_without_it_resumes_and_reuses_the_store(tmp_path, monkeypatch):
  from scalingnote_jax.train import stage1

  monkeypatch.setenv("SCALINGNOTE_CACHE_DIR", str(tmp_path / "cache"))
  plain = stage1.train(trunk_config(**{"model.trunk_cache": False}), str(tmp_path / "plain"))
  assert not os.path.exists(tmp_path / "cache")

  stage1.train(trunk_config(num_steps=2), str(tmp_path / "cached"))
  # (each tower's trunk has its own fingerprint directory: their order is arbitrary, the names are not)
  stores = sorted((str(p.parent) for p in (tmp_path / "cache" / "trunk").glob("*/*/COMPLETE")), key=os.path.basename)
  assert [os.path.basename(s).split("-")[:2] for s in stores] == [["documents", "64"], ["queries", "32"]]
  written = {s: os.path.getmtime(os.path.join(s, "COMPLETE")) for s in stores}
  resumed = stage1.train(trunk_config(), str(tmp_path / "cached"), resume=True)
  assert {s: os.path.getmtime(os.path.join(s, "COMPLETE")) for s in stores} == written  # found, not recomputed

  np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in plain["history"][2:]],
                             atol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(resumed["model"])), jax.tree.leaves(nnx.state(plain["model"]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert plain["history"][-1]["loss"] < plain["history"][0]["loss"]  # (the comparison is of a run that learns)

  # validation searched the whole corpus from the cache (its documents are all in the store) and scored as
  # the full forward does; so does an evaluation of the trained towers (`towers` finds the store)
  for key in ("ndcg_at_10", "recall_at_10", "contrastive_entropy"):
    assert resumed["evals"][-1][key] == pytest.approx(plain["evals"][-1][key], abs=1e-5), key
  from scalingnote_jax.data import synthetic
  from scalingnote_jax.encoder import towers

  corpus = list(synthetic.generate(32, queries_per_doc=1, seed=0).corpus.values())
  _, d_enc, _ = towers(str(tmp_path / "cached"))
  assert (d_enc.trunk.locate(d_enc.tokenize(d_enc.document_texts(corpus)))[0] >= 0).all()
  from_cache = d_enc.encode_documents(corpus)
  d_enc.use_trunk(None)
  np.testing.assert_allclose(from_cache, d_enc.encode_documents(corpus), atol=1e-5)


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
