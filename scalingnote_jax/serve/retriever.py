"""The online path as a Python API: the small student encodes queries, the index of LLM document embeddings
answers them.

  retriever = Retriever.load("bundle/")
  hits = retriever.search(["what is the orbit of halfeva 31"], k=10)   # hits.ids [Q][k], hits.scores [Q, k]
  hits = retriever.search("what is the orbit of halfeva 31")           # one string: Q = 1

Queries are padded to a few bucketed shapes (batch and length rounded up to powers of two, as in
`encoder.Encoder`), so the jitted student compiles once per bucket; `warmup()` compiles them all up front.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from scalingnote_jax.encoder import Encoder
from scalingnote_jax.index.hits import Hits
from scalingnote_jax.index.index import Index
from scalingnote_jax.serve import bundle as bundle_lib


class Retriever:

  def __init__(self, encoder: Encoder, index: Index, manifest: dict | None = None, *, max_batch: int = 64):
    if encoder.dim != index.dim:
      raise ValueError(f"query encoder embeds into {encoder.dim} dimensions, the index holds {index.dim}")
    self.encoder, self.index, self.manifest, self.max_batch = encoder, index, manifest or {}, max_batch

  @classmethod
  def load(cls, bundle_dir: str, *, device: jax.Device | None = None, max_batch: int = 64) -> Retriever:
    """A bundle written by `scalingnote export` (refused if its student and documents come from different
    teachers)."""
    student, tokenizer, index, manifest = bundle_lib.load_parts(bundle_dir, device)
    return cls(Encoder(student, tokenizer), index, manifest, max_batch=max_batch)

  @property
  def num_docs(self) -> int:
    return self.index.size

  def encode(self, queries: Sequence[str]) -> np.ndarray:
    """Query embeddings [Q, D] (unit norm), in batches of at most `max_batch`."""
    return self.encoder.encode_queries(queries, batch_size=self.max_batch, show_progress=False)

  def search(self, queries: Sequence[str] | str, k: int = 10) -> Hits:
    """The top k documents of each query (ids [Q][k], float32 scores [Q, k]), best first. One string is
    one query (Q = 1)."""
    return self.index.search(self.encode([queries] if isinstance(queries, str) else queries), k)

  def warmup(self) -> int:
    """Compiles the student for every (batch, length) bucket; returns how many shapes that was."""
    return self.encoder.warmup(self.max_batch)
