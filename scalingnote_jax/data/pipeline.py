"""Input pipelines (grain). Stage 1: examples -> tokenized, padded training batches, sharded by process.

A batch row is one query with G = 1 + n_neg documents: slot 0 a positive (sampled among the query's
positives), then up to n_neg hard negatives (slots without one hold id -1 and are masked by the loss).
Corpus and queries are tokenized once up front; the per-step work is sampling and padding. The iterator's
state (`get_state` / `set_state`) is saved with checkpoints so a resumed run sees the same batches.
Stage 2 (`DistillData`): queries with their cached teacher embeddings, batched the same way. Rerankers
(`RerankData`): groups of query-document pairs with relevance labels.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from scalingnote_jax.data.beir import TrainExample


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The one schema of a Stage 1 batch: what the pipeline makes and what ahead-of-time compilation assumes."""
  batch_size: int  # global: queries per step over all processes
  n_neg: int  # hard negatives per query
  query_len: int
  doc_len: int
  # Width of `pos_ids`: the most judged positives of one query (TrainData sets it from its examples; ahead
  # of time, a typical few: a few integers per row, memory-neutral).
  max_positives: int = 4

  def shapes(self, trunk_width: int = 0) -> dict[str, tuple[int, ...]]:
    """Every field of a global batch and its shape (int32): the query's tokens and mask, G = 1 + n_neg
    document slots with theirs, the slots' corpus rows (-1: empty) and the query's positives' rows. With a
    frozen trunk's cache (`trunk_width` E) the tokens give way to their states (float32): q_trunk [B, Tq, E],
    d_trunk [B, G, Td, E]."""
    b, g = self.batch_size, 1 + self.n_neg
    q, d = ("q_trunk", "d_trunk") if trunk_width else ("q_ids", "d_ids")
    e = (trunk_width,) if trunk_width else ()
    return {q: (b, self.query_len, *e), "q_mask": (b, self.query_len), d: (b, g, self.doc_len, *e),
            "d_mask": (b, g, self.doc_len), "doc_ids": (b, g), "pos_ids": (b, self.max_positives)}


def pad(ids: list[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) of one sequence cut or right-padded to `length`."""
  ids = ids[:length]
  out = np.full(length, pad_id, np.int32)
  out[:len(ids)] = ids
  return out, (np.arange(length) < len(ids)).astype(np.int32)


# A few batches ahead is enough to hide the host work behind a step. grain's default (16 threads, 500
# batches ahead) spends minutes of CPU on batches a short run never uses, and the records are Python (GIL).
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _batches(n: int, batch_size: int, seed: int, process_index: int, process_count: int, record=None):
  """Endless, reshuffled-per-epoch batches of this process's share of each global batch of `n` items.
  Items (or `record(index, rng)` of them) are drawn before the split by process, so a global batch holds
  the same rows whatever the number of processes."""
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
  if record is not None:
    ds = ds.random_map(record, seed=seed)
  return ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True)


class TrainData:
  """Examples plus corpus, tokenized by the towers' own prompt and tokenizer settings."""

  def __init__(self, examples: list[TrainExample], corpus: dict[str, dict], query_tokenize, doc_tokenize,
               pad_id: int, spec: BatchSpec):
    if not examples:
      raise ValueError("no training examples")
    self.spec = dataclasses.replace(spec, max_positives=max(len(ex.positive_ids) for ex in examples))
    self.pad_id, self.examples = pad_id, examples
    self.doc_index = {doc_id: i for i, doc_id in enumerate(corpus)}
    self.doc_tokens = doc_tokenize(list(corpus.values()))
    self.query_tokens = query_tokenize([ex.query for ex in examples])
    self.trunk = None  # a frozen trunk's cached states (data/trunk.py): batches carry them instead of token ids

  def record(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ex, spec = self.examples[index], self.spec
    positive = ex.positive_ids[rng.integers(len(ex.positive_ids))]
    negatives = list(rng.choice(ex.negative_ids, size=min(spec.n_neg, len(ex.negative_ids)), replace=False))
    doc_ids = np.full(1 + spec.n_neg, -1, np.int32)
    d_ids = np.full((1 + spec.n_neg, spec.doc_len), self.pad_id, np.int32)
    d_mask = np.zeros((1 + spec.n_neg, spec.doc_len), np.int32)
    for slot, doc in enumerate([positive] + negatives):
      doc_ids[slot] = self.doc_index[doc]
      d_ids[slot], d_mask[slot] = pad(self.doc_tokens[doc_ids[slot]], spec.doc_len, self.pad_id)
    d_mask[len(negatives) + 1:, 0] = 1  # empty slots get one token so no softmax row is fully masked
    q_ids, q_mask = pad(self.query_tokens[index], spec.query_len, self.pad_id)
    pos_ids = np.full(spec.max_positives, -1, np.int32)
    pos_ids[:len(ex.positive_ids)] = [self.doc_index[d] for d in ex.positive_ids]
    out = dict(q_ids=q_ids, q_mask=q_mask, d_ids=d_ids, d_mask=d_mask, doc_ids=doc_ids, pos_ids=pos_ids)
    return out if self.trunk is None else {**out, "q_row": np.int32(index)}

  def with_trunk_states(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch's token ids replaced by their trunk states: q_trunk [B, Tq, E], d_trunk [B, G, Td, E]."""
    batch = dict(batch)
    q_rows, _, _ = batch.pop("q_row"), batch.pop("q_ids"), batch.pop("d_ids")
    return {**batch, "q_trunk": self.trunk.queries(q_rows), "d_trunk": self.trunk.documents(batch["doc_ids"])}

  def iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """An endless iterator over this process's share of each global batch (state: get_state/set_state)."""
    ds = _batches(len(self.examples), self.spec.batch_size, seed, process_index, process_count, self.record)
    if self.trunk is not None:
      ds = ds.map(self.with_trunk_states)
    return iter(ds.to_iter_dataset(READ_OPTIONS))


class DistillData:
  """Stage 2 batches: student-tokenized queries and their teacher embeddings. The embeddings stay in their
  tensorstore array (`artifacts.store` layout) and each batch reads its rows, so the query set may exceed memory."""

  def __init__(self, query_tokens: list[list[int]], teacher_array, pad_id: int, query_len: int, batch_size: int):
    if not query_tokens:
      raise ValueError("no training queries")
    if teacher_array.shape[0] != len(query_tokens):
      raise ValueError(f"{len(query_tokens)} queries but {teacher_array.shape[0]} teacher embeddings")
    self.query_tokens, self.teacher, self.pad_id = query_tokens, teacher_array, pad_id
    self.query_len, self.batch_size = query_len, batch_size

  def batch(self, rows_B: np.ndarray) -> dict[str, np.ndarray]:
    ids, mask = zip(*(pad(self.query_tokens[r], self.query_len, self.pad_id) for r in rows_B))
    teacher_BxD = np.asarray(self.teacher.oindex[np.asarray(rows_B)].read().result(), np.float32)
    return dict(ids=np.stack(ids), mask=np.stack(mask), teacher=teacher_BxD)

  def iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    ds = _batches(len(self.query_tokens), self.batch_size, seed, process_index, process_count).map(self.batch)
    return iter(ds.to_iter_dataset(READ_OPTIONS))


@dataclasses.dataclass
class RerankGroup:
  """One training query for a reranker: prompted texts, its judged-relevant documents with their grades, and
  the first stage's other candidates (not judged relevant) to draw the rest of its group from."""
  query: str
  positives: list[tuple[str, float]]
  candidates: list[str]


class RerankData:
  """Reranker batches: per query a group of `group_size` pairs, slot 0 a relevant document (sampled among
  the judged ones), then first-stage candidates sampled without replacement; pairs are tokenized on the fly
  by `tokenize_pairs` (the reranker's own) and padded to `seq_len`. Labels are relevance grades (0 for
  candidates); slots without a candidate are masked (`where`)."""

  def __init__(self, groups: list[RerankGroup], tokenize_pairs, pad_id: int, group_size: int, seq_len: int,
               batch_size: int):
    if not groups:
      raise ValueError("no training queries with a judged-relevant document")
    self.groups, self.tokenize_pairs, self.pad_id = groups, tokenize_pairs, pad_id
    self.group_size, self.seq_len, self.batch_size = group_size, seq_len, batch_size

  def record(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    g, size = self.groups[index], self.group_size
    doc, grade = g.positives[rng.integers(len(g.positives))]
    others = [g.candidates[i] for i in rng.choice(len(g.candidates), min(size - 1, len(g.candidates)), replace=False)]
    pairs = self.tokenize_pairs([g.query] * (1 + len(others)), [doc] + others)
    ids = np.full((size, self.seq_len), self.pad_id, np.int32)
    mask = np.zeros((size, self.seq_len), np.int32)
    mask[len(pairs):, 0] = 1  # empty slots get one token (no fully masked attention row)
    for slot, row in enumerate(pairs):
      ids[slot], mask[slot] = pad(row, self.seq_len, self.pad_id)
    labels = np.zeros(size, np.float32)
    labels[0] = grade
    return dict(ids=ids, mask=mask, labels=labels, where=np.arange(size) < len(pairs))

  def iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    ds = _batches(len(self.groups), self.batch_size, seed, process_index, process_count, self.record)
    return iter(ds.to_iter_dataset(READ_OPTIONS))
