"""Stage 1 training-step throughput and model FLOPs utilisation on this machine.

Runs the real train step (both towers, contrastive loss, AdamW) on one device with a decoder sized so that
matmuls dominate, times it, counts the step's model FLOPs (and prints XLA's cost analysis beside them), and
measures the machine's matmul peak in the same run with a large jnp.dot in the compute dtype. Last line: one
JSON object.

  .venv/bin/python benchmarks/train_step.py [--hidden 512 --layers 4 --batch 16 --seq 128]
  python3 benchmarks/train_step.py --hidden 2048 --layers 8 --batch 64 --seq 256 --dtype bfloat16 --peak-n 8192
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalingnote_jax import sharding
from scalingnote_jax.models.dual import DualEncoder
from scalingnote_jax.models.llm import LLMConfig
from scalingnote_jax.models.tower import Tower, TowerConfig
from scalingnote_jax.train import common, stage1
from ml_collections import ConfigDict


def timeit(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(n: int, dtype: str, repeats: int) -> float:
  """FLOP/s of an n x n x n jnp.dot in the step's compute dtype (bf16 on an accelerator has its own peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  return 2 * n**3 / timeit(lambda: dot(a, b), repeats)


def model_flops(cfg: LLMConfig, towers: int, sequences: int, seq: int) -> float:
  """Model FLOPs of one training step (forward + backward = 3x forward), PaLM's convention: 2 per matmul
  parameter per token, plus the attention scores and the weighted sum (full T x T, causal masking not
  subtracted). The towers have no LM head; the contrastive logits (B x B x D) are negligible."""
  e, h, kv, hd, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  matmul_params = cfg.num_layers * (e * h * hd + 2 * e * kv * hd + h * hd * e + 3 * e * m)
  attention = cfg.num_layers * 2 * 2 * seq * h * hd  # per token: q.k over T keys, p.v over T values
  return 3 * towers * sequences * seq * (2 * matmul_params + attention)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=16, help="queries per step (each with one document)")
  p.add_argument("--seq", type=int, default=128, help="query and document length")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
  p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak (8192 on a GPU)")
  args = p.parse_args()

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  heads = args.hidden // 64
  bcfg = LLMConfig(vocab_size=8192, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                   num_kv_heads=heads, head_dim=64, intermediate_size=4 * args.hidden, dtype=args.dtype)
  tcfg = TowerConfig(pooling="last", max_length=args.seq)
  make = lambda: Tower.create(bcfg, tcfg, nnx.Rngs(0))  # noqa: E731
  model = DualEncoder(sharding.create_sharded(make, mesh, sharding.DEFAULT_RULES),
                             sharding.create_sharded(make, mesh, sharding.DEFAULT_RULES), 0.05, False)
  graphdef, params = nnx.split(model)
  optim = ConfigDict(dict(lr=1e-4, warmup_steps=10, schedule="cosine", final_lr_fraction=0.1, weight_decay=0.01,
                          clip_norm=1.0, b1=0.9, b2=0.999))
  tx = common.make_optimizer(optim, 1000)
  opt_state = sharding.init_optimizer(tx, params, mesh)
  rng = np.random.default_rng(0)
  b, t = args.batch, args.seq
  batch = dict(q_ids=rng.integers(3, 8192, (b, t)).astype(np.int32), q_mask=np.ones((b, t), np.int32),
               d_ids=rng.integers(3, 8192, (b, 1, t)).astype(np.int32), d_mask=np.ones((b, 1, t), np.int32),
               doc_ids=np.arange(b, dtype=np.int32)[:, None], pos_ids=np.arange(b, dtype=np.int32)[:, None])
  batch = sharding.global_batch(mesh, batch)
  step = common.jit_step(stage1.make_train_step(graphdef, tx, mesh), mesh, params, opt_state)  # as training does
  compiled = step.lower(params, opt_state, batch).compile()
  # MFU counts model FLOPs. XLA's own count is printed beside it: it matches on CPU, but XLA:GPU leaves out
  # most of the cuBLAS matmuls (custom calls), which undercounted a bf16 step 5x on an H200.
  cost = compiled.cost_analysis()
  xla_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  flops = model_flops(bcfg, 2, b, t)
  state = {"params": params, "opt": opt_state}

  def run():
    state["params"], state["opt"], metrics = compiled(state["params"], state["opt"], batch)
    return metrics["loss"]

  run()
  step_s = timeit(run, args.repeats)
  peak = matmul_peak(args.peak_n, args.dtype, max(args.repeats, 30))  # single dots vary by +-25%: a stable median
  tokens = 2 * b * t
  out = {"tokens_per_s": round(tokens / step_s, 1), "step_s": round(step_s, 4), "achieved_flops": flops / step_s,
         "peak_flops": peak, "mfu": round(flops / step_s / peak, 3), "step_flops": flops,
         "xla_step_flops": xla_flops,
         "model": f"2 towers x {args.layers} layers x {args.hidden} hidden, batch {b} x {t} tokens, {args.dtype}",
         "device": str(jax.devices()[0].device_kind)}
  print(f"train step: {step_s * 1000:.1f} ms, {out['tokens_per_s']} tokens/s, "
        f"{out['achieved_flops'] / 1e9:.1f} GFLOP/s achieved vs {peak / 1e9:.1f} GFLOP/s matmul peak")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
