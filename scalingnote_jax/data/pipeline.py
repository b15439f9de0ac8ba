"""The Stage 1 input pipeline (grain): examples -> tokenized, padded training batches, sharded by process.

A batch row is one query with G = 1 + n_neg documents: slot 0 a positive (sampled among the query's
positives), then up to n_neg hard negatives (slots without one hold id -1 and are masked by the loss).
Corpus and queries are tokenized once up front; the per-step work is sampling and padding. The iterator's
state (`get_state` / `set_state`) is saved with checkpoints so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from scalingnote_jax.data.beir import TrainExample


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  batch_size: int  # global: queries per step over all processes
  n_neg: int  # hard negatives per query
  query_len: int
  doc_len: int


class TrainData:
  """Examples plus corpus, tokenized by the towers' own prompt and tokenizer settings."""

  def __init__(self, examples: list[TrainExample], corpus: dict[str, dict], query_tokenize, doc_tokenize,
               pad_id: int, spec: BatchSpec):
    if not examples:
      raise ValueError("no training examples")
    self.spec, self.pad_id, self.examples = spec, pad_id, examples
    self.doc_index = {doc_id: i for i, doc_id in enumerate(corpus)}
    self.doc_tokens = doc_tokenize(list(corpus.values()))
    self.query_tokens = query_tokenize([ex.query for ex in examples])
    self.max_positives = max(len(ex.positive_ids) for ex in examples)

  def _pad(self, ids: list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:length]
    out = np.full(length, self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out, (np.arange(length) < len(ids)).astype(np.int32)

  def record(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ex, spec = self.examples[index], self.spec
    positive = ex.positive_ids[rng.integers(len(ex.positive_ids))]
    negatives = list(rng.choice(ex.negative_ids, size=min(spec.n_neg, len(ex.negative_ids)), replace=False))
    doc_ids = np.full(1 + spec.n_neg, -1, np.int32)
    d_ids = np.full((1 + spec.n_neg, spec.doc_len), self.pad_id, np.int32)
    d_mask = np.zeros((1 + spec.n_neg, spec.doc_len), np.int32)
    for slot, doc in enumerate([positive] + negatives):
      doc_ids[slot] = self.doc_index[doc]
      d_ids[slot], d_mask[slot] = self._pad(self.doc_tokens[doc_ids[slot]], spec.doc_len)
    d_mask[len(negatives) + 1:, 0] = 1  # empty slots get one token so no softmax row is fully masked
    q_ids, q_mask = self._pad(self.query_tokens[index], spec.query_len)
    pos_ids = np.full(self.max_positives, -1, np.int32)
    pos_ids[:len(ex.positive_ids)] = [self.doc_index[d] for d in ex.positive_ids]
    return dict(q_ids=q_ids, q_mask=q_mask, d_ids=d_ids, d_mask=d_mask, doc_ids=doc_ids, pos_ids=pos_ids)

  def iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """An endless, reshuffled-per-epoch iterator over this process's share of each global batch."""
    if self.spec.batch_size % process_count:
      raise ValueError(f"batch_size {self.spec.batch_size} is not divisible by {process_count} processes")
    # Records are sampled before the split by process, so the global batch holds the same rows (same
    # positives and negatives) whatever the number of processes.
    ds = (grain.MapDataset.range(len(self.examples)).shuffle(seed=seed).repeat(None)
          .random_map(self.record, seed=seed)
          [process_index::process_count]
          .batch(self.spec.batch_size // process_count, drop_remainder=True))
    return iter(ds.to_iter_dataset())
