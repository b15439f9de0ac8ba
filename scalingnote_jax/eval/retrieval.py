"""Exact search and IR metrics (nDCG@10, Recall@10/100, MRR@10, MAP) computed by pytrec_eval.

BEIR conventions: unjudged documents are non-relevant; a document whose id equals the query's id is removed
from that query's results (ArguAna-style corpora); qrels naming documents outside the corpus are reported by
the caller (`load_beir(unknown="skip")`), never crashed on.
"""

from __future__ import annotations

import numpy as np
import pytrec_eval

from scalingnote_jax.index.exact import exact_search  # noqa: F401  (one exact search for eval and the index)

MEASURES = {"ndcg_cut.10", "recall.10", "recall.100", "map"}


def to_run(qids: list[str], doc_ids: list[str], scores_QxK, indices_QxK, *, drop_self: bool = True):
  """{qid: {doc_id: score}} from top-k results."""
  run = {}
  for qid, row_scores, row_idx in zip(qids, scores_QxK, indices_QxK):
    run[qid] = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_idx) if not (drop_self and doc_ids[i] == qid)}
  return run


def ir_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
  """Means over the judged queries (a judged query missing from the run scores 0)."""
  judged = {q: r for q, r in qrels.items() if any(g > 0 for g in r.values())}
  full_run = {q: run.get(q) or {"__none__": 0.0} for q in judged}
  per_query = pytrec_eval.RelevanceEvaluator(judged, MEASURES).evaluate(full_run)
  # MRR@10 = reciprocal rank over each query's first 10 results
  top10 = {q: dict(sorted(r.items(), key=lambda kv: -kv[1])[:10]) for q, r in full_run.items()}
  rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
  mean = lambda key, table: float(np.mean([table[q][key] for q in judged]))  # noqa: E731
  return {"ndcg_at_10": mean("ndcg_cut_10", per_query), "recall_at_10": mean("recall_10", per_query),
          "recall_at_100": mean("recall_100", per_query), "map": mean("map", per_query),
          "mrr_at_10": mean("recip_rank", rr), "num_queries": len(judged)}
