"""Stage 1: dual LLM towers trained SPMD over a device mesh with the cross-device InfoNCE loss.

Sections in execution order: model (created sharded) -> train step (optionally GradCache-chunked) ->
evaluation -> the loop (workdir, mesh, data, model, optimizer, step, log, validate, checkpoint). The data come
from `data/training.py` and `data/pipeline.py`; the optimizer and the loop's parts shared with the other
trainers from `train/common.py`; what reads the workdir back from `artifacts/trained.py`.

  scalingnote train --config configs/<name>.py --workdir DIR
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.config import stage1_defaults
from scalingnote_jax.data import synthetic, trunk
from scalingnote_jax.data.pipeline import BatchSpec, TrainData
from scalingnote_jax.data.training import load_data, validation_doc_ids
from scalingnote_jax.distributed import is_main
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.eval.retrieval import ir_metrics, pair_metrics
from scalingnote_jax.index.exact import exact_search
from scalingnote_jax.models import layers, load_backbone
from scalingnote_jax.models.dual import DualEncoder
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.models.tower import Tower, TowerConfig
from scalingnote_jax.train.common import (MetricsLog, Preemption, SyncPoint, jit_step, make_optimizer,
                                          open_workdir)
from scalingnote_jax.train.losses import contrastive_loss


# ----------------------------------------------------------------------------------------------------------
# Model: query and document towers from the same LLM (checkpoint or random config), created sharded.

def build_model(cfg: ConfigDict, mesh) -> tuple[DualEncoder, Tokenizer]:
  """The dual encoder at step 0: the towers a previous Stage 1 run trained (`model.init` a workdir), a
  checkpoint's backbone for both, or random; parameters created (or imported) straight into their shardings;
  then the config's LoRA adapters, if any."""
  m, rules = cfg.model, cfg.rules
  tower_cfg = TowerConfig(**cfg.tower)
  if trained.is_stage1_workdir(m.init):  # the next round starts from the towers a previous run trained
    trained.previous_round(cfg)  # refused unless the towers' structure agrees
    model, tokenizer, _ = trained.load_stage1(m.init, mesh)  # (its adapters merged)
    model.fixed_scale = 1.0 / cfg.loss.temperature
  elif m.init == "random":
    bcfg = trained.backbone_config(m)
    # Both towers start from identical weights, like one checkpoint, unless the config gives the document
    # tower a seed of its own (`model.doc_seed`): then the two start unrelated and retrieval at chance.
    make = lambda seed: lambda: Tower.create(bcfg, tower_cfg, nnx.Rngs(seed))  # noqa: E731
    query = sharding.create_sharded(make(m.seed), mesh, rules)
    doc = query if cfg.tied else sharding.create_sharded(make(m.seed if m.doc_seed is None else m.doc_seed), mesh,
                                                         rules)
    tokenizer = Tokenizer.from_pretrained(m.tokenizer)
    model = DualEncoder(query, doc, cfg.loss.temperature, cfg.loss.learn_temperature)
  else:
    place = sharding.param_sharding_fn(mesh, rules)
    load = lambda: Tower(load_backbone(m.init, sharding=place, **trained.checkpoint_overrides(m))[0],  # noqa: E731
                         tower_cfg, rngs=nnx.Rngs(m.seed))
    query = load()
    doc = query if cfg.tied else load()
    tokenizer = Tokenizer.from_pretrained(m.tokenizer or m.init)
    model = DualEncoder(query, doc, cfg.loss.temperature, cfg.loss.learn_temperature)
  trained.add_adapters(model, cfg)
  # the few parameters made outside the sharded paths (temperature, projection, adapters) get their shardings too
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
  return nnx.merge(graphdef, state), tokenizer


# ----------------------------------------------------------------------------------------------------------
# Train step: embed both towers, contrastive loss over the global batch, AdamW update.

def _split_chunks(x, n):
  """[B, ...] -> [n, B/n, ...], chunk c holding rows c, c+n, ...: each chunk keeps rows of every device."""
  return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def _merge_chunks(x):
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def make_grad_fn(graphdef, mesh, *, chunks: int = 1, symmetric: bool = False, trunk_blocks: int = 0,
                 dropout_seed: int | None = None):
  """(params, batch, frozen=None, step=None) -> ((loss, (accuracy, scale)), grads). `params` are what trains,
  `frozen` the rest (a LoRA run's base, frozen layers): gradients are taken with respect to `params` only. With
  `dropout_seed` (LoRA dropout) the step number `step` keys the step's dropout, the same on any mesh and after a
  resume; each GradCache chunk folds in its index, and both passes over a chunk drop the same units. With
  `trunk_blocks` K the batch carries the frozen trunk's states after block K (q_trunk, d_trunk: data/trunk.py)
  instead of token ids, and only the blocks above K run. With `chunks` > 1
  this is GradCache: embeddings are computed chunk by chunk without activations kept, the loss's gradient with
  respect to the embeddings is taken on the full global batch, then each chunk is re-run to push that gradient
  into the parameters. Same result as one big batch, with the activation memory of one chunk."""

  def merge(params, frozen):
    return nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))

  def step_key(step):
    return None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), step)

  def embed(params, frozen, tokens, key=None):
    model = merge(params, frozen)
    b, g, t = tokens["d_mask"].shape
    d_mask = tokens["d_mask"].reshape(b * g, t)
    # hidden states stay split by rows (shard_batch); LoRA inputs dropped under the key, if any
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), layers.dropout_key(key):
      if trunk_blocks:
        q_BxD = model.query.from_trunk(tokens["q_trunk"], tokens["q_mask"], trunk_blocks)
        d_NxD = model.doc.from_trunk(tokens["d_trunk"].reshape(b * g, t, -1), d_mask, trunk_blocks)
      else:
        q_BxD = model.query(tokens["q_ids"], tokens["q_mask"])
        d_NxD = model.doc(tokens["d_ids"].reshape(b * g, t), d_mask)
    return q_BxD, d_NxD.reshape(b, g, -1)

  def loss_of(q_BxD, d_BxGxD, params, frozen, batch):
    scale = merge(params, frozen).scale()
    loss, accuracy = contrastive_loss(q_BxD, d_BxGxD, batch["doc_ids"], batch["pos_ids"], scale, mesh=mesh,
                                      symmetric=symmetric)
    return loss, (accuracy, scale)

  def grads_direct(params, batch, frozen=None, step=None):
    key = step_key(step)

    def f(p):
      return loss_of(*embed(p, frozen, batch, key), p, frozen, batch)
    return jax.value_and_grad(f, has_aux=True)(params)

  def grads_cached(params, batch, frozen=None, step=None):
    key = step_key(step)
    chunk_key = lambda i: None if key is None else jax.random.fold_in(key, i)  # noqa: E731
    tokens = {k: _split_chunks(v, chunks) for k, v in batch.items() if k not in ("doc_ids", "pos_ids")}
    index = jnp.arange(chunks)
    q_c, d_c = jax.lax.map(lambda xs: embed(params, frozen, xs[0], chunk_key(xs[1])), (tokens, index))
    (loss, aux), (g_q, g_d, g_params) = jax.value_and_grad(loss_of, argnums=(0, 1, 2), has_aux=True)(
        _merge_chunks(q_c), _merge_chunks(d_c), params, frozen, batch)

    def backprop_chunk(acc, xs):
      c, i, g_q_c, g_d_c = xs
      _, vjp = jax.vjp(lambda p: embed(p, frozen, c, chunk_key(i)), params)
      return jax.tree.map(jnp.add, acc, vjp((g_q_c, g_d_c))[0]), None

    grads, _ = jax.lax.scan(backprop_chunk, g_params,
                            (tokens, index, _split_chunks(g_q, chunks), _split_chunks(g_d, chunks)))
    return (loss, aux), grads

  return grads_cached if chunks > 1 else grads_direct


def make_train_step(graphdef, tx, mesh, *, chunks: int = 1, symmetric: bool = False, trunk_blocks: int = 0,
                    dropout_seed: int | None = None):
  """(params, opt_state, batch, frozen=None, step_number=None) -> (params, opt_state, metrics); the optimizer
  updates `params` only (it holds no state for the frozen parameters)."""
  grad_fn = make_grad_fn(graphdef, mesh, chunks=chunks, symmetric=symmetric, trunk_blocks=trunk_blocks,
                         dropout_seed=dropout_seed)

  def step(params, opt_state, batch, frozen=None, step_number=None):
    (loss, (accuracy, scale)), grads = grad_fn(params, batch, frozen, step_number)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(loss=loss, accuracy=accuracy, scale=scale, grad_norm=optax.tree.norm(grads))

  return step


def jit_train_step(cfg: ConfigDict, graphdef, tx, mesh, params, opt_state):
  """The Stage 1 step as training compiles it (also for ahead-of-time compilation)."""
  trunk_blocks = cfg.model.freeze_layers if cfg.model.trunk_cache else 0
  return jit_step(make_train_step(graphdef, tx, mesh, chunks=cfg.chunks, symmetric=cfg.loss.symmetric,
                                  trunk_blocks=trunk_blocks, dropout_seed=dropout_seed(cfg)), mesh, params, opt_state)


def dropout_seed(cfg: ConfigDict) -> int | None:
  """The seed of a run's LoRA dropout (None: no dropout)."""
  return cfg.model.seed if cfg.model.lora.rank and cfg.model.lora.dropout else None


# ----------------------------------------------------------------------------------------------------------
# Evaluation: Recall@10 by exact search and contrastive entropy on held-out queries.

def evaluate(model: DualEncoder, q_enc: Encoder, d_enc: Encoder, data: synthetic.Dataset, *, num_negatives: int,
             max_docs: int, seed: int, batch_size: int) -> dict[str, float]:
  """IR metrics of the current towers on held-out queries (over at most `max_docs` documents: the judged
  ones plus a fixed random sample; 0 = the whole corpus), AUC and contrastive entropy against
  `num_negatives` documents drawn from that sample (the corpus) at the model's temperature."""
  q_enc.update(model.query)
  d_enc.update(model.doc)
  rng = np.random.default_rng(seed)
  doc_ids, negative_pool = validation_doc_ids(data, max_docs, rng)
  qids = list(data.queries)
  d_NxD = d_enc.encode_documents([data.corpus[d] for d in doc_ids], batch_size=batch_size, show_progress=False)
  q_QxD = q_enc.encode_queries([data.queries[q] for q in qids], batch_size=batch_size, show_progress=False)
  metrics = ir_metrics(data.qrels, exact_search(q_QxD, d_NxD, k=100).with_ids(doc_ids).run(qids, drop_self=True))
  pairs = pair_metrics(lambda row, cols: d_NxD[cols] @ q_QxD[row], qids, data.qrels, doc_ids,
                       num_negatives=num_negatives, scale=float(model.scale()), rng=rng,
                       negative_pool=negative_pool)
  return {**metrics, **pairs, "num_docs": len(doc_ids)}


# ----------------------------------------------------------------------------------------------------------
# The loop: resume or start, step, log, validate, checkpoint.

@holds_lock("workdir")  # one writer at a time; the kernel releases it however the run ends
def train(cfg: ConfigDict, workdir: str, *, resume: bool = False, shared_base: str | None = None) -> dict:
  """Trains Stage 1 in `workdir` (checkpoints/, metrics.jsonl, tensorboard/). With `resume` it continues
  from the latest checkpoint there; without it, a workdir that already has checkpoints is refused.
  `shared_base`: a directory where runs store their frozen parameters once per content (`trained.write_base`)."""
  # A config that cannot train is refused before anything is written: what trains, and what is frozen.
  trainable = trained.trainable(cfg)
  backbone = trained.abstract_dual_encoder(cfg).query.backbone
  blocks = len(backbone.layers)
  if cfg.model.freeze_layers >= blocks:
    raise ValueError(f"model.freeze_layers={cfg.model.freeze_layers}: the backbone has {blocks} blocks; freeze at "
                     f"most {blocks - 1} so that one trains")
  if cfg.model.trunk_cache:
    trunk.check_possible(backbone, cfg.model.freeze_layers)
  if cfg.chunks < 1 or cfg.batch_size % cfg.chunks:
    raise ValueError(f"chunks={cfg.chunks}: GradCache splits batch_size={cfg.batch_size} into equal chunks; use a "
                     "divisor of it")
  # config.json (what encode, distill, export rebuild the towers from) is written only once the run is allowed
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, cfg.batch_size)
  ckpt, last = open_workdir(cfg, workdir, resume=resume, keep=cfg.checkpoint.keep, defaults=stage1_defaults())
  if is_main():
    print(f"stage1: {sharding.describe(mesh)}", flush=True)
  examples, held_out, corpus = load_data(cfg.data)
  tx = make_optimizer(cfg.optim, cfg.num_steps)

  # What trains (`params`: all, or LoRA adapters, or the unfrozen layers) and what stays (`frozen`: saved once).
  if last is None:  # fresh start: parameters created (or imported) already sharded
    model, tokenizer = build_model(cfg, mesh)
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    trained.write_base(workdir, frozen, shared_base)
    opt_state = sharding.init_optimizer(tx, params, mesh)
    start, data_state = 0, None
  else:  # resume: restore straight into this mesh's shardings (it may differ from the saving run's)
    abstract = trained.abstract_dual_encoder(cfg)
    graphdef, params, opt_state, data_state = trained.restore(abstract, ckpt, last, mesh, cfg.rules, tx, trainable)
    frozen = trained.read_base(workdir, abstract, trainable, mesh, cfg.rules)
    model, start = nnx.merge(graphdef, params, frozen), last
    tokenizer = trained.stage1_tokenizer(cfg)
  if is_main() and jax.tree.leaves(frozen):
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    print(f"stage1: training {count(params):,} of {count(params) + count(frozen):,} parameters", flush=True)

  q_enc, d_enc = Encoder(model.query, tokenizer, mesh), Encoder(model.doc, tokenizer, mesh)
  spec = BatchSpec(cfg.batch_size, cfg.data.n_neg, cfg.data.query_len, cfg.data.doc_len)
  data = TrainData(examples, corpus, lambda qs: q_enc.tokenize(q_enc.query_texts(qs)),
                   lambda ds: d_enc.tokenize(d_enc.document_texts(ds)), tokenizer.pad_id, spec)
  validate = held_out is not None and cfg.eval.every > 0
  if cfg.model.trunk_cache:  # computed once (or found): a step, and validation, then run only the trained blocks
    val_docs, _ = (validation_doc_ids(held_out, cfg.eval.max_docs, np.random.default_rng(cfg.eval.seed)) if validate
                   else ([], []))
    data.trunk = trunk.cache_training_texts(model.query, model.doc, cfg.model.freeze_layers, data, val_docs)
    q_enc.use_trunk(data.trunk.cache())
    d_enc.use_trunk(data.trunk.cache())
  batches = data.iterator(cfg.data.seed, jax.process_index(), jax.process_count())
  if data_state is not None:
    batches.set_state(data_state)
  step_fn = jit_train_step(cfg, graphdef, tx, mesh, params, opt_state)

  log = MetricsLog(workdir, start)
  history, evals = [], []
  tokens_per_step = cfg.batch_size * (spec.query_len + (1 + spec.n_neg) * spec.doc_len)

  def run_eval(step):
    nnx.update(model, params)
    metrics = evaluate(model, q_enc, d_enc, held_out, num_negatives=cfg.eval.num_negatives,
                       max_docs=cfg.eval.max_docs, seed=cfg.eval.seed, batch_size=cfg.eval.batch_size)
    evals.append({"step": step, **metrics})
    log.write(step, "val", metrics)
    return metrics

  if validate and start == 0 and cfg.eval.at_start:
    run_eval(0)
  bar = tqdm(range(start + 1, cfg.num_steps + 1), desc="stage1", initial=start, total=cfg.num_steps,
             disable=not is_main())
  sync, preemption = SyncPoint(ckpt, workdir, start), Preemption()
  with preemption.listening():
    for step in bar:
      batch = sharding.global_batch(mesh, next(batches))
      keyed = () if dropout_seed(cfg) is None else (np.int32(step),)  # the step keys its dropout
      params, opt_state, metrics = step_fn(params, opt_state, batch, frozen, *keyed)
      preempted = preemption.reached(step)  # a preemption notice: save this step, then stop
      save = step % cfg.checkpoint.every == 0 or step == cfg.num_steps or preempted
      if step % cfg.log_every == 0 or save:  # a sync point: the loss is checked before anything is saved
        metrics = sync(step, metrics)
        metrics["tokens_per_s"] = tokens_per_step / metrics["step_time_s"]
        history.append({"step": step, **metrics})
        log.write(step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", step_s=f"{metrics['step_time_s']:.2f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
      if validate and (step % cfg.eval.every == 0 or step == cfg.num_steps):
        m = run_eval(step)
        if is_main():
          bar.write(f"step {step}: val nDCG@10 {m['ndcg_at_10']:.4f}, Recall@10 {m['recall_at_10']:.3f}, "
                    f"contrastive entropy {m['contrastive_entropy']:.3f} ({m['num_docs']} documents)")
      if save:
        ckpt.save(step, params, opt_state, batches.get_state())
      if preempted:
        preemption.stop(step, ckpt, workdir)
  ckpt.wait()
  ckpt.close()
  nnx.update(model, params)
  return {"history": history, "evals": evals, "model": model, "tokenizer": tokenizer}
