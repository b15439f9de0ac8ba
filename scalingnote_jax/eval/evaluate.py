"""`scalingnote eval`: one retrieval system on a BEIR split, printed as one JSON object.

  scalingnote eval --bundle DIR --data BEIR_DIR --split test      # the online path: student + LLM documents
  scalingnote eval --checkpoint DIR --data BEIR_DIR               # a Stage 1 workdir's towers, or a HF / GGUF
                                                                  # encoder used for both sides (zero-shot)
  scalingnote eval --bm25 --data BEIR_DIR                         # BM25 (bm25s), the lexical baseline
  scalingnote eval --run RUN_FILE --data BEIR_DIR                 # a TREC run file (e.g. `scalingnote rerank`)

Any system's ranking can be written as a run file with --save-run FILE; --output DIR also writes the metrics as
MTEB writes a task's result (DIR/<TaskName>.json, main score nDCG@10; `eval.mteb_adapter` runs MTEB itself).

Metrics: nDCG@10, Recall@10/100, MRR@10 and MAP by pytrec_eval; AUC of judged-relevant against sampled
documents; contrastive entropy (dense systems: cosine / temperature); throughput of the whole search
(encode + index) batched and one query at a time. BEIR and MTEB conventions: every query of the split's
qrels is searched and averaged in; unjudged documents are non-relevant; a query judged only with grade 0
scores 0 (`queries_without_relevant`); a document with the query's own id is removed from its results
(ArguAna-style corpora); qrels naming documents that are not in the corpus are kept, relevant and never
retrieved, and reported (`qrels_unknown_documents`, `queries_relevant_not_in_corpus`), not crashed on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import store, trained
from scalingnote_jax.config import stage1_defaults
from scalingnote_jax.artifacts.files import cache_dir, write_atomic
from scalingnote_jax.data import beir
from scalingnote_jax.data.runs import read_run, write_run
from scalingnote_jax.data.training import hold_out
from scalingnote_jax.encoder import towers
from scalingnote_jax.eval.retrieval import CONTRASTIVE_NEGATIVES, DEFAULT_TEMPERATURE, ir_metrics, pair_metrics
from scalingnote_jax.index.bm25 import BM25
from scalingnote_jax.index.index import Index
from scalingnote_jax.serve.retriever import Retriever


# ----------------------------------------------------------------------------------------------------------
# Systems: `search(queries, k) -> Hits` and `scorer(queries)` for the pairwise metrics.

class Dense:
  """A query encoder over document embeddings and their index (`serve.retriever.Retriever`); `temperature`:
  the one its towers were trained at, where known (the contrastive entropy's)."""
  cosine = True

  def __init__(self, retriever, doc_ids: list[str], d_NxD: np.ndarray, temperature: float | None = None):
    self.retriever, self.doc_ids, self.d_NxD, self.temperature = retriever, doc_ids, d_NxD, temperature

  def search(self, queries: Sequence[str], k: int):
    return self.retriever.search(queries, k)

  def scorer(self, queries: Sequence[str]):
    q_QxD = self.retriever.encode(queries)
    return lambda row, cols: self.d_NxD[cols] @ q_QxD[row]


class Lexical:
  """BM25 (`index.bm25`)."""
  cosine = False

  def __init__(self, corpus: dict[str, dict]):
    self.bm25 = BM25(corpus)
    self.doc_ids = self.bm25.doc_ids

  def search(self, queries: Sequence[str], k: int):
    return self.bm25.search(queries, k)

  def scorer(self, queries: Sequence[str]):
    return lambda row, cols: self.bm25.scores(queries[row])[cols]


def bundle_system(bundle: str) -> Dense:
  """The online path of a serving bundle (`scalingnote export`)."""
  retriever = Retriever.load(bundle)
  return Dense(retriever, *store.load_embeddings(os.path.join(bundle, "documents")))


def embedding_cache(encoder, corpus: dict[str, dict]) -> str:
  """Where `eval` keeps a document tower's embeddings of a corpus between runs: CACHE/embeddings/<the tower's
  fingerprint>-<a hash of the corpus's ids and texts>, so that a second evaluation of the same tower and corpus
  (or one that adds --save-run) encodes nothing, and another tower or corpus gets a store of its own."""
  return cache_dir("embeddings", f"{encoder.fingerprint[:16]}-{store.inputs_digest(corpus)[:16]}")


def tower_system(checkpoint: str, corpus: dict[str, dict], embeddings: str | None, *, backend: str = "exact",
                 batch_size: int = 64, step: int | None = None) -> Dense:
  """A Stage 1 workdir's query and document towers (checkpoint `step`, default the latest), or one HF / GGUF /
  packaged encoder for both sides. The corpus is encoded into the store `embeddings` (default: the cache,
  `embedding_cache`); resumable, and reused when complete and of this tower."""
  q_enc, d_enc, temperature = towers(checkpoint, sharding.make_mesh(devices=jax.local_devices()), step)
  embeddings = embeddings or embedding_cache(d_enc, corpus)
  store.encode_corpus(d_enc, corpus, embeddings, batch_size=batch_size)
  doc_ids, d_NxD = store.load_embeddings(embeddings)
  return Dense(Retriever(q_enc, Index.build(d_NxD, doc_ids, backend=backend), max_batch=batch_size),
               doc_ids, d_NxD, temperature)


# ----------------------------------------------------------------------------------------------------------
# Evaluation.

def throughput(system, queries: list[str], *, batch_size: int, k: int = 100, singles: int = 32) -> dict:
  """Queries per second of the whole search (encode + index), batched, after a warm-up pass (compilation):
  the best of repeated passes (at least 3, and about a second in all), as `timeit` takes the minimum, since a
  fast system's single pass is mostly timer noise; and the median latency of one query on its own."""
  def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

  batches = [queries[i:i + batch_size] for i in range(0, len(queries), batch_size)]
  for b in batches:  # warm-up: every batch shape compiled
    system.search(b, k)
  passes = [timed(lambda: [system.search(b, k) for b in batches]) for _ in range(3)]
  while sum(passes) < 1.0 and len(passes) < 50:
    passes.append(timed(lambda: [system.search(b, k) for b in batches]))
  seconds = min(passes)
  one = [queries[i % len(queries)] for i in range(singles + 1)]
  system.search(one[:1], k)
  latency = sorted(timed(lambda q=q: system.search([q], k)) for q in one[1:])
  return {"qps": len(queries) / seconds, "batch_size": batch_size, "latency_ms_p50": 1000 * latency[len(latency) // 2]}


def beir_run(run: dict[str, dict[str, float]], *, drop_self: bool = True, k: int = 100) -> dict:
  """Each query's top k documents by score, after dropping a document with the query's own id."""
  out = {}
  for qid, docs in run.items():
    kept = sorted(((d, s) for d, s in docs.items() if not (drop_self and d == qid)), key=lambda kv: -kv[1])
    out[qid] = dict(kept[:k])
  return out


def evaluate(system, data: beir.Dataset, *, drop_self: bool = True, k: int = 100,
             num_negatives: int = CONTRASTIVE_NEGATIVES, temperature: float | None = None, seed: int = 0,
             batch_size: int = 64, measure_speed: bool = True, save_run: str | None = None) -> dict:
  """The system's metrics on `data` (queries and qrels of one split; corpus = what the system searches);
  `save_run`: also write its run (TREC format, what `scalingnote rerank` takes). The contrastive entropy's
  temperature: `temperature`, else the system's own, else DEFAULT_TEMPERATURE."""
  qids = list(data.qrels)  # every query of the split, as BEIR and MTEB search and average them
  texts = [data.queries[q] for q in qids]
  run = {}
  for i in range(0, len(texts), batch_size):  # one more than k: the query's own id may be among them
    run.update(system.search(texts[i:i + batch_size], k + int(drop_self)).run(qids[i:i + batch_size]))
  run = beir_run(run, drop_self=drop_self, k=k)
  if save_run:
    write_run(save_run, run)
  metrics = ir_metrics(data.qrels, run)
  temperature = temperature or getattr(system, "temperature", None) or DEFAULT_TEMPERATURE
  metrics.update(pair_metrics(system.scorer(texts), qids, data.qrels, system.doc_ids, num_negatives=num_negatives,
                              scale=1.0 / temperature if system.cosine else None, rng=np.random.default_rng(seed)))
  metrics["temperature"] = temperature if system.cosine else None
  metrics["num_docs"] = len(system.doc_ids)
  if measure_speed:
    metrics.update(throughput(system, texts, batch_size=batch_size, k=k))
  return metrics


def load_split(data_dir: str, split: str) -> tuple[beir.Dataset, dict]:
  """The split for evaluation as BEIR and MTEB score it: qrels naming a query that queries.jsonl lacks are
  dropped (it cannot be asked); qrels naming a document the corpus lacks are kept (relevant, never retrieved).
  Returns (data, counts of both)."""
  corpus = beir.load_corpus(os.path.join(data_dir, "corpus.jsonl"))
  queries = beir.load_queries(os.path.join(data_dir, "queries.jsonl"))
  skipped: list[str] = []
  qrels = beir.load_qrels(os.path.join(data_dir, "qrels", f"{split}.tsv"), query_ids=queries, unknown="skip",
                          skipped=skipped)
  where = os.path.join(data_dir, "qrels", f"{split}.tsv")
  if not qrels:
    raise beir.DataError(f"{where}: no judged query (of those in queries.jsonl): nothing to evaluate")
  if not any(g > 0 for judged in qrels.values() for g in judged.values()):
    raise beir.DataError(f"{where}: no query has a relevant (grade > 0) document: every metric would be 0")
  unknown = [(q, d) for q, judged in qrels.items() for d in judged if d not in corpus]
  for q, d in unknown[:5]:
    print(f"warning: qrels/{split}.tsv judges document {d!r} (query {q!r}), which {data_dir}/corpus.jsonl lacks: "
          "kept, as BEIR and MTEB keep it (relevant, never retrieved)", file=sys.stderr)
  if len(unknown) > 5:
    print(f"warning: ... {len(unknown) - 5} more judged documents not in the corpus", file=sys.stderr)
  for line in skipped[:5]:
    print(f"warning: {line} (dropped: it cannot be searched)", file=sys.stderr)
  lost = sum(not any(g > 0 and d in corpus for d, g in judged.items()) and any(g > 0 for g in judged.values())
             for judged in qrels.values())
  counts = {"qrels_unknown_queries": len(skipped), "qrels_unknown_documents": len(unknown),
            "queries_relevant_not_in_corpus": lost}
  return beir.Dataset(corpus, {q: queries[q] for q in qrels}, qrels), counts


HELD_OUT = "held-out"


def held_out_split(checkpoint: str | None, data_dir: str) -> tuple[beir.Dataset, dict]:
  """The dev queries a Stage 1 run held out of its train split (`data.val_split = data.train_split`), with
  their qrels, over the whole corpus of `data_dir`: where settings are chosen, the test split untouched."""
  if not checkpoint or not trained.is_stage1_workdir(checkpoint):
    raise ValueError(f"eval: --split {HELD_OUT} is the dev queries a Stage 1 run held out of its training "
                     "queries; give that run's workdir as --checkpoint")
  d = trained.read_config(checkpoint, stage1_defaults()).data
  if d.source != "beir" or d.val_split != d.train_split:
    raise ValueError(f"eval: {checkpoint}/config.json holds no dev queries out of its train split (data.source "
                     f"{d.source!r}, data.val_split {d.val_split!r}, data.train_split {d.train_split!r})")
  train = load_split(data_dir, d.train_split)[0]
  _, dev = hold_out(train, [], d.val_fraction, d.seed)
  return beir.Dataset(train.corpus, dev.queries, dev.qrels), {}


def evaluate_run_file(path: str, data: beir.Dataset, *, drop_self: bool = True, k: int = 100) -> dict:
  """The IR metrics of a run file (a reranker's output, another toolkit's run); judged queries it lacks
  score 0 and are counted."""
  run = read_run(path)
  metrics = ir_metrics(data.qrels, beir_run(run, drop_self=drop_self, k=k))
  return {**metrics, "queries_not_in_run": sum(q not in run for q in data.qrels)}


def run(*, data_dir: str, split: str, output: str | None = None, **kw) -> dict:
  """`scalingnote eval` (see `evaluate_split`); `output`: a directory to write the metrics into as MTEB's result
  JSON (`write_mteb_result`), once the evaluation has succeeded."""
  start = time.perf_counter()
  result = evaluate_split(data_dir=data_dir, split=split, **kw)
  if output:
    write_mteb_result(output, result, data_dir=data_dir, split=split, k=kw.get("k", 100),
                      evaluation_time=time.perf_counter() - start)
  return result


def evaluate_split(*, data_dir: str, split: str, bundle: str | None = None, checkpoint: str | None = None,
                   bm25: bool = False, run_file: str | None = None, embeddings: str | None = None,
                   backend: str = "exact", cache: bool = True, step: int | None = None, **kw) -> dict:
  """Exactly one of bundle / checkpoint / bm25 / run_file (a checkpoint: its `step`, default the latest). A
  checkpoint's corpus embeddings go to `embeddings`, else to the cache (`embedding_cache`), else (cache=False)
  to a temporary store. `split` "held-out": the dev queries the checkpoint's run held out."""
  if sum([bool(bundle), bool(checkpoint), bm25, bool(run_file)]) != 1:
    raise ValueError("eval: give exactly one of --bundle, --checkpoint, --bm25, --run")
  if kw.get("k", 100) < 1:
    raise ValueError(f"eval: --hits {kw['k']}: expected >= 1 documents per query")
  data, counts = held_out_split(checkpoint, data_dir) if split == HELD_OUT else load_split(data_dir, split)
  if run_file:
    if kw.get("save_run"):
      raise ValueError("eval: --save-run with --run would only copy the run file")
    metrics = evaluate_run_file(run_file, data, drop_self=kw.get("drop_self", True), k=kw.get("k", 100))
    return {"system": os.path.abspath(run_file), "data": os.path.abspath(data_dir), "split": split, **metrics,
            **counts}
  with tempfile.TemporaryDirectory(prefix="scalingnote-eval-") as tmp:
    if bundle:
      system, name = bundle_system(bundle), os.path.abspath(bundle)
    elif checkpoint:
      store_dir = embeddings or (None if cache else os.path.join(tmp, "documents"))
      system = tower_system(checkpoint, data.corpus, store_dir, backend=backend, batch_size=kw.get("batch_size", 64),
                            step=step)
      name = checkpoint
    else:
      system, name = Lexical(data.corpus), "bm25"
    missing = len(set(data.corpus) - set(system.doc_ids))
    if missing:
      print(f"warning: {missing} documents of {data_dir}/corpus.jsonl are not in the system's index", file=sys.stderr)
    metrics = evaluate(system, data, **kw)
  return {"system": name, "data": os.path.abspath(data_dir), "split": split, **metrics, **counts,
          "corpus_docs_not_indexed": missing}


# ----------------------------------------------------------------------------------------------------------
# MTEB's result file: the metrics as `mteb.TaskResult` writes them to disk, so that MTEB's tools (loading,
# comparing, the leaderboard's tables) read an evaluation made here.

MTEB_LANGUAGES = ("eng-Latn",)  # BEIR's corpora are English; a TaskResult must name its languages


def task_name(data_dir: str) -> str:
  """The MTEB task name of a local BEIR directory: its basename (`../shared/data/beir/scifact` -> scifact)."""
  return os.path.basename(os.path.normpath(os.path.abspath(data_dir)))


def data_revision(data_dir: str, split: str) -> str:
  """What stands for a task's dataset revision (a Hugging Face commit in MTEB) for a local BEIR directory: a
  hash of corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv, so that results on changed data do not compare equal."""
  h = hashlib.sha256()
  for name in ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", f"{split}.tsv")):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):  # (the held-out split has no file of its own)
      h.update(name.encode())
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()[:16]


def mteb_scores(metrics: dict, *, k: int = 100, languages: Sequence[str] = MTEB_LANGUAGES) -> dict:
  """One subset's entry of a TaskResult's scores: our IR metrics under MTEB's names (our MAP is over the top k
  retrieved, MTEB's map_at_k), main score nDCG@10 as MTEB's retrieval tasks have it."""
  return {"main_score": metrics["ndcg_at_10"], "ndcg_at_10": metrics["ndcg_at_10"],
          "recall_at_10": metrics["recall_at_10"], "recall_at_100": metrics["recall_at_100"],
          f"map_at_{k}": metrics["map"], "mrr_at_10": metrics["mrr_at_10"], "hf_subset": "default",
          "languages": list(languages)}


def write_mteb_result(out_dir: str, metrics: dict, *, data_dir: str, split: str, k: int = 100,
                      evaluation_time: float | None = None) -> str:
  """Writes OUT_DIR/<task name>.json as `mteb.TaskResult.to_disk` does (atomically); returns its path.
  mteb_version is null: MTEB did not compute these numbers (`mteb_adapter` runs MTEB's own evaluation)."""
  name = task_name(data_dir)
  result = {"dataset_revision": data_revision(data_dir, split), "task_name": name, "mteb_version": None,
            "scores": {split: [mteb_scores(metrics, k=k)]}, "evaluation_time": evaluation_time,
            "kg_co2_emissions": None, "date": time.time()}
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  write_atomic(path, json.dumps(result, indent=2, allow_nan=False))
  return path
