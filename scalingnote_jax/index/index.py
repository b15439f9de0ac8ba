"""The document index: one interface over exact inner-product search and ScaNN.

  index = Index.build(d_NxD, doc_ids, backend="scann")   # or "exact"; keywords override the defaults
  hits = index.search(q_QxD, k=10)                        # best first: hits.ids[q][j], hits.scores[q, j]
  index.save("runs/index")
  index = Index.load("runs/index", expect_dim=256)

On disk an index is a directory: `manifest.json` (format version, backend, dim, size, params, the backend's
files with their byte sizes and SHA-256, verified at load), `doc_ids.json`, and the backend's files (exact: `embeddings.npy`; ScaNN: its
own serialized searcher under `scann/`). Nothing is pickled. A save writes everything into a temporary
directory beside the target and renames it into place, so a reader never sees a half-written index and a
save that dies midway leaves the previous index as it was.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile

import numpy as np

from scalingnote_jax.artifacts.checksum import digest_tree, verify_tree
from scalingnote_jax.artifacts.files import fsync_tree, replace_dir
from scalingnote_jax.index.exact import exact_search
from scalingnote_jax.index.hits import Hits, id_array

FORMAT = "scalingnote_jax.index"
FORMAT_VERSION = 2  # 2: the manifest records each file's SHA-256 beside its size
MANIFEST = "manifest.json"
DOC_IDS = "doc_ids.json"

# Below this many documents ScaNN scores every document exactly (`score_brute_force`): results are exact
# and nothing is trained. Measured on 2 cores, 256-d clustered embeddings: brute force over 10k documents
# answers in 0.18 ms (13k queries/s batched); the default tree there is 3x faster at recall 0.99 -- a gain of
# tenths of a millisecond, bought with k-means over leaves of ~100 documents. At 20k brute force costs
# 0.45 ms and the tree is 13x faster, so the line sits at 10k (ScaNN's own guide says 20k).
BRUTE_FORCE_BELOW = 10_000


class IndexFormatError(ValueError):
  """An index directory that is missing, incomplete, of an unknown version, or inconsistent."""


def scann_defaults(n: int, dim: int, brute_force: bool | None = None) -> dict:
  """ScaNN settings for a corpus of `n` documents of dimension `dim` (any may be overridden by keyword).

  Brute force below BRUTE_FORCE_BELOW documents (unless `brute_force` says otherwise). Otherwise a k-means
  tree of sqrt(n) leaves (ScaNN's rule of thumb) up to 100k documents, growing to 2 sqrt(n) at 1M (x (log10 n
  - 4) above 100k), searching num_leaves^0.6 of them: 14% of 141 leaves (20k documents), 10% of 316 (100k),
  4.8% of 2000 (1M). A query's neighbours spread over more leaves as leaves shrink, but far fewer than
  proportionally: on clustered embeddings this keeps recall@10 at ~0.96 at all three sizes
  (tests/test_index.py, benchmarks/index_ann.py), where a fixed 5% gives 0.89 at 20k. Measured on 2 cores:
  at 1M, 2000 leaves answer 23% more queries/s than 1000 at the same recall (0.957); at 20k, twice sqrt(n)
  leaves lose recall (0.968 -> 0.940) for 5% more speed; at 100k the two are level. Asymmetric
  hashing with 2 dimensions per 4-bit block and anisotropic loss (threshold 0.2, ScaNN's advice for dot
  product); the best 100 AH candidates re-scored exactly (200 bought < 0.005 recall there).
  """
  del dim  # the block count of AH follows from dim and dims_per_block by itself
  if brute_force is None:
    brute_force = n < BRUTE_FORCE_BELOW
  if brute_force:
    return dict(brute_force=True)
  num_leaves = max(1, round(math.sqrt(n) * max(1.0, math.log10(n) - 4)))
  return dict(brute_force=False, num_leaves=num_leaves, num_leaves_to_search=min(num_leaves, round(num_leaves**0.6)),
              training_sample_size=min(n, 250_000), dims_per_block=2, anisotropic_quantization_threshold=0.2,
              reorder=100)


class Index:
  """A searchable set of (doc id, embedding) pairs. Create with `Index.build` or `Index.load`."""

  backend: str = ""

  def __init__(self, doc_ids: list[str], dim: int, params: dict, path: str | None = None):
    self.doc_ids = doc_ids
    self._id_array = id_array(doc_ids)
    self.dim = dim
    self.size = len(doc_ids)
    self.params = params
    self.path = path  # where it was loaded from or last saved to (for error messages)

  # -- building and searching ------------------------------------------------------------------------------

  @staticmethod
  def build(embeddings_NxD: np.ndarray, doc_ids, backend: str = "scann", **params) -> Index:
    """An index over the rows of `embeddings_NxD` (row i is document `doc_ids[i]`), scored by inner product.

    `params` override the backend's defaults (ScaNN: see `scann_defaults`; exact: none).
    """
    if backend not in BACKENDS:
      raise ValueError(f"unknown index backend {backend!r}; expected one of {sorted(BACKENDS)}")
    d_NxD = np.ascontiguousarray(embeddings_NxD, dtype=np.float32)
    if d_NxD.ndim != 2:
      raise ValueError(f"embeddings must be [N, D], got shape {d_NxD.shape}")
    doc_ids = list(doc_ids)
    if len(doc_ids) != d_NxD.shape[0]:
      raise ValueError(f"{len(doc_ids)} doc ids for {d_NxD.shape[0]} embeddings")
    if not all(isinstance(d, str) for d in doc_ids):
      raise TypeError("doc ids must be strings")
    if len(set(doc_ids)) != len(doc_ids):
      raise ValueError(f"doc ids are not unique ({len(doc_ids) - len(set(doc_ids))} duplicates)")
    return BACKENDS[backend]._build(d_NxD, doc_ids, params)

  def search(self, queries_QxD: np.ndarray, k: int, **search_params) -> Hits:
    """The top k documents of each query (ids [Q][k], float32 scores [Q, k]), best first. k is clipped to
    the index size.

    A result the backend could not fill (ScaNN, when the leaves searched hold fewer than k documents) has
    score -inf and id None.
    """
    return self.search_indices(queries_QxD, k, **search_params).with_ids(self._id_array)

  def search_indices(self, queries_QxD: np.ndarray, k: int, **search_params) -> Hits:
    """Like `search`, with row numbers into `doc_ids` (int64 [Q, k], -1 where unfilled) as ids."""
    q_QxD = np.ascontiguousarray(queries_QxD, dtype=np.float32)
    if q_QxD.ndim != 2 or q_QxD.shape[1] != self.dim:
      raise ValueError(f"queries must be [Q, {self.dim}] for the index at {self.path or '(in memory)'} "
                       f"(dim {self.dim}), got shape {q_QxD.shape}")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, self.size)
    if k == 0 or q_QxD.shape[0] == 0:
      return Hits(np.zeros((q_QxD.shape[0], k), np.int64), np.zeros((q_QxD.shape[0], k), np.float32))
    idx_QxK, scores_QxK = self._search(q_QxD, k, **search_params)
    return Hits(idx_QxK.astype(np.int64, copy=False), scores_QxK.astype(np.float32, copy=False))

  # -- saving and loading ----------------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """Write the index to directory `path` atomically, replacing an index already there."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not _is_index_dir(path):
      raise FileExistsError(f"{path} exists and is not an index directory: refusing to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
      if self.size:
        self._write(tmp)
      _write_json(os.path.join(tmp, DOC_IDS), self.doc_ids)
      manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, backend=self.backend, dim=self.dim,
                      size=self.size, params=self.params, files=digest_tree(tmp))
      _write_json(os.path.join(tmp, MANIFEST), manifest)  # written last: a directory without it is no index
      fsync_tree(tmp)
      replace_dir(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    self.path = path

  @staticmethod
  def load(path: str, *, expect_dim: int | None = None, expect_size: int | None = None) -> Index:
    """Read an index saved by `save`, checking it is complete and self-consistent (and, if given, that it
    has the dimension and size the caller expects)."""
    path = os.path.abspath(path)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
      what = "no such directory" if not os.path.isdir(path) else f"no {MANIFEST} (not an index, or a partial copy)"
      aside = glob.glob(os.path.join(os.path.dirname(path), f".{glob.escape(os.path.basename(path))}.old-*"))
      if aside:  # a save died between its two renames (see replace_dir)
        what += f"; the previous index is complete at {aside[0]}"
      raise IndexFormatError(f"index {path}: {what}")
    with open(manifest_path, encoding="utf-8") as f:
      try:
        m = json.load(f)
      except json.JSONDecodeError as e:
        raise IndexFormatError(f"index {path}: {MANIFEST} is not valid JSON ({e.msg})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
      raise IndexFormatError(f"index {path}: {MANIFEST} is not a {FORMAT} manifest")
    if m.get("format_version") not in (1, FORMAT_VERSION):  # version 1 recorded sizes only
      raise IndexFormatError(f"index {path}: format version {m.get('format_version')!r} is unknown to this "
                             f"code (it reads versions 1 to {FORMAT_VERSION})")
    if m.get("backend") not in BACKENDS:
      raise IndexFormatError(f"index {path}: unknown backend {m.get('backend')!r}")
    for key in ("dim", "size"):
      if not isinstance(m.get(key), int) or m[key] < 0:
        raise IndexFormatError(f"index {path}: manifest {key} is {m.get(key)!r}, expected an integer >= 0")
    dim, size = m["dim"], m["size"]
    if expect_dim is not None and dim != expect_dim:
      raise IndexFormatError(f"index {path}: dim is {dim}, expected {expect_dim}")
    if expect_size is not None and size != expect_size:
      raise IndexFormatError(f"index {path}: holds {size} documents, expected {expect_size}")
    if not isinstance(m.get("files"), dict) or DOC_IDS not in m["files"]:
      raise IndexFormatError(f"index {path}: manifest lists no files (or not {DOC_IDS})")
    verify_tree(path, m["files"], IndexFormatError, f"index {path}")  # sizes, and content since version 2
    with open(os.path.join(path, DOC_IDS), encoding="utf-8") as f:
      doc_ids = json.load(f)
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
      raise IndexFormatError(f"index {path}: {DOC_IDS} must be a JSON list of strings")
    if len(doc_ids) != size:
      raise IndexFormatError(f"index {path}: manifest says {size} documents but {DOC_IDS} holds {len(doc_ids)}")
    return BACKENDS[m["backend"]]._read(path, doc_ids, dim, m.get("params", {}))

  def __repr__(self):
    return f"{type(self).__name__}(size={self.size}, dim={self.dim}, params={self.params})"

  # -- what a backend implements ---------------------------------------------------------------------------

  @classmethod
  def _build(cls, d_NxD: np.ndarray, doc_ids: list[str], params: dict) -> Index:
    raise NotImplementedError

  def _search(self, q_QxD: np.ndarray, k: int, **search_params) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers [Q, k], scores [Q, k]) of a non-empty batch, best first, -1 where unfilled."""
    raise NotImplementedError

  def _write(self, directory: str) -> None:
    raise NotImplementedError

  @classmethod
  def _read(cls, path: str, doc_ids: list[str], dim: int, params: dict) -> Index:
    raise NotImplementedError


def load_index(path: str, **expect) -> Index:
  """`Index.load(path, expect_dim=..., expect_size=...)`."""
  return Index.load(path, **expect)


class ExactIndex(Index):
  """Brute-force inner product over all documents (numpy matmul + partial sort)."""

  backend = "exact"

  def __init__(self, d_NxD: np.ndarray, doc_ids: list[str], params: dict, path: str | None = None):
    super().__init__(doc_ids, d_NxD.shape[1], params, path)
    self.d_NxD = d_NxD

  @classmethod
  def _build(cls, d_NxD, doc_ids, params):
    if params:
      raise TypeError(f"the exact backend takes no parameters, got {sorted(params)}")
    return cls(d_NxD, doc_ids, {})

  def _search(self, q_QxD, k):
    hits = exact_search(q_QxD, self.d_NxD, k)
    return hits.ids, hits.scores

  def _write(self, directory):
    np.save(os.path.join(directory, "embeddings.npy"), self.d_NxD)

  @classmethod
  def _read(cls, path, doc_ids, dim, params):
    if not doc_ids:
      return cls(np.zeros((0, dim), np.float32), doc_ids, params, path)
    d_NxD = np.load(os.path.join(path, "embeddings.npy"), allow_pickle=False)
    if d_NxD.dtype != np.float32 or d_NxD.shape != (len(doc_ids), dim):
      raise IndexFormatError(f"index {path}: embeddings.npy is {d_NxD.dtype}{list(d_NxD.shape)}, the manifest "
                             f"says float32[{len(doc_ids)}, {dim}]")
    return cls(d_NxD, doc_ids, params, path)


class ScannIndex(Index):
  """ScaNN: k-means tree + anisotropic asymmetric hashing + exact reorder (brute force for small corpora).

  `search` also takes `leaves_to_search` and `reorder` to trade recall for speed per call.
  """

  backend = "scann"

  def __init__(self, searcher, doc_ids: list[str], dim: int, params: dict, path: str | None = None):
    super().__init__(doc_ids, dim, params, path)
    self.searcher = searcher  # None for an empty corpus (ScaNN cannot train on nothing)

  @classmethod
  def _build(cls, d_NxD, doc_ids, params):
    n, dim = d_NxD.shape
    defaults = scann_defaults(n, dim, params.get("brute_force"))
    unknown = set(params) - set(defaults)
    if unknown:
      raise TypeError(f"unknown ScaNN parameters {sorted(unknown)}; known: {sorted(defaults)}")
    p = {**defaults, **params}
    if n == 0:
      return cls(None, doc_ids, dim, p)
    from scann.scann_ops.py import scann_ops_pybind  # imported here: loading ScaNN's library is not free

    builder = scann_ops_pybind.builder(d_NxD, 10, "dot_product")
    if p["brute_force"]:
      builder = builder.score_brute_force()
    else:
      builder = (builder.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
                              training_sample_size=p["training_sample_size"])
                 .score_ah(p["dims_per_block"],
                           anisotropic_quantization_threshold=p["anisotropic_quantization_threshold"])
                 .reorder(p["reorder"]))
    return cls(builder.build(), doc_ids, dim, p)

  def _search(self, q_QxD, k, leaves_to_search=None, reorder=None):
    if self.params["brute_force"]:
      pre, leaves = -1, -1
    else:
      # At least k candidates must reach the exact reorder, or the tail of the top k is AH-scored only.
      pre = max(reorder or self.params["reorder"], k)
      leaves = leaves_to_search or -1
    if q_QxD.shape[0] == 1:  # the single-query path skips the batching machinery (latency)
      idx, dist = self.searcher.search(q_QxD[0], k, pre, leaves)
      idx_QxK, scores_QxK = idx[None], dist[None]
    else:
      # Split the batch so that every core gets a share (ScaNN's default splits at 256 queries).
      batch = max(1, min(256, -(-q_QxD.shape[0] // (os.cpu_count() or 1))))
      idx_QxK, scores_QxK = self.searcher.search_batched_parallel(q_QxD, k, pre, leaves, batch_size=batch)
    idx_QxK = idx_QxK.astype(np.int64)
    if idx_QxK.shape[1] < k:  # the single-query path returns only what it found
      pad = k - idx_QxK.shape[1]
      idx_QxK = np.pad(idx_QxK, ((0, 0), (0, pad)))
      scores_QxK = np.pad(scores_QxK, ((0, 0), (0, pad)), constant_values=np.nan)
    unfilled = np.isnan(scores_QxK)  # ScaNN pads short result lists with index 0 and score NaN
    if unfilled.any():
      idx_QxK[unfilled] = -1
      scores_QxK = np.where(unfilled, -np.inf, scores_QxK)
    return idx_QxK, scores_QxK

  def _write(self, directory):
    os.mkdir(os.path.join(directory, "scann"))
    # Relative paths inside ScaNN's asset list, so the directory still loads after the rename into place.
    self.searcher.serialize(os.path.join(directory, "scann"), relative_path=True)

  @classmethod
  def _read(cls, path, doc_ids, dim, params):
    if not doc_ids:
      return cls(None, doc_ids, dim, params, path)
    from scann.scann_ops.py import scann_ops_pybind

    sdir = os.path.join(path, "scann")
    assets = os.path.join(sdir, "scann_assets.pbtxt")
    if not os.path.isfile(assets):
      raise IndexFormatError(f"index {path}: scann/scann_assets.pbtxt is missing")
    # Check the sizes the arrays declare before handing them to ScaNN (a mismatch there is a crash at best).
    for name in ("dataset.npy", "hashed_dataset.npy", "datapoint_to_token.npy"):
      f = os.path.join(sdir, name)
      if os.path.isfile(f):
        shape = np.load(f, mmap_mode="r", allow_pickle=False).shape
        if shape[0] != len(doc_ids):
          raise IndexFormatError(f"index {path}: scann/{name} holds {shape[0]} rows but there are "
                                 f"{len(doc_ids)} doc ids")
        if name == "dataset.npy" and shape[1] != dim:
          raise IndexFormatError(f"index {path}: scann/{name} has dim {shape[1]}, the manifest says {dim}")
    # Built directly (not scann_ops_pybind.load_searcher), which would unpickle scann_docids.pkl if present.
    with open(assets, encoding="utf-8") as f:
      searcher = scann_ops_pybind.ScannSearcher(scann_ops_pybind.scann_pybind.ScannNumpy(sdir, f.read()))
    if searcher.size() != len(doc_ids):
      raise IndexFormatError(f"index {path}: the ScaNN searcher holds {searcher.size()} documents but there are "
                             f"{len(doc_ids)} doc ids")
    return cls(searcher, doc_ids, dim, params, path)


BACKENDS: dict[str, type[Index]] = {"exact": ExactIndex, "scann": ScannIndex}


# -- files ------------------------------------------------------------------------------------------------

def _is_index_dir(path: str) -> bool:
  """An index directory (ours to replace) or an empty one."""
  return os.path.isdir(path) and (os.path.isfile(os.path.join(path, MANIFEST)) or not os.listdir(path))


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1 if isinstance(obj, dict) else None)
