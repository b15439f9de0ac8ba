"""What the trainers share, in the order a trainer uses it: opening a workdir (refuse, resume or start, before
anything is written), a one-tower model created sharded or restored, the optimizer, the jitted step with its
finiteness check, the metrics log, the sync point that checks the step before anything is saved, and the
preemption notice that ends a run with a checkpoint. Each trainer keeps its own loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tensorboardX import SummaryWriter

from scalingnote_jax import models, sharding
from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.checkpoint import Checkpointer
from scalingnote_jax.artifacts.faults import failpoint
from scalingnote_jax.artifacts.trained import CONFIG_FILE
from scalingnote_jax.config import config_changes
from scalingnote_jax.distributed import is_main
from scalingnote_jax.models.tower import Tower

RESUMES_FILE = "resumes.jsonl"
# Fields a resumed run may change: how long it trains, how often it logs, evaluates and saves, and the mesh
# (restores reshard). Anything else would make the checkpoints a different model or a different run.
RESUMABLE_FIELDS = ("num_steps", "log_every", "mesh", "checkpoint.every", "checkpoint.keep", "eval.every",
                    "eval.at_start", "eval.batch_size")


def open_workdir(cfg: ConfigDict, workdir: str, *, resume: bool, keep: int,
                 defaults: ConfigDict) -> tuple[Checkpointer, int | None]:
  """(checkpointer, last complete step or None) of `workdir`, once this run is known to be allowed there:
  checkpoints and no `resume` is refused; `resume` with a config that differs from the saved one outside
  RESUMABLE_FIELDS is refused with the fields named (a field added since, at its value in `defaults`, is no
  difference). Only then is config.json written (and the allowed changes appended to resumes.jsonl), so a
  refused run leaves the workdir as it was."""
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep)
  last = ckpt.latest_step()
  if last is not None and not resume:
    ckpt.close()
    raise FileExistsError(f"{workdir} already holds checkpoints up to step {last}: pass --resume to continue, "
                          "or choose a new --workdir")
  config_path = os.path.join(workdir, CONFIG_FILE)
  changed = {}
  if last is not None and os.path.exists(config_path):
    with open(config_path) as f:
      changed = config_changes(json.load(f), cfg.to_dict(), defaults)
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_FIELDS}
    if refused:
      ckpt.close()
      fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
      raise ValueError(f"{config_path}: --resume with a different configuration ({fields}); only "
                       f"{', '.join(RESUMABLE_FIELDS)} may change on resume. Nothing was written.")
  if is_main():
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
      f.write(cfg.to_json(indent=1))
    os.replace(tmp, config_path)
    if changed:
      with open(os.path.join(workdir, RESUMES_FILE), "a") as f:
        f.write(json.dumps({"step": last, "time": time.time(), "changed": changed}) + "\n")
      print(f"resuming at step {last} with " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
            flush=True)
  return ckpt, last


# ----------------------------------------------------------------------------------------------------------
# A one-tower model (a Stage 2 student, a reranker): created sharded, or restored.

def build_tower(spec: dict, mesh, rules, seed: int) -> Tower:
  """The tower of a spec (`artifacts.trained.tower_spec`), its parameters created (or imported) straight
  into their shardings."""
  bcfg, tcfg = trained.tower_configs(spec)
  if spec["init"] == "random":
    return sharding.create_sharded(lambda: Tower.create(bcfg, tcfg, nnx.Rngs(seed)), mesh, rules)
  overrides = {f: getattr(bcfg, f) for f in ("num_layers", "dtype", "param_dtype", "remat")}
  backbone, _ = models.load_backbone(spec["init"], sharding=sharding.param_sharding_fn(mesh, rules), **overrides)
  tower = Tower(backbone, tcfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(tower)  # the projection was made outside the sharded path
  return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))


def start_or_restore(spec: dict, tx, ckpt: Checkpointer, last: int | None, mesh, rules, seed: int):
  """(tower, graphdef, params, opt_state, start step, data iterator state) of a one-tower trainer: created
  sharded at step 0, or restored from checkpoint `last` straight into its shardings."""
  if last is None:
    tower = build_tower(spec, mesh, rules, seed)
    graphdef, params = nnx.split(tower)
    opt_state = sharding.init_optimizer(tx, params, mesh)
    return tower, graphdef, params, opt_state, 0, None
  graphdef, params, opt_state, data_state = trained.restore(trained.abstract_tower(spec), ckpt, last, mesh, rules, tx)
  return nnx.merge(graphdef, params), graphdef, params, opt_state, last, data_state


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
# The step and the loop's parts.

def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def jit_step(step, mesh, params, opt_state):
  """`step(params, opt_state, batch, *rest) -> (params, opt_state, metrics)` as training compiles it: outputs
  keep the inputs' shardings, so it compiles once, and the old parameters and optimizer state are donated
  (not `rest`: e.g. Stage 1's frozen parameters). The metrics gain `state_finite`: whether the *updated*
  parameters and optimizer state (what a checkpoint of this step saves) are all finite; the loss alone is
  computed before the update."""

  def checked(params, opt_state, batch, *rest):
    params, opt_state, metrics = step(params, opt_state, batch, *rest)
    return params, opt_state, {**metrics, "state_finite": _all_finite((params, opt_state))}

  state_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
  return jax.jit(checked, out_shardings=(*state_shardings, sharding.replicated(mesh)), donate_argnums=(0, 1))


class MetricsLog:
  """metrics.jsonl (every process-0 record) and TensorBoard event files under the workdir."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = is_main()
    if not self.active:
      return
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


class SyncPoint:
  """Where the loop waits for the device: metrics become floats, a non-finite loss or updated state stops the
  run before anything more is saved, and the seconds per step since the previous sync point are measured."""

  def __init__(self, ckpt: Checkpointer, workdir: str, step: int):
    self.ckpt, self.workdir, self.step, self.time = ckpt, workdir, step, time.perf_counter()

  def __call__(self, step: int, metrics: dict) -> dict:
    metrics = {k: float(v) for k, v in metrics.items()}
    finite = metrics.pop("state_finite", 1.0) == 1.0
    if not (finite and math.isfinite(metrics["loss"])):
      self.ckpt.wait()
      last = self.ckpt.latest_step()
      what = f"loss is {metrics['loss']}" if not math.isfinite(metrics["loss"]) else (
          f"the updated parameters or optimizer state are not finite (loss {metrics['loss']:.4g}, grad norm "
          f"{metrics.get('grad_norm', float('nan')):.4g})")
      kept = (f"The last good checkpoint (step {last}) in {self.workdir} is intact." if last is not None else
              f"No checkpoint was saved in {self.workdir}.")
      raise FloatingPointError(f"step {step}: {what}; stopped, nothing of this step saved. {kept}")
    failpoint("train.step")
    now = time.perf_counter()
    metrics["step_time_s"] = (now - self.time) / max(step - self.step, 1)
    self.step, self.time = step, now
    return metrics


class Preempted(Exception):
  """The run stopped on a preemption notice after saving a checkpoint of the step it had reached."""


class Preemption:
  """Whether to save and stop at this step. A preemption notice is SIGTERM (TPU and SLURM preemptions, a
  plain `kill`) or SIGINT (Ctrl-C). One process: a handler notes it, and the loop saves the step it is on.
  Several processes: jax.distributed's coordination service catches SIGTERM and agrees with every process
  on the step to save at (`reached_preemption_sync_point`), so all of them save the same step, as MaxText
  does; SIGINT stays a plain interrupt there."""

  def __init__(self):
    self.noticed = None  # the signal's name

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.noticed is not None

  def stop(self, step: int, ckpt: Checkpointer, workdir: str):
    """Once this step's checkpoint is written: raise Preempted (the CLI exits 143)."""
    ckpt.wait()
    ckpt.close()
    raise Preempted(f"step {step}: stopped on a preemption notice ({self.noticed or 'SIGTERM'}) after saving "
                    f"checkpoint {step} in {workdir}; rerun with --resume to continue")

  @contextlib.contextmanager
  def listening(self):
    """Handlers for the duration of the training loop (main thread of a one-process run only)."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      yield self
      return

    def note(signum, frame):
      if self.noticed:  # a second notice: stop now, without the checkpoint
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
      self.noticed = signal.Signals(signum).name

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
