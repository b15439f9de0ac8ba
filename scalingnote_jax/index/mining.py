"""Hard-negative mining, in the style of sentence-transformers' `mine_hard_negatives`.

For each training query: retrieve the top `range_max` documents (dense, through the document index, or
BM25 via bm25s), drop the query's positives, keep ranks [range_min, range_max) of what remains, drop
candidates scoring too close to the positive (likely unlabelled positives: `absolute_margin`,
`relative_margin`), then keep `num_negatives` of them (the highest ranked, or a random sample). The output is
the training JSONL that Stage 1 reads (`data.train_jsonl`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from scalingnote_jax import sharding
from scalingnote_jax.artifacts.store import encode_corpus, load_embeddings
from scalingnote_jax.data.beir import TrainExample, examples_from_qrels, load_beir, write_train_jsonl
from scalingnote_jax.encoder import towers
from scalingnote_jax.index.bm25 import BM25
from scalingnote_jax.index.index import Index


@dataclasses.dataclass(frozen=True)
class MiningConfig:
  range_min: int = 10  # skip the top ranks: the closest non-positives are often unlabelled positives
  range_max: int = 100
  num_negatives: int = 8
  absolute_margin: float | None = None  # keep a negative only if score <= positive_score - margin
  relative_margin: float | None = None  # ... and score <= positive_score * (1 - margin)
  sampling: str = "top"  # "top": the best-ranked survivors; "random": a uniform sample of them
  seed: int = 0

  def __post_init__(self):
    if not 0 <= self.range_min < self.range_max:
      raise ValueError(f"need 0 <= range_min < range_max, got {self.range_min}, {self.range_max}")
    if self.sampling not in ("top", "random"):
      raise ValueError(f"sampling={self.sampling!r}: expected 'top' or 'random'")


def select_negatives(ranked: list[str], scores: list[float], positives: set[str], positive_score: float | None,
                     cfg: MiningConfig, rng: np.random.Generator) -> list[str]:
  """Negatives from one query's ranking (best first). Positives are never returned."""
  window = [(d, s) for d, s in zip(ranked, scores) if d not in positives][cfg.range_min:cfg.range_max]
  if positive_score is not None:
    if cfg.absolute_margin is not None:
      window = [(d, s) for d, s in window if s <= positive_score - cfg.absolute_margin]
    if cfg.relative_margin is not None:
      window = [(d, s) for d, s in window if s <= positive_score * (1 - cfg.relative_margin)]
  if cfg.sampling == "random" and len(window) > cfg.num_negatives:
    picked = sorted(rng.choice(len(window), size=cfg.num_negatives, replace=False))
    window = [window[i] for i in picked]
  return [d for d, _ in window[:cfg.num_negatives]]


def mine(examples: list[TrainExample], rankings: list[tuple[list[str], list[float]]],
         positive_scores: list[float | None], cfg: MiningConfig) -> list[TrainExample]:
  """New examples with mined negatives; `rankings[i]` and `positive_scores[i]` belong to `examples[i]`."""
  rng = np.random.default_rng(cfg.seed)
  out = []
  for ex, (ranked, scores), pos_score in zip(examples, rankings, positive_scores):
    negatives = select_negatives(ranked, scores, set(ex.positive_ids), pos_score, cfg, rng)
    out.append(TrainExample(ex.query_id, ex.query, list(ex.positive_ids), negatives))
  return out


def dense_rankings(q_QxD: np.ndarray, index, positive_emb: list[np.ndarray], k: int):
  """(rankings, positive scores) from a document `Index`; positive_emb[i] are [P_i, D] embeddings of query
  i's positives (its best-scoring positive is the margin's reference)."""
  hits = index.search(q_QxD, k)
  # ScaNN pads a row it could not fill with id None (score -inf): those are not documents.
  rankings = [([d for d in row_ids if d is not None], [float(s) for d, s in zip(row_ids, row_scores) if d is not None])
              for row_ids, row_scores in zip(hits.ids, hits.scores)]
  positive_scores = [float((p @ q).max()) if len(p) else None for q, p in zip(q_QxD, positive_emb)]
  return rankings, positive_scores


def bm25_rankings(corpus: dict[str, dict], queries: list[str], k: int):
  """(rankings, None scores) by BM25; margins do not apply to BM25 scores."""
  hits = BM25(corpus).search(queries, k)
  return [(row, [float(s) for s in srow]) for row, srow in zip(hits.ids, hits.scores)], [None] * len(queries)


def mine_from_checkpoint(checkpoint: str, data_dir: str, split: str, out: str, cfg: MiningConfig, *,
                         method: str = "dense", embeddings_dir: str | None = None, backend: str = "scann",
                         batch_size: int = 64) -> list[TrainExample]:
  """`scalingnote mine`: writes `out` (training JSONL) for the split's queries of a BEIR directory. The
  corpus store `embeddings_dir` is reused when complete, and only if the checkpoint's document tower wrote
  it."""
  data = load_beir(data_dir, split)
  examples = examples_from_qrels(data)
  queries = [ex.query for ex in examples]
  if method == "bm25":
    rankings, positive_scores = bm25_rankings(data.corpus, queries, cfg.range_max + max(map(len, data.qrels.values())))
  elif method == "dense":
    mesh = sharding.make_mesh()
    q_enc, d_enc, _ = towers(checkpoint, mesh)
    embeddings_dir = embeddings_dir or f"{os.path.splitext(out)[0]}.embeddings"
    encode_corpus(d_enc, data.corpus, embeddings_dir, batch_size=batch_size)  # resumable, reused if complete
    doc_ids, d_NxD = load_embeddings(embeddings_dir)
    row = {d: i for i, d in enumerate(doc_ids)}
    index = Index.build(d_NxD, doc_ids, backend=backend)
    q_QxD = q_enc.encode_queries(queries, batch_size=batch_size)
    positive_emb = [d_NxD[[row[d] for d in ex.positive_ids]] for ex in examples]
    k = cfg.range_max + max(len(ex.positive_ids) for ex in examples)  # positives are removed from the top k
    rankings, positive_scores = dense_rankings(q_QxD, index, positive_emb, k)
  else:
    raise ValueError(f"method={method!r}: expected 'dense' or 'bm25'")
  mined = mine(examples, rankings, positive_scores, cfg)
  write_train_jsonl(out, mined)
  return mined
