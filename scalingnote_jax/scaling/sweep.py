"""`scalingnote sweep --config configs/sweep_<name>.py --workdir DIR`: Stage 1 (or, with `kind="reranker"`,
the cross-encoder trainer) over a ladder of model sizes x data sizes, one run at a time, resumable (a
finished run is skipped, an interrupted one continues from its checkpoint). Writes DIR/results.jsonl, one
run per line, for `scalingnote fit-scaling`:

  N        non-embedding parameters of one tower / of the reranker (the paper's model size)
  D        training examples (query-positive pairs; a reranker's: training queries) the run draws from
  tokens   tokens the run processed (steps x batch x (query_len + (1 + n_neg) x doc_len); a reranker's:
           steps x batch x group_size x max_length)
  compute  6 x N x tokens (forward and backward FLOPs)
  and the final validation metrics: contrastive_entropy, ndcg_at_10, recall_at_100, ...

and DIR/curves.jsonl, every validation evaluation along each run's training (its metrics.jsonl `val/` rows,
every `eval.every` steps), for `scalingnote fit-scaling --protocol` (the reranker paper's D is the step):

  run, N, D  as above
  step       the training step of the evaluation
  examples   training examples seen: step x batch (a reranker's: queries; Stage 1's: query-positive pairs)
  tokens, compute  so far (tokens x step / steps)
  and the validation metrics at that step (the last row's are the run's final ones)
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx
from ml_collections import ConfigDict

from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.artifacts.stages import Stages
from scalingnote_jax.config import rerank_defaults, stage1_defaults
from scalingnote_jax.data.training import load_data
from scalingnote_jax.distributed import is_main
from scalingnote_jax.train import rerank, stage1

EMBEDDINGS = {"embed", "tok_embed", "pos_embed", "type_embed"}  # token / position tables (models/)


def non_embedding_params(cfg: ConfigDict, kind: str = "retriever") -> int:
  """Parameters of the query tower (a reranker: of the model) without its embedding tables (no memory
  allocated)."""
  if kind == "reranker":
    module = trained.abstract_tower(rerank.model_spec(cfg))
  else:
    module = trained.abstract_dual_encoder(cfg).query
  params = nnx.state(module, nnx.Param)
  return sum(int(leaf.size) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if not any(getattr(k, "key", getattr(k, "name", None)) in EMBEDDINGS for k in path))


def run_config(cfg: ConfigDict, model: dict, fraction: float) -> ConfigDict:
  """One run: `base` with a size's `model` fields (nested, e.g. {"backbone": {...}} or {"num_layers": 2})."""
  c = ConfigDict(cfg.base.to_dict())
  c.model.update(model)
  c.data.train_fraction = fraction
  return c


def train_one(c: ConfigDict, workdir: str, kind: str) -> dict:
  """Trains one run; its size (N, D, tokens, compute) and final validation metrics."""
  if kind == "reranker":
    out = rerank.train(c, workdir, resume=True)
    d, tokens = out["num_queries"], c.num_steps * c.batch_size * c.data.group_size * c.tower.max_length
  else:
    out = stage1.train(c, workdir, resume=True)
    d = len(load_data(c.data)[0])
    tokens = c.num_steps * c.batch_size * (c.data.query_len + (1 + c.data.n_neg) * c.data.doc_len)
  if not out["evals"]:
    raise ValueError("sweep runs need a validation split and eval.every > 0: their metrics are the results")
  n = non_embedding_params(c, kind)
  final = {k: v for k, v in out["evals"][-1].items() if k != "step"}
  return {"N": n, "D": d, "tokens": tokens, "compute": 6 * n * tokens, "steps": c.num_steps, **final}


def curve_rows(run_dir: str, final: dict, batch_size: int) -> list[dict]:
  """One row per validation evaluation in `run_dir`/metrics.jsonl, ascending steps, sized from the run's results
  row `final` (N, D, tokens, steps)."""
  path, val = os.path.join(run_dir, "metrics.jsonl"), {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      metrics = {k.removeprefix("val/"): v for k, v in row.items() if k.startswith("val/")}
      if metrics:
        val[row["step"]] = metrics  # one per step (a resumed run logs each step once)
  per_step = final["tokens"] / final["steps"]
  return [{"run": final["run"], "N": final["N"], "D": final["D"], "step": step, "examples": step * batch_size,
           "tokens": step * per_step, "compute": 6 * final["N"] * step * per_step, **val[step]} for step in sorted(val)]


@holds_lock("workdir")  # one sweep per workdir (each run also locks its own directory)
def run(cfg: ConfigDict, workdir: str) -> list[dict]:
  kind = cfg.kind
  if kind not in ("retriever", "reranker"):
    raise ValueError(f"kind={kind!r}: expected 'retriever' (Stage 1 runs) or 'reranker'")
  defaults = rerank_defaults() if kind == "reranker" else stage1_defaults()
  full_data_only = set(cfg.full_data_only)  # e.g. the held-out largest size: one run, not a row
  if full_data_only - set(cfg.sizes):
    raise ValueError(f"full_data_only: {sorted(full_data_only - set(cfg.sizes))} not among sizes {sorted(cfg.sizes)}")
  stages = Stages(workdir, label="sweep")
  rows, curves = [], []
  sizes = sorted(cfg.sizes.items(), key=lambda kv: non_embedding_params(run_config(cfg, kv[1].to_dict(), 1.0), kind))
  for size, model in sizes:  # smallest model first
    fractions = sorted(cfg.data_fractions)
    for fraction in fractions[-1:] if size in full_data_only else fractions:
      name = f"{size}_D{fraction:g}"
      c = run_config(cfg, model.to_dict(), fraction)
      run_dir = os.path.join(workdir, "runs", name)
      rows.append({"run": name, **stages(name, c.to_dict(), lambda c=c, run_dir=run_dir: train_one(c, run_dir, kind),
                                         defaults)})
      if is_main():  # (a finished run's too: its metrics.jsonl holds the curve)
        curves += curve_rows(run_dir, rows[-1], c.batch_size)
  if is_main():
    write_atomic(os.path.join(workdir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(os.path.join(workdir, "curves.jsonl"), "".join(json.dumps(r) + "\n" for r in curves))
  return rows
