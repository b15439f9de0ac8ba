"""The embedding store: a corpus encoded by a document tower (or a query set by a query tower) into a
tensorstore zarr array, written resumably chunk by chunk, recording which tower wrote it. It holds the
corpus encodings of `scalingnote encode`, a bundle's documents and the Stage 2 teacher cache.

Layout of the output directory:
  ids.json            the ids in row order (written first; a rerun checks it is the same corpus)
  ENCODER             JSON {fingerprint, kind, inputs}: which tower wrote it, and a digest of the ids and texts it
                      encodes (a rerun with another tower, or other texts under the same ids, is refused)
  embeddings.zarr/    float32 [N, D] (or [N, *row_shape] of another encoder, e.g. a frozen trunk's hidden
                      states [N, T, E]), one zarr chunk per encoding chunk of `chunk_size` items
  done/<chunk>        an empty marker written after its chunk's rows are durably written
  COMPLETE            JSON {num_docs, dim, fingerprint, kind, inputs, sha256}, written last: a store without it is never
                      read as complete; sha256 (of the rows as read back) is checked whenever the store is loaded

Chunks are dealt round-robin to JAX processes; within a process each batch is split over all its devices.
A killed run leaves some chunks without markers; rerunning writes exactly those, so the result equals an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scalingnote_jax.artifacts.faults import failpoint
from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.distributed import is_main

COMPLETE, IDS, ENCODER, ARRAY = "COMPLETE", "ids.json", "ENCODER", "embeddings.zarr"


def open_array(out_dir: str, shape=None, chunk_rows=None, *, create: bool):
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(out_dir, ARRAY)}}
  if create:
    spec["metadata"] = {"shape": list(shape), "data_type": "float32",
                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, *shape[1:]]}}}
  return ts.open(spec, create=create, open=True).result()


@holds_lock("out_dir")  # one writer at a time; the kernel releases it however the run ends
def encode_corpus(encoder, corpus: dict[str, dict | str], out_dir: str, *, chunk_size: int = 1024,
                  batch_size: int = 64, queries: bool = False) -> str:
  """Encodes `corpus` ({id: {"title", "text"}} documents, or {id: text} queries with `queries`) into
  `out_dir` with `encoder` (an `encoder.Encoder`); returns it. Skips finished chunks. The encoder's
  fingerprint is recorded; finishing or reusing a store another tower wrote, or one of other texts, is refused."""
  os.makedirs(os.path.join(out_dir, "done"), exist_ok=True)
  kind = "queries" if queries else "documents"
  encoder_info = {"fingerprint": encoder.fingerprint, "kind": kind, "inputs": inputs_digest(corpus)}
  ids = list(corpus)
  if os.path.exists(os.path.join(out_dir, COMPLETE)):
    _check_store(out_dir, "finished", _read_json(out_dir, COMPLETE), encoder_info, ids)
    return out_dir
  ids_path, encoder_path = os.path.join(out_dir, IDS), os.path.join(out_dir, ENCODER)
  if os.path.exists(ids_path):
    found = _read_json(out_dir, ENCODER) if os.path.exists(encoder_path) else {}
    _check_store(out_dir, "partial", found, encoder_info, ids)
  elif is_main():
    write_atomic(encoder_path, json.dumps(encoder_info))
    write_atomic(ids_path, json.dumps(ids))
  shape = (len(ids), *encoder.row_shape)
  array = open_array(out_dir, shape, chunk_size, create=True)
  if array.shape != shape:
    raise ValueError(f"{out_dir}/{ARRAY}: shape {array.shape}, expected {shape}")

  encode = encoder.encode_queries if queries else encoder.encode_documents
  # Chunks are dealt to processes, each encoding with its own devices; a tower sharded over every process
  # (e.g. the teacher in multi-process distillation) encodes every chunk together and process 0 writes.
  together = encoder.spans_processes
  first, stride = (0, 1) if together else (jax.process_index(), jax.process_count())
  chunks = range(first, -(-len(ids) // chunk_size), stride)
  todo = [c for c in chunks if not os.path.exists(os.path.join(out_dir, "done", str(c)))]
  for c in tqdm(todo, desc=f"encoding {kind}", unit="chunk", disable=not is_main() or not todo):
    rows = ids[c * chunk_size:(c + 1) * chunk_size]
    emb_CxD = encode([corpus[i] for i in rows], batch_size=batch_size, show_progress=False)
    if together and not is_main():
      continue
    array[c * chunk_size:c * chunk_size + len(rows)].write(emb_CxD).result()
    open(os.path.join(out_dir, "done", str(c)), "w").close()
    failpoint("encode.chunk")

  if jax.process_count() > 1:  # every process's chunks are written before the store is declared complete
    multihost_utils.sync_global_devices("encode_corpus")
  if is_main():  # the checksum is of what was written, read back from disk
    write_atomic(os.path.join(out_dir, COMPLETE), json.dumps({"num_docs": len(ids), "dim": encoder.dim,
                                                              **encoder_info, "sha256": _digest(array)}))
  if jax.process_count() > 1:  # and no process reads the store before it is
    multihost_utils.sync_global_devices("encode_corpus_complete")
  return out_dir


def _read_json(out_dir: str, name: str):
  with open(os.path.join(out_dir, name)) as f:
    return json.load(f)


def inputs_digest(corpus: dict) -> str:
  """sha256 of a store's inputs: each id with its text, document ({title, text}) or token row, in order."""
  h = hashlib.sha256()
  for key, value in corpus.items():
    h.update(json.dumps([key, value], sort_keys=True, ensure_ascii=False, default=lambda o: o.tolist()).encode())
  return h.hexdigest()


def _check_store(out_dir: str, state: str, found: dict, want: dict, ids: list[str]) -> None:
  """A store is finished or continued only by the tower that began it, for the same ids and texts."""
  for key in ("kind", "fingerprint"):
    if key in found and found[key] != want[key]:
      raise ValueError(f"{out_dir}: was encoded with {key} {found[key]!r}, not this tower's {want[key]!r}; "
                       "use a new --out (or the tower that wrote it)")
  if _read_json(out_dir, IDS) != ids:  # reused only for the corpus it holds, in the same order
    raise ValueError(f"{out_dir}: holds a {state} encoding of a different corpus; use a new --out")
  if "inputs" in found and found["inputs"] != want["inputs"]:  # (stores written before 2026-12-07 record none)
    raise ValueError(f"{out_dir}: holds a {state} encoding of other texts under the same ids (the digest of its "
                     "inputs differs); use a new --out")


def store_info(out_dir: str) -> dict:
  """{num_docs, dim, fingerprint, kind} of a complete store."""
  if not os.path.exists(os.path.join(out_dir, COMPLETE)):
    raise FileNotFoundError(f"{out_dir}: no {COMPLETE} marker: the encoding is missing or unfinished "
                            "(rerun `scalingnote encode` with the same --out to finish it)")
  return _read_json(out_dir, COMPLETE)


def _digest(array) -> str:
  """sha256 of the array's float32 rows in order, read a slice of rows at a time (bounded memory)."""
  h = hashlib.sha256()
  n, rows = array.shape[0], max(1, (64 << 20) // max(1, 4 * math.prod(array.shape[1:])))
  for start in range(0, n, rows):  # (tensorstore does not clip a slice to the array's bounds)
    h.update(np.ascontiguousarray(array[start:min(start + rows, n)].read().result(), np.float32).tobytes())
  return h.hexdigest()


def open_verified(out_dir: str):
  """The array of a complete store after checking it against the checksum its COMPLETE marker records (a
  store written before checksums existed has none to check); a corrupted store is refused."""
  info = store_info(out_dir)
  array = open_array(out_dir, create=False)
  if array.shape[0] != info["num_docs"]:
    raise ValueError(f"{out_dir}/{ARRAY}: {array.shape[0]} rows, but {COMPLETE} records {info['num_docs']}")
  if "sha256" in info and _digest(array) != info["sha256"]:
    raise ValueError(f"{out_dir}/{ARRAY}: its contents do not match the checksum in {COMPLETE}: the store is "
                     "corrupted; delete it and encode again")
  return array


def load_embeddings(out_dir: str) -> tuple[list[str], np.ndarray]:
  """(ids, float32 [N, D]) of a complete, verified encoding; an incomplete or corrupted one is refused."""
  info = store_info(out_dir)
  doc_ids = _read_json(out_dir, IDS)
  emb = open_verified(out_dir).read().result()
  if emb.shape != (info["num_docs"], info["dim"]) or len(doc_ids) != info["num_docs"]:
    raise ValueError(f"{out_dir}: {len(doc_ids)} ids and an array of {emb.shape} disagree with {COMPLETE} {info}")
  return doc_ids, np.asarray(emb, np.float32)
