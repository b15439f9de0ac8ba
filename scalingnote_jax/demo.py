"""`scalingnote demo`: the main job on the embedded default, both stages and the online path. Trains Stage 1
on the built-in synthetic corpus (WORKDIR/teacher), encodes the corpus with the trained document tower and
the held-out queries with the query tower, distils the query tower into a small BERT student
(WORKDIR/student), exports the serving bundle (WORKDIR/bundle) and answers the held-out queries through it.
Reports retrieval before and after training, the student's share of the teacher's Recall@10, and
throughput."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from ml_collections import ConfigDict

from scalingnote_jax.encoder import Encoder
from scalingnote_jax.eval.retrieval import ir_metrics
from scalingnote_jax.serve import bundle
from scalingnote_jax.serve.retriever import Retriever
from scalingnote_jax.train import stage1, stage2


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
  teacher_dir, student_dir, bundle_dir = (os.path.join(workdir, name) for name in ("teacher", "student", "bundle"))
  print(f"Stage 1 on the synthetic corpus ({cfg.data.num_docs} documents) in {teacher_dir}")
  out = stage1.train(cfg, teacher_dir)
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

  print(f"Stage 2: distilling the query tower into {student_dir}")
  s_cfg = ConfigDict(cfg.stage2.to_dict())
  s_cfg.teacher = teacher_dir
  s_out = stage2.distill(s_cfg, student_dir)
  # the validation document store holds the whole corpus (eval.max_docs=0): the bundle reuses it
  bundle.export(student_dir, bundle_dir, embeddings=os.path.join(student_dir, "teacher", "documents"))
  retriever = Retriever.load(bundle_dir)
  qids = list(held_out.queries)
  ids, scores = retriever.search(queries, k=100)
  online = ir_metrics(held_out.qrels, {q: dict(zip(i, map(float, s))) for q, i, s in zip(qids, ids, scores)})
  teacher_r10 = s_out["teacher"]["recall_at_10"]
  stage2_report = {"student_layers": s_cfg.student.num_layers, "steps": s_cfg.num_steps,
                   "teacher_recall_at_10": round(teacher_r10, 3),
                   "online_recall_at_10": round(online["recall_at_10"], 3),
                   "recall_at_10_retention": round(online["recall_at_10"] / teacher_r10, 3),
                   "cosine_to_teacher": round(s_out["evals"][-1]["cosine_to_teacher"], 4), "bundle": bundle_dir}

  keys = ("recall_at_10", "ndcg_at_10", "contrastive_entropy")
  before, after = ({k: round(e[k], 3) for k in keys} for e in (out["evals"][0], out["evals"][-1]))
  report = {"train": {"steps": cfg.num_steps, "tokens_per_s_median": round(float(np.median(train_tok_s)))},
            "held_out": {"queries": len(queries), "documents": len(corpus), "before": before, "after": after},
            "documents": doc_stats, "queries": query_stats, "dim": d_enc.dim, "stage2": stage2_report}
  print(f"held-out Recall@10 {before['recall_at_10']} -> {after['recall_at_10']}, nDCG@10 {before['ndcg_at_10']} "
        f"-> {after['ndcg_at_10']} ({len(queries)} queries over {len(corpus)} documents)")
  print(f"training: {report['train']['tokens_per_s_median']} tokens/s; documents: {doc_stats['per_s']} docs/s; "
        f"queries: {query_stats['per_s']} queries/s batched, {query_stats['single_query_ms_p50']} ms one query")
  print(f"online path (student -> ScaNN over the LLM document embeddings): Recall@10 "
        f"{stage2_report['online_recall_at_10']}, {stage2_report['recall_at_10_retention']:.1%} of the teacher's "
        f"{stage2_report['teacher_recall_at_10']} (this toy teacher is smaller than the student; the speed-up "
        "with a real LLM teacher: benchmarks/online_path.py)")
  print(json.dumps(report))
  return report
