"""Stage 2: query-based knowledge distillation of the frozen LLM query tower into a small BERT encoder.

Documents stay with the LLM document tower; only the query side moves to the student, trained to reproduce
the teacher's query embeddings (MSE + lambda * (1 - cosine)). Teacher embeddings are computed once and
cached, so no step runs the LLM. Sections in execution order: teacher -> training queries -> train step ->
evaluation -> the loop (cached teacher embeddings, the student: its spec by `artifacts/trained.tower_spec`,
created sharded by `train/common.py`, step, log, validate, checkpoint).

  scalingnote distill --config configs/distill_tiny.py --config.teacher=STAGE1_WORKDIR --workdir DIR

The workdir holds config.json, student.json (what rebuilds the student: backbone and tower configs, its
tokenizer, the teacher's fingerprints), teacher/{queries-<digest of the texts>,val_queries,documents}/ (cached
teacher embeddings, `artifacts.store` stores; elsewhere with `teacher_cache`), checkpoints/, metrics.jsonl and
tensorboard/.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import store, trained
from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.config import distill_defaults
from scalingnote_jax.artifacts.trained import STUDENT_FILE
from scalingnote_jax.data import beir, synthetic
from scalingnote_jax.data.pipeline import DistillData
from scalingnote_jax.data.training import load_data, validation_doc_ids
from scalingnote_jax.distributed import is_main
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.eval.retrieval import ir_metrics
from scalingnote_jax.index.exact import exact_search
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.train.common import (MetricsLog, Preemption, SyncPoint, jit_step, make_optimizer,
                                          open_workdir, start_or_restore)
from scalingnote_jax.train.losses import distillation_loss


# ----------------------------------------------------------------------------------------------------------
# Teacher: the towers of a Stage 1 workdir, identified by content fingerprints.

def load_teacher(path: str, mesh) -> tuple[Encoder, Encoder, ConfigDict, dict]:
  """(query encoder, document encoder, Stage 1 config, identity {workdir, dim, query_fingerprint,
  doc_fingerprint})."""
  if not path or not trained.is_stage1_workdir(path):
    raise ValueError(f"teacher={path!r}: not a Stage 1 workdir (config.json + checkpoints/); "
                     "set --config.teacher=DIR to a `scalingnote train` workdir")
  model, tokenizer, t_cfg = trained.load_stage1(path, mesh)
  q_enc, d_enc = Encoder(model.query, tokenizer, mesh), Encoder(model.doc, tokenizer, mesh)
  identity = {"workdir": os.path.abspath(path), "dim": q_enc.dim, "query_fingerprint": q_enc.fingerprint,
              "doc_fingerprint": d_enc.fingerprint}
  return q_enc, d_enc, t_cfg, identity


# ----------------------------------------------------------------------------------------------------------
# Queries: the teacher's labelled training queries plus unlabelled query text (files, or the synthetic
# corpus's query log); never a held-out query's text.

def read_query_file(path: str) -> list[str]:
  """Query texts from .jsonl (one object per line with a "text" or "query" field) or plain text (one
  query per line). Errors name file:line."""
  if path.endswith(".jsonl"):
    out = []
    for lineno, obj in beir.read_jsonl(path):
      key = "text" if "text" in obj else "query"
      out.append(beir.field(obj, key, f"{path}:{lineno}"))
    return out
  if not os.path.exists(path):
    raise beir.DataError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def training_queries(cfg: ConfigDict, t_cfg: ConfigDict) -> tuple[dict[str, str], synthetic.Dataset | None]:
  """({id: text} to distil on, the teacher's held-out split or None)."""
  examples, held_out, _ = load_data(t_cfg.data)
  texts = {ex.query_id: ex.query for ex in examples}
  unlabelled = []
  if cfg.data.unlabelled_per_doc:
    d = t_cfg.data
    if d.source != "synthetic":
      raise ValueError("data.unlabelled_per_doc needs a teacher trained on the synthetic corpus; "
                       "give unlabelled queries as data.query_files instead")
    unlabelled += synthetic.generate(d.num_docs, queries_per_doc=d.queries_per_doc, seed=d.seed,
                                     unlabelled_per_doc=cfg.data.unlabelled_per_doc).unlabelled
  for path in cfg.data.query_files:
    unlabelled += read_query_file(path)
  seen = set(texts.values()) | (set(held_out.queries.values()) if held_out else set())
  for text in unlabelled:
    if text not in seen:
      seen.add(text)
      texts[f"unlabelled:{len(texts)}"] = text
  return texts, held_out


# ----------------------------------------------------------------------------------------------------------
# Train step: the student's raw query vectors against the cached teacher embeddings.

def make_train_step(graphdef, tx, mesh, loss: ConfigDict):
  """(params, opt_state, batch) -> (params, opt_state, metrics)."""

  def loss_fn(params, batch):
    student = nnx.merge(graphdef, params)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      s_BxD = student(batch["ids"], batch["mask"], normalize=False)
    return distillation_loss(s_BxD, batch["teacher"], mse_weight=loss.mse_weight, cosine_weight=loss.cosine_weight,
                             normalized_mse=loss.normalized_mse)

  def step(params, opt_state, batch):
    (value, (mse, cosine)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(loss=value, mse=mse, cosine=cosine, grad_norm=optax.tree.norm(grads))

  return step


# ----------------------------------------------------------------------------------------------------------
# Evaluation: held-out queries searched over the teacher's document embeddings, by student and by teacher.

def search_metrics(qids: list[str], q_QxD: np.ndarray, doc_ids: list[str], d_NxD: np.ndarray,
                   qrels: dict) -> dict[str, float]:
  return ir_metrics(qrels, exact_search(q_QxD, d_NxD, k=100).with_ids(doc_ids).run(qids, drop_self=True))


def evaluate(s_enc: Encoder, held_out: synthetic.Dataset, qids: list[str], t_QxD: np.ndarray, doc_ids: list[str],
             d_NxD: np.ndarray, teacher: dict, batch_size: int) -> dict[str, float]:
  """The student's IR metrics, their ratio to the teacher's, and its mean cosine to the teacher's vectors."""
  s_QxD = s_enc.encode_queries([held_out.queries[q] for q in qids], batch_size=batch_size, show_progress=False)
  m = search_metrics(qids, s_QxD, doc_ids, d_NxD, held_out.qrels)
  m["cosine_to_teacher"] = float(np.mean(np.sum(s_QxD * t_QxD, axis=1)))
  for key in ("recall_at_10", "recall_at_100", "ndcg_at_10"):
    m[f"{key}_retention"] = m[key] / max(teacher[key], 1e-12)
  return m


# ----------------------------------------------------------------------------------------------------------
# The loop: teacher embeddings (cached), student, resume or start, step, log, validate, checkpoint.

@holds_lock("workdir")  # one writer at a time; the kernel releases it however the run ends
def distill(cfg: ConfigDict, workdir: str, *, resume: bool = False) -> dict:
  """Distils the teacher's query tower in `workdir`. With `resume` it continues from the latest checkpoint
  there; without it, a workdir that already has checkpoints is refused."""
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, cfg.batch_size)
  ckpt, last = open_workdir(cfg, workdir, resume=resume, keep=cfg.checkpoint.keep, defaults=distill_defaults())
  if is_main():
    print(f"distill: {sharding.describe(mesh)}", flush=True)

  # Teacher embeddings: training queries, held-out queries and the documents validation searches. Each
  # store is resumable and reused; its fingerprint ties it to this teacher.
  t_q_enc, t_d_enc, t_cfg, identity = load_teacher(cfg.teacher, mesh)
  cache = cfg.teacher_cache or os.path.join(workdir, "teacher")  # students of one teacher may share it
  if last is not None and trained.read_spec(workdir)["teacher"]["query_fingerprint"] != identity["query_fingerprint"]:
    raise ValueError(f"{workdir} was distilled from another teacher than {cfg.teacher} (fingerprints differ; a "
                     "workdir from before 2026-12-06 recorded parameter-only fingerprints: distil it anew)")
  queries, held_out = training_queries(cfg, t_cfg)
  kw = dict(batch_size=cfg.teacher_encode.batch_size, chunk_size=cfg.teacher_encode.chunk_size)
  # one store per query set (the query files differ between students; unlabelled ids are positions, not texts)
  train_dir = os.path.join(cache, f"queries-{store.inputs_digest(queries)[:16]}")
  train_store = store.encode_corpus(t_q_enc, queries, train_dir, queries=True, **kw)
  validate = held_out is not None and cfg.eval.every > 0
  if validate:
    doc_ids, _ = validation_doc_ids(held_out, cfg.eval.max_docs, np.random.default_rng(cfg.eval.seed))
    val_qids = list(held_out.queries)
    store.encode_corpus(t_q_enc, held_out.queries, os.path.join(cache, "val_queries"), queries=True, **kw)
    store.encode_corpus(t_d_enc, {d: held_out.corpus[d] for d in doc_ids}, os.path.join(cache, "documents"), **kw)
    _, t_val_QxD = store.load_embeddings(os.path.join(cache, "val_queries"))
    _, d_NxD = store.load_embeddings(os.path.join(cache, "documents"))
    teacher_metrics = search_metrics(val_qids, t_val_QxD, doc_ids, d_NxD, held_out.qrels)
  del t_q_enc, t_d_enc  # the LLM is not needed from here on

  # Student and optimizer: fresh (student.json written once) or restored.
  spec = trained.tower_spec(cfg.student, cfg.tower, identity["dim"]) if last is None else trained.read_spec(workdir)
  spec["teacher"] = identity
  if is_main():
    write_atomic(os.path.join(workdir, STUDENT_FILE), json.dumps(spec, indent=1))
  tx = make_optimizer(cfg.optim, cfg.num_steps)
  student, graphdef, params, opt_state, start, data_state = start_or_restore(spec, tx, ckpt, last, mesh, cfg.rules,
                                                                             cfg.student.seed)
  s_tok = Tokenizer.from_pretrained(spec["tokenizer"])
  s_enc = Encoder(student, s_tok, mesh)

  # Data: the student's tokens of each training query with its cached teacher row.
  query_tokens = s_enc.tokenize(s_enc.query_texts(list(queries.values())))
  data = DistillData(query_tokens, store.open_verified(train_store), s_tok.pad_id, cfg.data.query_len,
                     cfg.batch_size)
  batches = data.iterator(cfg.data.seed, jax.process_index(), jax.process_count())
  if data_state is not None:
    batches.set_state(data_state)
  step_fn = jit_step(make_train_step(graphdef, tx, mesh, cfg.loss), mesh, params, opt_state)

  log = MetricsLog(workdir, start)
  history, evals = [], []

  def run_eval(step):
    nnx.update(student, params)
    s_enc.update(student)
    metrics = evaluate(s_enc, held_out, val_qids, t_val_QxD, doc_ids, d_NxD, teacher_metrics, cfg.eval.batch_size)
    evals.append({"step": step, **metrics})
    log.write(step, "val", metrics)
    return metrics

  if validate and start == 0:
    log.write(0, "teacher", teacher_metrics)
    if cfg.eval.at_start:
      run_eval(0)
  bar = tqdm(range(start + 1, cfg.num_steps + 1), desc="stage2", initial=start, total=cfg.num_steps,
             disable=not is_main())
  sync, preemption = SyncPoint(ckpt, workdir, start), Preemption()
  with preemption.listening():
    for step in bar:
      batch = sharding.global_batch(mesh, next(batches))
      params, opt_state, metrics = step_fn(params, opt_state, batch)
      preempted = preemption.reached(step)  # a preemption notice: save this step, then stop
      save = step % cfg.checkpoint.every == 0 or step == cfg.num_steps or preempted
      if step % cfg.log_every == 0 or save:  # a sync point: the loss is checked before anything is saved
        metrics = sync(step, metrics)
        history.append({"step": step, **metrics})
        log.write(step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", cos=f"{metrics['cosine']:.4f}")
      if validate and (step % cfg.eval.every == 0 or step == cfg.num_steps):
        m = run_eval(step)
        if is_main():
          bar.write(f"step {step}: val Recall@10 {m['recall_at_10']:.3f} ({m['recall_at_10_retention']:.1%} of the "
                    f"teacher's {teacher_metrics['recall_at_10']:.3f}), cosine to teacher {m['cosine_to_teacher']:.4f}")
      if save:
        ckpt.save(step, params, opt_state, batches.get_state())
      if preempted:
        preemption.stop(step, ckpt, workdir)
  ckpt.wait()
  ckpt.close()
  nnx.update(student, params)
  return {"history": history, "evals": evals, "teacher": teacher_metrics if validate else None,
          "student": student, "tokenizer": s_tok, "spec": spec}
