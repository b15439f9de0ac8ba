"""The document index: exact backend against numpy, ScaNN recall against exact, save/load round trips,
refusal of inconsistent directories, atomic saves."""

import json
import os
import re

import numpy as np
import pytest

from scalingnote_jax.data.synthetic import clustered_embeddings
from scalingnote_jax.index import BRUTE_FORCE_BELOW, Index, IndexFormatError, load_index, scann_defaults


def ids_for(n: int) -> list[str]:
  return [f"doc{i}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus():
  d_NxD, q_QxD = clustered_embeddings(20_000, 64, 500)
  return d_NxD, q_QxD, ids_for(len(d_NxD))


@pytest.fixture(scope="module")
def scann_index(corpus):
  d_NxD, _, ids = corpus
  return Index.build(d_NxD, ids, backend="scann")


def test_exact_backend_equals_numpy_brute_force():
  rng = np.random.default_rng(0)
  d_NxD = rng.normal(size=(1000, 32)).astype(np.float32)
  q_QxD = rng.normal(size=(50, 32)).astype(np.float32)
  index = Index.build(d_NxD, ids_for(1000), backend="exact")
  assert (index.dim, index.size) == (32, 1000)
  hits = index.search(q_QxD, k=10)
  full_QxN = q_QxD @ d_NxD.T
  want = np.argsort(-full_QxN, axis=1)[:, :10]
  assert hits.ids == [[f"doc{i}" for i in row] for row in want]
  np.testing.assert_allclose(hits.scores, np.take_along_axis(full_QxN, want, axis=1), rtol=1e-5)
  assert hits.scores.dtype == np.float32


def test_scann_defaults_reach_recall_on_clustered_embeddings(corpus, scann_index):
  d_NxD, q_QxD, _ = corpus
  assert scann_index.params["brute_force"] is False  # 20k documents: the tree + AH + reorder path
  want = Index.build(d_NxD, ids_for(len(d_NxD)), backend="exact").search_indices(q_QxD, 10).ids
  got = scann_index.search_indices(q_QxD, 10).ids
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
  assert recall >= 0.95, recall
  one = scann_index.search_indices(q_QxD[:1], 10).ids  # the single-query path agrees with the batched one
  np.testing.assert_array_equal(one[0], got[0])


def test_scann_defaults_follow_corpus_size():
  assert scann_defaults(BRUTE_FORCE_BELOW - 1, 64) == {"brute_force": True}
  p = scann_defaults(1_000_000, 256)
  assert p["num_leaves"] == 2000 and p["training_sample_size"] == 250_000
  assert 0.04 * p["num_leaves"] <= p["num_leaves_to_search"] <= 0.06 * p["num_leaves"]
  assert scann_defaults(20_000, 64)["num_leaves"] == 141 and scann_defaults(100_000, 64)["num_leaves"] == 316
  assert scann_defaults(1_000_000, 256, brute_force=True) == {"brute_force": True}


def test_small_corpus_is_brute_force_and_exact():
  rng = np.random.default_rng(1)
  d_NxD = rng.normal(size=(300, 16)).astype(np.float32)
  q_QxD = rng.normal(size=(20, 16)).astype(np.float32)
  index = Index.build(d_NxD, ids_for(300), backend="scann")
  assert index.params == {"brute_force": True}
  got = index.search(q_QxD, k=5)
  want = Index.build(d_NxD, ids_for(300), backend="exact").search(q_QxD, k=5)
  assert got.ids == want.ids
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_save_load_search_identical(backend, corpus, scann_index, tmp_path):
  d_NxD, q_QxD, ids = corpus
  index = scann_index if backend == "scann" else Index.build(d_NxD, ids, backend="exact")
  index.save(str(tmp_path / "idx"))
  loaded = Index.load(str(tmp_path / "idx"), expect_dim=64, expect_size=len(ids))
  assert (loaded.backend, loaded.dim, loaded.size, loaded.params) == (backend, 64, len(ids), index.params)
  before, after = index.search(q_QxD, 10), loaded.search(q_QxD, 10)
  np.testing.assert_array_equal(before.scores, after.scores)
  assert before.ids == after.ids
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary directory left beside it
  assert not any(f.endswith(".pkl") for _, _, fs in os.walk(tmp_path) for f in fs)
  with pytest.raises(IndexFormatError, match="dim is 64, expected 128"):
    load_index(str(tmp_path / "idx"), expect_dim=128)


def test_wrong_query_dim_and_bad_inputs(scann_index):
  with pytest.raises(ValueError, match=r"queries must be \[Q, 64\].*got shape \(3, 32\)"):
    scann_index.search(np.zeros((3, 32), np.float32), 10)
  with pytest.raises(ValueError, match="2 doc ids for 3 embeddings"):
    Index.build(np.zeros((3, 4), np.float32), ["a", "b"], backend="exact")
  with pytest.raises(ValueError, match="not unique"):
    Index.build(np.zeros((2, 4), np.float32), ["a", "a"], backend="exact")
  with pytest.raises(TypeError, match="unknown ScaNN parameters"):
    Index.build(np.zeros((2, 4), np.float32), ["a", "b"], backend="scann", num_leafs=3)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_empty_corpus_and_k_larger_than_size(backend, tmp_path):
  empty = Index.build(np.zeros((0, 8), np.float32), [], backend=backend)
  hits = empty.search(np.ones((2, 8), np.float32), 10)
  assert hits.scores.shape == (2, 0) and hits.ids == [[], []]
  empty.save(str(tmp_path / "empty"))
  assert Index.load(str(tmp_path / "empty")).size == 0
  rng = np.random.default_rng(2)
  small = Index.build(rng.normal(size=(3, 8)).astype(np.float32), ["a", "b", "c"], backend=backend)
  hits = small.search(rng.normal(size=(4, 8)).astype(np.float32), 100)
  assert hits.scores.shape == (4, 3) and all(sorted(row) == ["a", "b", "c"] for row in hits.ids)
  assert np.all(np.diff(hits.scores, axis=1) <= 0)  # best first


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_tampered_manifest_is_refused(backend, corpus, scann_index, tmp_path):
  d_NxD, _, ids = corpus
  index = scann_index if backend == "scann" else Index.build(d_NxD, ids, backend="exact")
  path = str(tmp_path / "idx")
  index.save(path)
  manifest_path = os.path.join(path, "manifest.json")
  with open(manifest_path) as f:
    good = json.load(f)

  def tamper(**changes):
    with open(manifest_path, "w") as f:
      json.dump({**good, **changes}, f)

  tamper(size=len(ids) + 1)
  with pytest.raises(IndexFormatError, match=rf"{re.escape(path)}: manifest says {len(ids) + 1} documents but "
                     rf"doc_ids.json holds {len(ids)}"):
    Index.load(path)
  tamper(dim=65)  # the backend's files say 64
  with pytest.raises(IndexFormatError, match=rf"{re.escape(path)}: .*64.*the manifest says .*65"):
    Index.load(path)
  tamper(format_version=99)
  with pytest.raises(IndexFormatError, match="format version 99 is unknown"):
    Index.load(path)
  os.remove(manifest_path)
  with pytest.raises(IndexFormatError, match="no manifest.json"):
    Index.load(path)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_a_flipped_byte_is_refused_naming_the_file(backend, corpus, scann_index, tmp_path):
  """Same-size corruption (the size check alone let a 40-byte flip in dataset.npy serve wrong results)."""
  d_NxD, _, ids = corpus
  index = scann_index if backend == "scann" else Index.build(d_NxD, ids, backend="exact")
  path = tmp_path / "idx"
  index.save(str(path))
  biggest = max((p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"),
                key=lambda p: p.stat().st_size)
  for target in (biggest, path / "doc_ids.json"):
    original = target.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    target.write_bytes(bytes(flipped))
    rel = re.escape(str(target.relative_to(path)))
    with pytest.raises(IndexFormatError, match=rf"file {rel} does not match its checksum"):
      Index.load(str(path))
    target.write_bytes(original)
  assert Index.load(str(path)).size == len(ids)


def test_backend_file_disagreeing_with_doc_ids_is_refused(tmp_path):
  rng = np.random.default_rng(3)
  path = str(tmp_path / "idx")
  Index.build(rng.normal(size=(10, 4)).astype(np.float32), ids_for(10), backend="exact").save(path)
  np.save(os.path.join(path, "embeddings.npy"), np.zeros((9, 4), np.float32))
  with open(os.path.join(path, "manifest.json")) as f:
    m = json.load(f)
  m["files"]["embeddings.npy"] = os.path.getsize(os.path.join(path, "embeddings.npy"))
  with open(os.path.join(path, "manifest.json"), "w") as f:  # the byte count now agrees: the shape check must refuse
    json.dump(m, f)
  with pytest.raises(IndexFormatError, match=r"embeddings.npy is float32\[9, 4\], the manifest says float32\[10, 4\]"):
    Index.load(path)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_interrupted_save_keeps_previous_index(backend, monkeypatch, tmp_path):
  rng = np.random.default_rng(4)
  old = Index.build(rng.normal(size=(200, 8)).astype(np.float32), ids_for(200), backend=backend)
  path = str(tmp_path / "idx")
  old.save(path)
  q_QxD = rng.normal(size=(5, 8)).astype(np.float32)
  want = old.search(q_QxD, 5)
  new = Index.build(rng.normal(size=(300, 8)).astype(np.float32), ids_for(300), backend=backend)
  real_write = type(new)._write

  def dies_midway(self, directory):
    real_write(self, directory)  # the backend's files are written ...
    raise KeyboardInterrupt("killed during save")  # ... then the process dies before the manifest

  monkeypatch.setattr(type(new), "_write", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    new.save(path)
  with pytest.raises(KeyboardInterrupt):
    new.save(str(tmp_path / "fresh"))
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # no partial target, no temporary directory
  got = Index.load(path, expect_size=200).search(q_QxD, 5)
  np.testing.assert_array_equal(got.scores, want.scores)
  assert got.ids == want.ids
  monkeypatch.undo()
  new.save(path)  # a complete save replaces the old index
  assert Index.load(path).size == 300 and sorted(os.listdir(tmp_path)) == ["idx"]


def test_failed_rename_into_place_restores_previous_index(monkeypatch, tmp_path):
  import scalingnote_jax.index.index as index_module

  path = str(tmp_path / "idx")
  Index.build(np.eye(4, dtype=np.float32), ids_for(4), backend="exact").save(path)
  real_rename = os.rename

  def rename(src, dst):
    if os.path.basename(src).startswith(".idx.tmp-"):  # the old index is already aside at this point
      raise OSError("disk gone")
    real_rename(src, dst)

  monkeypatch.setattr(index_module.os, "rename", rename)
  with pytest.raises(OSError, match="disk gone"):
    Index.build(np.eye(5, dtype=np.float32), ids_for(5), backend="exact").save(path)
  monkeypatch.undo()
  assert Index.load(path).size == 4 and sorted(os.listdir(tmp_path)) == ["idx"]


def test_save_refuses_to_replace_a_non_index_directory(tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "precious.txt").write_text("keep me")
  index = Index.build(np.eye(4, dtype=np.float32), ids_for(4), backend="exact")
  with pytest.raises(FileExistsError, match="not an index directory"):
    index.save(str(tmp_path / "data"))
  assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
