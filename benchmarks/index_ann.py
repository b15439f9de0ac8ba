"""ANN index: ScaNN (our `Index`, default parameters) vs exact search vs faiss HNSW at matched recall.

Data: N unit vectors of dimension D shaped like text embeddings, made by `synthetic.clustered_embeddings` (also used by
tests/test_index.py): the variance along direction j falls as 1/(j+1) (a power-law spectrum, as in real
embedding spaces); 100 topic centres ~ N(0, diag(s)); N/100 cluster centres = a random topic + N(0, diag(s));
a vector = its cluster's centre + 1.5 * N(0, diag(s)), then L2-normalised. Queries are drawn like documents
with a separate seed (they are not corpus points). The noise is larger than the cluster offsets, so a query's
true neighbours straddle clusters (printed: cosines of random pairs and of the true top-1/top-10).

For every system: build time, memory (the index's serialized bytes: what it holds in RAM; RSS growth is not
reported because each build reuses heap the previous step freed, which made it meaningless), recall@10
against exact search, batched QPS (all queries in one call, every core) and single-query latency (median).
Exact search is timed two ways: the library's exact backend (numpy matmul + argpartition) and a jitted JAX
matmul + lax.top_k; the faster one is `exact_qps`. faiss HNSW (M=32) has its efSearch raised until its
recall@10 reaches ScaNN's, and is timed there. ScaNN also gets a short leaves_to_search sweep for context.

  .venv/bin/python benchmarks/index_ann.py [--n 1000000 --dim 256 --queries 2000] [--quick]

faiss-cpu is needed for this benchmark only (`pip install faiss-cpu`). The last line printed is one JSON
object: scann_qps, exact_qps, faiss_hnsw_qps, recall_at_10 (ScaNN), scann_vs_exact, scann_vs_faiss, and more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import psutil

from scalingnote_jax.data.synthetic import clustered_embeddings
from scalingnote_jax.index import Index


def recall_at(got_QxK: np.ndarray, want_QxK: np.ndarray) -> float:
  return float(np.mean([len(set(g) & set(w)) / w.shape[0] for g, w in zip(got_QxK, want_QxK)]))


def timed_rounds(fns: dict, q_QxD: dict, repeats: int) -> dict:
  """Queries per second of each fn(its queries), median over `repeats` rounds. Each round times every system
  once, in a rotating order, so that load from other jobs on a shared machine hits all systems alike."""
  for name, fn in fns.items():
    fn(q_QxD[name][:64])  # warm-up
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      fns[name](q_QxD[name])
      times[name].append(time.perf_counter() - t0)
  return {name: q_QxD[name].shape[0] / statistics.median(t) for name, t in times.items()}


def latencies_ms(fns: dict, q_QxD: np.ndarray, every: dict) -> dict:
  """Median milliseconds of each fn(one query): query i goes to every system in turn (system s only sees
  every[s]-th query: exact search is slow)."""
  times = {name: [] for name in fns}
  for name, fn in fns.items():
    fn(q_QxD[:1])
  for i in range(q_QxD.shape[0]):
    for name, fn in fns.items():
      if i % every.get(name, 1) == 0:
        t0 = time.perf_counter()
        fn(q_QxD[i:i + 1])
        times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def jax_exact(d_jax, k: int, block: int):
  """Exact top-k with a jitted JAX matmul + lax.top_k over query blocks of `block` (the corpus is an argument,
  not baked into the program as a constant)."""
  import jax
  import jax.numpy as jnp

  top = jax.jit(lambda q, d: jax.lax.top_k(q @ d.T, k))

  def search(q_QxD):
    out = []
    for s in range(0, q_QxD.shape[0], block):
      q = q_QxD[s:s + block]
      pad = block - q.shape[0]  # one compiled shape for every block
      _, idx = top(jnp.asarray(np.pad(q, ((0, pad), (0, 0)))), d_jax)
      out.append(np.asarray(idx)[:q.shape[0]])
    return np.concatenate(out)

  return search


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=1_000_000, help="corpus size")
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--queries", type=int, default=2000, help="queries for recall and batched QPS")
  p.add_argument("--exact-queries", type=int, default=256, help="queries for timing exact search (it is slow)")
  p.add_argument("--latency-queries", type=int, default=200, help="single queries for latency (exact: 1/10)")
  p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--hnsw-m", type=int, default=32)
  p.add_argument("--hnsw-ef-construction", type=int, default=40, help="faiss's default")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="100k documents, 1000 queries (~2 min instead of ~10)")
  args = p.parse_args()
  if args.quick:
    args.n, args.queries = 100_000, 1000
  k = 10
  load_start = os.getloadavg()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; load average {load_start[0]:.2f}")

  t0 = time.perf_counter()
  d_NxD, q_QxD = clustered_embeddings(args.n, args.dim, args.queries, args.seed)
  ids = [f"d{i}" for i in range(args.n)]
  print(f"data: {args.n} x {args.dim} documents, {args.queries} queries, generated in {time.perf_counter() - t0:.1f} s")

  # -- exact: ground truth, by the library's exact backend ------------------------------------------------
  exact = Index.build(d_NxD, ids, backend="exact")
  t0 = time.perf_counter()
  truth = exact.search_indices(q_QxD, k)
  true_scores, true_QxK = truth.scores, truth.ids
  print(f"exact: ground truth for {args.queries} queries in {time.perf_counter() - t0:.1f} s")
  rng = np.random.default_rng(args.seed)
  a, b = d_NxD[rng.integers(0, args.n, 10_000)], d_NxD[rng.integers(0, args.n, 10_000)]
  pair = (a * b).sum(1)
  stats = dict(random_pair_cos=round(float(pair.mean()), 3), random_pair_cos_std=round(float(pair.std()), 3),
               top1_cos=round(float(true_scores[:, 0].mean()), 3), top10_cos=round(float(true_scores[:, -1].mean()), 3))
  print(f"data stats: {stats}")
  import jax.numpy as jnp

  d_jax = jnp.asarray(d_NxD)
  jax_batched, jax_single = jax_exact(d_jax, k, block=256), jax_exact(d_jax, k, block=1)
  assert recall_at(jax_batched(q_QxD[:256]), true_QxK[:256]) > 0.999

  # -- ScaNN through our Index (default parameters) -------------------------------------------------------
  t0 = time.perf_counter()
  scann = Index.build(d_NxD, ids, backend="scann")
  scann_build_s = time.perf_counter() - t0
  print(f"scann: built in {scann_build_s:.1f} s, params {scann.params}")
  tmp = tempfile.mkdtemp(prefix="index_ann-")
  try:
    t0 = time.perf_counter()
    scann.save(os.path.join(tmp, "scann"))
    save_s = time.perf_counter() - t0
    scann_bytes = dir_bytes(os.path.join(tmp, "scann"))
    t0 = time.perf_counter()
    loaded = Index.load(os.path.join(tmp, "scann"), expect_dim=args.dim, expect_size=args.n)
    load_s = time.perf_counter() - t0
    assert np.array_equal(loaded.search_indices(q_QxD[:100], k).ids, scann.search_indices(q_QxD[:100], k).ids)
    del loaded
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"scann: saved {scann_bytes / 2**20:.0f} MiB in {save_s:.1f} s, loaded in {load_s:.1f} s (same results)")
  scann_search = lambda q: scann.search_indices(q, k).ids  # noqa: E731
  scann_recall = recall_at(scann_search(q_QxD), true_QxK)
  print(f"scann: recall@10 {scann_recall:.4f}")
  if not scann.params["brute_force"]:
    leaves = scann.params["num_leaves_to_search"]
    for f in (0.5, 2.0):
      n_leaves = max(1, round(f * leaves))
      s = lambda q: scann.search_indices(q, k, leaves_to_search=n_leaves).ids  # noqa: B023, E731
      print(f"  (sweep) leaves_to_search {n_leaves}: recall@10 {recall_at(s(q_QxD), true_QxK):.4f}")

  # -- faiss HNSW, efSearch raised until its recall matches ScaNN's ---------------------------------------
  import faiss

  t0 = time.perf_counter()
  hnsw = faiss.IndexHNSWFlat(args.dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
  hnsw.hnsw.efConstruction = args.hnsw_ef_construction
  hnsw.add(d_NxD)
  hnsw_build_s = time.perf_counter() - t0
  hnsw_bytes = faiss.serialize_index(hnsw).nbytes
  print(f"faiss hnsw: M={args.hnsw_m} efConstruction={args.hnsw_ef_construction} built in {hnsw_build_s:.1f} s, "
        f"{hnsw_bytes / 2**20:.0f} MiB serialized")
  hnsw_search = lambda q: hnsw.search(q, k)[1]  # noqa: E731
  for ef in (10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024):
    hnsw.hnsw.efSearch = ef
    hnsw_recall = recall_at(hnsw_search(q_QxD), true_QxK)
    print(f"  efSearch {ef}: recall@10 {hnsw_recall:.4f}")
    if hnsw_recall >= scann_recall:
      break

  # -- timing: all systems interleaved ----------------------------------------------------------------------
  q_exact = q_QxD[:args.exact_queries]
  batched = dict(scann=scann_search, faiss_hnsw=hnsw_search, exact_numpy=lambda q: exact.search_indices(q, k).ids,
                 exact_jax=jax_batched)
  qps = timed_rounds(batched, dict(scann=q_QxD, faiss_hnsw=q_QxD, exact_numpy=q_exact, exact_jax=q_exact),
                     args.repeats)
  single = dict(scann=scann_search, faiss_hnsw=hnsw_search, exact_numpy=batched["exact_numpy"],
                exact_jax=jax_single)
  lat = latencies_ms(single, q_QxD[:args.latency_queries], every=dict(exact_numpy=10, exact_jax=10))
  exact_qps = max(qps["exact_numpy"], qps["exact_jax"])
  for name in batched:
    print(f"{name}: {qps[name]:.0f} q/s batched, {lat[name]:.3f} ms/query")

  load_end = os.getloadavg()
  print(f"load average at the end {load_end[0]:.2f} (other jobs on the machine slow every system alike)")
  print(json.dumps({
      "scann_qps": round(qps["scann"], 1), "exact_qps": round(exact_qps, 1),
      "faiss_hnsw_qps": round(qps["faiss_hnsw"], 1),
      "recall_at_10": round(scann_recall, 4), "scann_vs_exact": round(qps["scann"] / exact_qps, 2),
      "scann_vs_faiss": round(qps["scann"] / qps["faiss_hnsw"], 3), "faiss_hnsw_recall_at_10": round(hnsw_recall, 4),
      "faiss_hnsw_ef_search": ef, "exact_numpy_qps": round(qps["exact_numpy"], 1),
      "exact_jax_qps": round(qps["exact_jax"], 1), "scann_latency_ms": round(lat["scann"], 3),
      "exact_latency_ms": round(min(lat["exact_numpy"], lat["exact_jax"]), 3),
      "faiss_hnsw_latency_ms": round(lat["faiss_hnsw"], 3),
      "scann_build_s": round(scann_build_s, 1), "faiss_hnsw_build_s": round(hnsw_build_s, 1),
      "scann_disk_mib": round(scann_bytes / 2**20), "faiss_hnsw_mib": round(hnsw_bytes / 2**20),
      "corpus_mib": round(d_NxD.nbytes / 2**20), "scann_params": scann.params, "n": args.n, "dim": args.dim,
      "queries": args.queries, **stats, "load_avg_start": round(load_start[0], 2),
      "load_avg_end": round(load_end[0], 2)}))


if __name__ == "__main__":
  main()
