"""The online path against the teacher path on a BEIR dataset: the distilled student encodes queries into the
index of LLM document embeddings, versus the LLM query tower into the same index.

    .venv/bin/python benchmarks/online_path.py --student runs/scifact_student \
        --data ../shared/data/beir/scifact [--split test] [--bundle runs/scifact_bundle] [--single 200] [--batch 64]

The bundle is exported first unless --bundle names one that exists (its documents must come from the
student's teacher; `scalingnote export` refuses otherwise). Both paths then answer the split's queries with
the same index: quality (Recall@100, nDCG@10 by pytrec_eval), single-query latency (one query per call, as a
lightly loaded service sees them; p50/p99 over --single queries) and throughput (queries/s answering all
queries in batches of --batch, as the micro-batching service does under load). An untimed first pass
compiles every shape. The last line is one JSON object: student_qps, teacher_qps, qps_ratio (batched
throughput), student_recall_at_100, teacher_recall_at_100, recall_retention, student_ndcg_at_10,
teacher_ndcg_at_10, and the single-query latencies (with --speed-llm, also the query encoding alone of an LLM against the
student's).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import trained
from scalingnote_jax.data.beir import load_beir
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.eval.retrieval import ir_metrics
from scalingnote_jax.serve import bundle
from scalingnote_jax.serve.retriever import Retriever


def timed(search, texts: list[str], single: int) -> tuple[float, list[float], object]:
  """(batched seconds, single-query seconds, batched result); a first untimed pass compiles every shape."""
  for timing in (False, True):
    t = time.perf_counter()
    result = search(texts)
    batched_s = time.perf_counter() - t
    latencies = []
    for text in texts[:single]:
      t = time.perf_counter()
      search([text])
      latencies.append(time.perf_counter() - t)
  return batched_s, latencies, result


def measure(name: str, retriever: Retriever, qids: list[str], texts: list[str], qrels: dict, single: int) -> dict:
  batched_s, latencies, hits = timed(lambda qs: retriever.search(qs, k=100), texts, single)
  metrics = ir_metrics(qrels, hits.run(qids))
  out = {"qps": len(texts) / batched_s, "latency_ms_p50": 1e3 * float(np.percentile(latencies, 50)),
         "latency_ms_p99": 1e3 * float(np.percentile(latencies, 99)), "recall_at_100": metrics["recall_at_100"],
         "ndcg_at_10": metrics["ndcg_at_10"]}
  print(f"{name:8s} {out['qps']:9.1f} q/s batched  single-query p50 {out['latency_ms_p50']:7.2f} ms "
        f"p99 {out['latency_ms_p99']:7.2f} ms  Recall@100 {out['recall_at_100']:.4f}  nDCG@10 {out['ndcg_at_10']:.4f}")
  return out


def encode_speed(enc: Encoder, texts: list[str], batch: int, single: int) -> dict:
  batched_s, latencies, _ = timed(lambda qs: enc.encode_queries(qs, batch_size=batch, show_progress=False), texts,
                                  single)
  return {"qps": len(texts) / batched_s, "ms_p50": 1e3 * float(np.percentile(latencies, 50))}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--student", required=True, help="a Stage 2 workdir (scalingnote distill)")
  p.add_argument("--data", required=True, help="a BEIR directory: its corpus is indexed, --split's queries asked")
  p.add_argument("--split", default="test")
  p.add_argument("--bundle", default=None, help="bundle directory (exported here when it does not exist)")
  p.add_argument("--embeddings", default=None, help="an existing encode store of the corpus for the export")
  p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
  p.add_argument("--batch", type=int, default=64, help="queries per call for the throughput figure")
  p.add_argument("--speed-llm", default=None, help="also time the query encoding alone of this LLM (HF dir, GGUF "
                                                   "or packaged name) against the student's: the speed of an "
                                                   "LLM-sized teacher when the trained teacher is smaller")
  args = p.parse_args()

  bundle_dir = args.bundle or os.path.join(args.student, "bundle")
  if not os.path.exists(os.path.join(bundle_dir, bundle.MANIFEST)):
    bundle.export(args.student, bundle_dir, corpus_dir=args.data, embeddings=args.embeddings)
  student = Retriever.load(bundle_dir, max_batch=args.batch)
  manifest = student.manifest
  model, tokenizer, _ = trained.load_stage1(manifest["teacher"]["workdir"], sharding.make_mesh(devices=jax.devices()[:1]))
  teacher = Retriever(Encoder(model.query, tokenizer), student.index, manifest, max_batch=args.batch)

  data = load_beir(args.data, args.split, unknown="skip")
  qids = [q for q in data.queries if q in data.qrels]
  texts = [data.queries[q] for q in qids]
  print(f"{len(qids)} {args.split} queries over {student.num_docs} documents; student "
        f"{manifest['student']['num_layers']} layers x {manifest['student']['hidden_size']}, teacher "
        f"{manifest['teacher']['workdir']}; {jax.devices()[0].device_kind}")
  s = measure("student", student, qids, texts, data.qrels, args.single)
  t = measure("teacher", teacher, qids, texts, data.qrels, args.single)
  extra = {}
  if args.speed_llm:
    llm = Encoder.from_pretrained(args.speed_llm, query_prompt=model.query.cfg.query_prompt)
    for name, enc in (("student", student.encoder), ("llm", llm)):
      extra.update({f"{name}_encode_{k}": v for k, v in encode_speed(enc, texts, args.batch, args.single).items()})
    extra["llm_encode_qps_ratio"] = extra["student_encode_qps"] / extra["llm_encode_qps"]
    print(f"encoding alone: student {extra['student_encode_qps']:.1f} q/s, {args.speed_llm} "
          f"{extra['llm_encode_qps']:.1f} q/s ({extra['llm_encode_qps_ratio']:.1f}x); single query p50 "
          f"{extra['student_encode_ms_p50']:.2f} vs {extra['llm_encode_ms_p50']:.2f} ms")
  print(json.dumps({
      "student_qps": s["qps"], "teacher_qps": t["qps"], "qps_ratio": s["qps"] / t["qps"],
      "student_recall_at_100": s["recall_at_100"], "teacher_recall_at_100": t["recall_at_100"],
      "recall_retention": s["recall_at_100"] / max(t["recall_at_100"], 1e-12),
      "student_ndcg_at_10": s["ndcg_at_10"], "teacher_ndcg_at_10": t["ndcg_at_10"],
      "student_latency_ms_p50": s["latency_ms_p50"], "teacher_latency_ms_p50": t["latency_ms_p50"],
      "latency_ratio_p50": t["latency_ms_p50"] / s["latency_ms_p50"], **extra}))


if __name__ == "__main__":
  main()
