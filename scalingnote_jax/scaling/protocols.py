"""`scalingnote fit-scaling CURVES.jsonl --protocol data|model|joint`: the reranker paper's three protocols
(arXiv 2603.04816), on evaluations along training, where D is the training step. The input has one evaluation
per line: N, step and the metrics, e.g. a sweep's curves.jsonl.

  data   per model size, y = a + b step^c fitted on all but its last 5 evaluations and forecasting those 5
  model  y = a + b N^c fitted on the last 10 evaluations of each small size (10 points a size), forecasting each
         large size's mean over its last 10 (the paper's "actual": mean ± std)
  joint  y = a + b N^c + d step^e (fit.py's nd) fitted on every (N, step) of the small sizes, forecasting every
         (N, step) of the large ones: R² on them, and each large size's bias (measured - predicted, > 0 where the
         law underestimates)

The large sizes are the `large` largest N (default 1; the paper fits 17M-150M and forecasts 400M and 1B: 2).
a + b x^c has the paper's bounds: c in [-5, 0]; a rising metric: a in [0, 1], b <= 0; a falling loss: a >= 0,
b >= 0. Evaluations at step 0 are left out: a power of the step has no value there.
"""

from __future__ import annotations

import numpy as np

from scalingnote_jax.scaling import fit

PROTOCOLS = ("data", "model", "joint")
DATA_HELD_OUT = 5  # the last evaluations of each size, forecast by the data protocol
MODEL_LAST = 10  # the evaluations of each size the model protocol fits (small sizes) or averages (large ones)
MIN_SIZES = 3  # the model and joint laws' N term has 2 parameters and shares the offset: 3 sizes to pin it


def read_curves(path: str, y: str, where: dict[str, float] | None = None) -> dict[float, tuple[np.ndarray, ...]]:
  """{N: (steps_S, y_S)}, sizes ascending, each by step, step > 0. A size with two evaluations at one step (runs
  of several data sizes) is refused: one curve per size."""
  cols = fit.read_results(path, ["N", "step", y], where)
  if np.any(cols["N"] <= 0) or np.any(cols["step"] < 0):
    raise ValueError(f"{path}: N must be > 0 and step >= 0 in every evaluation")
  curves = {}
  for n in np.unique(cols["N"]):
    sel = (cols["N"] == n) & (cols["step"] > 0)
    order = np.argsort(cols["step"][sel], kind="stable")
    steps_S, y_S = cols["step"][sel][order], cols[y][sel][order]
    if len(np.unique(steps_S)) < len(steps_S):
      raise ValueError(f"{path}: N={n:g} has several evaluations at one step (runs of several data sizes?): keep one "
                       "run per size, e.g. --where D=VALUE")
    curves[float(n)] = (steps_S, y_S)
  return curves


def _need(curves: dict, count: int, protocol: str, why: str) -> None:
  for n, (steps_S, _) in curves.items():
    if len(steps_S) < count:
      raise ValueError(f"N={n:g}: {len(steps_S)} evaluations after step 0; the {protocol} protocol {why}, so it "
                       f"needs {count} or more (evaluate more often: eval.every)")


def _split(curves: dict, large: int) -> tuple[list[float], list[float]]:
  """(small sizes, large sizes): the `large` largest N are forecast from the others."""
  sizes = sorted(curves)
  if large < 1 or len(sizes) - large < MIN_SIZES:
    raise ValueError(f"{len(sizes)} model sizes, {large} of them large: the law needs {MIN_SIZES} or more small "
                     "sizes to fit")
  return sizes[:-large], sizes[-large:]


def _summary(result: dict) -> dict:
  """A fit's result without what the protocol reports once (law, direction, bounds) or keeps for plots."""
  return {k: v for k, v in result.items() if k not in ("law", "direction", "bounds", "_fit")}


def data_protocol(curves: dict, y: str, direction: str, bootstrap: int, plot_path: str | None) -> dict:
  """Per size: y = a + b step^c on all but the last DATA_HELD_OUT evaluations, forecasting them."""
  _need(curves, DATA_HELD_OUT + 4, "data", f"holds out the last {DATA_HELD_OUT} and fits 3 parameters on the rest")
  sizes, fits = [], []
  for n, (steps_S, y_S) in curves.items():
    held_out_S = np.arange(len(steps_S)) >= len(steps_S) - DATA_HELD_OUT
    r = fit.fit("power", steps_S[None], y_S, bootstrap=bootstrap, holdout=held_out_S, direction=direction,
                paper_bounds=True)
    fits.append((n, r, steps_S, y_S, held_out_S))
    sizes.append({"N": n, **_summary(r), "mae": float(np.mean([f["abs_error"] for f in r["forecast"]]))})
  if plot_path:
    fig, axes = fit.figure(len(fits))
    for ax, (n, r, steps_S, y_S, held_out_S) in zip(axes, fits):
      fit.draw(ax, r, steps_S[None], y_S, held_out_S, "step", y)
      ax.set_title(f"N={n:.3g}")
    fit.save(fig, plot_path)
  return {"law": "power", "bounds": "paper", "sizes": sizes, "mae": float(np.mean([s["mae"] for s in sizes]))}


def model_protocol(curves: dict, y: str, direction: str, bootstrap: int, plot_path: str | None, large: int) -> dict:
  """y = a + b N^c on the last MODEL_LAST evaluations of each small size; each large size's mean over its last
  MODEL_LAST forecast."""
  small, big = _split(curves, large)
  _need(curves, MODEL_LAST, "model", f"fits (and averages) each size's last {MODEL_LAST}")
  last = {n: curves[n][1][-MODEL_LAST:] for n in curves}
  n_P = np.array([n for n in small for _ in range(MODEL_LAST)] + big)
  y_P = np.concatenate([last[n] for n in small] + [[last[n].mean()] for n in big])
  held_out_P = n_P >= big[0]
  r = fit.fit("power", n_P[None], y_P, bootstrap=bootstrap, holdout=held_out_P, direction=direction,
              paper_bounds=True)
  for row, n in zip(r["forecast"], big):
    row["measured_std"] = float(np.std(last[n], ddof=1))  # measured: the mean of its last MODEL_LAST
  if plot_path:
    fit.plot(r, n_P[None], y_P, held_out_P, "N (non-embedding parameters)", y, plot_path)
  return {"large": big, **r}


def joint_protocol(curves: dict, y: str, direction: str, bootstrap: int, plot_path: str | None, large: int) -> dict:
  """y = a + b N^c + d step^e on every (N, step) of the small sizes; every (N, step) of the large ones forecast."""
  _, big = _split(curves, large)
  x_2xP = np.concatenate([np.stack([np.full(len(curves[n][0]), n), curves[n][0]]) for n in curves], axis=1)
  y_P = np.concatenate([curves[n][1] for n in curves])
  held_out_P = x_2xP[0] >= big[0]
  r = fit.fit("nd", x_2xP, y_P, bootstrap=bootstrap, holdout=held_out_P, direction=direction)
  measured_F = np.array([f["measured"] for f in r["forecast"]])
  error_F = measured_F - np.array([f["predicted"] for f in r["forecast"]])  # > 0: the law underestimates
  n_F = x_2xP[0, held_out_P]
  test = {"r2": fit.r_squared(measured_F, measured_F - error_F), "mae": float(np.mean(np.abs(error_F))),
          "by_size": [{"N": n, "points": int(np.sum(n_F == n)), "bias": float(np.mean(error_F[n_F == n])),
                       "mae": float(np.mean(np.abs(error_F[n_F == n])))} for n in big]}
  if plot_path:
    fit.plot(r, x_2xP, y_P, held_out_P, "step", y, plot_path, along=1, names=("N", "step"))
  return {"large": big, **r, "test": test}


def run(path: str, *, protocol: str, y: str, large: int = 1, bootstrap: int = 200, plot_path: str | None = None,
        where: dict[str, float] | None = None, direction: str = "auto") -> dict:
  """`scalingnote fit-scaling --protocol`: one of the paper's protocols on a curves file (see the module's doc)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
  if direction not in ("auto", "rising", "falling"):
    raise ValueError(f"direction {direction!r}: expected auto, rising or falling")
  curves = read_curves(path, y, where)
  if direction == "auto":
    x_2xP = np.concatenate([np.stack([np.full(len(s), n), s]) for n, (s, _) in curves.items()], axis=1)
    direction = fit.direction_of(y, x_2xP, np.concatenate([v for _, v in curves.values()]))
  if protocol == "data":
    result = data_protocol(curves, y, direction, bootstrap, plot_path)
  elif protocol == "model":
    result = model_protocol(curves, y, direction, bootstrap, plot_path, large)
  else:
    result = joint_protocol(curves, y, direction, bootstrap, plot_path, large)
  x = ["N", "step"] if protocol == "joint" else ["step"] if protocol == "data" else ["N"]
  out = {"results": path, "protocol": protocol, "x": x, "y": y, "where": where or {}, "direction": direction,
         **{k: v for k, v in result.items() if k != "_fit"}}
  if plot_path:
    out["plot"] = plot_path
  return out
