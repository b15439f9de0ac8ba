"""`scalingnote fit-scaling RESULTS.jsonl`: power laws fitted to sweep results, with bootstrap confidence
intervals, R², and a forecast check (fit without the largest run, predict it).

Laws (x = N, non-embedding parameters, or D, training pairs or tokens):
  n        L(N)    = (A / N)^alpha + delta                        ScalingNote's model-size law (contrastive entropy)
  d        L(D)    = (B / D)^beta + delta                         its data-size law
  nd       y(N, D) = a + b * N^c + d * D^e                        the additive joint law (the reranker paper's)
  coupled  L(N, D) = [(A / N)^(alpha / beta) + B / D]^beta + delta  Fang et al.'s joint law (a loss)
  power    y       = a + b * x^c                                  downstream metrics against N or D (unbounded;
                                                                  the reranker paper's bounds in protocols.py)

A loss falls with N and D, a metric (nDCG, MAP, Recall) rises. n, d and coupled are laws of a falling loss and
refuse a rising field. nd takes either, with the reranker paper's bounds: for a rising metric a in [0, 1],
b, d <= 0; for a falling loss a >= 0, b, d >= 0; c, e in [-5, 0] both ways. The direction comes from the
field's name where it says (entropy, loss / ndcg, recall, map, mrr, auc, accuracy), else from the data's trend.
Losses are fitted on log(y), as they span orders of magnitude; metrics on y. Fits use scipy's `curve_fit`
(trust-region, bounded) started where the law is easy: for fixed exponents (or a fixed delta) each law is
linear, so the best of a grid of linear least-squares fits is the start. Scale parameters are fitted in log
space (A, B span orders of magnitude).

Intervals (bootstrap over the fitted runs): `params_ci95`, and for each forecast `predicted_ci95`, the
confidence interval of the fitted curve at that point, and `predicted_pi95`, the prediction interval of a new
run there (the curve's uncertainty plus the scatter of runs around it, from the fit's residuals). A held-out
run is to be judged against the prediction interval.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from scipy.optimize import curve_fit


@dataclasses.dataclass(frozen=True)
class Law:
  name: str
  params: tuple[str, ...]  # as reported
  fn: object  # fn(x_KxN, *fit_params) -> y_N, with fit_params in the fitting parameterisation
  starts: object  # starts(x_KxN, y_N) -> list of initial fit_params
  bounds: object  # bounds(x_KxN, y_N) -> (lower, upper)
  report: object  # report(fit_params) -> reported params
  log: bool  # least squares on log(y): a loss spans orders of magnitude and is positive


def _saturating(x, log_a, alpha, delta):
  return np.exp(alpha * (log_a - np.log(x[0]))) + delta


def _sat_starts(x, y):
  """For a fixed delta the law is a line in log space, log(y - delta) = alpha log A - alpha log N: the best
  line over a grid of delta starts the fit (one cheap start instead of many curve_fit runs)."""
  lx, lo, best, best_sse = np.log(x[0]), float(np.min(y)), None, np.inf
  for delta in lo * np.linspace(0.0, 0.98, 50):
    slope, intercept = np.polyfit(lx, np.log(y - delta), 1)
    if slope >= 0:
      continue
    p = (intercept / -slope, -slope, delta)
    sse = float(np.sum((_saturating(x, *p) - y) ** 2))
    if sse < best_sse:
      best, best_sse = p, sse
  return ([best] if best else []) + [(float(np.log(np.median(x[0]))), 0.5, 0.5 * lo)]


def _sat_bounds(x, y):
  return ([-50.0, 1e-3, 0.0], [100.0, 5.0, float(np.min(y))])


def _joint(x, a, b, c, d, e):
  return a + b * x[0] ** c + d * x[1] ** e


def _linear_start(columns, y):
  """(coefficients, SSE) of the least-squares fit of y on `columns` (the parameters a law is linear in)."""
  coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)
  return coef, float(np.sum((np.stack(columns, axis=1) @ coef - y) ** 2))


EXPONENTS = np.concatenate([-np.geomspace(2.0, 0.02, 40), np.geomspace(0.02, 2.0, 40)])


def _joint_starts(x, y):
  """For fixed exponents (c, e) the joint law is linear in (a, b, d): the best pair of a grid starts the fit."""
  best, best_sse = None, np.inf
  for c in EXPONENTS[EXPONENTS < 0][::2]:
    for e in EXPONENTS[EXPONENTS < 0][::2]:
      (a, b, d), sse = _linear_start([np.ones_like(y), x[0] ** c, x[1] ** e], y)
      if 0 <= a <= np.min(y) and b >= 0 and d >= 0 and sse < best_sse:
        best, best_sse = (a, b, c, d, e), sse
  return [best] if best else [(float(np.min(y)), 1.0, -0.3, 1.0, -0.3)]


def _joint_starts_rising(x, y):
  """As _joint_starts, for a rising metric: a in [0, 1], b <= 0, d <= 0."""
  best, best_sse = None, np.inf
  for c in EXPONENTS[EXPONENTS < 0][::2]:
    for e in EXPONENTS[EXPONENTS < 0][::2]:
      (a, b, d), sse = _linear_start([np.ones_like(y), x[0] ** c, x[1] ** e], y)
      if 0 <= a <= 1 and b <= 0 and d <= 0 and sse < best_sse:
        best, best_sse = (a, b, c, d, e), sse
  return [best] if best else [(float(min(np.max(y), 1.0)), -1.0, -0.3, -1.0, -0.3)]


def _coupled(x, log_a, alpha, log_b, beta, delta):
  return (np.exp(alpha / beta * (log_a - np.log(x[0]))) + np.exp(log_b - np.log(x[1]))) ** beta + delta


def _coupled_starts(x, y):
  """For fixed (alpha, beta, delta) the coupled law is linear after a power: (L - delta)^(1/beta) =
  u * N^(-alpha/beta) + B / D with u = A^(alpha/beta). The best of a grid of such fits (u, B > 0) starts it."""
  lo, best, best_sse = float(np.min(y)), None, np.inf
  for alpha in np.geomspace(0.05, 1.5, 12):
    for beta in np.geomspace(0.05, 2.0, 12):
      for delta in lo * np.linspace(0.0, 0.95, 8):
        k = alpha / beta
        (u, b), _ = _linear_start([x[0] ** -k, 1.0 / x[1]], (y - delta) ** (1 / beta))
        if u <= 0 or b <= 0:
          continue
        q = (float(np.log(u) / k), alpha, float(np.log(b)), beta, delta)
        sse = float(np.sum((np.log(_coupled(x, *q)) - np.log(y)) ** 2))
        if np.isfinite(sse) and sse < best_sse:
          best, best_sse = q, sse
  return ([best] if best else []) + [(float(np.log(np.median(x[0]))), 0.3, float(np.log(np.median(x[1]))), 0.3,
                                      0.5 * lo)]


def _power(x, a, b, c):
  return a + b * x[0] ** c


def _power_starts(x, y):
  """For a fixed exponent c the law is linear in (a, b): the best c of a grid (either sign) starts the fit."""
  fits = [(_linear_start([np.ones_like(y), x[0] ** c], y), c) for c in EXPONENTS]
  ((a, b), _), c = min(fits, key=lambda f: f[0][1])
  return [(a, b, c)]


def _power_starts_bounded(x, y, rising: bool):
  """As _power_starts, over c < 0 and the (a, b) within the reranker paper's bounds (a rising metric: a in [0, 1],
  b <= 0; a falling loss: a in [0, min y], b >= 0); else the paper's own start."""
  best, best_sse = None, np.inf
  for c in EXPONENTS[EXPONENTS < 0]:
    (a, b), sse = _linear_start([np.ones_like(y), x[0] ** c], y)
    inside = (0 <= a <= 1 and b <= 0) if rising else (0 <= a <= np.min(y) and b >= 0)
    if inside and sse < best_sse:
      best, best_sse = (a, b, c), sse
  lo, hi = float(np.min(y)), float(np.max(y))
  return [best] if best else [(1.2 * hi, lo - hi, -0.5) if rising else (0.9 * lo, hi - lo, -0.5)]


LAWS = {
    "n": Law("n", ("A", "alpha", "delta"), _saturating, _sat_starts, _sat_bounds,
             lambda p: (math.exp(p[0]), p[1], p[2]), log=True),
    "d": Law("d", ("B", "beta", "delta"), _saturating, _sat_starts, _sat_bounds,
             lambda p: (math.exp(p[0]), p[1], p[2]), log=True),
    "nd": Law("nd", ("a", "b", "c", "d", "e"), _joint, _joint_starts,  # a loss: a >= 0, falling in N and D
              lambda x, y: ([0.0, 0.0, -5.0, 0.0, -5.0], [float(np.min(y)), np.inf, 0.0, np.inf, 0.0]), tuple,
              log=True),
    "coupled": Law("coupled", ("A", "alpha", "B", "beta", "delta"), _coupled, _coupled_starts,
                   lambda x, y: ([-50.0, 1e-3, -50.0, 1e-3, 0.0], [100.0, 5.0, 100.0, 5.0, float(np.min(y))]),
                   lambda p: (math.exp(p[0]), p[1], math.exp(p[2]), p[3], p[4]), log=True),
    "power": Law("power", ("a", "b", "c"), _power, _power_starts, lambda x, y: (-np.inf, np.inf), tuple, log=False),
}
# The additive joint law of a rising metric (nDCG, MAP): a in [0, 1], b, d <= 0 (`fit` picks it for "nd").
ND_RISING = Law("nd", ("a", "b", "c", "d", "e"), _joint, _joint_starts_rising,
                lambda x, y: ([0.0, -np.inf, -5.0, -np.inf, -5.0], [1.0, 0.0, 0.0, 0.0, 0.0]), tuple, log=False)
# The reranker paper's single-variable law y = a + b x^c with its bounds (c in [-5, 0]; a rising metric: a in [0, 1],
# b <= 0; a falling loss: a >= 0, b >= 0): the data and model laws of its protocols (`fit(paper_bounds=True)`).
POWER_PAPER = {
    "rising": Law("power", ("a", "b", "c"), _power, lambda x, y: _power_starts_bounded(x, y, rising=True),
                  lambda x, y: ([0.0, -np.inf, -5.0], [1.0, 0.0, 0.0]), tuple, log=False),
    "falling": Law("power", ("a", "b", "c"), _power, lambda x, y: _power_starts_bounded(x, y, rising=False),
                   lambda x, y: ([0.0, 0.0, -5.0], [float(np.min(y)), np.inf, 0.0]), tuple, log=True),
}
FALLING_ONLY = ("n", "d", "coupled")
RISING_NAMES, FALLING_NAMES = ("ndcg", "recall", "map", "mrr", "auc", "accuracy"), ("entropy", "loss")


def trend_rises(x_KxN: np.ndarray, y_N: np.ndarray) -> bool:
  """Whether y grows with the sizes: the sign of the summed slopes of y on log N (and log D)."""
  coef, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(y_N), *np.log(x_KxN)]), y_N, rcond=None)
  return float(np.sum(coef[1:])) > 0


def direction_of(field: str, x_KxN: np.ndarray, y_N: np.ndarray) -> str:
  """'rising' or 'falling': from the field's name where it says, else from the data."""
  name = field.lower()
  if any(k in name for k in FALLING_NAMES):
    return "falling"
  if any(k in name for k in RISING_NAMES):
    return "rising"
  return "rising" if trend_rises(x_KxN, y_N) else "falling"


def law_of(law_name: str, direction: str, paper_bounds: bool = False) -> Law:
  """The law fitted for `law_name`: nd's bounds follow the direction; power has the reranker paper's bounds when
  `paper_bounds` (else none)."""
  if law_name == "nd" and direction == "rising":
    return ND_RISING
  if law_name == "power" and paper_bounds:
    return POWER_PAPER[direction]
  return LAWS[law_name]


def fit_law(law: Law, x_KxN: np.ndarray, y_N: np.ndarray) -> np.ndarray:
  """Best least-squares fit parameters (fitting parameterisation) over the law's starting points."""
  best, best_sse = None, np.inf
  lower, upper = law.bounds(x_KxN, y_N)
  for p0 in law.starts(x_KxN, y_N):
    p0 = np.clip(p0, np.asarray(lower, float) + 1e-9, np.asarray(upper, float) - 1e-9) if np.ndim(lower) else p0
    fn, target = (lambda x, *q: np.log(np.maximum(law.fn(x, *q), 1e-30)), np.log(y_N)) if law.log else (law.fn, y_N)
    try:
      p, _ = curve_fit(fn, x_KxN, target, p0=p0, bounds=(lower, upper), maxfev=5000)
    except (RuntimeError, ValueError, FloatingPointError):  # this start did not converge: try the next
      continue
    sse = float(np.sum((fn(x_KxN, *p) - target) ** 2))
    if np.isfinite(sse) and sse < best_sse:
      best, best_sse = p, sse
  if best is None:
    raise RuntimeError(f"law {law.name!r}: no starting point converged on {len(y_N)} points")
  return best


def r_squared(y_N: np.ndarray, pred_N: np.ndarray) -> float:
  return 1.0 - float(np.sum((y_N - pred_N) ** 2) / max(np.sum((y_N - y_N.mean()) ** 2), 1e-300))


def fit(law_name: str, x_KxN: np.ndarray, y_N: np.ndarray, *, bootstrap: int = 200, seed: int = 0,
        holdout: np.ndarray | None = None, direction: str | None = None, paper_bounds: bool = False) -> dict:
  """Fits `law_name` to (x, y); `bootstrap` resamples the points for 95% intervals of the parameters. With
  `holdout` (a boolean mask), fits on the other points and forecasts the held-out ones, with intervals.
  `direction` ('rising' / 'falling'; default: the data's trend) picks the nd law's bounds (and power's, with
  `paper_bounds`); a falling-only law refuses a rising metric rather than fitting it silently wrong."""
  x_KxN, y_N = np.asarray(x_KxN, np.float64).reshape(len(x_KxN), -1), np.asarray(y_N, np.float64)
  train = ~holdout if holdout is not None else np.ones(len(y_N), bool)
  direction = direction or ("rising" if trend_rises(x_KxN[:, train], y_N[train]) else "falling")
  if law_name in FALLING_ONLY and direction == "rising":
    raise ValueError(f"law {law_name!r} is a law of a falling loss; this field rises with the sizes: fit it with "
                     "--law nd (a + b N^c + d D^e, b, d <= 0) or --law power")
  law = law_of(law_name, direction, paper_bounds)
  p = fit_law(law, x_KxN[:, train], y_N[train])
  out = {"law": law_name, "direction": direction, **({"bounds": "paper"} if law in POWER_PAPER.values() else {}),
         "params": dict(zip(law.params, map(float, law.report(p)))),
         "num_points": int(train.sum()), "r2": r_squared(y_N[train], law.fn(x_KxN[:, train], *p))}
  rng = np.random.default_rng(seed)
  idx = np.flatnonzero(train)
  # The scatter of runs around the curve, in the space the law is fitted in, for prediction intervals
  # (inflated by n / (n - p): residuals of a fit are smaller than the noise).
  space = (lambda v: np.log(np.maximum(v, 1e-30)), np.exp) if law.log else (lambda v: v, lambda v: v)
  resid = space[0](y_N[train]) - space[0](law.fn(x_KxN[:, train], *p))
  resid = resid * math.sqrt(len(idx) / max(len(idx) - len(law.params), 1))
  boot, boot_pred, boot_new = [], [], []
  for _ in range(bootstrap):
    pick = rng.choice(idx, size=len(idx), replace=True)
    if len(np.unique(x_KxN[:, pick], axis=1).T) < len(law.params):  # too few distinct points to fit
      continue
    try:
      bp = fit_law(law, x_KxN[:, pick], y_N[pick])
    except RuntimeError:
      continue
    boot.append(law.report(bp))
    if holdout is not None:
      pred = law.fn(x_KxN[:, holdout], *bp)
      boot_pred.append(pred)
      boot_new.append(space[1](space[0](pred) + rng.choice(resid, size=len(pred))))
  if bootstrap:
    out["bootstrap_fits"] = len(boot)
  if len(boot) < bootstrap / 2:
    # The few resamples that do fit sit next to the point fit: their spread would be a narrow, false interval.
    out["warning"] = f"only {len(boot)} of {bootstrap} bootstrap resamples could be fitted: no intervals"
    boot, boot_pred, boot_new = [], [], []
  if boot:
    lo, hi = np.percentile(np.asarray(boot, np.float64), [2.5, 97.5], axis=0)
    out["params_ci95"] = {k: [float(a), float(b)] for k, a, b in zip(law.params, lo, hi)}
  if holdout is not None:
    pred = law.fn(x_KxN[:, holdout], *p)
    out["forecast"] = [{"x": x_KxN[:, i].tolist(), "measured": float(y_N[i]), "predicted": float(v),
                        "abs_error": float(abs(v - y_N[i])), "rel_error": float(abs(v - y_N[i]) / abs(y_N[i]))}
                       for i, v in zip(np.flatnonzero(holdout), pred)]
    if boot_pred:
      lo, hi = np.percentile(np.asarray(boot_pred), [2.5, 97.5], axis=0)
      new_lo, new_hi = np.percentile(np.asarray(boot_new), [2.5, 97.5], axis=0)
      for row, a, b, c, d in zip(out["forecast"], lo, hi, new_lo, new_hi):
        row["predicted_ci95"] = [float(a), float(b)]  # where the mean curve lies
        row["predicted_pi95"] = [float(c), float(d)]  # where a new run lands
  out["_fit"] = p  # fitting parameterisation, for plots (dropped from JSON)
  return out


# ----------------------------------------------------------------------------------------------------------
# Results files and the command.

def read_results(path: str, fields: list[str], select: dict[str, float] | None = None) -> dict[str, np.ndarray]:
  """Rows of a JSONL results file (one run per line), those whose fields equal `select`'s values; errors name
  file:line and field."""
  cols: dict[str, list[float]] = {f: [] for f in fields}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
      if select and isinstance(row, dict) and any(row.get(k) != v for k, v in select.items()):
        continue
      for field in fields:
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
          raise ValueError(f"{where}: field {field!r} must be a finite number, got {value!r}")
        cols[field].append(float(value))
  if not cols[fields[0]]:
    raise ValueError(f"{path}: no runs" + (f" with {select}" if select else ""))
  return {k: np.asarray(v) for k, v in cols.items()}


def figure(columns: int = 1):
  """A matplotlib figure (no display needed) with `columns` axes side by side: (fig, [ax, ...])."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, columns, figsize=(6 if columns == 1 else 4.5 * columns, 4.2), squeeze=False)
  return fig, list(axes[0])


def save(fig, out: str) -> None:
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def draw(ax, result: dict, x_KxN: np.ndarray, y_N: np.ndarray, holdout, xlabel: str, ylabel: str, along: int = 0,
         names: tuple[str, str] = ("N", "D")) -> None:
  """`result`'s data, fitted curve(s) and forecasts on `ax`. A joint law: x_KxN[along] on the x axis, one curve per
  distinct value of the other size (`names` label them)."""
  law = law_of(result["law"], result["direction"], result.get("bounds") == "paper")
  p = result["_fit"]
  train = ~holdout if holdout is not None else np.ones(len(y_N), bool)
  if x_KxN.shape[0] == 1:
    grid = np.geomspace(x_KxN[0].min(), x_KxN[0].max() * 2, 200)[None]
    ax.plot(grid[0], law.fn(grid, *p), label=f"fit (R² {result['r2']:.3f})")
    ax.scatter(x_KxN[0, train], y_N[train], label="fitted runs")
  else:  # one curve per distinct value of the other size
    other = 1 - along
    for v in np.unique(x_KxN[other]):
      sel = x_KxN[other] == v
      grid = np.geomspace(x_KxN[along].min(), x_KxN[along].max() * 2, 200)
      at = [grid, np.full_like(grid, v)]
      ax.plot(grid, law.fn(np.stack(at if along == 0 else at[::-1]), *p), alpha=0.6)
      ax.scatter(x_KxN[along, sel & train], y_N[sel & train], label=f"{names[other]}={v:.3g}")
  for i, row in enumerate(result.get("forecast", [])):
    for key, width, label in (("predicted_pi95", 1, "forecast, 95% prediction interval"),
                              ("predicted_ci95", 4, "95% CI of the curve")):
      lo, hi = row.get(key, [row["predicted"]] * 2)
      ax.errorbar(row["x"][along], row["predicted"], yerr=[[row["predicted"] - lo], [hi - row["predicted"]]],
                  fmt="s", color="red", capsize=4 if width == 1 else 0, elinewidth=width,
                  label=label if i == 0 else None)
    ax.scatter(row["x"][along], row["measured"], marker="*", s=120, color="black",
               label="held-out run" if i == 0 else None)
  ax.set_xscale("log")
  from matplotlib.ticker import EngFormatter, LogLocator

  ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # 2M, 5M, 10M, 20M: short labels that never overlap
  for formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
    formatter(EngFormatter(sep=""))
  if law.log:  # losses: the scale they are fitted on
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def plot(result: dict, x_KxN: np.ndarray, y_N: np.ndarray, holdout, xlabel: str, ylabel: str, out: str,
         **kwargs) -> None:
  """`draw` alone in a PNG at `out`."""
  fig, (ax,) = figure()
  draw(ax, result, x_KxN, y_N, holdout, xlabel, ylabel, **kwargs)
  save(fig, out)


def run(path: str, *, law: str, y: str, x: str | None = None, holdout_largest: bool = True, bootstrap: int = 200,
        plot_path: str | None = None, where: dict[str, float] | None = None, direction: str = "auto") -> dict:
  """`scalingnote fit-scaling`: the fit of `law` to field `y` against `x` (default N for n / power, D for d,
  both for nd and coupled), forecasting the run(s) with the largest N (or D for the d law) when
  `holdout_largest`. `direction`: 'rising', 'falling' or 'auto' (the field's name, else the data)."""
  if law not in LAWS:
    raise ValueError(f"law {law!r}: expected one of {', '.join(LAWS)}")
  if direction not in ("auto", "rising", "falling"):
    raise ValueError(f"direction {direction!r}: expected auto, rising or falling")
  xs = ["N", "D"] if law in ("nd", "coupled") else [x or ("D" if law == "d" else "N")]
  cols = read_results(path, xs + [y], where)
  for name in xs:
    if np.any(cols[name] <= 0):
      raise ValueError(f"{path}: field {name!r} must be > 0 in every run")
  x_KxN = np.stack([cols[name] for name in xs])
  holdout = (x_KxN[0] == x_KxN[0].max()) if holdout_largest else None
  if holdout is not None and (~holdout).sum() <= len(LAWS[law].params):
    raise ValueError(f"{path}: {int((~holdout).sum())} runs besides the largest; the {law} law needs more than "
                     f"{len(LAWS[law].params)} to fit")
  if direction == "auto":
    direction = direction_of(y, x_KxN, cols[y])
  result = fit(law, x_KxN, cols[y], bootstrap=bootstrap, holdout=holdout, direction=direction)
  if plot_path:
    plot(result, x_KxN, cols[y], holdout, xs[0], y, plot_path)
    result["plot"] = plot_path
  result.pop("_fit")
  return {"results": path, "x": xs, "y": y, "where": where or {}, **result}
