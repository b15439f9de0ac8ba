"""Config files and overrides, the synthetic corpus, and the demo command end to end."""

import os

import pytest

from scalingnote_jax.config import load_config
from scalingnote_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def test_overrides_are_typed_and_named():
  cfg = load_config(DEMO + ":smoke", ["--config.data.num_docs=7", "--config.model.dtype=bfloat16"])
  assert cfg.data.num_docs == 7 and cfg.model.dtype == "bfloat16"
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


def test_demo_smoke_runs_both_stages_then_reports_real_numbers(capsys, tmp_path):
  import json

  from scalingnote_jax.cli import main

  assert main(["demo", "--config", DEMO + ":smoke", "--workdir", str(tmp_path)]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["train"]["steps"] == 4 and report["train"]["tokens_per_s_median"] > 0
  assert report["held_out"]["before"] != report["held_out"]["after"]  # evaluated before and after training
  assert report["documents"]["n"] == 32 and report["documents"]["per_s"] > 0 and report["queries"]["per_s"] > 0
  assert (tmp_path / "teacher" / "checkpoints" / "4").is_dir() and (tmp_path / "teacher" / "metrics.jsonl").is_file()
  # then Stage 2, export, and the held-out queries answered through the bundle
  s2 = report["stage2"]
  assert s2["steps"] == 4 and (tmp_path / "student" / "checkpoints" / "4").is_dir()
  assert (tmp_path / "bundle" / "manifest.json").is_file() and 0 <= s2["online_recall_at_10"] <= 1
