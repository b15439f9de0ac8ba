"""`scalingnote eval --output DIR`: the metrics also written as MTEB writes a task's result (read back by
MTEB itself in tests/test_mteb.py, in the floor tier, where mteb is installed)."""

import json
import os

from scalingnote_jax.cli import main
from scalingnote_jax.data import beir


def test_eval_output_writes_an_mteb_task_result(tmp_path, capsys):
  corpus = {"d1": {"title": "Tides", "text": "the moon pulls the oceans into tides"},
            "d2": {"title": "", "text": "tides rise twice a day on most coasts"},
            "d3": {"title": "Bread", "text": "yeast makes bread dough rise"},
            "d4": {"title": "", "text": "the moon has no atmosphere"}}
  queries = {"q1": "why do tides rise", "q2": "what makes dough rise", "q3": "moon atmosphere"}
  qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}, "q3": {"d4": 1, "d1": 0}}
  data = beir.write_beir(beir.Dataset(corpus, queries, qrels), str(tmp_path / "tides"), "test")
  out = tmp_path / "results"
  assert main(["eval", "--bm25", "--data", data, "--output", str(out), "--hits", "10"]) == 0
  printed = json.loads(capsys.readouterr().out)  # the JSON line, as without --output
  assert os.listdir(out) == ["tides.json"]  # named as MTEB names it (<task name>.json); no temporary left
  saved = json.loads((out / "tides.json").read_text())
  assert saved["task_name"] == "tides" and saved["mteb_version"] is None and len(saved["dataset_revision"]) == 16
  assert saved["evaluation_time"] > 0
  (entry,) = saved["scores"]["test"]
  assert 0 < printed["ndcg_at_10"] < 1
  assert entry["main_score"] == entry["ndcg_at_10"] == printed["ndcg_at_10"]
  assert entry["map_at_10"] == printed["map"] and entry["recall_at_100"] == printed["recall_at_100"]
  assert entry["hf_subset"] == "default" and entry["languages"] == ["eng-Latn"]

  # only after the evaluation succeeded: a failed one writes nothing
  assert main(["eval", "--bm25", "--data", data, "--split", "dev", "--output", str(tmp_path / "none")]) == 1
  assert not (tmp_path / "none").exists()


def test_no_speed_skips_the_throughput_pass_and_changes_no_metric(tmp_path, capsys):
  corpus = {f"d{i}": {"title": "", "text": f"document {i} about topic {i % 3}"} for i in range(6)}
  data = beir.write_beir(beir.Dataset(corpus, {"q1": "topic 1", "q2": "document 5"}, {"q1": {"d1": 1}, "q2": {"d5": 1}}),
                         str(tmp_path / "tiny"), "test")
  assert main(["eval", "--bm25", "--data", data]) == 0
  timed = json.loads(capsys.readouterr().out)
  assert main(["eval", "--bm25", "--data", data, "--no-speed"]) == 0
  untimed = json.loads(capsys.readouterr().out)
  assert timed["qps"] > 0 and "qps" not in untimed and "latency_ms_p50" not in untimed
  assert {k: v for k, v in timed.items() if k not in ("qps", "batch_size", "latency_ms_p50")} == untimed
