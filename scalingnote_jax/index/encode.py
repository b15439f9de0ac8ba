"""`scalingnote encode`: a BEIR corpus through a tower's document side into an embedding store (resumable;
`artifacts/store.py`), the input of `scalingnote export --embeddings` and `scalingnote eval --embeddings`."""

from __future__ import annotations

import os

import jax

from scalingnote_jax import sharding
from scalingnote_jax.artifacts.store import encode_corpus
from scalingnote_jax.data.beir import load_corpus
from scalingnote_jax.encoder import towers


def encode_corpus_dir(checkpoint: str, corpus_dir: str, out: str, *, chunk_size: int = 1024,
                      batch_size: int = 64) -> dict:
  """Encodes `corpus_dir`/corpus.jsonl by the document tower of `checkpoint` (a Stage 1 workdir, a HF dir, a
  .gguf or a packaged name) into the store `out`; returns {out, dim, fingerprint}."""
  # Each process encodes its own chunks with the tower on its own devices: no cross-host traffic.
  encoder = towers(checkpoint, sharding.make_mesh(devices=jax.local_devices()))[1]
  encode_corpus(encoder, load_corpus(os.path.join(corpus_dir, "corpus.jsonl")), out, chunk_size=chunk_size,
                batch_size=batch_size)
  return {"out": out, "dim": encoder.dim, "fingerprint": encoder.fingerprint}
