"""A cross-encoder reranker: the query and a document in one sequence, one score out, trained over groups of
first-stage candidates with a pointwise (BCE), pairwise (RankNet) or listwise (ListNet) loss.

Sections in execution order: first-stage runs -> training groups -> model (created sharded) -> train step ->
evaluation (the validation run's top candidates reranked) -> loop.

  scalingnote train-reranker --config configs/rerank_tiny.py --workdir DIR --config.data.path=BEIR_DIR
  scalingnote rerank --checkpoint DIR --data BEIR_DIR --split test --run FIRST_STAGE.run --out RERANKED.run

The first stage is BM25 (`data.train_run="bm25"`) or any TREC run file over the split's queries, e.g. a dense
model's from `scalingnote eval --checkpoint ... --save-run FILE`. The workdir holds config.json, reranker.json
(what rebuilds the model: backbone and tower configs, tokenizer), checkpoints/ and metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.config import rerank_defaults
from scalingnote_jax.artifacts.trained import RERANKER_FILE
from scalingnote_jax.data import beir
from scalingnote_jax.data.pipeline import RerankData, RerankGroup
from scalingnote_jax.data import runs
from scalingnote_jax.data.runs import read_run, write_run
from scalingnote_jax.data.training import hold_out, subsample
from scalingnote_jax.distributed import is_main
from scalingnote_jax.encoder import CrossEncoder
from scalingnote_jax.eval.evaluate import beir_run
from scalingnote_jax.eval.retrieval import ir_metrics
from scalingnote_jax.index.bm25 import BM25
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.train.common import (MetricsLog, Preemption, SyncPoint, jit_step, make_optimizer,
                                          open_workdir, start_or_restore)
from scalingnote_jax.train.losses import RANKING_LOSSES, ranking_loss
# A reranker is a tower with a scalar head: projection to one output with a bias, no normalisation.
SCORE_HEAD = dict(projection=1, projection_bias=True, normalize=False)


# ----------------------------------------------------------------------------------------------------------
# First stage: a run per split (BM25 computed here, or a run file), cut to each query's top k.

def first_stage(source: str, data: beir.Dataset, k: int) -> dict[str, dict[str, float]]:
  """{qid: {doc_id: score}} for the split's queries: "bm25", or a TREC run file."""
  if source == "bm25":
    qids = list(data.queries)
    run = BM25(data.corpus).search([data.queries[q] for q in qids], k + 1).run(qids)
  else:
    run = read_known_run(source, data.corpus)
  return beir_run(run, drop_self=True, k=k)


def read_known_run(path: str, corpus: dict, queries: dict | None = None) -> dict[str, dict[str, float]]:
  """A run file whose documents (and, when given, queries) must be known: an unknown one stops the run
  before any work, named with the file."""
  run = read_run(path)
  for what, have, known in (("documents", {d for docs in run.values() for d in docs}, corpus),
                            ("queries", set(run) if queries is not None else set(), queries or {})):
    unknown = sorted(have - set(known))
    if unknown:
      raise beir.DataError(f"{path}: {len(unknown)} {what} are not in the data directory, e.g. {unknown[0]!r}")
  return run


def splits(d: ConfigDict) -> tuple[beir.Dataset, beir.Dataset | None]:
  """(training split, validation split or None) of the `data` section. val_split = train_split holds
  val_fraction of the training queries out as a dev split: the same queries as a Stage 1 run's with the same
  seed (`data.training.hold_out`), none of them trained on."""
  train = beir.load_beir(d.path, d.train_split, unknown="skip")
  if not d.val_split:
    return train, None
  if d.val_split != d.train_split:
    return train, beir.load_beir(d.path, d.val_split, unknown="skip")
  _, dev = hold_out(train, [], d.val_fraction, d.seed)
  rest = {q: r for q, r in train.qrels.items() if q not in dev.qrels}
  return (beir.Dataset(train.corpus, {q: train.queries[q] for q in rest if q in train.queries}, rest),
          beir.Dataset(train.corpus, dev.queries, dev.qrels))


def training_groups(data: beir.Dataset, run: dict, enc: CrossEncoder) -> list[RerankGroup]:
  """One group per query with a judged-relevant document; its candidates are the first stage's other
  documents (never one judged relevant). Texts carry the reranker's prompts."""
  text = dict(zip(data.corpus, enc.document_texts(list(data.corpus.values()))))
  groups = []
  for qid, judged in data.qrels.items():
    positives = [(text[d], float(g)) for d, g in judged.items() if g > 0 and d in text]
    if positives and qid in data.queries:
      candidates = [text[d] for d in run.get(qid, {}) if judged.get(d, 0) <= 0]
      groups.append(RerankGroup(enc.query_texts([data.queries[qid]])[0], positives, candidates))
  return groups


# ----------------------------------------------------------------------------------------------------------
# Model: a BERT or decoder backbone (a checkpoint's first layers, or random) with the score head.

def model_spec(cfg: ConfigDict) -> dict:
  return trained.tower_spec(cfg.model, ConfigDict({**cfg.tower.to_dict(), **SCORE_HEAD}))


SCORE_BIASES = ("zero", "prior")


def prior_log_odds(group_size: int) -> float:
  """The log-odds of a training pair being the relevant one: 1 pair in each group of `group_size`."""
  return math.log(1 / (group_size - 1))


def set_score_bias(params: nnx.State, value: float) -> None:
  """Sets the score head's bias in `params` (in place, in its sharding). Started at the labels' prior, a BCE
  reranker's first predictions are the base rate rather than 1/2 (Adam moves the bias by about the learning rate
  a step: at a fine-tuning rate of 5e-5, -1.1 is ~20,000 steps away)."""
  bias = params["projection"]["bias"]
  bias.set_value(jax.device_put(jax.numpy.full(bias.shape, value, bias.dtype), bias[...].sharding))


# ----------------------------------------------------------------------------------------------------------
# Train step: every pair of the batch's groups scored, the loss over each group.

def make_train_step(graphdef, tx, mesh, loss: str):
  """(params, opt_state, batch) -> (params, opt_state, metrics)."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    b, g, t = batch["ids"].shape
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      scores_BxG = model(batch["ids"].reshape(b * g, t), batch["mask"].reshape(b * g, t)).reshape(b, g)
    value = ranking_loss(loss, scores_BxG, batch["labels"], batch["where"])
    best_B = jax.numpy.argmax(jax.numpy.where(batch["where"], scores_BxG, -jax.numpy.inf), axis=1)
    return value, (best_B == 0).mean()  # the relevant document scored first among its group

  def step(params, opt_state, batch):
    (value, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(loss=value, accuracy=accuracy, grad_norm=optax.tree.norm(grads))

  return step


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the validation queries' first-stage top k, reranked.

def evaluate(enc: CrossEncoder, data: beir.Dataset, run: dict, top_k: int, batch_size: int,
             fuse: tuple[float, ...] = ()) -> dict[str, float]:
  """The reranked top_k's metrics, and nDCG@10 of its fusion with the first stage at each weight of `fuse`
  (`fused_W_ndcg_at_10`: choose W on a dev split for `scalingnote rerank --fuse W`)."""
  judged = {q: run[q] for q in run if any(g > 0 for g in data.qrels.get(q, {}).values())}
  reranked = enc.rerank(judged, data.queries, data.corpus, top_k=top_k, batch_size=batch_size, show_progress=False)
  metrics = ir_metrics(data.qrels, reranked)
  for w in fuse:
    metrics[f"fused_{w:g}_ndcg_at_10"] = ir_metrics(data.qrels, runs.fuse(judged, reranked, w))["ndcg_at_10"]
  return metrics


# ----------------------------------------------------------------------------------------------------------
# The loop: data, model, resume or start, step, log, validate, checkpoint.

@holds_lock("workdir")  # one writer at a time; the kernel releases it however the run ends
def train(cfg: ConfigDict, workdir: str, *, resume: bool = False) -> dict:
  """Trains a reranker in `workdir`. With `resume` it continues from the latest checkpoint there; without it,
  a workdir that already has checkpoints is refused."""
  if cfg.loss not in RANKING_LOSSES:
    raise ValueError(f"loss={cfg.loss!r}: expected one of {RANKING_LOSSES}")
  if cfg.data.group_size < 2 or cfg.data.top_k < cfg.data.group_size - 1:
    raise ValueError(f"data.group_size={cfg.data.group_size}, data.top_k={cfg.data.top_k}: a group needs the "
                     "relevant document and at least one candidate (group_size >= 2), drawn from top_k >= "
                     "group_size - 1")
  for w in cfg.eval.fuse:  # checked now, not at the first validation
    runs.check_fuse_weight(w, "eval.fuse:")
  if cfg.score_bias not in SCORE_BIASES:
    raise ValueError(f"score_bias={cfg.score_bias!r}: expected one of {SCORE_BIASES}")
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, cfg.batch_size)
  ckpt, last = open_workdir(cfg, workdir, resume=resume, keep=cfg.checkpoint.keep, defaults=rerank_defaults())
  if is_main():
    print(f"rerank: {sharding.describe(mesh)}", flush=True)

  # Model and optimizer: fresh (reranker.json written once) or restored.
  spec = model_spec(cfg) if last is None else trained.read_spec(workdir, RERANKER_FILE)
  if is_main():
    write_atomic(os.path.join(workdir, RERANKER_FILE), json.dumps(spec, indent=1))
  tx = make_optimizer(cfg.optim, cfg.num_steps)
  model, graphdef, params, opt_state, start, data_state = start_or_restore(spec, tx, ckpt, last, mesh, cfg.rules,
                                                                           cfg.model.seed)
  if start == 0 and cfg.score_bias == "prior":
    set_score_bias(params, prior_log_odds(cfg.data.group_size))
  enc = CrossEncoder(model, Tokenizer.from_pretrained(spec["tokenizer"]), mesh)

  # Data: groups of the training split's first-stage candidates; the validation split's run.
  d = cfg.data
  train_data, val = splits(d)
  validate = val is not None and cfg.eval.every > 0
  groups = training_groups(train_data, first_stage(d.train_run, train_data, d.top_k), enc)
  groups = subsample(groups, d.train_fraction, d.seed)  # data-size sweeps: nested subsets
  data = RerankData(groups, enc.tokenize_pairs, enc.tokenizer.pad_id, d.group_size, enc.cfg.max_length,
                    cfg.batch_size)
  batches = data.iterator(d.seed, jax.process_index(), jax.process_count())
  if data_state is not None:
    batches.set_state(data_state)
  if validate:
    val_run = first_stage(d.val_run, val, 100)
    first_stage_metrics = ir_metrics(val.qrels, val_run)
  step_fn = jit_step(make_train_step(graphdef, tx, mesh, cfg.loss), mesh, params, opt_state)

  log = MetricsLog(workdir, start)
  history, evals = [], []

  def run_eval(step):
    nnx.update(model, params)
    enc.update(model)
    metrics = evaluate(enc, val, val_run, cfg.eval.top_k, cfg.eval.batch_size, tuple(cfg.eval.fuse))
    evals.append({"step": step, **metrics})
    log.write(step, "val", metrics)
    return metrics

  if validate and start == 0:
    log.write(0, "first_stage", first_stage_metrics)
    if cfg.eval.at_start:
      run_eval(0)
  bar = tqdm(range(start + 1, cfg.num_steps + 1), desc=f"rerank ({cfg.loss})", initial=start, total=cfg.num_steps,
             disable=not is_main())
  sync, preemption = SyncPoint(ckpt, workdir, start), Preemption()
  with preemption.listening():
    for step in bar:
      batch = sharding.global_batch(mesh, next(batches))
      params, opt_state, metrics = step_fn(params, opt_state, batch)
      preempted = preemption.reached(step)  # a preemption notice: save this step, then stop
      save = step % cfg.checkpoint.every == 0 or step == cfg.num_steps or preempted
      if step % cfg.log_every == 0 or save:
        metrics = sync(step, metrics)
        history.append({"step": step, **metrics})
        log.write(step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
      if validate and (step % cfg.eval.every == 0 or step == cfg.num_steps):
        m = run_eval(step)
        if is_main():
          bar.write(f"step {step}: val nDCG@10 {m['ndcg_at_10']:.4f} reranking the first stage's top {cfg.eval.top_k} "
                    f"(first stage {first_stage_metrics['ndcg_at_10']:.4f})")
      if save:
        ckpt.save(step, params, opt_state, batches.get_state())
      if preempted:
        preemption.stop(step, ckpt, workdir)
  ckpt.wait()
  ckpt.close()
  nnx.update(model, params)
  return {"history": history, "evals": evals, "first_stage": first_stage_metrics if validate else None,
          "spec": spec, "num_queries": len(groups)}


# ----------------------------------------------------------------------------------------------------------
# `scalingnote rerank`: a run file in, the reranked run file out.

def rerank_file(model_dir: str, data_dir: str, run_in: str, out: str, *, top_k: int = 100,
                batch_size: int = 64, fuse: float = 1.0) -> dict:
  """Reranks each query's top_k documents of `run_in` (queries and documents from the BEIR directory; `fuse`
  < 1 mixes in the first stage's scores) and writes the run to `out`; returns counts and pairs scored per
  second."""
  if top_k < 1:
    raise ValueError(f"rerank: --top-k {top_k}: expected >= 1")
  runs.check_fuse_weight(fuse, "rerank: --fuse")
  enc = CrossEncoder.from_workdir(model_dir)
  queries = beir.load_queries(os.path.join(data_dir, "queries.jsonl"))
  corpus = beir.load_corpus(os.path.join(data_dir, "corpus.jsonl"))
  run = read_known_run(run_in, corpus, queries)
  t0 = time.perf_counter()
  reranked = enc.rerank(run, queries, corpus, top_k=top_k, batch_size=batch_size, fuse=fuse)
  seconds = time.perf_counter() - t0
  write_run(out, reranked, tag="scalingnote-rerank")
  pairs = sum(len(docs) for docs in reranked.values())
  return {"out": out, "queries": len(reranked), "pairs": pairs, "pairs_per_s": pairs / seconds}
