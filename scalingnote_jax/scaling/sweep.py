"""`scalingnote sweep --config configs/sweep_<name>.py --workdir DIR`: Stage 1 over a ladder of model sizes x
data sizes, one run at a time, resumable (a finished run is skipped, an interrupted one continues from its
checkpoint). Writes DIR/results.jsonl, one run per line, for `scalingnote fit-scaling`:

  N        non-embedding parameters of one tower (the paper's model size)
  D        training examples (query-positive pairs) the run draws from
  tokens   tokens the run processed (steps x batch x (query_len + (1 + n_neg) x doc_len))
  compute  6 x N x tokens (forward and backward FLOPs of both towers)
  and the final validation metrics: contrastive_entropy, ndcg_at_10, recall_at_100, ...
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx
from ml_collections import ConfigDict

from scalingnote_jax.distributed import is_main
from scalingnote_jax.index import corpus as store
from scalingnote_jax.pipeline import Stages

EMBEDDINGS = {"embed", "tok_embed", "pos_embed", "type_embed"}  # token / position tables (models/)


def non_embedding_params(cfg: ConfigDict) -> int:
  """Parameters of the query tower without its embedding tables (no memory allocated)."""
  from scalingnote_jax.train import stage1

  params = nnx.state(stage1.abstract_model(cfg).query, nnx.Param)
  return sum(int(leaf.size) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if not any(getattr(k, "key", getattr(k, "name", None)) in EMBEDDINGS for k in path))


def run_config(cfg: ConfigDict, model: dict, fraction: float) -> ConfigDict:
  """One run: `base` with a size's `model` fields (nested, e.g. {"backbone": {...}} or {"num_layers": 2})."""
  c = ConfigDict(cfg.base.to_dict())
  c.model.update(model)
  c.data.train_fraction = fraction
  return c


def train_one(c: ConfigDict, workdir: str) -> dict:
  from scalingnote_jax.train import stage1

  out = stage1.train(c, workdir, resume=True)
  if not out["evals"]:
    raise ValueError("sweep runs need a validation split and eval.every > 0: their metrics are the results")
  n = non_embedding_params(c)
  tokens = c.num_steps * c.batch_size * (c.data.query_len + (1 + c.data.n_neg) * c.data.doc_len)
  final = {k: v for k, v in out["evals"][-1].items() if k != "step"}
  return {"N": n, "D": len(stage1.load_data(c)[0]), "tokens": tokens, "compute": 6 * n * tokens, "steps": c.num_steps,
          **final}


def run(cfg: ConfigDict, workdir: str) -> list[dict]:
  stages = Stages(workdir, label="sweep")
  rows = []
  sizes = sorted(cfg.sizes.items(), key=lambda kv: non_embedding_params(run_config(cfg, kv[1].to_dict(), 1.0)))
  for size, model in sizes:  # smallest model first
    for fraction in sorted(cfg.data_fractions):
      name = f"{size}_D{fraction:g}"
      c = run_config(cfg, model.to_dict(), fraction)
      rows.append({"run": name, **stages(name, c.to_dict(), lambda c=c, name=name: train_one(
          c, os.path.join(workdir, "runs", name)))})
  if is_main():
    store.write_atomic(os.path.join(workdir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  return rows
