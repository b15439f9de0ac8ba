"""Offline corpus encoding by the document tower into a tensorstore zarr array, resumable chunk by chunk.

Layout of the output directory:
  doc_ids.json        the corpus ids in row order (written first; a rerun checks it is the same corpus)
  embeddings.zarr/    float32 [N, D], one zarr chunk per encoding chunk of `chunk_size` documents
  done/<chunk>        an empty marker written after its chunk's rows are durably written
  COMPLETE            JSON {num_docs, dim}, written last: a store without it is never read as complete

Chunks are dealt round-robin to JAX processes; within a process each batch is split over all its devices.
A killed run leaves some chunks without markers; rerunning writes exactly those, so the result equals an
uninterrupted run.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from scalingnote_jax.distributed import is_main
from scalingnote_jax.encoder import Encoder

COMPLETE, IDS, ARRAY = "COMPLETE", "doc_ids.json", "embeddings.zarr"


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _open_array(out_dir: str, shape=None, chunk_rows=None, *, create: bool):
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(out_dir, ARRAY)}}
  if create:
    spec["metadata"] = {"shape": list(shape), "data_type": "float32",
                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, shape[1]]}}}
  return ts.open(spec, create=create, open=True).result()


def document_encoder(checkpoint: str, mesh: jax.sharding.Mesh | None = None) -> Encoder:
  """The document tower of a Stage 1 workdir (latest checkpoint), or of a HF dir / GGUF / packaged model."""
  from scalingnote_jax.train import stage1

  if stage1.is_stage1_workdir(checkpoint):
    model, tokenizer, _ = stage1.load_trained(checkpoint, mesh)
    return Encoder(model.doc, tokenizer, mesh)
  return Encoder.from_pretrained(checkpoint, mesh=mesh)


def encode_corpus(encoder: Encoder, corpus: dict[str, dict], out_dir: str, *, chunk_size: int = 1024,
                  batch_size: int = 64) -> str:
  """Encodes `corpus` ({id: {"title", "text"}}) into `out_dir`; returns it. Skips finished chunks."""
  os.makedirs(os.path.join(out_dir, "done"), exist_ok=True)
  if os.path.exists(os.path.join(out_dir, COMPLETE)):
    return out_dir
  doc_ids = list(corpus)
  ids_path = os.path.join(out_dir, IDS)
  if os.path.exists(ids_path):
    with open(ids_path) as f:
      if json.load(f) != doc_ids:
        raise ValueError(f"{out_dir}: holds a partial encoding of a different corpus; use a new --out")
  elif is_main():
    _write_atomic(ids_path, json.dumps(doc_ids))
  array = _open_array(out_dir, (len(doc_ids), encoder.dim), chunk_size, create=True)
  if array.shape != (len(doc_ids), encoder.dim):
    raise ValueError(f"{out_dir}/{ARRAY}: shape {array.shape}, expected {(len(doc_ids), encoder.dim)}")

  chunks = range(jax.process_index(), -(-len(doc_ids) // chunk_size), jax.process_count())
  todo = [c for c in chunks if not os.path.exists(os.path.join(out_dir, "done", str(c)))]
  for c in tqdm(todo, desc="encoding corpus", unit="chunk", disable=not is_main() or not todo):
    rows = doc_ids[c * chunk_size:(c + 1) * chunk_size]
    emb_CxD = encoder.encode_documents([corpus[d] for d in rows], batch_size=batch_size, show_progress=False)
    array[c * chunk_size:c * chunk_size + len(rows)].write(emb_CxD).result()
    open(os.path.join(out_dir, "done", str(c)), "w").close()

  if jax.process_count() > 1:  # every process's chunks are written before the store is declared complete
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("encode_corpus")
  if is_main():
    _write_atomic(os.path.join(out_dir, COMPLETE), json.dumps({"num_docs": len(doc_ids), "dim": encoder.dim}))
  return out_dir


def load_embeddings(out_dir: str) -> tuple[list[str], np.ndarray]:
  """(doc ids, float32 [N, D]) of a complete encoding; an incomplete one is refused."""
  if not os.path.exists(os.path.join(out_dir, COMPLETE)):
    raise FileNotFoundError(f"{out_dir}: no {COMPLETE} marker: the encoding is missing or unfinished "
                            "(rerun `scalingnote encode` with the same --out to finish it)")
  with open(os.path.join(out_dir, COMPLETE)) as f:
    info = json.load(f)
  with open(os.path.join(out_dir, IDS)) as f:
    doc_ids = json.load(f)
  emb = _open_array(out_dir, create=False).read().result()
  if emb.shape != (info["num_docs"], info["dim"]) or len(doc_ids) != info["num_docs"]:
    raise ValueError(f"{out_dir}: {len(doc_ids)} ids and an array of {emb.shape} disagree with {COMPLETE} {info}")
  return doc_ids, np.asarray(emb, np.float32)
