"""TREC run files, the exchange format of first stages and rerankers (what trec_eval, pytrec_eval and ranx
read): one retrieved document per line, `query_id Q0 doc_id rank score tag`, whitespace-separated."""

from __future__ import annotations

import os

from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.data.beir import DataError


def read_run(path: str) -> dict[str, dict[str, float]]:
  """{query_id: {doc_id: score}}. A malformed line or a document listed twice for a query raises with
  path:line."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such run file")
  run: dict[str, dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      where = f"{path}:{lineno}"
      if len(parts) != 6:
        raise DataError(f"{where}: expected 6 fields 'query_id Q0 doc_id rank score tag', got {len(parts)}")
      qid, _, doc_id, rank, score, _ = parts
      try:
        int(rank)
        value = float(score)
      except ValueError:
        raise DataError(f"{where}: rank {rank!r} / score {score!r} is not an integer / a number") from None
      docs = run.setdefault(qid, {})
      if doc_id in docs:
        raise DataError(f"{where}: document {doc_id!r} listed twice for query {qid!r}")
      docs[doc_id] = value
  return run


def format_run(run: dict[str, dict[str, float]], tag: str = "scalingnote") -> str:
  """The run as TREC lines, each query's documents by descending score (ties by id), ranked from 1."""
  if any(c.isspace() for c in tag) or not tag:
    raise ValueError(f"run tag {tag!r}: must be one non-empty word")
  lines = []
  for qid, docs in run.items():
    for rank, (doc_id, score) in enumerate(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0])), 1):
      lines.append(f"{qid} Q0 {doc_id} {rank} {score:.9g} {tag}\n")
  return "".join(lines)


def write_run(path: str, run: dict[str, dict[str, float]], tag: str = "scalingnote") -> None:
  """Written atomically: a reader never sees half a run."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_atomic(path, format_run(run, tag))


def check_fuse_weight(weight: float, where: str = "fusion weight") -> None:
  """A fusion weight is in [0, 1]; callers check before any scoring, so a bad one costs nothing."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"{where} {weight}: expected 0 <= weight <= 1 (1: the reranker alone)")


def fuse(first: dict[str, dict[str, float]], second: dict[str, dict[str, float]],
         weight: float) -> dict[str, dict[str, float]]:
  """Weighted sum of two runs' scores, each min-max normalised per query (ranx's `fuse(norm="min-max",
  method="wsum")`, tested equal): `weight` on `second` (e.g. a reranker's), 1 - weight on `first` (its first
  stage), over the documents `second` scored (each must be in `first`)."""
  check_fuse_weight(weight)

  def min_max(scores: dict[str, float]) -> dict[str, float]:
    lo, hi = min(scores.values(), default=0.0), max(scores.values(), default=0.0)
    return {d: (s - lo) / (hi - lo) if hi > lo else 0.0 for d, s in scores.items()}

  out = {}
  for qid, docs in second.items():
    missing = [d for d in docs if d not in first.get(qid, {})]
    if missing:
      raise ValueError(f"fuse: document {missing[0]!r} of query {qid!r} is not in the first run")
    a, b = min_max({d: first[qid][d] for d in docs}), min_max(docs)
    out[qid] = {d: (1.0 - weight) * a[d] + weight * b[d] for d in docs}
  return out
