"""BM25 over a BEIR corpus (bm25s): the lexical baseline of `scalingnote eval` and a negative miner."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import bm25s
import numpy as np
import Stemmer

from scalingnote_jax.index.hits import Hits, id_array

# bm25s sets its logger to DEBUG: once anything (absl, orbax) gives the root logger a handler, every index
# build prints "Building index from tokens".
logging.getLogger("bm25s").setLevel(logging.WARNING)


class BM25:
  """Title + text of every document; lower-cased, English stopwords removed and Snowball-stemmed (as the
  Elasticsearch English analyzer behind BEIR's BM25 numbers); bm25s's default k1, b."""

  def __init__(self, corpus: dict[str, dict]):
    self.doc_ids = list(corpus)
    self._id_array = id_array(self.doc_ids)
    self.stemmer = Stemmer.Stemmer("english")
    self.retriever = bm25s.BM25()
    self.retriever.index(self._tokenize([f"{d.get('title', '')} {d['text']}" for d in corpus.values()]),
                         show_progress=False)

  def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)

  def search(self, queries: Sequence[str], k: int) -> Hits:
    """The top k documents of each query (ids [Q][k], float32 scores [Q, k]), best first."""
    idx_QxK, scores_QxK = self.retriever.retrieve(self._tokenize(queries), k=min(k, len(self.doc_ids)),
                                                  show_progress=False)
    return Hits(idx_QxK, scores_QxK.astype(np.float32)).with_ids(self._id_array)

  def scores(self, query: str) -> np.ndarray:
    """The query's score against every document [N] (zeros when none of its words is in the corpus)."""
    tokens = [t for t in self._tokenize([query])[0] if t in self.retriever.vocab_dict]
    return self.retriever.get_scores(tokens) if tokens else np.zeros(len(self.doc_ids), np.float32)
