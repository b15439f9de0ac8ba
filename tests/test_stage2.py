"""Stage 2 end to end on the synthetic corpus: a MiniLM student distilled from the tiny Stage 1 teacher keeps
>= 95% of its Recall@10; export writes a bundle that `Retriever` and the HTTP service answer from with the
student's own results; a student and documents from different teachers are refused; resume == uninterrupted."""

import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, read_metrics, run_cli
from scalingnote_jax import cli, sharding
from scalingnote_jax.config import load_config
from scalingnote_jax.data import synthetic
from scalingnote_jax.data.beir import DataError
from scalingnote_jax.data.training import load_data
from scalingnote_jax.eval.retrieval import ir_metrics
from scalingnote_jax.serve import bundle
from scalingnote_jax.serve.retriever import Retriever
from scalingnote_jax.artifacts import store, trained
from scalingnote_jax.train import stage1, stage2

pytestmark = pytest.mark.slow  # trains, encodes a real corpus or runs processes: in `make test`, not test-fast

DISTILL = f"{ROOT}/configs/distill_tiny.py"


def config(teacher, variant="", **overrides):
  fields = {"teacher": teacher, **overrides}
  return load_config(f"{DISTILL}:{variant}", [f"--config.{k}={v}" for k, v in fields.items()])


@pytest.fixture(scope="module")
def distilled(tiny_teacher, tmp_path_factory):
  """A student distilled (`scalingnote distill`, one device) on the labelled queries plus an unlabelled query
  log given as a JSONL file."""
  tmp = tmp_path_factory.mktemp("stage2")
  t_cfg = load_config(f"{ROOT}/configs/tiny.py")
  _, held_out, _ = load_data(t_cfg.data)
  log = synthetic.generate(t_cfg.data.num_docs, queries_per_doc=1, seed=t_cfg.data.seed,
                           unlabelled_per_doc=4).unlabelled
  leaked = next(iter(held_out.queries.values()))  # a held-out query in the log must not be trained on
  with open(tmp / "log.jsonl", "w") as f:
    for text in [*log, leaked, log[0]]:
      f.write(json.dumps({"text": text}) + "\n")
  workdir = str(tmp / "student")
  overrides = {"teacher": tiny_teacher, "data.unlabelled_per_doc": 0,
               "data.query_files": f"('{tmp / 'log.jsonl'}',)"}
  run_cli("distill", "--config", DISTILL, "--workdir", workdir, *(f"--config.{k}={v}" for k, v in overrides.items()))
  return {"workdir": workdir, "teacher": read_metrics(workdir, "teacher")[0], "evals": read_metrics(workdir, "val"),
          "held_out": held_out, "log": log}


def test_student_keeps_95_percent_of_the_teachers_recall(distilled):
  teacher, first, last = distilled["teacher"], distilled["evals"][0], distilled["evals"][-1]
  assert teacher["recall_at_10"] >= 0.9, teacher
  assert first["step"] == 0 and first["recall_at_10_retention"] < 0.3, first  # a random projection at first
  assert last["recall_at_10_retention"] >= 0.95, last
  assert last["cosine_to_teacher"] > 0.85 > first["cosine_to_teacher"]
  [store_dir] = glob.glob(os.path.join(distilled["workdir"], "teacher", "queries-*"))  # one store per query set
  with open(os.path.join(store_dir, "ids.json")) as f:
    trained_on = json.load(f)
  labelled = [q for q in trained_on if not q.startswith("unlabelled:")]
  examples, held_out, _ = load_data(load_config(f"{ROOT}/configs/tiny.py").data)
  assert sorted(labelled) == sorted(ex.query_id for ex in examples)
  texts = {*(ex.query for ex in examples), *held_out.queries.values()}
  assert len(trained_on) - len(labelled) == len(set(distilled["log"]) - texts)  # duplicates and held-out dropped


def test_export_then_retriever_and_service_answer_like_the_student(distilled, tmp_path):
  from starlette.testclient import TestClient

  from scalingnote_jax.serve import http

  out = tmp_path / "bundle"
  assert cli.main(["export", distilled["workdir"], "--out", str(out)]) == 0
  manifest = bundle.read_manifest(str(out))
  spec = trained.read_spec(distilled["workdir"])
  assert manifest["num_docs"] == 1024 and manifest["dim"] == spec["teacher"]["dim"] == 64
  assert manifest["documents"]["fingerprint"] == spec["teacher"]["doc_fingerprint"]
  assert manifest["index"]["backend"] == "scann" and manifest["student"]["num_layers"] == 1
  assert manifest["metrics"]["student"]["step"] == load_config(DISTILL).num_steps

  retriever = Retriever.load(str(out))
  held_out = distilled["held_out"]
  qids = list(held_out.queries)
  texts = [held_out.queries[q] for q in qids]
  student, tokenizer, _ = trained.load_tower(distilled["workdir"])  # the training workdir's own student
  from scalingnote_jax.encoder import Encoder

  np.testing.assert_allclose(retriever.encode(texts), Encoder(student, tokenizer).encode_queries(texts), atol=1e-5)
  # the student leaves the project as a Hugging Face / sentence-transformers folder (`export-hf`)
  assert cli.main(["export-hf", distilled["workdir"], "--out", str(tmp_path / "hf")]) == 0
  np.testing.assert_allclose(Encoder.from_pretrained(str(tmp_path / "hf")).encode_queries(texts),
                             retriever.encode(texts), atol=1e-5)
  hits = retriever.search(texts, k=100)  # ScaNN scores 1024 documents exactly (brute force)
  one, listed = retriever.search(texts[0], k=100), retriever.search(texts[:1], k=100)  # one string: one query
  assert one.ids == listed.ids and np.array_equal(one.scores, listed.scores) and len(one.ids[0]) == 100
  metrics = ir_metrics(held_out.qrels, hits.run(qids, drop_self=True))
  for key in ("recall_at_10", "ndcg_at_10"):
    assert metrics[key] == pytest.approx(manifest["metrics"]["student"][key], abs=1e-6)

  with TestClient(http.create_app(retriever)) as client:
    reply = client.post("/search", json={"queries": texts[:3], "k": 5})
  assert reply.status_code == 200
  for row, want_ids, want_scores in zip(reply.json()["results"], hits.ids, hits.scores):
    assert [r["id"] for r in row] == want_ids[:5]
    np.testing.assert_allclose([r["score"] for r in row], want_scores[:5], atol=1e-6)


def test_student_and_documents_from_different_teachers_are_refused(distilled, tmp_path):
  other = str(tmp_path / "other_teacher")  # a different Stage 1 run: other document tower weights
  stage1.train(load_config(f"{ROOT}/configs/tiny.py:smoke", ["--config.num_steps=1"]), other)
  with pytest.raises(bundle.BundleError, match="different embedding spaces"):
    bundle.export(distilled["workdir"], str(tmp_path / "a"), teacher=other)
  assert not (tmp_path / "a").exists()

  good = tmp_path / "good"
  bundle.export(distilled["workdir"], str(good), backend="exact",  # the teacher's own store: accepted
                embeddings=os.path.join(distilled["workdir"], "teacher", "documents"))
  store = tmp_path / "other_docs"  # what `scalingnote encode --checkpoint OTHER` writes
  assert cli.main(["encode", "--checkpoint", other, "--data", str(_beir_corpus(tmp_path)), "--out", str(store)]) == 0
  with pytest.raises(bundle.BundleError, match="different embedding spaces"):
    bundle.export(distilled["workdir"], str(tmp_path / "b"), embeddings=str(store))
  # a flipped byte in the student's parameters is refused, naming the file; a bundle of format 1 (no file
  # checksums) still has its student checked against the fingerprint recorded at export
  params = max((p for p in (good / "student" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  original = params.read_bytes()
  flipped = bytearray(original)
  flipped[len(flipped) // 2] ^= 0x01
  params.write_bytes(bytes(flipped))
  with pytest.raises(bundle.BundleError, match=rf"file {re.escape(str(params.relative_to(good)))} does not match"):
    Retriever.load(str(good))
  manifest = json.loads((good / "manifest.json").read_text())
  (good / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "files": {}}))
  with pytest.raises(bundle.BundleError, match="do not match the fingerprint recorded at export"):
    Retriever.load(str(good))
  params.write_bytes(original)
  assert Retriever.load(str(good)).num_docs == 1024
  shutil.rmtree(good / "documents")  # a bundle assembled by hand from mismatched parts
  shutil.copytree(store, good / "documents")
  with pytest.raises(bundle.BundleError, match="different embedding spaces"):
    Retriever.load(str(good))


def _beir_corpus(tmp_path):
  d = tmp_path / "beir"
  d.mkdir()
  corpus = load_data(load_config(f"{ROOT}/configs/tiny.py").data)[2]
  with open(d / "corpus.jsonl", "w") as f:
    for doc_id, doc in corpus.items():
      f.write(json.dumps({"_id": doc_id, **doc}) + "\n")
  return d


def test_resume_equals_an_uninterrupted_run(tiny_teacher, tmp_path):
  # a constant learning rate: the two runs differ in num_steps, and nothing else may differ
  smoke = lambda steps: config(tiny_teacher, "smoke", num_steps=steps, log_every=1, batch_size=16,  # noqa: E731
                               **{"checkpoint.every": 2, "optim.warmup_steps": 0, "optim.final_lr_fraction": 1.0})
  whole = stage2.distill(smoke(4), str(tmp_path / "whole"))
  stage2.distill(smoke(2), str(tmp_path / "split"))
  with pytest.raises(FileExistsError, match="pass --resume"):
    stage2.distill(smoke(4), str(tmp_path / "split"))
  resumed = stage2.distill(smoke(4), str(tmp_path / "split"), resume=True)
  assert [h["step"] for h in resumed["history"]] == [3, 4]
  np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in whole["history"][2:]],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(resumed["student"])), jax.tree.leaves(nnx.state(whole["student"]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_students_with_other_query_logs_share_a_teacher_cache_each_with_its_own_rows(tiny_teacher, tmp_path):
  """The teacher cache keeps one store per query set: a student whose log holds as many other texts (so the
  same positional ids) gets the teacher's rows of its own texts, not the first student's."""
  cache, got = tmp_path / "cache", {}
  for word in ("alpha", "beta"):
    (tmp_path / f"{word}.txt").write_text("".join(f"{word} question number {i}\n" for i in range(6)))
    cfg = config(tiny_teacher, "smoke", teacher_cache=str(cache), **{"data.query_files": f"('{tmp_path / word}.txt',)"})
    stage2.distill(cfg, str(tmp_path / word))
    got[word] = stage2.training_queries(cfg, load_config(f"{ROOT}/configs/tiny.py"))[0]
  assert list(got["alpha"]) == list(got["beta"]) and got["alpha"] != got["beta"]  # same ids, other texts
  stores = sorted(cache.glob("queries-*"))
  assert len(stores) == 2
  t_q_enc = stage2.load_teacher(tiny_teacher, sharding.make_mesh())[0]
  for store_dir, queries in zip(stores, sorted(got.values(), key=store.inputs_digest)):
    ids, rows_QxD = store.load_embeddings(str(store_dir))
    assert ids == list(queries)
    np.testing.assert_allclose(rows_QxD, t_q_enc.encode_queries(list(queries.values())), atol=1e-5)


def test_query_files_errors_name_file_and_line(tmp_path):
  good = tmp_path / "log.txt"
  good.write_text("first query\n\n  second query  \n")
  assert stage2.read_query_file(str(good)) == ["first query", "second query"]
  bad = tmp_path / "log.jsonl"
  bad.write_text('{"text": "fine"}\n{"query": 3.5}\n')
  with pytest.raises(DataError, match=r"log.jsonl:2: field 'query' must be str"):
    stage2.read_query_file(str(bad))
  with pytest.raises(DataError, match="no such file"):
    stage2.read_query_file(str(tmp_path / "missing.txt"))
