"""Exact top-k by inner product: the reference every approximate index is measured against."""

from __future__ import annotations

import numpy as np

from scalingnote_jax.index.hits import Hits

# Scores held at once per query block: 2^26 float32 = 256 MB, whatever the corpus size.
_BLOCK_SCORES = 1 << 26


def exact_search(q_QxD: np.ndarray, d_NxD: np.ndarray, k: int, block: int | None = None) -> Hits:
  """Top-k by inner product, in query blocks: Hits with row numbers of `d_NxD` as ids (int64 [Q, k]) and
  float32 scores [Q, k], best first; k is clipped to N.

  `block` queries are scored at once; by default as many as keep the block's scores under 256 MB (at most
  1024), so a 1M-document corpus does not need a 4 GB score matrix.
  """
  n = d_NxD.shape[0]
  k = min(k, n)
  if k <= 0 or q_QxD.shape[0] == 0:
    return Hits(np.zeros((q_QxD.shape[0], 0), np.int64), np.zeros((q_QxD.shape[0], 0), np.float32))
  block = block or max(1, min(1024, _BLOCK_SCORES // n))
  scores, indices = [], []
  for s in range(0, q_QxD.shape[0], block):
    sims = q_QxD[s:s + block] @ d_NxD.T
    top = np.argpartition(sims, n - k, axis=1)[:, n - k:]  # the k largest, unordered (no negated copy)
    top_scores = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    indices.append(np.take_along_axis(top, order, axis=1))
    scores.append(np.take_along_axis(top_scores, order, axis=1))
  return Hits(np.concatenate(indices).astype(np.int64), np.concatenate(scores).astype(np.float32, copy=False))
