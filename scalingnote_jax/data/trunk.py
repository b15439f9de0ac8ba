"""A frozen trunk's cache. With `model.freeze_layers` K the embedding and the first K blocks of each tower never
change, so the hidden states they produce for a training text are the same at every epoch. With
`model.trunk_cache` Stage 1 computes them once for every training query and every document a training example
names, into embedding stores (artifacts/store.py: resumable chunk by chunk, refused when another trunk wrote
them), and each step reads its rows' states and runs only the trained blocks (`Tower.from_trunk`).

Where: CACHE/trunk/<the trunk's fingerprint>-<a hash of the token rows>/{queries,documents} (CACHE:
`artifacts.files.cache_dir`). The fingerprint covers the trunk's parameters, K, the padded length and the
dtype; the hash covers the tokens (tokenizer, prompts, truncation), so another base model, prompt or length gets
a store of its own, and runs that share all of them (a learning-rate sweep, a resumed run) share one.
"""

from __future__ import annotations

import hashlib
import json

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
    in_trunk = lambda path, _: path[0] == "embed" or (path[0] == "layers" and path[1] < blocks)  # noqa: E731
    h = hashlib.sha256(fingerprint(nnx.state(backbone, in_trunk)).encode())
    h.update(json.dumps({"blocks": blocks, "length": length, "dtype": backbone.cfg.dtype}).encode())
    self.fingerprint = h.hexdigest()[:32]

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


def _token_hash(rows: list[list[int]]) -> str:
  h = hashlib.sha256()
  for r in rows:
    h.update(np.asarray(r, np.int32).tobytes() + b";")
  return h.hexdigest()[:16]


class TrunkStates:
  """The cached states of a run's training texts: query rows by example index, documents by corpus row."""

  def __init__(self, queries, documents, doc_rows_of_corpus: np.ndarray):
    self._queries, self._documents, self._doc_row = queries, documents, doc_rows_of_corpus

  @staticmethod
  def _read(array, rows: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(rows, return_inverse=True)  # a read wants distinct, sorted rows
    return np.asarray(array.oindex[unique].read().result(), np.float32)[inverse.reshape(rows.shape)]

  def queries(self, rows_B: np.ndarray) -> np.ndarray:
    return self._read(self._queries, np.asarray(rows_B))

  def documents(self, corpus_rows: np.ndarray) -> np.ndarray:
    """States of the documents at these corpus rows (any shape); zeros for empty slots (row -1)."""
    rows = np.asarray(corpus_rows)
    out = self._read(self._documents, np.where(rows >= 0, self._doc_row[np.maximum(rows, 0)], 0))
    out[rows < 0] = 0.0
    return out


def cache_training_texts(query: Tower, doc: Tower, blocks: int, data: TrainData) -> TrunkStates:
  """Computes (or finds, or finishes) the trunk states of `data`'s training queries and of the documents its
  examples name; returns their reader (`check_possible` first)."""
  spec = data.spec
  named = sorted({data.doc_index[d] for ex in data.examples for d in (*ex.positive_ids, *ex.negative_ids)})
  doc_rows = [data.doc_tokens[r] for r in named]
  stores = []
  for kind, tower, length, rows in (("queries", query, spec.query_len, data.query_tokens),
                                    ("documents", doc, spec.doc_len, doc_rows)):
    trunk = Trunk(tower, blocks, length, data.pad_id)
    out = cache_dir("trunk", f"{trunk.fingerprint[:16]}-{_token_hash(rows)}", kind)
    store.encode_corpus(trunk, {str(i): r for i, r in enumerate(rows)}, out, chunk_size=CHUNK_ROWS,
                        batch_size=CHUNK_ROWS, queries=kind == "queries")
    stores.append(store.open_verified(out))
  doc_row_of_corpus = np.full(len(data.doc_tokens), -1, np.int64)
  doc_row_of_corpus[named] = np.arange(len(named))
  return TrunkStates(*stores, doc_row_of_corpus)
