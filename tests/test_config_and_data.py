"""Config files and overrides, and the synthetic corpus."""

import os

import pytest

from scalingnote_jax.config import load_config
from scalingnote_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def test_overrides_are_typed_and_named():
  cfg = load_config(DEMO + ":smoke", ["--config.data.num_docs=7", "--config.teacher.model.dtype=bfloat16"])
  assert cfg.data.num_docs == 7 and cfg.teacher.model.dtype == "bfloat16"
  with pytest.raises(KeyError, match=r"demo\.py: no config field 'data.num_doc'"):
    load_config(DEMO, ["--config.data.num_doc=7"])
  with pytest.raises(TypeError, match=r"field 'data.num_docs' is int, got 'many'"):
    load_config(DEMO, ["--config.data.num_docs=many"])
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    load_config(DEMO + ":huge")


def test_synthetic_corpus_is_deterministic_and_labelled():
  a, b = synthetic.generate(40, seed=3), synthetic.generate(40, seed=3)
  assert a == b and synthetic.generate(40, seed=4) != a
  assert len(a.corpus) == 40 and set(a.qrels) == set(a.queries)
  for qid, query in a.queries.items():
    (doc_id,) = a.qrels[qid]
    entity = next(w for w in a.corpus[doc_id]["title"].split() if "-" in w)
    assert entity.lower().replace("-", " ") in query  # the query names its document's entity, as typed
    assert entity not in query
    others = [d for d in a.corpus if d != doc_id and entity in a.corpus[d]["text"]]
    assert not others  # ... and only that document's
  topics = [doc["title"].split("(")[1] for doc in a.corpus.values()]
  assert len(set(topics)) == len(synthetic.TOPICS) and len(topics) > len(set(topics))  # same-topic distractors
