"""IR metrics (nDCG@10, Recall@10/100, MRR@10, MAP) computed by pytrec_eval, and the pairwise ones (AUC,
contrastive entropy) over judged-relevant vs sampled documents.

BEIR conventions (BEIR's and MTEB's `evaluate`: pytrec_eval over every query of the qrels, mean over them):
unjudged documents are non-relevant; a document whose id equals the query's id is removed from that query's
results (ArguAna-style corpora); a query judged only with grade 0 counts, scoring 0; qrels naming documents
outside the corpus are kept (relevant, never retrieved: they count against recall), and reported by the caller.
"""

from __future__ import annotations

import numpy as np
import pytrec_eval

MEASURES = {"ndcg_cut.10", "recall.10", "recall.100", "map"}
# Contrastive entropy as Fang et al. ("Scaling Laws for Dense Retrieval", 2024) define it, the metric of
# ScalingNote's scaling figures: each judged (query, relevant document) pair against CONTRASTIVE_NEGATIVES
# documents drawn uniformly from the corpus minus the query's relevant ones, cross-entropy of the relevant one
# at logits score / temperature, averaged over all pairs. The temperature is the model's own (a Stage 1
# model's fixed or learned one); DEFAULT_TEMPERATURE for encoders trained elsewhere. Stage 1 validation and
# `scalingnote eval` both compute it here, with the same negatives for the same seed.
CONTRASTIVE_NEGATIVES = 256
DEFAULT_TEMPERATURE = 0.05


def ir_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
  """Means over every query of the qrels, as BEIR and MTEB average them: one judged only with grade 0 scores
  0 (`queries_without_relevant` counts them), and so does a query missing from the run."""
  judged = qrels
  full_run = {q: run.get(q) or {"__none__": 0.0} for q in judged}
  per_query = pytrec_eval.RelevanceEvaluator(judged, MEASURES).evaluate(full_run)
  # MRR@10 = reciprocal rank over each query's first 10 results
  top10 = {q: dict(sorted(r.items(), key=lambda kv: -kv[1])[:10]) for q, r in full_run.items()}
  rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
  mean = lambda key, table: float(np.mean([table[q][key] for q in judged]))  # noqa: E731
  return {"ndcg_at_10": mean("ndcg_cut_10", per_query), "recall_at_10": mean("recall_10", per_query),
          "recall_at_100": mean("recall_100", per_query), "map": mean("map", per_query),
          "mrr_at_10": mean("recip_rank", rr), "num_queries": len(judged),
          "queries_without_relevant": sum(not any(g > 0 for g in r.values()) for r in judged.values())}


def pair_metrics(score_fn, qids: list[str], qrels: dict[str, dict[str, int]], doc_ids: list[str], *,
                 num_negatives: int, scale: float | None, rng: np.random.Generator,
                 negative_pool: list[str] | None = None) -> dict[str, float]:
  """For each judged query, its relevant documents against `num_negatives` documents sampled from the rest
  (of `negative_pool`, default all of `doc_ids`; unjudged = non-relevant): AUC = P(relevant scores above
  sampled), ties count half; contrastive entropy (Fang et al., see CONTRASTIVE_NEGATIVES) = the cross-entropy
  of each relevant document among those negatives at logits `scale * score`, averaged over all (query,
  relevant document) pairs (None: not computed, for scores that are not similarities). `score_fn(row,
  doc_rows)` scores query `qids[row]`."""
  index = {d: i for i, d in enumerate(doc_ids)}
  candidates = np.arange(len(doc_ids)) if negative_pool is None else np.array([index[d] for d in negative_pool])
  auc, entropy = [], []
  for row, qid in enumerate(qids):
    relevant = [index[d] for d, g in qrels.get(qid, {}).items() if g > 0 and d in index]
    if not relevant:
      continue
    pool = np.setdiff1d(candidates, relevant)
    negs = rng.choice(pool, size=min(num_negatives, len(pool)), replace=False)
    s = np.asarray(score_fn(row, np.array(relevant + negs.tolist())), np.float64)
    pos_P, neg_N = s[:len(relevant)], s[len(relevant):]
    auc.append(float(np.mean((pos_P[:, None] > neg_N[None]) + 0.5 * (pos_P[:, None] == neg_N[None]))))
    if scale is not None:  # every relevant document, each against the same negatives
      neg_logits = scale * neg_N
      entropy += [float(np.logaddexp(scale * p, np.logaddexp.reduce(neg_logits)) - scale * p) for p in pos_P]
  return {"auc": float(np.mean(auc)), "contrastive_entropy": float(np.mean(entropy)) if entropy else None,
          "contrastive_pairs": len(entropy)}
