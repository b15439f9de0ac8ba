"""BEIR / JSONL readers (errors name file:line) and the grain training pipeline."""

import json

import numpy as np
import pytest

from scalingnote_jax.data import beir
from scalingnote_jax.data.pipeline import BatchSpec, TrainData

from helpers import BEIR


def write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_real_scifact_loads():
  root = f"{BEIR}/scifact"
  data = beir.load_beir(root, "train")
  assert len(data.corpus) == 5183 and len(data.queries) == 809 and sum(map(len, data.qrels.values())) == 919
  test = beir.load_beir(root, "test")
  assert len(test.queries) == 300


def test_a_dev_split_is_held_out_of_the_training_queries():
  from scalingnote_jax.config import stage1_defaults
  from scalingnote_jax.data.training import load_data

  d = stage1_defaults().data
  d.update(dict(source="beir", path=f"{BEIR}/scifact", train_split="train", val_split="train", val_fraction=0.15))
  examples, dev, _ = load_data(d)
  trained = {ex.query_id for ex in examples}
  assert len(dev.queries) == round(0.15 * 809) and not trained & set(dev.queries)
  assert len(trained) + len(dev.queries) == 809  # (every SciFact train query has a positive)
  assert set(load_data(d)[1].queries) == set(dev.queries)  # the same queries every time
  d.val_fraction = 1.0
  with pytest.raises(ValueError, match="holding out dev queries needs 0 < data.val_fraction < 1"):
    load_data(d)


@pytest.mark.parametrize("line, message", [
    ('{"_id": "1", "text": "ok"', r"corpus\.jsonl:2: invalid JSON"),
    ('{"_id": "2"}', r"corpus\.jsonl:2: missing field 'text'"),
    ('{"_id": "3", "text": ""}', r"corpus\.jsonl:2: field 'text' is empty"),
    ('{"_id": "0", "text": "again"}', r"corpus\.jsonl:2: duplicate document id '0'"),
    ('["not", "an", "object"]', r"corpus\.jsonl:2: expected a JSON object"),
    ('{"_id": "4", "text": "half a pair \\ud83d"}', r"corpus\.jsonl:2: a string holds a lone surrogate"),
    (b'{"_id": "5", "text": "caf\xe9"}', r"corpus\.jsonl:2: not UTF-8 \(byte 0xe9 at column 26\)"),  # Latin-1
    ('{"_id": "doc 6", "text": "x"}', r"corpus\.jsonl:2: document id 'doc 6' contains whitespace"),  # no TREC id
])
def test_bad_corpus_lines_name_file_and_line(tmp_path, line, message):
  first = '{"_id": "0", "title": "t", "text": "first \\ud83d\\ude00"}'  # an escaped pair (an emoji) is fine
  if isinstance(line, bytes):
    (tmp_path / "corpus.jsonl").write_bytes(first.encode() + b"\n" + line + b"\n")
    path = str(tmp_path / "corpus.jsonl")
  else:
    path = write(tmp_path / "corpus.jsonl", [first, line])
  with pytest.raises(beir.DataError, match=message):
    beir.load_corpus(path)
  assert beir.load_corpus(write(tmp_path / "ok.jsonl", [first]))["0"]["text"] == "first \U0001F600"


def test_the_pipeline_writes_a_query_log_from_the_corpus(tmp_path):
  """data.query_log "titles+conclusions": every title (one line each), then the last two sentences of each
  abstract that have 5-60 words; the sentence split keeps numbers and brackets inside their sentence."""
  from ml_collections import ConfigDict

  from scalingnote_jax.pipeline import prepare_data

  docs = [{"_id": "d1", "title": "Statins and\nmemory ", "text": "We studied 17 adults (n = 17) over a year. Short "
           "one. Memory fell by 2.5 points vs. 0.4 in controls, p = 0.016. Statins may impair memory in older adults."},
          {"_id": "d2", "title": "", "text": "A single sentence about the gut microbiome and diet"},
          {"_id": "d3", "title": "Vitamin D", "text": "Too short. Also brief!"}]
  (tmp_path / "beir").mkdir()
  write(tmp_path / "beir" / "corpus.jsonl", [json.dumps(d) for d in docs])
  write(tmp_path / "beir" / "queries.jsonl", ['{"_id": "q1", "text": "do statins harm memory"}'])
  (tmp_path / "beir" / "qrels").mkdir()
  for split in ("train", "test"):
    write(tmp_path / "beir" / "qrels" / f"{split}.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1"])
  d = ConfigDict(dict(source="beir", path=str(tmp_path / "beir"), split="test", query_log="titles+conclusions"))
  log = prepare_data(d, str(tmp_path / "data"))["query_log"]
  assert open(log).read().splitlines() == [
      "Statins and memory", "Vitamin D",
      "Memory fell by 2.5 points vs. 0.4 in controls, p = 0.016.", "Statins may impair memory in older adults.",
      "A single sentence about the gut microbiome and diet"]
  d.query_log = "titles"
  assert open(prepare_data(d, str(tmp_path / "t"))["query_log"]).read() == "Statins and memory\nVitamin D\n"
  d.query_log = str(tmp_path / "data" / "query_log.txt")  # a file is the log as it is
  assert prepare_data(d, str(tmp_path / "f"))["query_log"] == d.query_log and not (tmp_path / "f").exists()
  d.query_log = "titles+abstracts"
  with pytest.raises(ValueError, match=r"data.query_log='titles\+abstracts': 'abstracts' is not one of"):
    prepare_data(d, str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_bad_qrels_name_file_and_line(tmp_path):
  qrels = write(tmp_path / "q.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td9\t1"])
  with pytest.raises(beir.DataError, match=r"q\.tsv:3: unknown document id 'd9'"):
    beir.load_qrels(qrels, query_ids={"q1"}, doc_ids={"d1"})
  assert beir.load_qrels(qrels, query_ids={"q1"}, doc_ids={"d1"}, unknown="skip") == {"q1": {"d1": 1}}
  bad = write(tmp_path / "b.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\thigh"])
  with pytest.raises(beir.DataError, match=r"b\.tsv:2: score 'high' is not a number"):
    beir.load_qrels(bad)
  for score in ("inf", "nan", "0.6"):  # not a grade: was OverflowError, an error, and a silent 0
    bad = write(tmp_path / "g.tsv", ["query-id\tcorpus-id\tscore", "q1\td0\t2.0", f"q1\td1\t{score}"])
    with pytest.raises(beir.DataError, match=rf"g\.tsv:3: score '{score}' is not an integer relevance grade"):
      beir.load_qrels(bad)
  (tmp_path / "l.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq\xe9\td2\t1\n")  # Latin-1
  with pytest.raises(beir.DataError, match=r"l\.tsv:3: not UTF-8 \(byte 0xe9 at column 2\)"):
    beir.load_qrels(str(tmp_path / "l.tsv"))  # was: a bare UnicodeDecodeError, no file, no line
  twice = write(tmp_path / "t.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td1\t0", "q1\td1\t1"])
  assert beir.load_qrels(twice) == {"q1": {"d1": 1}, "q2": {"d1": 0}}  # a repeat that agrees is harmless
  clash = write(tmp_path / "c.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td1\t0", "q1\td1\t2"])
  with pytest.raises(beir.DataError, match=r"c\.tsv:4: \('q1', 'd1'\) judged again with grade 2 \(first line: 2, "
                                           r"grade 1\)"):
    beir.load_qrels(clash)  # was: silently the last


def test_train_jsonl_drops_negatives_that_are_positives(tmp_path):
  corpus = {f"d{i}": {"title": "", "text": f"doc {i}"} for i in range(5)}
  path = write(tmp_path / "train.jsonl", [json.dumps(dict(query_id="q", query="x", positive_ids=["d0", "d1"],
                                                          negative_ids=["d1", "d2", "d3"]))])
  (ex,) = beir.load_train_jsonl(path, corpus)
  assert ex.negative_ids == ["d2", "d3"]
  bad = write(tmp_path / "bad.jsonl", [json.dumps(dict(query_id="q", query="x", positive_ids=["d7"],
                                                         negative_ids=[]))])
  with pytest.raises(beir.DataError, match=r"bad\.jsonl:1: unknown document id 'd7'"):
    beir.load_train_jsonl(bad, corpus)


def pipeline(batch_size=4, n_neg=2):
  corpus = {f"d{i}": {"title": "", "text": f"doc {i}"} for i in range(12)}
  examples = [beir.TrainExample(f"q{i}", f"query {i}", [f"d{i}"], [f"d{(i + k) % 12}" for k in (1, 2, 3)])
              for i in range(10)]
  examples[0].negative_ids = ["d5"]  # fewer negatives than n_neg: a padded slot
  tok = lambda texts: [[len(t)] * (1 + i % 5) for i, t in enumerate(texts)]  # noqa: E731
  return TrainData(examples, corpus, tok, lambda docs: tok([d["text"] for d in docs]), 0,
                   BatchSpec(batch_size, n_neg, 8, 8))


def test_pipeline_batches_and_resumes_from_saved_state():
  data = pipeline()
  it = data.iterator(seed=1)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  rest = [next(it) for _ in range(4)]
  b = first[0]
  assert b["q_ids"].shape == (4, 8) and b["d_ids"].shape == (4, 3, 8) and b["doc_ids"].shape == (4, 3)
  # the one batch schema (what ahead-of-time compilation lowers the step with) is what the pipeline makes
  assert {k: v.shape for k, v in b.items()} == data.spec.shapes() and all(v.dtype == np.int32 for v in b.values())
  assert data.spec.max_positives == 1  # set from the examples (one positive each)
  assert (b["doc_ids"][:, 0] == b["pos_ids"][:, 0]).all()  # slot 0 is a positive
  seen = np.concatenate([x["pos_ids"][:, 0] for x in first + rest])
  assert len(set(seen[:10].tolist())) >= 8  # an epoch visits (nearly) every example once
  resumed = data.iterator(seed=1)
  resumed.set_state(state)
  for want in rest:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_pipeline_shards_by_process():
  data = pipeline(batch_size=4)
  full = next(data.iterator(seed=2))
  halves = [next(data.iterator(seed=2, process_index=p, process_count=2)) for p in range(2)]
  assert all(h["q_ids"].shape[0] == 2 for h in halves)
  # the same rows, sampled negatives included, whatever the process count: process p holds rows p, p+2
  for k in full:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k][[0, 2, 1, 3]])
