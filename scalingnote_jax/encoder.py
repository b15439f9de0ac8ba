"""Encoding API in the sentence-transformers style.

    enc = Encoder.from_pretrained("path/to/hf_dir_or.gguf")
    q_NxD = enc.encode_queries(["what is ...?"])
    d_NxD = enc.encode_documents([{"title": "...", "text": "..."}])
    q_D = enc.encode_query("what is ...?")                         # sentence-transformers' names: a string
    d_NxD = enc.encode_document(["...", "..."], normalize_embeddings=True)   # or a list

    q_enc, d_enc, temperature = towers("runs/teacher")          # a Stage 1 workdir's two towers

    reranker = CrossEncoder.from_workdir("runs/reranker")          # `scalingnote train-reranker`
    s_N = reranker.predict(["what is ...?"] * 2, [doc_a, doc_b])   # one score per (query, document) pair
    s_N = reranker.predict([("what is ...?", doc_a), ("what is ...?", doc_b)])   # sentence-transformers' form
    ranked = reranker.rank("what is ...?", [doc_a, doc_b], top_k=1)           # [{"corpus_id", "score"}]

Inputs are sorted by length and padded to a few bucketed shapes so jit compiles a handful of programs; the
caller's order is restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.checkpoint import fingerprint
from scalingnote_jax.data import runs, trunk
from scalingnote_jax.models import load_backbone, resolve_path
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.models.st_folder import load_dense, sentence_transformers_folder
from scalingnote_jax.models.tower import Tower, TowerConfig

MIN_LENGTH_BUCKET = 16


def bucket(n: int, cap: int, smallest: int = 1) -> int:
  """The smallest power of two >= n (and >= smallest), or `cap` if that is smaller."""
  b = smallest
  while b < n:
    b *= 2
  return min(b, cap)


class Encoder:
  """A tower with its tokenizer; encodes text into float32 numpy arrays [N, D]."""

  def __init__(self, tower: Tower, tokenizer: Tokenizer, mesh: jax.sharding.Mesh | None = None):
    """With a `mesh`, each batch is split over its batch axes (data parallel over all devices); the tower's
    parameters keep whatever sharding they have."""
    self.tower, self.tokenizer, self.cfg, self.mesh = tower, tokenizer, tower.cfg, mesh
    self._graphdef, self._state = nnx.split(tower)
    self._fingerprint, self.trunk = None, None
    # A mesh over several processes (evaluation during multi-process training): every process passes the
    # same batch and gets the whole result back.
    self.spans_processes = mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)
    self._forward = jax.jit(lambda state, ids, mask: nnx.merge(self._graphdef, state)(ids, mask),
                            out_shardings=sharding.replicated(mesh) if self.spans_processes else None)
    self._rows_multiple = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)

  @classmethod
  def from_pretrained(cls, path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                      mesh: jax.sharding.Mesh | None = None, **tower_fields) -> Encoder:
    """From a HF model directory, a llama GGUF file or a packaged model name (`models.PACKAGED`);
    `tower_fields` override `TowerConfig` defaults."""
    path = resolve_path(path)
    backbone, backbone_cfg = load_backbone(path, dtype=dtype, param_dtype=param_dtype)
    unknown = set(tower_fields) - {f.name for f in dataclasses.fields(TowerConfig)}
    if unknown:
      raise TypeError(f"unknown TowerConfig field(s): {sorted(unknown)}")
    folder = None if path.endswith(".gguf") else path
    st = sentence_transformers_folder(folder) if folder else None  # read once: settings, then Dense weights
    tower = Tower(backbone, TowerConfig.default_for(backbone_cfg, folder, st=st, **tower_fields), rngs=nnx.Rngs(0))
    if st and st.dense:  # the folder's Dense module, with its weights
      load_dense(tower, st.dense)
    return cls(tower, Tokenizer.from_pretrained(path), mesh)

  @property
  def dim(self) -> int:
    return self.tower.dim

  @property
  def row_shape(self) -> tuple[int, ...]:
    """The shape of one encoded item (what an embedding store holds per row)."""
    return (self.dim,)

  @property
  def fingerprint(self) -> str:
    """What identifies the embeddings this encoder makes: a content hash of the tower's parameters
    (`artifacts.checkpoint.fingerprint`: the same on any mesh) and of its config (pooling, prompts, length,
    normalisation). An embedding store records it of the tower that wrote it; a student records its
    teacher's."""
    if self._fingerprint is None:
      h = hashlib.sha256(fingerprint(self._state).encode())
      h.update(json.dumps(dataclasses.asdict(self.cfg), sort_keys=True).encode())
      self._fingerprint = h.hexdigest()[:32]
    return self._fingerprint

  def update(self, tower: Tower) -> None:
    """Use `tower`'s current parameters (same structure; e.g. during training): no recompilation. (A trunk
    cache in use stays: the caller trains above it.)"""
    self._state, self._fingerprint = nnx.state(tower), None

  def use_trunk(self, cache) -> None:
    """Encode every text a frozen trunk's cache holds (`data.trunk.TrunkCache`; None: none) from its cached
    states, running only the blocks above the trunk: the same embeddings (tested <= 1e-5), a fraction of the
    work. Texts the cache lacks are encoded in full."""
    self.trunk = cache
    if cache is not None:
      blocks = cache.blocks
      self._from_trunk = jax.jit(lambda state, h, mask: nnx.merge(self._graphdef, state).from_trunk(h, mask, blocks),
                                 out_shardings=sharding.replicated(self.mesh) if self.spans_processes else None)

  def query_texts(self, queries: Sequence[str]) -> list[str]:
    """Queries with the query prompt applied."""
    _check_items(queries, "queries", allow_dict=False)
    return [self.cfg.query_prompt.format(text=q).strip() for q in queries]

  def document_texts(self, docs: Sequence[str | dict]) -> list[str]:
    """Documents (strings or {"title", "text"} dicts) with the document prompt applied."""
    _check_items(docs, "docs", allow_dict=True)
    texts = []
    for d in docs:
      title, text = (d.get("title") or "", d["text"]) if isinstance(d, dict) else ("", d)
      texts.append(self.cfg.document_prompt.format(title=title, text=text).strip())
    return texts

  def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
    """Token ids as the tower sees them: truncated to max_length, EOS appended when configured."""
    return self.tokenizer.encode(texts, max_length=self.cfg.max_length, append_eos=self.cfg.append_eos,
                                 truncate=truncate)

  def encode_queries(self, queries: Sequence[str], batch_size: int = 32, **kw) -> np.ndarray:
    return self.encode(self.query_texts(queries), batch_size, **kw)

  def encode_documents(self, docs: Sequence[str | dict], batch_size: int = 32, **kw) -> np.ndarray:
    """Documents as strings or {"title", "text"} dicts."""
    return self.encode(self.document_texts(docs), batch_size, **kw)

  def encode(self, texts: Sequence[str], batch_size: int = 32, *, truncate: bool = True,
             show_progress: bool | None = None) -> np.ndarray:
    """Already-prompted texts -> [N, D]. The progress bar shows by default beyond 10 batches."""
    _check_items(texts, "texts", allow_dict=False)
    return self.encode_ids(self.tokenize(list(texts), truncate), batch_size, show_progress=show_progress)

  # sentence-transformers' names (v5): one text or a list; a single text gives one vector [D].
  def encode_query(self, queries: str | Sequence[str], batch_size: int = 32, **kw) -> np.ndarray:
    """sentence-transformers' `encode_query`: the query prompt applied; [D] for one string, [N, D] for a list."""
    return self._encode_st(self.query_texts, queries, batch_size, **kw)

  def encode_document(self, docs: str | dict | Sequence[str | dict], batch_size: int = 32, **kw) -> np.ndarray:
    """sentence-transformers' `encode_document`: the document prompt applied; documents as strings or
    {"title", "text"} dicts; [D] for one, [N, D] for a list."""
    return self._encode_st(self.document_texts, docs, batch_size, **kw)

  def _encode_st(self, prompt, items, batch_size: int, *, show_progress_bar: bool | None = None,
                 normalize_embeddings: bool = False) -> np.ndarray:
    one = isinstance(items, (str, dict))
    items = [items] if one else list(items)
    if not items:  # as sentence-transformers: nothing in, nothing out
      return np.zeros((0, self.dim), np.float32)
    emb = self.encode(prompt(items), batch_size, show_progress=show_progress_bar)
    if normalize_embeddings:
      emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb[0] if one else emb

  def encode_ids(self, ids: list[list[int]], batch_size: int = 32, *, show_progress: bool | None = None) -> np.ndarray:
    """Token id sequences -> [N, D], batched by length."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Batches: of the rows a trunk cache holds, by store and store row (reads in order); of the rest, by length.
    store_of, row_of = self.trunk.locate(ids) if self.trunk else (np.full(len(ids), -1), None)
    by_length = [i for i in np.argsort([-len(x) for x in ids], kind="stable") if store_of[i] < 0]
    batches = [(by_length[s:s + batch_size], None) for s in range(0, len(by_length), batch_size)]
    for k, st in enumerate(self.trunk.stores if self.trunk else ()):
      held = np.flatnonzero(store_of == k)
      held = held[np.argsort(row_of[held], kind="stable")]
      batches += [(held[s:s + batch_size], st) for s in range(0, len(held), batch_size)]
    show = len(batches) > 10 if show_progress is None else show_progress
    outs = []
    for rows, st in tqdm(batches, desc="encoding", unit="batch", disable=not show):
      if st is None:
        ids_BxT, mask_BxT = self._pad([ids[i] for i in rows], batch_size)
        outs.append(self._forward(self._state, *self._put(ids_BxT, mask_BxT)))  # async: no sync per batch
      else:
        h_BxTxE, mask_BxT = self._trunk_rows(st, row_of[rows], [len(ids[i]) for i in rows], batch_size)
        outs.append(self._from_trunk(self._state, *self._put(h_BxTxE, mask_BxT)))
    out = np.zeros((0, *self.row_shape), np.float32) if not ids else None
    for (rows, _), o in zip(batches, outs):
      o = np.asarray(o[:len(rows)], np.float32)
      out = np.empty((len(ids), *o.shape[1:]), np.float32) if out is None else out
      out[np.asarray(rows, np.int64)] = o
    return out

  def _put(self, *arrays):
    """A batch's arrays split over the mesh's batch axes (as they are without a mesh)."""
    if self.mesh is None:
      return arrays
    return tuple(jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim)) for x in arrays)

  def _trunk_rows(self, st, rows, lengths: list[int], batch_size: int):
    """Cached trunk states of store rows, padded as `_pad` pads token rows: [b, L, E] states, [b, L] mask."""
    b = -(-bucket(len(rows), batch_size) // self._rows_multiple) * self._rows_multiple
    states = st.read(rows)
    h = np.zeros((b, *states.shape[1:]), np.float32)
    h[:len(rows)] = states
    mask = np.zeros((b, st.length), np.int32)
    mask[len(rows):, 0] = 1  # filler rows get one token so no softmax row is fully masked
    for r, n in enumerate(lengths):
      mask[r, :n] = 1
    return h, mask

  def warmup(self, batch_size: int = 32) -> int:
    """Compiles every (batch, length) bucket that `encode(..., batch_size)` can meet, so that the first
    requests of a service do not wait for XLA; returns how many shapes that was."""
    powers = lambda cap: [2 ** i for i in range(cap.bit_length()) if 2 ** i <= cap] + [cap]  # noqa: E731
    shapes = {self._pad([[self.tokenizer.pad_id] * t] * b, batch_size)[0].shape
              for b in powers(batch_size) for t in powers(self.cfg.max_length)}
    for b, t in sorted(shapes):
      ids, mask = np.full((b, t), self.tokenizer.pad_id, np.int32), np.ones((b, t), np.int32)
      jax.block_until_ready(self._forward(self._state, *self._put(ids, mask)))
    return len(shapes)

  def _pad(self, rows: list[list[int]], batch_size: int):
    t = bucket(max(len(r) for r in rows), self.cfg.max_length, MIN_LENGTH_BUCKET)
    b = bucket(len(rows), batch_size)
    b = -(-b // self._rows_multiple) * self._rows_multiple  # every device gets the same number of rows
    ids = np.full((b, t), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    mask[len(rows):, 0] = 1  # filler rows get one token so no softmax row is fully masked
    for r, row in enumerate(rows):
      ids[r, :len(row)], mask[r, :len(row)] = row, 1
    return ids, mask


def towers(checkpoint: str, mesh: jax.sharding.Mesh | None = None,
           step: int | None = None) -> tuple[Encoder, Encoder, float | None]:
  """(query, document) encoders and the temperature they were trained at: a Stage 1 workdir's towers
  (its checkpoint `step`, default the latest; its fixed or learned temperature), or one HF dir / GGUF /
  packaged model for both sides (None: not trained here)."""
  if trained.is_stage1_workdir(checkpoint):
    model, tokenizer, cfg = trained.load_stage1(checkpoint, mesh, step)
    q_enc, d_enc = Encoder(model.query, tokenizer, mesh), Encoder(model.doc, tokenizer, mesh)
    if cfg.model.trunk_cache:  # trained above a frozen trunk: the texts its cache holds are encoded from it
      for enc in (q_enc, d_enc):
        enc.use_trunk(trunk.TrunkCache.find(enc.tower, cfg.model.freeze_layers))
    return q_enc, d_enc, 1.0 / float(model.scale())
  if step is not None:
    raise ValueError(f"{checkpoint}: a checkpoint step is for a Stage 1 workdir, and this is none")
  encoder = Encoder.from_pretrained(checkpoint, mesh=mesh)
  return encoder, encoder, None


def _check_items(items, what: str, *, allow_dict: bool):
  if isinstance(items, (str, dict)):
    one = {"queries": "encode_query", "docs": "encode_document"}.get(what, "encode_query / encode_document")
    raise TypeError(f"{what}: expected a list, got one {type(items).__name__} ({one} takes a single one, as "
                    "sentence-transformers does, and returns [D])")
  if not isinstance(items, Sequence):
    raise TypeError(f"{what}: expected a list, got {type(items).__name__}")
  if len(items) == 0:
    raise ValueError(f"{what}: got an empty list; nothing to encode")
  for i, x in enumerate(items):
    if isinstance(x, str):
      continue
    if allow_dict and isinstance(x, dict):
      if not isinstance(x.get("text"), str) or not isinstance(x.get("title", ""), (str, type(None))):
        raise TypeError(f"{what}[{i}]: a document dict needs a string 'text' (and optional string 'title'), "
                        f"got keys {sorted(x)}")
      continue
    raise TypeError(f"{what}[{i}]: expected {'a string or dict' if allow_dict else 'a string'}, "
                    f"got {type(x).__name__}")


class CrossEncoder(Encoder):
  """A reranker: a tower whose input is a query-document pair and whose output is one score (projection to
  1, no normalisation). Prompts, lengths and batching are the encoder's."""

  @classmethod
  def from_workdir(cls, path: str, mesh: jax.sharding.Mesh | None = None) -> CrossEncoder:
    """The latest checkpoint of a `scalingnote train-reranker` workdir."""
    tower, tokenizer, _ = trained.load_tower(path, mesh, spec_file=trained.RERANKER_FILE)
    return cls(tower, tokenizer, mesh)

  def predict(self, queries, docs: Sequence[str | dict] | None = None, batch_size: int = 32, *,
              show_progress: bool | None = None) -> np.ndarray:
    """Scores [N] (float32) of the pairs (queries[i], docs[i]), or, as sentence-transformers' CrossEncoder
    takes them, of a list of (query, document) pairs: `predict([(q, d), ...])`. Documents as strings or
    {"title", "text"} dicts."""
    if isinstance(docs, int) and not isinstance(docs, bool):  # predict(pairs, 16): sentence-transformers' order
      batch_size, docs = docs, None
    if docs is None:
      pairs = list(queries)
      if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise TypeError("predict: expected a list of (query, document) pairs, or predict(queries, docs)")
      if not pairs:
        return np.zeros((0,), np.float32)
      queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    if len(queries) != len(docs):
      raise ValueError(f"predict: {len(queries)} queries but {len(docs)} documents")
    ids = self.tokenize_pairs(self.query_texts(queries), self.document_texts(docs))
    return self.encode_ids(ids, batch_size, show_progress=show_progress)[:, 0]

  def rank(self, query: str, documents: Sequence[str | dict], top_k: int | None = None, *,
           return_documents: bool = False, batch_size: int = 32) -> list[dict]:
    """sentence-transformers' `CrossEncoder.rank`: the documents scored against one query, best first, as
    [{"corpus_id": index in `documents`, "score": float (, "text": the document)}], the top_k of them."""
    docs = list(documents)
    if not docs:
      return []
    scores = self.predict([query] * len(docs), docs, batch_size)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [{"corpus_id": int(i), "score": float(scores[i]), **({"text": docs[i]} if return_documents else {})}
            for i in order]

  def tokenize_pairs(self, query_texts: list[str], doc_texts: list[str]) -> list[list[int]]:
    """Token ids of prompted pairs as the reranker sees them (training batches use this too)."""
    return self.tokenizer.encode_pairs(query_texts, doc_texts, max_length=self.cfg.max_length,
                                       append_eos=self.cfg.append_eos)

  def rerank(self, run: dict[str, dict[str, float]], queries: dict[str, str], corpus: dict[str, dict], *,
             top_k: int = 100, batch_size: int = 32, fuse: float = 1.0,
             show_progress: bool | None = None) -> dict[str, dict[str, float]]:
    """A run ({qid: {doc_id: score}}) whose top_k documents per query are rescored by the reranker (the rest
    are dropped). `fuse` < 1 mixes in the first stage's scores (`runs.fuse`: weight `fuse` on the reranker's,
    each min-max normalised per query). Queries missing from `queries`, or documents from `corpus`, raise
    with their ids."""
    runs.check_fuse_weight(fuse)
    pairs = []
    for qid, docs in run.items():
      if qid not in queries:
        raise KeyError(f"run query {qid!r} is not among the {len(queries)} queries given")
      for doc_id, _ in sorted(docs.items(), key=lambda kv: -kv[1])[:top_k]:
        if doc_id not in corpus:
          raise KeyError(f"run document {doc_id!r} (query {qid!r}) is not in the corpus")
        pairs.append((qid, doc_id))
    if not pairs:
      return {qid: {} for qid in run}
    scores = self.predict([queries[q] for q, _ in pairs], [corpus[d] for _, d in pairs], batch_size,
                          show_progress=show_progress)
    out: dict[str, dict[str, float]] = {qid: {} for qid in run}
    for (qid, doc_id), score in zip(pairs, scores):
      out[qid][doc_id] = float(score)
    return out if fuse == 1.0 else runs.fuse(run, out, fuse)
