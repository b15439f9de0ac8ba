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


def test_described_queries_have_one_answer_that_they_do_not_name():
  """style="described": no two documents share kind, attributes and qualities, so the one document stating a
  query's (in canonical words) is its only answer; the query never names the entity; `noise` is the chance of
  each of its five words being a synonym (0: the document's words, 1: none of them)."""
  import re

  def stated(doc):  # (noun, {(attribute, quality)}) as every "described" document states them
    noun = re.search(r"is a (.+?) studied in", doc["text"]).group(1)
    a1, q1, a2, q2 = re.search(r"describe the (.+?) of \S+ as (\S+), while its (.+?) is (\S+)\.", doc["text"]).groups()
    return noun, frozenset([(a1, q1), (a2, q2)])

  for noise in (0.0, 1.0):
    d = synthetic.generate(400, seed=2, noise=noise, style="described", unlabelled_per_doc=1)
    kinds = [stated(doc) for doc in d.corpus.values()]
    assert len(set(kinds)) == len(kinds) == 400
    assert len(d.unlabelled) == 400
    for qid, query in d.queries.items():
      (doc_id,) = d.qrels[qid]
      doc = d.corpus[doc_id]
      assert doc["title"].split()[0].lower() not in query.lower()  # the entity is never named
      noun, pairs = stated(doc)
      canonical = [noun, *(w for pair in pairs for w in pair)]
      said = [bool(re.search(rf"\b{re.escape(w)}\b", query)) for w in canonical]
      assert all(x == (noise == 0.0) for x in said), (noise, query, canonical)
  with pytest.raises(ValueError, match="data.style='plain': expected 'named' or 'described'"):
    synthetic.generate(4, style="plain")


def test_a_field_added_since_a_run_is_no_change_at_its_default(tmp_path):
  """Finished work stays valid when the schema grows: a recorded config (a pipeline stage's marker, a workdir's
  config.json) without a field that has since been declared matches a config holding that field's default,
  and still differs, naming the field, from one that sets it otherwise."""
  import json

  import jax.numpy as jnp
  from ml_collections import ConfigDict

  from scalingnote_jax.artifacts.checkpoint import Checkpointer
  from scalingnote_jax.artifacts.stages import Stages
  from scalingnote_jax.config import config_changes, stage1_defaults, with_defaults
  from scalingnote_jax.train.common import open_workdir

  new = stage1_defaults()
  old = new.to_dict()
  del old["model"]["doc_seed"]  # as recorded before the field existed
  assert config_changes(old, new.to_dict(), stage1_defaults()) == {}
  assert config_changes(old, new.to_dict()) == {"model.doc_seed": [None, None]}  # no defaults: a difference
  assert with_defaults(old, stage1_defaults()).model.doc_seed is None

  stages, calls = Stages(str(tmp_path / "pipeline")), []
  stages("teacher", old, lambda: calls.append(1) or {"ok": 1})
  assert stages("teacher", new.to_dict(), lambda: calls.append(2), stage1_defaults()) == {"ok": 1} and calls == [1]
  changed = new.to_dict()
  changed["model"]["doc_seed"] = 7
  with pytest.raises(ValueError, match=r"stage 'teacher' completed with another configuration .*model\.doc_seed: "
                                       r"None -> 7"):
    stages("teacher", changed, lambda: calls.append(3), stage1_defaults())

  workdir = str(tmp_path / "run")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  ckpt.save(1, {"w": jnp.zeros(2)}, {"m": jnp.zeros(2)}, {"step": 1})
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(old, f)
  open_workdir(new, workdir, resume=True, keep=1, defaults=stage1_defaults())[0].close()  # resumes
  with pytest.raises(ValueError, match=r"model\.doc_seed: None -> 7.*Nothing was written"):
    open_workdir(ConfigDict(changed), workdir, resume=True, keep=1, defaults=stage1_defaults())
