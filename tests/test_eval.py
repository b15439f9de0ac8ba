"""Retrieval metrics: pytrec_eval against hand-checked values, BEIR conventions, exact search."""

import numpy as np
import pytest

from scalingnote_jax.eval.retrieval import exact_search, ir_metrics, to_run


def test_metrics_match_hand_computed_values():
  qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d9": 1}, "q3": {"d4": 0}}  # q3 has no relevant doc: not counted
  run = {"q1": {"d3": 0.9, "d1": 0.5, "d2": 0.1}}  # q2 retrieved nothing: scores 0
  m = ir_metrics(qrels, run)
  dcg = 1 / np.log2(3) + 2 / np.log2(4)  # trec_eval's gain is the grade itself, at ranks 2 and 3
  idcg = 2 / np.log2(2) + 1 / np.log2(3)
  assert m["num_queries"] == 2
  assert m["ndcg_at_10"] == pytest.approx((dcg / idcg + 0) / 2, abs=1e-6)
  assert m["mrr_at_10"] == pytest.approx((1 / 2 + 0) / 2)
  assert m["recall_at_100"] == pytest.approx((1 + 0) / 2)


def test_mrr_only_looks_at_the_first_ten():
  run = {"q": {f"d{i}": 1.0 - i / 100 for i in range(20)}}
  assert ir_metrics({"q": {"d12": 1}}, run)["mrr_at_10"] == 0.0
  assert ir_metrics({"q": {"d3": 1}}, run)["mrr_at_10"] == pytest.approx(1 / 4)


def test_exact_search_and_self_removal():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(300, 16)).astype(np.float32)
  q = rng.normal(size=(37, 16)).astype(np.float32)
  scores, idx = exact_search(q, d, k=10, block=8)
  full = q @ d.T
  np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :10])
  np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :10], rtol=1e-6)
  run = to_run(["a"], ["a", "b", "c"], np.array([[3.0, 2.0, 1.0]]), np.array([[0, 1, 2]]))
  assert list(run["a"]) == ["b", "c"]  # the query's own id never counts as a result
