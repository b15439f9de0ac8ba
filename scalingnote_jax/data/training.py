"""What a run's `data` section names, as examples: training examples, a held-out split for validation and
the corpus (the synthetic corpus, or a BEIR directory with optional mined negatives); nested subsets for
data-size sweeps; the documents a validation searches."""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from scalingnote_jax.data import beir, synthetic


def load_data(d: ConfigDict) -> tuple[list[beir.TrainExample], synthetic.Dataset | None, dict]:
  """(training examples, validation dataset or None, corpus) of a config's `data` section."""
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
    examples = subsample(examples, d.train_fraction, d.seed)
    held_out = synthetic.Dataset(data.corpus, {q: data.queries[q] for q in val}, {q: data.qrels[q] for q in val})
    return examples, held_out, data.corpus
  if d.source == "beir":
    train = beir.load_beir(d.path, d.train_split)
    examples = (beir.load_train_jsonl(d.train_jsonl, train.corpus) if d.train_jsonl
                else beir.examples_from_qrels(train))
    if d.val_split and d.val_split == d.train_split:  # a dev split held out of the training queries
      examples, held_out = hold_out(train, examples, d.val_fraction, d.seed)
    else:
      held_out = beir.load_beir(d.path, d.val_split, unknown="skip") if d.val_split else None
    return subsample(examples, d.train_fraction, d.seed), held_out, train.corpus
  raise ValueError(f"data.source={d.source!r}: expected 'synthetic' or 'beir'")


def hold_out(train: synthetic.Dataset, examples: list[beir.TrainExample], fraction: float,
             seed: int) -> tuple[list[beir.TrainExample], synthetic.Dataset]:
  """A fixed random `fraction` of the training queries set apart as a dev split (for a dataset without one,
  e.g. SciFact: settings are chosen on it, the test split is reported once); the rest train."""
  if not 0 < fraction < 1:
    raise ValueError(f"data.val_split = data.train_split: holding out dev queries needs 0 < data.val_fraction < 1, "
                     f"got {fraction}")
  qids = sorted(train.qrels)
  dev = set(np.random.default_rng(seed).permutation(qids)[:round(fraction * len(qids))].tolist())
  held_out = synthetic.Dataset(train.corpus, {q: train.queries[q] for q in sorted(dev)},
                               {q: train.qrels[q] for q in sorted(dev)})
  return [ex for ex in examples if ex.query_id not in dev], held_out


def subsample(examples: list, fraction: float, seed: int) -> list:
  """A fixed random `fraction` of the training examples (data-size sweeps); nested: a smaller fraction's
  examples are a subset of a larger one's."""
  if not 0 < fraction <= 1:
    raise ValueError(f"data.train_fraction={fraction}: expected 0 < fraction <= 1")
  if fraction == 1:
    return examples
  order = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in sorted(order[:max(1, round(fraction * len(examples)))])]


def validation_doc_ids(data: synthetic.Dataset, max_docs: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
  """(the documents validation searches, those contrastive entropy draws its negatives from): the whole corpus
  twice; or, with `max_docs`, the judged documents plus a random sample of the others up to `max_docs`, and
  that sample. (Negatives from the sample only are uniform over the corpus, as Fang et al. draw them, bar the
  few judged documents; the judged ones, every one kept, would otherwise be a quarter of a 500-document pool.)"""
  doc_ids = list(data.corpus)
  if not max_docs or len(doc_ids) <= max_docs:
    return doc_ids, doc_ids
  judged = {d for r in data.qrels.values() for d in r if d in data.corpus}
  others = [d for d in doc_ids if d not in judged]
  sample = list(rng.choice(others, size=max(0, max_docs - len(judged)), replace=False))
  return sorted(judged) + sample, sample
