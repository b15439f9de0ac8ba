"""What every search returns: `Index.search`, `exact_search`, `BM25.search`, `Retriever.search`, the HTTP
service's batcher and the systems `scalingnote eval` scores. Named fields, so that no caller has to remember
which side of a tuple the scores are on."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Hits:
  """For each of Q queries its top k documents, best first.

  ids     [Q][k] document ids; a result a backend could not fill (ScaNN, when the leaves searched hold fewer
          than k documents) is None with score -inf. A search over bare arrays (`exact_search`,
          `Index.search_indices`) gives row numbers instead, int64 [Q, k], -1 where unfilled: `with_ids`
          names them.
  scores  float32 [Q, k]
  """
  ids: list[list[str | None]] | np.ndarray
  scores: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def with_ids(self, doc_ids: Sequence[str] | np.ndarray) -> Hits:
    """Row numbers replaced by the documents' ids (-1 by None). `doc_ids` as an object array (`id_array`) is
    indexed without a Python loop: on a serving path's small batches the loop was ~7% of a search."""
    if not isinstance(doc_ids, np.ndarray):
      doc_ids = id_array(doc_ids)
    rows = np.asarray(self.ids, dtype=np.int64)
    named = doc_ids[np.maximum(rows, 0)] if rows.size else np.empty(rows.shape, object)
    named[rows < 0] = None
    return Hits(named.tolist(), self.scores)

  def run(self, qids: Sequence[str], *, drop_self: bool = False) -> dict[str, dict[str, float]]:
    """{query id: {document id: score}} (a TREC run's shape), without unfilled results; `drop_self` drops a
    document whose id is the query's (ArguAna-style corpora, where each query is also a document)."""
    if len(qids) != len(self.ids):
      raise ValueError(f"{len(qids)} query ids for the results of {len(self.ids)} queries")
    return {qid: {d: float(s) for d, s in zip(row_ids, row_scores) if d is not None and not (drop_self and d == qid)}
            for qid, row_ids, row_scores in zip(qids, self.ids, self.scores)}

  def __iter__(self):
    raise TypeError("Hits is not a tuple: use .ids and .scores")


def id_array(doc_ids: Sequence[str]) -> np.ndarray:
  """Document ids as a 1-D object array, for `Hits.with_ids` (build it once per corpus)."""
  out = np.empty(len(doc_ids), dtype=object)
  out[:] = list(doc_ids)
  return out
