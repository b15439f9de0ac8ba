"""Scaling-law fits on data whose true law is known: the fit recovers the exponents (falling losses, rising
metrics, the additive and the coupled joint laws), the forecast of the held-out largest run lands near it,
prediction intervals cover new runs at their nominal rate, and bad results files are named."""

import json

import numpy as np
import pytest

from scalingnote_jax.scaling import fit


def noisy(y, rng, rel=0.005):
  return y * (1 + rel * rng.standard_normal(len(y)))


@pytest.mark.parametrize("law", ["n", "d"])
def test_single_variable_law_is_recovered_and_forecasts_the_largest_run(law):
  rng = np.random.default_rng(0)
  x = np.geomspace(1e5, 3e8, 8)
  a, alpha, delta = 4e4, 0.35, 0.8  # L = (A / x)^alpha + delta
  y = noisy((a / x) ** alpha + delta, rng)
  holdout = x == x.max()
  r = fit.fit(law, x[None], y, holdout=holdout, bootstrap=100)
  names = ("A", "alpha", "delta") if law == "n" else ("B", "beta", "delta")
  got = dict(zip(("A", "alpha", "delta"), (r["params"][k] for k in names)))
  assert got["alpha"] == pytest.approx(alpha, abs=0.05)
  assert got["delta"] == pytest.approx(delta, abs=0.05)
  assert r["r2"] > 0.99 and r["num_points"] == 7
  lo, hi = r["params_ci95"][names[1]]
  assert lo <= alpha <= hi
  (forecast,) = r["forecast"]
  true = (a / x.max()) ** alpha + delta
  assert forecast["rel_error"] < 0.02 and abs(forecast["predicted"] - true) < 0.02
  lo, hi = forecast["predicted_pi95"]  # the interval for a new run
  assert lo <= forecast["measured"] <= hi


def test_data_without_a_trend_gets_no_interval():
  """The SciFact BCE reranker ladder: flat within noise. Most resamples cannot be fitted, and the few that can
  sit next to the point fit, so an interval from them would look precise and mean nothing."""
  x = np.array([1775617.0, 3550081.0, 5324545.0, 7099009.0])
  y = np.array([0.431, 0.436, 0.384, 0.431])
  r = fit.fit("power", x[None], y, bootstrap=100)
  assert r["bootstrap_fits"] < 50 and "params_ci95" not in r and "no intervals" in r["warning"]
  good = fit.fit("power", x[None], 0.75 - 5.0 * x ** -0.25, bootstrap=100)  # a clean trend keeps its interval
  assert good["bootstrap_fits"] >= 50 and "params_ci95" in good and "warning" not in good


def test_joint_law_recovers_both_exponents():
  rng = np.random.default_rng(1)
  n, d = np.meshgrid(np.geomspace(1e5, 1e8, 5), np.geomspace(1e3, 1e6, 4))
  n, d = n.ravel(), d.ravel()
  y = noisy(0.5 + 30 * n ** -0.3 + 8 * d ** -0.4, rng, rel=0.002)
  r = fit.fit("nd", np.stack([n, d]), y, bootstrap=0)
  assert r["params"]["c"] == pytest.approx(-0.3, abs=0.05)
  assert r["params"]["e"] == pytest.approx(-0.4, abs=0.05)
  assert r["params"]["a"] == pytest.approx(0.5, abs=0.05) and r["r2"] > 0.99


def test_power_law_for_a_saturating_metric():
  x = np.geomspace(1e5, 1e8, 7)
  y = 0.75 - 5.0 * x ** -0.25  # nDCG@10 rising towards 0.75
  r = fit.fit("power", x[None], y, bootstrap=0)
  assert r["params"]["c"] == pytest.approx(-0.25, abs=0.02) and r["params"]["a"] == pytest.approx(0.75, abs=0.01)


def test_command_reads_a_results_file_writes_a_plot_and_names_bad_lines(tmp_path, capsys):
  from scalingnote_jax.cli import main

  rng = np.random.default_rng(2)
  ns = np.geomspace(1e5, 1e8, 6)
  rows = [{"N": float(n), "D": 1000, "contrastive_entropy": float(v)}
          for n, v in zip(ns, noisy((2e4 / ns) ** 0.3 + 0.6, rng))]
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in rows))
  plot = tmp_path / "fit.png"
  assert main(["fit-scaling", str(results), "--law", "n", "--y", "contrastive_entropy", "--plot", str(plot),
               "--bootstrap", "20"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["params"]["alpha"] == pytest.approx(0.3, abs=0.08) and len(out["forecast"]) == 1
  assert plot.read_bytes()[:4] == b"\x89PNG"
  results.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"N": 1e9, "D": 10, "contrastive_entropy": 9.0}]))
  assert main(["fit-scaling", str(results), "--law", "n", "--y", "contrastive_entropy", "--where", "D=1000",
               "--bootstrap", "0"]) == 0  # the D=10 run is not fitted: without --where it would be the held-out one
  assert json.loads(capsys.readouterr().out)["forecast"][0]["x"] == [ns[-1]]
  results.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"N": 5, "contrastive_entropy": "high"}) + "\n")
  assert main(["fit-scaling", str(results), "--law", "n", "--y", "contrastive_entropy"]) == 1
  assert "results.jsonl:2: field 'contrastive_entropy' must be a finite number" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The sweep: N counted without embeddings, nested data fractions, results a fit reads, resumable.

def test_non_embedding_parameters_are_counted_by_hand():
  from scalingnote_jax.config import load_config
  from scalingnote_jax.scaling.sweep import non_embedding_params

  cfg = load_config("configs/tiny.py")  # 2 layers, width 64, 4 heads of 16, 2 KV heads, MLP 128
  e, kv, f = 64, 2 * 16, 128
  per_layer = e * e + 2 * e * kv + e * e + 3 * e * f + 2 * e  # q, k, v, o, gate/up/down, two norms
  assert non_embedding_params(cfg) == 2 * per_layer + e  # + the final norm; the 49152 x 64 table is not N


def test_a_ladder_of_truncated_checkpoints_counts_only_the_layers_it_keeps():
  from scalingnote_jax.config import load_config
  from scalingnote_jax.scaling.sweep import non_embedding_params, run_config

  cfg = load_config("configs/sweep_scifact.py")  # all-MiniLM-L6-v2's first 1..6 layers, configs only (no weights)
  n = {name: non_embedding_params(run_config(cfg, size.to_dict(), 1.0)) for name, size in cfg.sizes.items()}
  e, f = 384, 1536
  per_layer = 4 * (e * e + e) + (e * f + f) + (f * e + e) + 2 * 2 * e  # q, k, v, o; MLP in and out; two LayerNorms
  assert n["L2"] - n["L1"] == per_layer and n["L6"] - n["L4"] == 2 * per_layer
  rerankers = load_config("configs/sweep_rerank_scifact.py:bce")  # the same cut plus a score head
  n_r = {name: non_embedding_params(run_config(rerankers, size.to_dict(), 1.0), "reranker")
         for name, size in rerankers.sizes.items()}
  assert n_r["L2"] - n_r["L1"] == per_layer and n_r["L1"] == n["L1"] + e + 1  # + the head's weights and bias


def test_data_fractions_are_nested():
  from scalingnote_jax.data.training import subsample

  items = list(range(100))
  quarter, half = subsample(items, 0.25, seed=3), subsample(items, 0.5, seed=3)
  assert len(quarter) == 25 and len(half) == 50 and set(quarter) < set(half)
  with pytest.raises(ValueError, match="train_fraction=0"):
    subsample(items, 0, seed=3)


@pytest.mark.slow
def test_sweep_writes_results_that_fit_reads_and_resumes(tmp_path):
  from helpers import ROOT, run_cli

  from scalingnote_jax.config import load_config
  from scalingnote_jax.scaling import sweep

  bad = load_config(f"{ROOT}/configs/sweep_tiny.py:smoke")
  bad.full_data_only = ("h99",)
  with pytest.raises(ValueError, match=r"full_data_only: \['h99'\] not among sizes \['h16', 'h8'\]"):
    sweep.run(bad, str(tmp_path / "bad"))
  config = f"{ROOT}/configs/sweep_tiny.py:smoke"
  workdir = tmp_path / "sweep"
  every = "--config.base.eval.every=2"  # two evaluations along each run's 4 steps: its curve
  first = run_cli("sweep", "--config", config, every, "--workdir", str(workdir)).stdout
  rows = [json.loads(line) for line in (workdir / "results.jsonl").open()]
  assert [r["run"] for r in rows] == ["h8_D0.5", "h8_D1", "h16_D1"]  # h16: full data only
  by = {r["run"]: r for r in rows}
  assert by["h16_D1"]["N"] > by["h8_D1"]["N"] and by["h8_D1"]["N"] == by["h8_D0.5"]["N"]
  assert by["h8_D1"]["D"] == 2 * by["h8_D0.5"]["D"]
  assert by["h8_D1"]["compute"] == 6 * by["h8_D1"]["N"] * by["h8_D1"]["tokens"]
  assert all(np.isfinite(r["contrastive_entropy"]) and 0 <= r["ndcg_at_10"] <= 1 for r in rows)
  assert first.count(": running") == 3
  curves = [json.loads(line) for line in (workdir / "curves.jsonl").open()]
  assert [(c["run"], c["step"]) for c in curves] == [(r["run"], s) for r in rows for s in (2, 4)]
  assert all(c["examples"] == c["step"] * bad.base.batch_size and c["N"] == by[c["run"]]["N"] for c in curves)
  for c in curves[1::2]:  # the last evaluation is the run's final one
    assert c == {**{k: v for k, v in by[c["run"]].items() if k != "steps"}, "step": 4, "examples": c["examples"]}
  again = run_cli("sweep", "--config", config, every, "--workdir", str(workdir)).stdout
  assert again.count("skipped") == 3 and ": running" not in again
  assert [json.loads(line) for line in (workdir / "results.jsonl").open()] == rows
  assert [json.loads(line) for line in (workdir / "curves.jsonl").open()] == curves  # each run's curve once
  cols = fit.read_results(str(workdir / "results.jsonl"), ["N", "D", "compute", "contrastive_entropy", "ndcg_at_10"])
  assert len(cols["N"]) == 3  # what `scalingnote fit-scaling` reads
  assert len(fit.read_results(str(workdir / "curves.jsonl"), ["N", "step", "ndcg_at_10"])["N"]) == 6  # --protocol


# ---------------------------------------------------------------------------------------------------------
# Rising metrics, the coupled law, prediction intervals (the papers' definitions).

def test_joint_law_of_a_rising_metric_is_fitted_with_the_reranker_papers_bounds():
  """nDCG rising to 0.7 in N and D: the nd law fits it (b, d <= 0), where the loss bounds gave R² -0.005."""
  rng = np.random.default_rng(3)
  n, d = np.meshgrid(np.geomspace(1e6, 1e8, 5), np.geomspace(1e2, 1e4, 4))
  n, d = n.ravel(), d.ravel()
  y = 0.7 - 4.0 * n ** -0.25 - 1.5 * d ** -0.5 + 0.002 * rng.standard_normal(len(n))
  r = fit.fit("nd", np.stack([n, d]), y, bootstrap=0)
  assert r["direction"] == "rising" and r["r2"] > 0.99
  p = r["params"]
  assert p["a"] == pytest.approx(0.7, abs=0.02) and p["b"] < 0 and p["d"] < 0
  assert p["c"] == pytest.approx(-0.25, abs=0.06) and p["e"] == pytest.approx(-0.5, abs=0.1)
  assert fit.direction_of("ndcg_at_10", np.stack([n, d]), -y) == "rising"  # the name decides where it says
  assert fit.direction_of("contrastive_entropy", np.stack([n, d]), y) == "falling"
  with pytest.raises(ValueError, match="law 'n' is a law of a falling loss; this field rises"):
    fit.fit("n", n[None], y, bootstrap=0)  # n, d and coupled refuse a rising field instead of a silent misfit


def test_coupled_law_is_recovered_and_forecasts_a_larger_model():
  """Fang et al.'s L(N, D) = [(A/N)^(alpha/beta) + B/D]^beta + delta on its own data: the exponents come back
  and the held-out largest model is forecast."""
  rng = np.random.default_rng(4)
  n, d = np.meshgrid(np.geomspace(1e6, 3e8, 6), np.geomspace(1e3, 1e6, 4))
  n, d = n.ravel(), d.ravel()
  law = lambda n, d: ((5e5 / n) ** (0.4 / 0.6) + 2e3 / d) ** 0.6 + 0.3  # noqa: E731
  y = noisy(law(n, d), rng, rel=0.003)
  r = fit.fit("coupled", np.stack([n, d]), y, holdout=n == n.max(), bootstrap=0)
  p = r["params"]
  assert r["direction"] == "falling" and r["r2"] > 0.99
  assert p["alpha"] == pytest.approx(0.4, abs=0.08) and p["beta"] == pytest.approx(0.6, abs=0.12)
  assert p["delta"] == pytest.approx(0.3, abs=0.05)
  assert max(f["rel_error"] for f in r["forecast"]) < 0.03


@pytest.mark.slow
def test_prediction_intervals_cover_new_runs_as_often_as_they_say():
  """Over replicas of data drawn from the exact n law with 3% scatter (15 fitted runs), the 95% prediction
  interval holds the held-out run about 95% of the time; the curve's confidence interval, narrower, holds it
  far less often (it is not an interval for a new run)."""
  x = np.geomspace(1e5, 3e8, 16)
  holdout = x == x.max()
  inside_pi = inside_ci = 0
  replicas = 20
  for seed in range(replicas):
    y = noisy((4e4 / x) ** 0.35 + 0.8, np.random.default_rng(100 + seed), rel=0.03)
    (f,) = fit.fit("n", x[None], y, holdout=holdout, bootstrap=40, seed=seed)["forecast"]
    inside_pi += f["predicted_pi95"][0] <= f["measured"] <= f["predicted_pi95"][1]
    inside_ci += f["predicted_ci95"][0] <= f["measured"] <= f["predicted_ci95"][1]
  assert inside_pi >= 0.85 * replicas, (inside_pi, inside_ci)  # measured: 19 of 20
  assert inside_ci <= inside_pi - 0.15 * replicas, (inside_pi, inside_ci)  # measured: 13 of 20


# ---------------------------------------------------------------------------------------------------------
# The reranker paper's protocols on evaluations along training (D = the step), from curves drawn from known
# laws. Points a protocol must not fit carry a known offset from the law (a late-training gain the law does not
# know): fitted correctly, the law is recovered and each forecast misses by exactly that offset; had the
# protocol fitted those points, both would move.

STEPS = np.arange(100.0, 2100.0, 100.0)  # 20 evaluations a run, every 100 steps
FIELDS = {"rising": "ndcg_at_10", "falling": "loss"}


def curves(ns, law, rng, offset=lambda n, step: 0.0, noise=0.0005) -> list[dict]:
  """One row per (N, step) as a sweep's curves.jsonl: law(N, step) + offset(N, step) + noise."""
  return [{"N": float(n), "step": float(s), "value": float(law(n, s) + offset(n, s) + noise * rng.standard_normal())}
          for n in ns for s in STEPS]


def write_curves(path, rows, field):
  path.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "value"}, field: r["value"]}) + "\n"
                          for r in rows))
  return str(path)


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_data_protocol_fits_each_size_on_all_but_its_last_5_evaluations(tmp_path, direction):
  """y = a_N + b step^c per size; the last 5 evaluations sit `gain` beyond the law."""
  from scalingnote_jax.scaling import protocols

  floor = {1e6: 0.4, 1e7: 0.45, 1e8: 0.5} if direction == "rising" else {1e6: 1.2, 1e7: 1.0, 1e8: 0.8}
  b, c, gain = (-2.0, -0.5, 0.01) if direction == "rising" else (20.0, -0.6, -0.02)
  rows = curves(floor, lambda n, s: floor[n] + b * s ** c, np.random.default_rng(5),
                offset=lambda n, s: gain * (s > STEPS[-6]))
  path = write_curves(tmp_path / "curves.jsonl", rows, FIELDS[direction])
  r = protocols.run(path, protocol="data", y=FIELDS[direction], bootstrap=0)
  assert r["direction"] == direction and [s["N"] for s in r["sizes"]] == sorted(floor)
  for size in r["sizes"]:
    assert size["num_points"] == 15 and [f["x"] for f in size["forecast"]] == [[s] for s in STEPS[-5:]]
    assert size["params"]["a"] == pytest.approx(floor[size["N"]], abs=0.01)
    assert size["params"]["c"] == pytest.approx(c, abs=0.05) and size["r2"] > 0.99
    for f in size["forecast"]:  # the law's value at the held-out steps: off by the gain it could not know
      assert f["measured"] - f["predicted"] == pytest.approx(gain, abs=0.003)


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_model_protocol_fits_the_last_10_evaluations_of_the_small_sizes_and_forecasts_the_large(tmp_path, direction):
  """y = f(N) + g(step), g = 0 from step 1000 on (the last 10 evaluations): the law of f is recovered from the 4
  small sizes, and the 2 large sizes' mean over their last 10 (`gain` beyond f) is forecast (the paper: 17M-150M
  -> 400M, 1B)."""
  from scalingnote_jax.scaling import protocols

  ns = np.geomspace(1e6, 3e8, 6)
  a, b, c, early, gain = (0.5, -8.0, -0.3, -0.3, 0.01) if direction == "rising" else (0.8, 50.0, -0.3, 0.5, -0.02)
  f = lambda n: a + b * n ** c  # noqa: E731
  rows = curves(ns, lambda n, s: f(n) + early * max(0.0, 1 - s / 1000), np.random.default_rng(6),
                offset=lambda n, s: gain * (n >= ns[-2]))
  path = write_curves(tmp_path / "curves.jsonl", rows, FIELDS[direction])
  r = protocols.run(path, protocol="model", y=FIELDS[direction], large=2, bootstrap=0)
  assert r["direction"] == direction and r["num_points"] == 40 and r["large"] == ns[-2:].tolist()
  assert r["params"]["a"] == pytest.approx(a, abs=0.01) and r["params"]["c"] == pytest.approx(c, abs=0.03)
  for forecast, n in zip(r["forecast"], ns[-2:], strict=True):
    assert forecast["x"] == [n] and forecast["measured"] == pytest.approx(f(n) + gain, abs=0.0005)
    assert forecast["predicted"] == pytest.approx(f(n), abs=0.002) and forecast["measured_std"] < 0.001


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_joint_protocol_fits_every_step_of_the_small_sizes_and_tests_the_large(tmp_path, direction):
  """y = a + b N^c + d step^e over 5 sizes; the largest runs `gain` beyond the law at every step (larger models
  beat the forecast, as the paper found): its bias is that gain."""
  from scalingnote_jax.scaling import protocols

  ns = np.geomspace(1e6, 1e8, 5)
  p, gain = ((0.7, -4.0, -0.25, -1.5, -0.5), 0.01) if direction == "rising" else ((0.5, 30.0, -0.3, 8.0, -0.4), -0.02)
  rows = curves(ns, lambda n, s: p[0] + p[1] * n ** p[2] + p[3] * s ** p[4], np.random.default_rng(7),
                offset=lambda n, s: gain * (n == ns[-1]))
  path = write_curves(tmp_path / "curves.jsonl", rows, FIELDS[direction])
  r = protocols.run(path, protocol="joint", y=FIELDS[direction], bootstrap=0)
  assert r["direction"] == direction and r["num_points"] == 80 and r["large"] == [ns[-1]]
  assert r["params"]["c"] == pytest.approx(p[2], abs=0.03) and r["params"]["e"] == pytest.approx(p[4], abs=0.03)
  (size,) = r["test"]["by_size"]
  assert size["N"] == ns[-1] and size["points"] == 20 and size["bias"] == pytest.approx(gain, abs=0.002)


def test_command_runs_the_protocols_on_a_sweeps_curves_file(tmp_path, capsys):
  """As `scalingnote sweep` writes it: several fields, an evaluation at step 0 (left out), and a second data size
  of the smallest model (refused until --where picks one run per size)."""
  from scalingnote_jax.cli import main

  ns = np.geomspace(1e6, 1e8, 5)
  law = lambda n, s: 0.7 - 4.0 * n ** -0.25 - 1.5 * s ** -0.5  # noqa: E731
  rows = [{"run": f"N{r['N']:g}_D1", "N": r["N"], "D": 1000, "step": r["step"], "examples": 8 * r["step"],
           "ndcg_at_10": r["value"]} for r in curves(ns, law, np.random.default_rng(8))]
  rows += [{"run": "N1e+06_D1", "N": ns[0], "D": 1000, "step": 0, "ndcg_at_10": 0.01},
           {"run": "N1e+06_D0.5", "N": ns[0], "D": 500, "step": 100, "ndcg_at_10": 0.3},
           {"run": "N1e+06_D0.5", "N": ns[0], "D": 500, "step": 200, "ndcg_at_10": 0.35}]
  path = tmp_path / "curves.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  fit_args = ["fit-scaling", str(path), "--y", "ndcg_at_10", "--bootstrap", "10"]
  assert main(fit_args + ["--protocol", "joint"]) == 1
  assert "N=1e+06 has several evaluations at one step" in capsys.readouterr().err
  for protocol, extra in (("data", []), ("model", ["--large", "2"]), ("joint", [])):
    plot = tmp_path / f"{protocol}.png"
    assert main(fit_args + ["--protocol", protocol, "--where", "D=1000", "--plot", str(plot), *extra]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == protocol and out["direction"] == "rising" and plot.read_bytes()[:4] == b"\x89PNG"
    if protocol == "data":
      assert [s["num_points"] for s in out["sizes"]] == [15] * 5 and "predicted_pi95" in out["sizes"][0]["forecast"][0]
    else:
      assert out["large"] == ns[-len(out["large"]):].tolist() and len(out["large"]) == (2 if protocol == "model" else 1)
  with pytest.raises(SystemExit):  # a protocol fixes its law
    main(fit_args + ["--protocol", "model", "--law", "power"])
  assert "--protocol model fixes its law, axes and held-out points: drop --law" in capsys.readouterr().err


def test_sweep_curve_rows_are_the_validation_evaluations_along_a_run(tmp_path):
  """One row per `val/` record of a run's metrics.jsonl (not its train or first-stage records), sized from the run's
  results row."""
  from scalingnote_jax.scaling.sweep import curve_rows

  log = [{"step": 0, "first_stage/ndcg_at_10": 0.6}, {"step": 0, "val/ndcg_at_10": 0.1},
         {"step": 5, "train/loss": 1.2}, {"step": 10, "val/ndcg_at_10": 0.3, "val/map": 0.2},
         {"step": 10, "train/loss": 1.0}, {"step": 20, "val/ndcg_at_10": 0.4, "val/map": 0.3}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
  final = {"run": "L1_D1", "N": 1000, "D": 50, "tokens": 20 * 8 * 64, "steps": 20, "ndcg_at_10": 0.4, "map": 0.3}
  rows = curve_rows(str(tmp_path), final, batch_size=8)
  assert [r["step"] for r in rows] == [0, 10, 20] and [r["ndcg_at_10"] for r in rows] == [0.1, 0.3, 0.4]
  assert rows[1] == {"run": "L1_D1", "N": 1000, "D": 50, "step": 10, "examples": 80, "tokens": 10 * 8 * 64,
                     "compute": 6 * 1000 * 10 * 8 * 64, "ndcg_at_10": 0.3, "map": 0.2}
  assert {k: rows[-1][k] for k in ("ndcg_at_10", "map")} == {"ndcg_at_10": 0.4, "map": 0.3}  # = the final row's
