"""`scalingnote demo`: encode the built-in synthetic corpus with the LLM document tower and the queries with
the small BERT query tower, and report throughput (until the full pipeline exists, this is the main job)."""

from __future__ import annotations

import json
import time

import numpy as np
from ml_collections import ConfigDict

from scalingnote_jax.data import synthetic
from scalingnote_jax.encoder import Encoder


def timed_encode(fn, items, batch_size):
  """Two passes: the first includes jit compilation, the second is steady-state throughput."""
  t0 = time.perf_counter()
  fn(items, batch_size=batch_size)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  emb = fn(items, batch_size=batch_size)
  steady = time.perf_counter() - t0
  return emb, {"n": len(items), "first_pass_s": round(first, 2), "steady_s": round(steady, 2),
               "per_s": round(len(items) / steady, 1)}


def recall_at_k(q_NxD, d_MxD, queries, doc_ids, qrels, k=10) -> float:
  top = np.argsort(-(q_NxD @ d_MxD.T), axis=1)[:, :k]
  hits = [any(doc_ids[j] in qrels[qid] for j in row) for qid, row in zip(queries, top)]
  return float(np.mean(hits))


def run(cfg: ConfigDict) -> dict:
  data = synthetic.generate(cfg.num_docs, seed=cfg.seed)
  doc_ids, docs = list(data.corpus), list(data.corpus.values())
  qids, queries = list(data.queries), list(data.queries.values())
  print(f"synthetic corpus: {len(docs)} documents, {len(queries)} queries (seed {cfg.seed})")

  print(f"document tower: {cfg.document_tower}")
  t0 = time.perf_counter()
  doc_tower = Encoder.from_pretrained(cfg.document_tower, dtype=cfg.dtype, max_length=cfg.max_length)
  load_s = time.perf_counter() - t0
  d_llm, doc_stats = timed_encode(doc_tower.encode_documents, docs, cfg.batch_size)
  doc_stats.update(load_s=round(load_s, 1), dim=doc_tower.dim)

  print(f"query tower: {cfg.query_tower}")
  query_tower = Encoder.from_pretrained(cfg.query_tower, dtype=cfg.dtype, max_length=cfg.max_length)
  q_small, query_stats = timed_encode(query_tower.encode_queries, queries, cfg.batch_size)
  one_query = []
  for q in queries[:32]:
    t0 = time.perf_counter()
    query_tower.encode_queries([q])
    one_query.append(time.perf_counter() - t0)
  query_stats.update(dim=query_tower.dim, single_query_ms_p50=round(1000 * float(np.median(one_query[1:])), 2))

  # Zero-shot sanity check of the small tower on its own (the towers are not trained together yet).
  d_small = query_tower.encode_documents(docs, batch_size=cfg.batch_size)
  report = {"documents": doc_stats, "queries": query_stats,
            "zero_shot_small_tower_recall_at_10": round(recall_at_k(q_small, d_small, qids, doc_ids, data.qrels), 3),
            "llm_doc_embeddings_shape": list(d_llm.shape)}
  print(f"documents: {doc_stats['per_s']} docs/s with the LLM tower ({doc_stats['dim']}-d), "
        f"first pass incl. compile {doc_stats['first_pass_s']} s")
  print(f"queries:   {query_stats['per_s']} queries/s batched, {query_stats['single_query_ms_p50']} ms single "
        f"query (p50) with the small tower")
  print(f"zero-shot small tower Recall@10 on the synthetic corpus: {report['zero_shot_small_tower_recall_at_10']}")
  print(json.dumps(report))
  return report
