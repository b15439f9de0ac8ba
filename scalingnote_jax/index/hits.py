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

  def with_ids(self, doc_ids: Sequence[str]) -> Hits:
    """Row numbers replaced by the documents' ids (-1 by None)."""
    rows = self.ids.tolist() if isinstance(self.ids, np.ndarray) else self.ids
    return Hits([[doc_ids[i] if i >= 0 else None for i in row] for row in rows], self.scores)

  def run(self, qids: Sequence[str], *, drop_self: bool = False) -> dict[str, dict[str, float]]:
    """{query id: {document id: score}} (a TREC run's shape), without unfilled results; `drop_self` drops a
    document whose id is the query's (ArguAna-style corpora, where each query is also a document)."""
    if len(qids) != len(self.ids):
      raise ValueError(f"{len(qids)} query ids for the results of {len(self.ids)} queries")
    return {qid: {d: float(s) for d, s in zip(row_ids, row_scores) if d is not None and not (drop_self and d == qid)}
            for qid, row_ids, row_scores in zip(qids, self.ids, self.scores)}

  def __iter__(self):
    raise TypeError("Hits is not a tuple: use .ids and .scores")
