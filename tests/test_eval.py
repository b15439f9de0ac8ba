"""Retrieval metrics: pytrec_eval against hand-checked values, BEIR conventions, exact search."""

import numpy as np
import pytest

from scalingnote_jax.eval.retrieval import ir_metrics
from scalingnote_jax.index.exact import exact_search
from scalingnote_jax.index.hits import Hits


def test_metrics_match_hand_computed_values():
  # q3 is judged only non-relevant: BEIR and MTEB average it in with 0 (pytrec_eval returns it), as we do
  qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d9": 1}, "q3": {"d4": 0}}
  run = {"q1": {"d3": 0.9, "d1": 0.5, "d2": 0.1}, "q3": {"d4": 0.3}}  # q2 retrieved nothing: scores 0
  m = ir_metrics(qrels, run)
  dcg = 1 / np.log2(3) + 2 / np.log2(4)  # trec_eval's gain is the grade itself, at ranks 2 and 3
  idcg = 2 / np.log2(2) + 1 / np.log2(3)
  assert m["num_queries"] == 3 and m["queries_without_relevant"] == 1
  assert m["ndcg_at_10"] == pytest.approx((dcg / idcg + 0 + 0) / 3, abs=1e-6)
  assert m["mrr_at_10"] == pytest.approx((1 / 2 + 0 + 0) / 3)
  assert m["recall_at_100"] == pytest.approx((1 + 0 + 0) / 3)
  # BEIR's own arithmetic: pytrec_eval over the qrels and the run, the mean over the queries it returns
  import pytrec_eval

  beir = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate({**run, "q2": {"d7": 0.1}})
  assert m["ndcg_at_10"] == pytest.approx(np.mean([s["ndcg_cut_10"] for s in beir.values()]), abs=1e-12)


def test_mrr_only_looks_at_the_first_ten():
  run = {"q": {f"d{i}": 1.0 - i / 100 for i in range(20)}}
  assert ir_metrics({"q": {"d12": 1}}, run)["mrr_at_10"] == 0.0
  assert ir_metrics({"q": {"d3": 1}}, run)["mrr_at_10"] == pytest.approx(1 / 4)


def test_exact_search_and_self_removal():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(300, 16)).astype(np.float32)
  q = rng.normal(size=(37, 16)).astype(np.float32)
  hits = exact_search(q, d, k=10, block=8)
  full = q @ d.T
  np.testing.assert_array_equal(hits.ids, np.argsort(-full, axis=1)[:, :10])
  np.testing.assert_allclose(hits.scores, np.sort(full, axis=1)[:, ::-1][:, :10], rtol=1e-6)
  hits = Hits(np.array([[0, 1, 2, -1]]), np.array([[3.0, 2.0, 1.0, -np.inf]], np.float32)).with_ids(["a", "b", "c"])
  assert hits.ids == [["a", "b", "c", None]]
  assert hits.run(["a"], drop_self=True) == {"a": {"b": 2.0, "c": 1.0}}  # not the query's own id, nor unfilled
  assert hits.run(["a"]) == {"a": {"a": 3.0, "b": 2.0, "c": 1.0}}
  with pytest.raises(TypeError, match="not a tuple"):  # no order to get wrong: `scores, ids = hits` fails
    scores, ids = hits


# ---------------------------------------------------------------------------------------------------------
# `scalingnote eval`: pairwise metrics, BEIR conventions through the whole command, BM25 against its
# published SciFact score, and pytrec_eval against a second implementation (ranx).

def test_pair_metrics_auc_and_contrastive_entropy():
  from scalingnote_jax.eval.retrieval import pair_metrics

  doc_ids = [f"d{i}" for i in range(6)]
  qrels = {"q": {"d0": 1, "d1": 2, "d5": 0}}  # two relevant documents; d5 judged non-relevant
  score = np.array([0.9, 0.7, 0.1, 0.2, 0.3, 0.8])
  m = pair_metrics(lambda row, cols: score[cols], ["q"], qrels, doc_ids, num_negatives=4, scale=10.0,
                   rng=np.random.default_rng(0))
  # negatives = all four others (d2..d5); d0 beats every one, d1 loses to d5 only: (4 + 3) / 8
  assert m["auc"] == pytest.approx(7 / 8)
  # Fang et al.: every (query, relevant) pair against the same negatives, averaged over the pairs
  negatives = 10 * np.array([0.1, 0.2, 0.3, 0.8])
  ce = [np.logaddexp.reduce(np.r_[10 * p, negatives]) - 10 * p for p in (0.9, 0.7)]
  assert m["contrastive_entropy"] == pytest.approx(np.mean(ce)) and m["contrastive_pairs"] == 2
  ties = pair_metrics(lambda row, cols: np.zeros(len(cols)), ["q"], qrels, doc_ids, num_negatives=4, scale=None,
                      rng=np.random.default_rng(0))
  assert ties == {"auc": 0.5, "contrastive_entropy": None, "contrastive_pairs": 0}
  # negatives drawn from a pool (a validation's random sample of the corpus): d2, d3 only
  pooled = pair_metrics(lambda row, cols: score[cols], ["q"], qrels, doc_ids, num_negatives=4, scale=10.0,
                        rng=np.random.default_rng(0), negative_pool=["d2", "d3", "d0"])
  ce = [np.logaddexp.reduce(np.r_[10 * p, 10 * np.array([0.1, 0.2])]) - 10 * p for p in (0.9, 0.7)]
  assert pooled["contrastive_entropy"] == pytest.approx(np.mean(ce)) and pooled["auc"] == 1.0


def test_a_validation_over_part_of_the_corpus_draws_negatives_from_its_random_sample_only():
  """eval.max_docs: every judged document is searched, but the negatives of contrastive entropy come from the
  uniform sample of the rest (were the judged ones, kept whole, in the pool, they would be overdrawn)."""
  from scalingnote_jax.data import synthetic
  from scalingnote_jax.data.training import validation_doc_ids

  gen = synthetic.generate(300, queries_per_doc=1, seed=0)
  qids = list(gen.queries)[:50]  # a dev split: 50 queries over the whole corpus
  data = synthetic.Dataset(gen.corpus, {q: gen.queries[q] for q in qids}, {q: gen.qrels[q] for q in qids})
  judged = {d for r in data.qrels.values() for d in r}
  assert 0 < len(judged) < 200
  doc_ids, pool = validation_doc_ids(data, 200, np.random.default_rng(0))
  assert len(doc_ids) == 200 and judged <= set(doc_ids) and len(set(doc_ids)) == 200
  assert set(pool) == set(doc_ids) - judged  # the sample, none of it judged
  again, _ = validation_doc_ids(data, 200, np.random.default_rng(0))
  assert again == doc_ids  # fixed by the seed
  whole, whole_pool = validation_doc_ids(data, 0, np.random.default_rng(0))
  assert whole == whole_pool == list(data.corpus)


def write_tiny_beir(root, corpus, queries, qrels_rows, split="test"):
  import json

  (root / "qrels").mkdir(parents=True)
  (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                             for i, t in corpus.items()))
  (root / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
  (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n"
                                                                                    for q, d, g in qrels_rows))
  return str(root)


def test_eval_command_follows_beir_conventions(tmp_path, capsys):
  """ArguAna-style: every query is also a document (same id) and would retrieve itself first; a qrels line
  naming a document outside the corpus is reported, not crashed on; unjudged results count as non-relevant."""
  import json

  from scalingnote_jax.cli import main

  corpus = {"a1": "solar panels cut household energy bills", "a2": "panels on roofs reduce the energy bills",
            "a3": "wind turbines kill migrating birds", "a4": "birds avoid modern wind turbines",
            "a5": "an unrelated text about cheese"}
  queries = {"a1": "solar panels cut household energy bills", "a3": "wind turbines kill migrating birds",
             "q5": "cheese", "q6": "who asked this"}
  data = write_tiny_beir(tmp_path / "argu", corpus, queries,
                         [("a1", "a2", 1), ("a3", "a4", 1), ("a3", "missing-doc", 1), ("q5", "gone", 1),
                          ("nobody", "a1", 1)])
  assert main(["eval", "--bm25", "--data", data]) == 0
  out = capsys.readouterr()
  m = json.loads(out.out)
  # as BEIR and MTEB count them: judged documents missing from the corpus are kept (relevant, never found), so
  # q5, whose only relevant document is missing, scores 0 and counts; a qrels line naming an unknown query is
  # dropped (it cannot be asked); q6, unjudged, is not part of the split
  assert m["qrels_unknown_documents"] == 2 and m["queries_relevant_not_in_corpus"] == 1
  assert m["qrels_unknown_queries"] == 1 and "qrels/test.tsv:6" in out.err and "missing-doc" in out.err
  assert m["num_queries"] == 3 and m["num_docs"] == 5
  # each query's own document is dropped, so its counter-argument ranks first; a3 lacks one of its two
  assert m["mrr_at_10"] == pytest.approx(2 / 3)
  assert m["ndcg_at_10"] == pytest.approx((1 + 1 / (1 + 1 / np.log2(3)) + 0) / 3)
  assert main(["eval", "--bm25", "--data", data, "--keep-self"]) == 0
  kept = json.loads(capsys.readouterr().out)
  assert kept["mrr_at_10"] == pytest.approx(1 / 3)  # the query's own id ranks first: unjudged, non-relevant

  # --hits: the ranking's depth, in the metrics and the run file (kept, a query's own id is its one hit)
  assert main(["eval", "--bm25", "--data", data, "--keep-self", "--hits", "1", "--save-run",
               str(tmp_path / "h1.run")]) == 0
  shallow = json.loads(capsys.readouterr().out)
  lines = [line.split() for line in (tmp_path / "h1.run").read_text().splitlines()]
  assert sorted((q, d) for q, _, d, *_ in lines if q != "q5") == [("a1", "a1"), ("a3", "a3")]
  assert len(lines) == 3 and kept["recall_at_100"] > 0 and shallow["recall_at_100"] == shallow["mrr_at_10"] == 0
  assert main(["eval", "--bm25", "--data", data, "--hits", "0"]) == 1
  assert "--hits 0: expected >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_tower_keeps_its_corpus_embeddings_for_the_next_run(tmp_path, monkeypatch, minilm_dir):
  """`eval --checkpoint` encodes a corpus once per tower: the second run (here with --save-run) reuses the store
  in the cache, and another corpus gets a store of its own."""
  import json

  from scalingnote_jax.cli import main

  monkeypatch.setenv("SCALINGNOTE_CACHE_DIR", str(tmp_path / "cache"))
  corpus = {f"d{i}": f"document {i} about topic {i % 3}" for i in range(12)}
  data = write_tiny_beir(tmp_path / "beir", corpus, {"q1": "topic 1", "q2": "document 5"}, [("q1", "d1", 1),
                                                                                             ("q2", "d5", 1)])
  stores = lambda: sorted((tmp_path / "cache" / "embeddings").iterdir())  # noqa: E731
  files = lambda store: {p: p.stat().st_mtime_ns for p in store.rglob("*")  # noqa: E731
                         if p.is_file() and p.name != ".lock"}  # (the lock file is rewritten by each taker)
  assert main(["eval", "--checkpoint", minilm_dir, "--data", data]) == 0
  [store] = stores()
  written = files(store)
  assert main(["eval", "--checkpoint", minilm_dir, "--data", data, "--save-run", str(tmp_path / "a.run")]) == 0
  assert stores() == [store] and files(store) == written  # nothing encoded again
  corpus["d0"] = "an edited document"
  other = write_tiny_beir(tmp_path / "beir2", corpus, {"q1": "topic 1"}, [("q1", "d1", 1)])
  assert main(["eval", "--checkpoint", minilm_dir, "--data", other]) == 0
  assert len(stores()) == 2 and files(store) == written


@pytest.mark.slow
def test_eval_of_the_dev_queries_a_run_held_out_equals_its_own_validation(tmp_path, capsys):
  """`eval --split held-out --step N`: the dev queries a Stage 1 run held out of its train split, over the whole
  corpus, at checkpoint N, score as the run's own validation scored them at step N."""
  from helpers import ROOT
  from scalingnote_jax.cli import main
  from scalingnote_jax.config import load_config
  from scalingnote_jax.data import synthetic
  from scalingnote_jax.eval import evaluate
  from scalingnote_jax.train import stage1

  gen = synthetic.generate(24, queries_per_doc=1, seed=0)
  data = write_tiny_beir(tmp_path / "beir", {i: d["text"] for i, d in gen.corpus.items()}, gen.queries,
                         [(q, d, g) for q, judged in gen.qrels.items() for d, g in judged.items()], split="train")
  fields = {"data.source": "beir", "data.path": data, "data.train_split": "train", "data.val_split": "train",
            "data.val_fraction": 0.25, "data.n_neg": 0, "num_steps": 2, "checkpoint.every": 1, "eval.every": 1,
            "eval.at_start": False, "eval.max_docs": 0}
  cfg = load_config(f"{ROOT}/configs/tiny.py:smoke", [f"--config.{k}={v}" for k, v in fields.items()])
  workdir = str(tmp_path / "run")
  evals = stage1.train(cfg, workdir)["evals"]
  capsys.readouterr()
  # (step 1 scored otherwise than the latest, step 2: what --step 1 returns is step 1's)
  assert [e["step"] for e in evals] == [1, 2] and evals[0]["contrastive_entropy"] != evals[1]["contrastive_entropy"]
  got = evaluate.run(data_dir=data, split="held-out", checkpoint=workdir, step=1, cache=False,
                     measure_speed=False)  # (`eval --split held-out --step 1` without the throughput pass)
  assert got["num_queries"] == 6 and got["num_docs"] == 24
  for key in ("ndcg_at_10", "recall_at_10", "map", "contrastive_entropy"):
    assert got[key] == pytest.approx(evals[0][key], abs=1e-5), key
  assert main(["eval", "--checkpoint", workdir, "--data", data, "--split", "held-out", "--step", "7"]) == 1
  assert "checkpoints: no checkpoint of step 7 (there are: [1, 2])" in capsys.readouterr().err
  assert main(["eval", "--bm25", "--data", data, "--split", "held-out"]) == 1
  assert "--split held-out is the dev queries a Stage 1 run held out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scifact_bm25_run():
  import os

  from helpers import BEIR
  from scalingnote_jax.eval.evaluate import Lexical, load_split

  data, _ = load_split(os.path.join(BEIR, "scifact"), "test")
  system = Lexical(data.corpus)
  return data, system.search([data.queries[q] for q in data.qrels], 100).run(list(data.qrels)), system


def test_bm25_on_scifact_matches_the_published_bm25s_score(scifact_bm25_run):
  import os

  from helpers import BEIR
  from scalingnote_jax.eval.evaluate import evaluate

  data, _, system = scifact_bm25_run
  m = evaluate(system, data, measure_speed=False)
  with open(os.path.join(BEIR, "reference_scores.tsv")) as f:
    row = next(line.split("\t") for line in f if line.startswith("scifact\tBM25 via bm25s"))
  assert m["num_queries"] == 300 and m["num_docs"] == 5183
  assert m["ndcg_at_10"] == pytest.approx(float(row[2]), abs=0.003)  # MTEB's bm25s baseline, 0.6874
  assert m["recall_at_100"] == pytest.approx(float(row[3]), abs=0.003)
  assert 0.9 < m["auc"] <= 1.0 and m["contrastive_entropy"] is None


def test_metrics_match_a_second_implementation(scifact_bm25_run):
  """pytrec_eval (trec_eval) against ranx on a real run: 300 SciFact queries, 100 BM25 results each."""
  from ranx import Qrels, Run, evaluate

  data, run, _ = scifact_bm25_run
  ours = ir_metrics(data.qrels, run)
  theirs = evaluate(Qrels(data.qrels), Run(run), ["ndcg@10", "recall@10", "recall@100", "mrr@10", "map"])
  for key, name in (("ndcg_at_10", "ndcg@10"), ("recall_at_10", "recall@10"), ("recall_at_100", "recall@100"),
                    ("mrr_at_10", "mrr@10"), ("map", "map")):
    assert ours[key] == pytest.approx(theirs[name], abs=1e-9), key


def test_a_split_with_nothing_to_score_is_refused_before_any_work(tmp_path):
  from scalingnote_jax.data.beir import DataError
  from scalingnote_jax.eval.evaluate import load_split

  corpus, queries = {"d1": "one", "d2": "two"}, {"q1": "one?"}
  zeros = write_tiny_beir(tmp_path / "zeros", corpus, queries, [("q1", "d1", 0)])
  with pytest.raises(DataError, match=r"qrels/test\.tsv: no query has a relevant \(grade > 0\) document"):
    load_split(zeros, "test")  # was: ZeroDivisionError in BM25, or a failure after encoding the corpus
  none = write_tiny_beir(tmp_path / "none", corpus, queries, [("q9", "d1", 1)])
  with pytest.raises(DataError, match=r"qrels/test\.tsv: no judged query"):
    load_split(none, "test")


def test_cli_json_is_strict_json_even_for_a_diverged_model():
  import json as json_

  from scalingnote_jax.cli import to_json

  report = {"ndcg_at_10": 0.5, "contrastive_entropy": float("nan"), "per_split": [float("inf"), 1.0]}
  out = to_json(report)
  assert json_.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
      "ndcg_at_10": 0.5, "contrastive_entropy": None, "per_split": [None, 1.0]}
