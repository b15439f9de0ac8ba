"""A frozen trunk's cache. With `model.freeze_layers` K the embedding and the first K blocks of each tower never
change, so the hidden states they produce for a text are the same at every step. With `model.trunk_cache`
Stage 1 computes them once for every training query, every document a training example names and every
document its validation searches, into embedding stores (artifacts/store.py: resumable chunk by chunk, refused
when another trunk wrote them). Each step reads its rows' states and runs only the trained blocks
(`Tower.from_trunk`), and so does every encoding of a text the cache holds (`Encoder.use_trunk`): validation
during training, `scalingnote eval` / `encode` of the trained towers, the pipeline's corpus encoding.

Stores are found by content: a row's id in its store is the hash of the tokens the trunk saw (`row_key`), and
every complete store of a trunk sits under one directory named by the trunk's fingerprint (its parameters,
K, dtype), so any later encoding by a tower with that trunk finds every text any run cached for it.

Where: CACHE/trunk/<trunk fingerprint>/<kind>-<padded length>-<a hash of the rows>/ (CACHE:
`artifacts.files.cache_dir`). Another base model or K gets a directory of its own; runs that share the trunk
and the texts (a learning-rate sweep, a resumed run, the evaluation after training) share one store.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from scalingnote_jax.artifacts import store
from scalingnote_jax.artifacts.checkpoint import fingerprint
from scalingnote_jax.artifacts.files import cache_dir
from scalingnote_jax.data.pipeline import TrainData, pad
from scalingnote_jax.models import llm
from scalingnote_jax.models.tower import Tower

CHUNK_ROWS = 8  # rows per store chunk: a batch reads scattered rows, each costs a chunk's read


def check_possible(backbone, freeze_layers: int) -> None:
  """Refuses a trunk cache the run cannot have, before it writes anything: frozen blocks to cache, a decoder
  backbone, one process (each process would need the whole store)."""
  if not freeze_layers:
    raise ValueError("model.trunk_cache=True needs model.freeze_layers > 0: it caches the frozen blocks' states")
  if not isinstance(backbone, llm.LLM):
    raise ValueError(f"model.trunk_cache: the towers' backbone is {type(backbone).__name__}; a trunk cache needs "
                     "a decoder")
  if jax.process_count() > 1:
    raise ValueError("model.trunk_cache: a trunk cache is for single-host budgets; a multi-process run trains "
                     "without it (model.trunk_cache=False)")


def trunk_fingerprint(backbone, blocks: int) -> str:
  """What identifies a trunk's function: the parameters of the embedding and first `blocks` blocks, their
  number and the compute dtype (the same on any mesh)."""
  in_trunk = lambda path, _: path[0] == "embed" or (path[0] == "layers" and path[1] < blocks)  # noqa: E731
  h = hashlib.sha256(fingerprint(nnx.state(backbone, in_trunk)).encode())
  h.update(json.dumps({"blocks": blocks, "dtype": backbone.cfg.dtype}).encode())
  return h.hexdigest()[:32]


def row_key(row: Sequence[int], length: int) -> str:
  """A token row's id in a trunk store: a hash of the tokens the trunk sees of it (cut to the store's length)."""
  return hashlib.sha256(np.asarray(row[:length], np.int32).tobytes()).hexdigest()[:32]


class Trunk:
  """The embedding and first `blocks` blocks of a decoder tower as an encoder (the embedding store's
  interface) of token-id rows into hidden states [length, E], rows cut or right-padded to `length` as a
  training batch pads them."""

  def __init__(self, tower: Tower, blocks: int, length: int, pad_id: int):
    backbone = tower.backbone
    graphdef, self._state = nnx.split(backbone)
    self._forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).trunk(ids, mask, blocks))
    self.blocks, self.length, self.pad_id = blocks, length, pad_id
    self.dim = backbone.cfg.hidden_size
    self.row_shape = (length, self.dim)
    self.spans_processes = False
    self.trunk_fingerprint = trunk_fingerprint(backbone, blocks)
    self.fingerprint = f"{self.trunk_fingerprint}-{length}"  # what its store records: trunk and padded length

  def encode(self, rows: list[list[int]], batch_size: int = 8, show_progress: bool = False) -> np.ndarray:
    """Token-id rows -> float32 [N, length, E]; every batch padded to `batch_size` rows (one compilation)."""
    del show_progress  # the store shows progress by chunk
    out = []
    for s in range(0, len(rows), batch_size):
      part = rows[s:s + batch_size]
      ids, mask = map(np.stack, zip(*(pad(r, self.length, self.pad_id) for r in part)))
      filler = batch_size - len(part)
      ids = np.concatenate([ids, np.full((filler, self.length), self.pad_id, np.int32)])
      mask = np.concatenate([mask, np.eye(1, self.length, dtype=np.int32).repeat(filler, 0)])  # one token each
      out.append(np.asarray(self._forward(self._state, ids, mask), np.float32)[:len(part)])
    return np.concatenate(out)

  encode_queries = encode_documents = encode

  def cache(self, rows: list[list[int]], kind: str) -> StateStore:
    """The states of `rows` in their store (computed, finished or found); duplicate rows are stored once."""
    keyed = {row_key(r, self.length): r[:self.length] for r in rows}  # the tokens it sees: a store's inputs
    h = hashlib.sha256("".join(sorted(keyed)).encode()).hexdigest()[:16]
    out = cache_dir("trunk", self.trunk_fingerprint, f"{kind}-{self.length}-{h}")
    store.encode_corpus(self, keyed, out, chunk_size=CHUNK_ROWS, batch_size=CHUNK_ROWS, queries=kind == "queries")
    return StateStore(out)


class StateStore:
  """One complete trunk store, read by content: its states [N, length, E] and the row of each `row_key`."""

  def __init__(self, path: str):
    self.path = path
    self.array = store.open_verified(path)  # (checked against its checksum)
    self.length = self.array.shape[1]
    with open(os.path.join(path, store.IDS)) as f:
      self.row = {key: i for i, key in enumerate(json.load(f))}

  def read(self, rows: np.ndarray) -> np.ndarray:
    """float32 states of store rows (any shape of indices) -> [*rows.shape, length, E]."""
    rows = np.asarray(rows)
    unique, inverse = np.unique(rows, return_inverse=True)  # a read wants distinct, sorted rows
    return np.asarray(self.array.oindex[unique].read().result(), np.float32)[inverse.reshape(rows.shape)]

  def rows_of(self, token_rows: Sequence[Sequence[int]]) -> np.ndarray:
    """The store row of each token row, -1 where the store lacks it or the row is longer than its length (the
    store holds that row's first `length` tokens only)."""
    return np.asarray([self.row.get(row_key(r, self.length), -1) if len(r) <= self.length else -1
                       for r in token_rows], np.int64)


class TrunkCache:
  """The complete stores of one trunk, found by content: what `Encoder.use_trunk` reads."""

  def __init__(self, blocks: int, stores: list[StateStore]):
    self.blocks, self.stores = blocks, stores

  @classmethod
  def find(cls, tower: Tower, blocks: int) -> TrunkCache | None:
    """Every complete store in the cache that a trunk of `tower`'s first `blocks` blocks wrote; None if none
    (or the tower is no decoder, or the run spans processes)."""
    if not blocks or not isinstance(tower.backbone, llm.LLM) or jax.process_count() > 1:
      return None
    fp = trunk_fingerprint(tower.backbone, blocks)
    root = cache_dir("trunk", fp)
    paths = sorted(os.path.join(root, d) for d in (os.listdir(root) if os.path.isdir(root) else ()))
    found = [StateStore(p) for p in paths if _written_by(p, fp)]
    return cls(blocks, found) if found else None

  def locate(self, token_rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(store index, row) of each token row; store -1 where no store holds it."""
    where, rows = np.full(len(token_rows), -1, np.int64), np.full(len(token_rows), -1, np.int64)
    for s, st in enumerate(self.stores):
      todo = np.flatnonzero(where < 0)
      got = st.rows_of([token_rows[i] for i in todo])
      where[todo[got >= 0]], rows[todo[got >= 0]] = s, got[got >= 0]
    return where, rows


def _written_by(path: str, trunk_fp: str) -> bool:
  """A complete store whose encoder was a trunk with this fingerprint (an unfinished one is not read)."""
  try:
    return store.store_info(path)["fingerprint"].startswith(trunk_fp + "-")
  except (FileNotFoundError, KeyError, ValueError):
    return False


class TrunkStates:
  """The cached states of a run's training texts: query rows by example index, documents by corpus row."""

  def __init__(self, blocks: int, queries: StateStore, documents: StateStore, query_rows: np.ndarray,
               doc_rows: np.ndarray):
    self.blocks, self._queries, self._documents = blocks, queries, documents
    self._query_row, self._doc_row = query_rows, doc_rows

  def queries(self, rows_B: np.ndarray) -> np.ndarray:
    return self._queries.read(self._query_row[np.asarray(rows_B)])

  def documents(self, corpus_rows: np.ndarray) -> np.ndarray:
    """States of the documents at these corpus rows (any shape); zeros for empty slots (row -1)."""
    rows = np.asarray(corpus_rows)
    out = self._documents.read(np.where(rows >= 0, self._doc_row[np.maximum(rows, 0)], 0))
    out[rows < 0] = 0.0
    return out

  def cache(self) -> TrunkCache:
    """Both stores as a `TrunkCache` (for the run's encoders)."""
    return TrunkCache(self.blocks, [self._queries, self._documents])


def cache_training_texts(query: Tower, doc: Tower, blocks: int, data: TrainData,
                         also_docs: Sequence[str] = ()) -> TrunkStates:
  """Computes (or finds, or finishes) the trunk states of `data`'s training queries, of the documents its
  examples name and of `also_docs` (ids: e.g. those validation searches); returns their reader
  (`check_possible` first)."""
  spec = data.spec
  named = {data.doc_index[d] for ex in data.examples for d in (*ex.positive_ids, *ex.negative_ids)}
  named = sorted(named | {data.doc_index[d] for d in also_docs})
  queries = Trunk(query, blocks, spec.query_len, data.pad_id).cache(data.query_tokens, "queries")
  documents = Trunk(doc, blocks, spec.doc_len, data.pad_id).cache([data.doc_tokens[r] for r in named], "documents")
  doc_rows = np.full(len(data.doc_tokens), -1, np.int64)
  # (a row longer than doc_len is stored cut: the training batch cuts it too, so look it up cut)
  cut = lambda rows, n: [r[:n] for r in rows]  # noqa: E731
  doc_rows[named] = documents.rows_of(cut([data.doc_tokens[r] for r in named], spec.doc_len))
  query_rows = queries.rows_of(cut(data.query_tokens, spec.query_len))
  return TrunkStates(blocks, queries, documents, query_rows, doc_rows)
