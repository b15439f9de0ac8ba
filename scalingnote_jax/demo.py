"""`scalingnote demo`: the main job on the embedded default. Trains Stage 1 on the built-in synthetic
corpus, then encodes the corpus with the trained document tower and the held-out queries with the query
tower, and reports retrieval before and after training with training and encoding throughput."""

from __future__ import annotations

import json
import time

import numpy as np
from ml_collections import ConfigDict

from scalingnote_jax.encoder import Encoder
from scalingnote_jax.train import stage1


def timed_encode(fn, items, batch_size):
  """Two passes: the first includes jit compilation, the second is steady-state throughput."""
  t0 = time.perf_counter()
  fn(items, batch_size=batch_size, show_progress=False)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  fn(items, batch_size=batch_size, show_progress=False)
  steady = time.perf_counter() - t0
  return {"n": len(items), "first_pass_s": round(first, 2), "steady_s": round(steady, 2),
          "per_s": round(len(items) / steady, 1)}


def run(cfg: ConfigDict, workdir: str) -> dict:
  print(f"Stage 1 on the synthetic corpus ({cfg.data.num_docs} documents) in {workdir}")
  out = stage1.train(cfg, workdir)
  model, tokenizer = out["model"], out["tokenizer"]
  _, held_out, corpus = stage1.load_data(cfg)
  train_tok_s = [h["tokens_per_s"] for h in out["history"][1:]] or [out["history"][-1]["tokens_per_s"]]

  d_enc, q_enc = Encoder(model.doc, tokenizer), Encoder(model.query, tokenizer)
  batch = cfg.eval.batch_size
  doc_stats = timed_encode(d_enc.encode_documents, list(corpus.values()), batch)
  queries = list(held_out.queries.values())
  query_stats = timed_encode(q_enc.encode_queries, queries, batch)
  one = []
  for q in queries[:33]:
    t0 = time.perf_counter()
    q_enc.encode_queries([q], show_progress=False)
    one.append(time.perf_counter() - t0)
  query_stats["single_query_ms_p50"] = round(1000 * float(np.median(one[1:])), 2)

  keys = ("recall_at_10", "ndcg_at_10", "contrastive_entropy")
  before, after = ({k: round(e[k], 3) for k in keys} for e in (out["evals"][0], out["evals"][-1]))
  report = {"train": {"steps": cfg.num_steps, "tokens_per_s_median": round(float(np.median(train_tok_s)))},
            "held_out": {"queries": len(queries), "documents": len(corpus), "before": before, "after": after},
            "documents": doc_stats, "queries": query_stats, "dim": d_enc.dim}
  print(f"held-out Recall@10 {before['recall_at_10']} -> {after['recall_at_10']}, nDCG@10 {before['ndcg_at_10']} "
        f"-> {after['ndcg_at_10']} ({len(queries)} queries over {len(corpus)} documents)")
  print(f"training: {report['train']['tokens_per_s_median']} tokens/s; documents: {doc_stats['per_s']} docs/s; "
        f"queries: {query_stats['per_s']} queries/s batched, {query_stats['single_query_ms_p50']} ms one query")
  print(json.dumps(report))
  return report
