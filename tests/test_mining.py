"""Hard-negative selection: positives never come back, rank window and margins hold, BM25 works."""

import numpy as np
import pytest

from scalingnote_jax.data import synthetic
from scalingnote_jax.data.beir import TrainExample, examples_from_qrels
from scalingnote_jax.index import mining


def test_window_margins_and_no_positives():
  ranked = [f"d{i}" for i in range(20)]
  scores = [1.0 - 0.05 * i for i in range(20)]
  rng = np.random.default_rng(0)
  cfg = mining.MiningConfig(range_min=2, range_max=10, num_negatives=5)
  neg = mining.select_negatives(ranked, scores, {"d0", "d3"}, 0.9, cfg, rng)
  assert neg == ["d4", "d5", "d6", "d7", "d8"]  # positives removed first, then ranks 2.. of the rest
  cfg = mining.MiningConfig(range_min=0, range_max=20, num_negatives=20, absolute_margin=0.3)
  neg = mining.select_negatives(ranked, scores, {"d0"}, 0.9, cfg, rng)
  assert all(scores[int(d[1:])] <= 0.6 + 1e-9 for d in neg) and "d6" not in neg and "d8" in neg
  cfg = mining.MiningConfig(range_min=0, range_max=20, num_negatives=3, sampling="random", seed=1)
  neg = mining.select_negatives(ranked, scores, {"d1"}, None, cfg, rng)
  assert len(neg) == 3 and "d1" not in neg
  with pytest.raises(ValueError, match="range_min < range_max"):
    mining.MiningConfig(range_min=5, range_max=5)


def test_bm25_mining_on_synthetic_excludes_every_positive():
  data = synthetic.generate(120, queries_per_doc=2, seed=3)
  examples = examples_from_qrels(data)
  examples[0] = TrainExample(examples[0].query_id, examples[0].query, examples[0].positive_ids + ["d7"], [])
  rankings, pos = mining.bm25_rankings(data.corpus, [e.query for e in examples], k=30)
  mined = mining.mine(examples, rankings, pos, mining.MiningConfig(range_min=1, range_max=30, num_negatives=4))
  assert all(len(m.negative_ids) == 4 for m in mined)
  for m in mined:
    assert not set(m.negative_ids) & set(m.positive_ids)
  # BM25 finds the entity's document first for most queries; window from rank 1 keeps it out
  first = [r[0][0] for r in rankings]
  assert np.mean([f in e.positive_ids for f, e in zip(first, examples)]) > 0.3


@pytest.mark.slow
def test_mine_then_train_rounds_from_the_cli(tmp_path):
  """Round 1 trains, `mine` uses its towers (dense, through the index) to write negatives that exclude every
  positive, round 2 warm-starts from round 1 and trains on them."""
  import json

  from helpers import ROOT
  from scalingnote_jax.cli import main
  from scalingnote_jax.data.beir import load_train_jsonl, write_beir

  data = synthetic.generate(96, queries_per_doc=2, seed=7)
  beir_dir = write_beir(data, str(tmp_path / "beir"), "train")
  common = ["--config.data.source=beir", f"--config.data.path={beir_dir}", "--config.data.val_split=",
            "--config.batch_size=16", "--config.log_every=1", "--config.checkpoint.every=100"]
  tiny = f"{ROOT}/configs/tiny.py:smoke"
  assert main(["train", "--config", tiny, "--workdir", str(tmp_path / "r1"), "--config.num_steps=3", *common]) == 0
  out = str(tmp_path / "negatives.jsonl")
  assert main(["mine", "--checkpoint", str(tmp_path / "r1"), "--data", beir_dir, "--out", out, "--backend", "exact",
               "--range-min", "1", "--range-max", "20", "--num-negatives", "3"]) == 0
  mined = load_train_jsonl(out, data.corpus)
  assert len(mined) == len(data.queries)
  assert all(len(m.negative_ids) == 3 and not set(m.negative_ids) & set(m.positive_ids) for m in mined)
  assert main(["train", "--config", tiny, "--workdir", str(tmp_path / "r2"), "--config.num_steps=2",
               f"--config.model.init={tmp_path / 'r1'}", f"--config.data.train_jsonl={out}",
               "--config.data.n_neg=2", *common]) == 0
  with open(tmp_path / "r2" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
