"""Stage 1: dual LLM towers trained SPMD over a device mesh with the cross-device InfoNCE loss.

Sections in execution order: mesh -> data -> model (created sharded) -> optimizer -> train step (optionally
GradCache-chunked) -> evaluation -> loop. `scalingnote train --config configs/<name>.py --workdir DIR`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from scalingnote_jax import models, sharding
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.distributed import is_main
from scalingnote_jax.data import beir, synthetic
from scalingnote_jax.data.pipeline import BatchSpec, TrainData
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.eval.retrieval import exact_search, ir_metrics, pair_metrics, to_run
from scalingnote_jax.models import bert, llm, load_backbone
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.models.tower import Tower, TowerConfig
from scalingnote_jax.train.checkpoint import Checkpointer, abstract_like
from scalingnote_jax.train.common import CONFIG_FILE, Preemption, SyncPoint, jit_step, open_workdir
from scalingnote_jax.train.losses import contrastive_loss

MAX_SCALE = 100.0  # 1 / temperature is capped, as in CLIP


# ----------------------------------------------------------------------------------------------------------
# Data: training examples, a held-out split for validation, and the corpus.

def load_data(cfg: ConfigDict) -> tuple[list[beir.TrainExample], synthetic.Dataset, dict]:
  """(training examples, validation dataset, corpus) as the config's `data` section says."""
  d = cfg.data
  if d.source == "synthetic":
    data = synthetic.generate(d.num_docs, queries_per_doc=d.queries_per_doc, seed=d.seed)
    qids = list(data.queries)
    n_val = int(len(qids) * d.val_fraction)
    rng = np.random.default_rng(d.seed)
    val = set(rng.choice(qids, size=n_val, replace=False).tolist())
    train = synthetic.Dataset(data.corpus, {q: t for q, t in data.queries.items() if q not in val},
                              {q: r for q, r in data.qrels.items() if q not in val})
    examples = synthetic.with_topic_negatives(beir.examples_from_qrels(train), data.corpus, d.n_neg_candidates,
                                              d.seed)
    examples = subsample(examples, d.get("train_fraction", 1.0), d.seed)
    held_out = synthetic.Dataset(data.corpus, {q: data.queries[q] for q in val}, {q: data.qrels[q] for q in val})
    return examples, held_out, data.corpus
  if d.source == "beir":
    train = beir.load_beir(d.path, d.train_split)
    examples = (beir.load_train_jsonl(d.train_jsonl, train.corpus) if d.train_jsonl
                else beir.examples_from_qrels(train))
    held_out = beir.load_beir(d.path, d.val_split, unknown="skip") if d.val_split else None
    return subsample(examples, d.get("train_fraction", 1.0), d.seed), held_out, train.corpus
  raise ValueError(f"data.source={d.source!r}: expected 'synthetic' or 'beir'")


def subsample(examples: list, fraction: float, seed: int) -> list:
  """A fixed random `fraction` of the training examples (data-size sweeps); nested: a smaller fraction's
  examples are a subset of a larger one's."""
  if not 0 < fraction <= 1:
    raise ValueError(f"data.train_fraction={fraction}: expected 0 < fraction <= 1")
  if fraction == 1:
    return examples
  order = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in sorted(order[:max(1, round(fraction * len(examples)))])]


# ----------------------------------------------------------------------------------------------------------
# Model: query and document towers from the same LLM (checkpoint or random config), created sharded.

class DualEncoder(nnx.Module):
  """Query and document towers (separate parameters unless tied) and the softmax temperature."""

  def __init__(self, query: Tower, doc: Tower, temperature: float, learn_temperature: bool):
    self.query, self.doc = query, doc  # `doc is query` when tied
    self.log_scale = nnx.Param(jnp.log(jnp.float32(1.0 / temperature))) if learn_temperature else None
    self.fixed_scale = 1.0 / temperature

  def scale(self):
    if self.log_scale is None:
      return jnp.float32(self.fixed_scale)
    return jnp.minimum(jnp.exp(self.log_scale[...]), MAX_SCALE)


def backbone_config(m: ConfigDict):
  fields = dict(m.backbone)
  kind = fields.pop("kind")
  cls = {"llm": llm.LLMConfig, "bert": bert.BertConfig}[kind]
  return cls(**fields, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)


def checkpoint_overrides(m: ConfigDict) -> dict:
  """Backbone fields a config sets over a checkpoint's: dtypes, remat, and `num_layers` (> 0: keep the first
  layers only, e.g. a small dual tower from a larger encoder)."""
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **({"num_layers": m.num_layers} if m.get("num_layers") else {}))


def is_stage1_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints"))


def _previous_round(cfg: ConfigDict) -> ConfigDict:
  """The config of the Stage 1 run that `model.init` names (a warm start, e.g. after mining negatives).
  The towers keep that run's structure, so the parts that define it must agree."""
  with open(os.path.join(cfg.model.init, CONFIG_FILE)) as f:
    prev = ConfigDict(json.load(f))
  for key in ("tied", "tower", "loss.learn_temperature"):
    a, b = prev, cfg
    for part in key.split("."):
      a, b = a[part], b[part]
    if (a.to_dict() if isinstance(a, ConfigDict) else a) != (b.to_dict() if isinstance(b, ConfigDict) else b):
      raise ValueError(f"model.init={cfg.model.init}: its {key} ({a}) differs from this config's ({b})")
  return prev


def abstract_model(cfg: ConfigDict) -> DualEncoder:
  """The dual encoder's structure with no memory behind it (for restoring a checkpoint into)."""
  m = cfg.model
  if is_stage1_workdir(m.init):
    return abstract_model(_previous_round(cfg))
  bcfg = backbone_config(m) if m.init == "random" else models.backbone_config(m.init, **checkpoint_overrides(m))
  tower_cfg = TowerConfig(**cfg.tower)

  def create():
    query = Tower.create(bcfg, tower_cfg, nnx.Rngs(m.seed))
    doc = query if cfg.tied else Tower.create(bcfg, tower_cfg, nnx.Rngs(m.get("doc_seed", m.seed)))
    return DualEncoder(query, doc, cfg.loss.temperature, cfg.loss.learn_temperature)
  return nnx.eval_shape(create)


def build_model(cfg: ConfigDict, mesh) -> tuple[DualEncoder, Tokenizer]:
  m, rules = cfg.model, cfg.rules
  tower_cfg = TowerConfig(**cfg.tower)
  if is_stage1_workdir(m.init):  # the next round starts from the towers a previous run trained
    prev = _previous_round(cfg)
    ckpt = Checkpointer(os.path.join(m.init, "checkpoints"), keep=prev.checkpoint.keep)
    graphdef, params, _, _ = restore(prev, ckpt, ckpt.latest_step(), mesh)
    ckpt.close()
    model = nnx.merge(graphdef, params)
    model.fixed_scale = 1.0 / cfg.loss.temperature
    return model, tokenizer_of(prev)
  if m.init == "random":
    bcfg = backbone_config(m)
    # Both towers start from identical weights, like one checkpoint, unless the config gives the document
    # tower a seed of its own (`model.doc_seed`): then the two start unrelated and retrieval at chance.
    make = lambda seed: lambda: Tower.create(bcfg, tower_cfg, nnx.Rngs(seed))  # noqa: E731
    query = sharding.create_sharded(make(m.seed), mesh, rules)
    doc = query if cfg.tied else sharding.create_sharded(make(m.get("doc_seed", m.seed)), mesh, rules)
    tokenizer = Tokenizer.from_pretrained(m.tokenizer)
  else:
    place = sharding.param_sharding_fn(mesh, rules)
    load = lambda: Tower(load_backbone(m.init, sharding=place, **checkpoint_overrides(m))[0], tower_cfg,  # noqa: E731
                         rngs=nnx.Rngs(m.seed))
    query = load()
    doc = query if cfg.tied else load()
    tokenizer = Tokenizer.from_pretrained(m.tokenizer or m.init)
  model = DualEncoder(query, doc, cfg.loss.temperature, cfg.loss.learn_temperature)
  # the few parameters made outside the sharded paths (temperature, projection) get their shardings too
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
  return nnx.merge(graphdef, state), tokenizer


# ----------------------------------------------------------------------------------------------------------
# Optimizer: AdamW with warmup + decay, global-norm clipping, no weight decay on vectors (norms, biases).

def make_optimizer(o: ConfigDict, num_steps: int) -> optax.GradientTransformation:
  decay_steps = max(num_steps, o.warmup_steps + 1)
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, decay_steps, o.lr * o.final_lr_fraction)
  elif o.schedule == "linear":
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps),
                               optax.linear_schedule(o.lr, o.lr * o.final_lr_fraction, decay_steps - o.warmup_steps)],
                              [o.warmup_steps])
  else:
    raise ValueError(f"optim.schedule={o.schedule!r}: expected 'cosine' or 'linear'")
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
  return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------------------------------------
# Train step: embed both towers, contrastive loss over the global batch, AdamW update.

def _split_chunks(x, n):
  """[B, ...] -> [n, B/n, ...], chunk c holding rows c, c+n, ...: each chunk keeps rows of every device."""
  return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def _merge_chunks(x):
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def make_grad_fn(graphdef, mesh, *, chunks: int = 1, symmetric: bool = False):
  """(params, batch) -> ((loss, (accuracy, scale)), grads). With `chunks` > 1 this is GradCache: embeddings
  are computed chunk by chunk without activations kept, the loss's gradient with respect to the embeddings
  is taken on the full global batch, then each chunk is re-run to push that gradient into the parameters.
  Same result as one big batch, with the activation memory of one chunk."""

  def embed(params, tokens):
    model = nnx.merge(graphdef, params)
    b, g, t = tokens["d_ids"].shape
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # hidden states stay split by rows (shard_batch)
      q_BxD = model.query(tokens["q_ids"], tokens["q_mask"])
      d_BxGxD = model.doc(tokens["d_ids"].reshape(b * g, t), tokens["d_mask"].reshape(b * g, t)).reshape(b, g, -1)
    return q_BxD, d_BxGxD

  def loss_of(q_BxD, d_BxGxD, params, batch):
    scale = nnx.merge(graphdef, params).scale()
    loss, accuracy = contrastive_loss(q_BxD, d_BxGxD, batch["doc_ids"], batch["pos_ids"], scale, mesh=mesh,
                                      symmetric=symmetric)
    return loss, (accuracy, scale)

  def grads_direct(params, batch):
    def f(p):
      return loss_of(*embed(p, batch), p, batch)
    return jax.value_and_grad(f, has_aux=True)(params)

  def grads_cached(params, batch):
    tokens = {k: _split_chunks(batch[k], chunks) for k in ("q_ids", "q_mask", "d_ids", "d_mask")}
    q_c, d_c = jax.lax.map(lambda c: embed(params, c), tokens)
    (loss, aux), (g_q, g_d, g_params) = jax.value_and_grad(loss_of, argnums=(0, 1, 2), has_aux=True)(
        _merge_chunks(q_c), _merge_chunks(d_c), params, batch)

    def backprop_chunk(acc, xs):
      c, g_q_c, g_d_c = xs
      _, vjp = jax.vjp(lambda p: embed(p, c), params)
      return jax.tree.map(jnp.add, acc, vjp((g_q_c, g_d_c))[0]), None

    grads, _ = jax.lax.scan(backprop_chunk, g_params, (tokens, _split_chunks(g_q, chunks), _split_chunks(g_d, chunks)))
    return (loss, aux), grads

  return grads_cached if chunks > 1 else grads_direct


def make_train_step(graphdef, tx, mesh, *, chunks: int = 1, symmetric: bool = False):
  """(params, opt_state, batch) -> (params, opt_state, metrics)."""
  grad_fn = make_grad_fn(graphdef, mesh, chunks=chunks, symmetric=symmetric)

  def step(params, opt_state, batch):
    (loss, (accuracy, scale)), grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(loss=loss, accuracy=accuracy, scale=scale, grad_norm=optax.tree.norm(grads))

  return step


def jit_train_step(cfg: ConfigDict, graphdef, tx, mesh, params, opt_state):
  """The Stage 1 step as training compiles it (also for ahead-of-time compilation)."""
  return jit_step(make_train_step(graphdef, tx, mesh, chunks=cfg.chunks, symmetric=cfg.loss.symmetric), mesh,
                  params, opt_state)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: Recall@10 by exact search and contrastive entropy on held-out queries.

def eval_doc_ids(data: synthetic.Dataset, max_docs: int, rng: np.random.Generator) -> list[str]:
  """The documents validation searches: all, or the judged ones plus a random sample up to `max_docs`."""
  doc_ids = list(data.corpus)
  if max_docs and len(doc_ids) > max_docs:
    judged = {d for r in data.qrels.values() for d in r if d in data.corpus}
    others = [d for d in doc_ids if d not in judged]
    doc_ids = sorted(judged) + list(rng.choice(others, size=max(0, max_docs - len(judged)), replace=False))
  return doc_ids


def evaluate(model: DualEncoder, q_enc: Encoder, d_enc: Encoder, data: synthetic.Dataset, *, num_negatives: int,
             max_docs: int, seed: int, batch_size: int) -> dict[str, float]:
  """IR metrics of the current towers on held-out queries (over at most `max_docs` documents: the judged
  ones plus a fixed random sample; 0 = the whole corpus), AUC and contrastive entropy against
  `num_negatives` sampled documents at the model's temperature."""
  q_enc.update(model.query)
  d_enc.update(model.doc)
  rng = np.random.default_rng(seed)
  doc_ids = eval_doc_ids(data, max_docs, rng)
  qids = list(data.queries)
  d_NxD = d_enc.encode_documents([data.corpus[d] for d in doc_ids], batch_size=batch_size, show_progress=False)
  q_QxD = q_enc.encode_queries([data.queries[q] for q in qids], batch_size=batch_size, show_progress=False)
  metrics = ir_metrics(data.qrels, to_run(qids, doc_ids, *exact_search(q_QxD, d_NxD, k=100)))
  pairs = pair_metrics(lambda row, cols: d_NxD[cols] @ q_QxD[row], qids, data.qrels, doc_ids,
                       num_negatives=num_negatives, scale=float(model.scale()), rng=rng)
  return {**metrics, **pairs, "num_docs": len(doc_ids)}


# ----------------------------------------------------------------------------------------------------------
# The loop: resume or start, step, log, validate, checkpoint.

class MetricsLog:
  """metrics.jsonl (every process-0 record) and TensorBoard event files under the workdir."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = is_main()
    if not self.active:
      return
    from tensorboardX import SummaryWriter

    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if os.path.exists(self.path):  # drop what a crashed run logged after its last checkpoint
      with open(self.path) as f:
        lines = f.readlines()
      for lineno, line in enumerate(lines, 1):
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          if lineno == len(lines):  # torn by a kill mid-write: it was logged after the checkpoint anyway
            break
          raise ValueError(f"{self.path}:{lineno}: not a JSON line; move the file aside to resume") from None
        if row["step"] <= resume_step:
          kept.append(line)
    with open(self.path, "w") as f:
      f.writelines(kept)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, prefix: str, metrics: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.tb.flush()


def restore(cfg: ConfigDict, ckpt: Checkpointer, step: int, mesh, tx=None):
  """(graphdef, params, opt_state, data_state) of checkpoint `step`, in `mesh`'s shardings. Without `tx`
  only the parameters are read."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  abstract = abstract_like(abstract, sharding.state_shardings(abstract, mesh, cfg.rules))  # this run's rules
  abstract_opt = None if tx is None else sharding.abstract_optimizer(tx, abstract, mesh)
  params, opt_state, data_state = ckpt.restore(step, abstract, abstract_opt)
  return graphdef, params, opt_state, data_state


def load_trained(workdir: str, mesh=None, step: int | None = None) -> tuple[DualEncoder, Tokenizer, ConfigDict]:
  """The dual encoder of a Stage 1 workdir (its latest checkpoint unless `step`), its tokenizer and config."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    cfg = ConfigDict(json.load(f))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no complete checkpoint")
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  graphdef, params, _, _ = restore(cfg, ckpt, step, mesh)
  ckpt.close()
  return nnx.merge(graphdef, params), tokenizer_of(cfg), cfg


def tokenizer_of(cfg: ConfigDict) -> Tokenizer:
  """The towers' tokenizer, following `model.init` back through warm-started rounds."""
  m = cfg.model
  return tokenizer_of(_previous_round(cfg)) if is_stage1_workdir(m.init) else Tokenizer.from_pretrained(m.tokenizer or m.init)


@holds_lock("workdir")  # one writer at a time; the kernel releases it however the run ends
def train(cfg: ConfigDict, workdir: str, *, resume: bool = False) -> dict:
  """Trains Stage 1 in `workdir` (checkpoints/, metrics.jsonl, tensorboard/). With `resume` it continues
  from the latest checkpoint there; without it, a workdir that already has checkpoints is refused."""
  # config.json (what encode, distill, export rebuild the towers from) is written only once the run is allowed
  ckpt, last = open_workdir(cfg, workdir, resume=resume, keep=cfg.checkpoint.keep)
  mesh = sharding.make_mesh(cfg.mesh)
  if is_main():
    print(f"stage1: {sharding.describe(mesh)}", flush=True)
  examples, held_out, corpus = load_data(cfg)
  tx = make_optimizer(cfg.optim, cfg.num_steps)

  if last is None:  # fresh start: parameters created (or imported) already sharded
    model, tokenizer = build_model(cfg, mesh)
    graphdef, params = nnx.split(model)
    opt_state = sharding.init_optimizer(tx, params, mesh)
    start, data_state = 0, None
  else:  # resume: restore straight into this mesh's shardings (it may differ from the saving run's)
    graphdef, params, opt_state, data_state = restore(cfg, ckpt, last, mesh, tx)
    model, start = nnx.merge(graphdef, params), last
    tokenizer = tokenizer_of(cfg)

  q_enc, d_enc = Encoder(model.query, tokenizer, mesh), Encoder(model.doc, tokenizer, mesh)
  spec = BatchSpec(cfg.batch_size, cfg.data.n_neg, cfg.data.query_len, cfg.data.doc_len)
  data = TrainData(examples, corpus, lambda qs: q_enc.tokenize(q_enc.query_texts(qs)),
                   lambda ds: d_enc.tokenize(d_enc.document_texts(ds)), tokenizer.pad_id, spec)
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

  validate = held_out is not None and cfg.eval.every > 0
  if validate and start == 0 and cfg.eval.at_start:
    run_eval(0)
  bar = tqdm(range(start + 1, cfg.num_steps + 1), desc="stage1", initial=start, total=cfg.num_steps,
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
