"""Ahead-of-time compilation of the Stage 1 train step for a fake topology: does a config fit, without the
hardware?

  scalingnote compile --config configs/qwen2_5_7b.py:v5e256 --topology v5e-256
  scalingnote compile --config configs/qwen2_5_7b.py --topology h100-64 --config.mesh='(8,8,1)'

CLI arguments of the `compile` subcommand (cli.py wires them to `compile_report` / `format_report`):
  --config CONFIG        required unless --list-topologies: configs/<name>.py, optionally :variant
                         (fields overridden with --config.field=value, e.g. --config.mesh='(1,-1,1)')
  --topology NAME        required unless --list-topologies: a key of TOPOLOGIES, or cpu-N
  --list-topologies      print `list_topologies()` and exit
  --json                 print the report as JSON instead of `format_report`'s text
Before any JAX computation the CLI calls `prepare_host(topology)`: a GPU topology without the CUDA plugin
and cpu-N compile on N simulated host devices, whose number JAX fixes when it first initialises.

How the devices are faked:
- TPU: `jax.experimental.topologies.get_topology_desc(platform="tpu")` with the `libtpu` package installed
  (the one `jax[tpu]` pins): compile-only TPU devices; no TPU and no network needed. The report is the TPU
  compiler's own buffer assignment.
- GPU: the same call with `platform="cuda"` and a GPU target description (`GPU_TARGETS`) needs only the CUDA
  PJRT plugin (`jax[cuda12-local]`, no GPU, driver or CUDA libraries). Without the plugin the step is
  compiled for as many simulated CPU devices instead, and the report says its memory is the CPU compiler's.
- cpu-N: N simulated CPU devices (tests; a quick check of shardings).

Nothing is allocated: parameters, optimizer state and batch are ShapeDtypeStructs carrying their shardings.

The memory arithmetic of configs/qwen2_5_7b.py and its compiled numbers per topology are in README.md
("Does the 7B dual tower fit?").
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import topologies
from ml_collections import ConfigDict

from scalingnote_jax import sharding
from scalingnote_jax.artifacts.checkpoint import abstract_like
from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.trained import abstract_dual_encoder
from scalingnote_jax.data.pipeline import BatchSpec
from scalingnote_jax.train import stage1
from scalingnote_jax.train.common import make_optimizer

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
  platform: str  # "tpu", "cuda" or "cpu"
  name: str  # get_topology_desc's: TPU "v5e:16x16"; GPU "slices x hosts x devices per host"; cpu: a count
  hbm_bytes: int | None  # memory of one device
  description: str
  chip_config: str | None = None  # TPU "megacore": one device per chip (v4, v5p)

  @property
  def num_devices(self) -> int:
    return math.prod(int(s) for s in self.name.split(":")[-1].split("x"))


# GPU memory as nvidia-smi reports it (the "80GB" H100 has 79.6 GiB, the "141GB" H200 140.4 GiB).
H100_BYTES, H200_BYTES = 81559 * 2**20, 143771 * 2**20
# A TPU "-N" name counts TensorCores: v5p-128 and v4-128 are 64 megacore chips (64 devices); v5e is 1 per chip.
TOPOLOGIES = {
    "v5e-8": Topology("tpu", "v5e:2x4", 16 * GiB, "TPU v5e-8 (8 chips)"),
    "v5e-64": Topology("tpu", "v5e:8x8", 16 * GiB, "TPU v5e-64 (64 chips)"),
    "v5e-256": Topology("tpu", "v5e:16x16", 16 * GiB, "TPU v5e-256 (256 chips)"),
    "v6e-256": Topology("tpu", "v6e:16x16", 32 * GiB, "TPU v6e-256 (256 chips)"),
    "v4-128": Topology("tpu", "v4:4x4x4", 32 * GiB, "TPU v4-128 (64 chips)", "megacore"),
    "v5p-8": Topology("tpu", "v5p:2x2x1", 95 * GiB, "TPU v5p-8 (4 chips)", "megacore"),
    "v5p-128": Topology("tpu", "v5p:4x4x4", 95 * GiB, "TPU v5p-128 (64 chips)", "megacore"),
    "v5p-256": Topology("tpu", "v5p:4x4x8", 95 * GiB, "TPU v5p-256 (128 chips)", "megacore"),
    "h100-8": Topology("cuda", "1x1x8", H100_BYTES, "1 host x 8 H100 80GB"),
    "h100-64": Topology("cuda", "1x8x8", H100_BYTES, "8 hosts x 8 H100 80GB"),
    "h200-8": Topology("cuda", "1x1x8", H200_BYTES, "1 host x 8 H200"),
    "h200-64": Topology("cuda", "1x8x8", H200_BYTES, "8 hosts x 8 H200"),
}
# The GPU compiler's description of a device it cannot query (GpuTargetConfigProto; public SXM5 specs).
GPU_TARGETS = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", memory=H100_BYTES, bandwidth=3352320000000),
    "h200": dict(description="NVIDIA H200", memory=H200_BYTES, bandwidth=4800000000000),
}


def list_topologies() -> str:
  rows = [f"{k:<9} {t.description:<24} {t.platform:<4} {t.name:<10} {t.num_devices:>3} devices x "
          f"{t.hbm_bytes / GiB:.1f} GiB" for k, t in TOPOLOGIES.items()]
  return "\n".join(rows + ["cpu-N     N simulated CPU devices (memory from the CPU compiler)"])


def _topology(name: str) -> Topology:
  if name.startswith("cpu-") and name[4:].isdigit():
    return Topology("cpu", name[4:], None, f"{name[4:]} simulated CPU devices")
  if name not in TOPOLOGIES:
    raise ValueError(f"--topology {name!r}: unknown (known: {', '.join(TOPOLOGIES)}, cpu-N)")
  return TOPOLOGIES[name]


def _has_cuda_plugin() -> bool:
  """Whether jax-cuda12-plugin (`jax[cuda12-local]`) is installed; it imports without a GPU."""
  import importlib.util

  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no JAX plugin at all
    return False


def _host_devices_needed(topo: Topology) -> int:
  """How many simulated CPU devices `topo` compiles on (0: it has compile-only devices of its own)."""
  on_cpu = topo.platform == "cpu" or (topo.platform == "cuda" and not _has_cuda_plugin())
  return topo.num_devices if on_cpu else 0


def prepare_host(topology: str) -> None:
  """Makes JAX start with enough simulated CPU devices for `topology` where it compiles on the CPU (cpu-N, or
  a GPU topology without the CUDA plugin). Call before any JAX computation; a no-op otherwise."""
  topo = _topology(topology)
  if topo.platform == "cuda" and _has_cuda_plugin():
    # No GPU is used: from jax 0.12 the plugin refuses to start without cuDNN / CUDA libraries to check the
    # versions of (jax 0.10's did not check); the compiler itself needs none of them.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  n = _host_devices_needed(topo)
  if n:
    try:
      jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
    except RuntimeError:
      pass  # JAX has started already: fake_devices says what to do if it has too few devices


def _gpu_target_config(kind: str) -> str:
  s = GPU_TARGETS[kind]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {s['bandwidth']} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {s['memory']} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{s['description']}"
"""


def fake_devices(topology: str) -> tuple[list, str | None]:
  """(compile-only devices of `topology`, a note on how far the memory report is that hardware's)."""
  topo = _topology(topology)
  if topo.platform == "tpu":
    # No TPU is used: libtpu need not ask the GCE metadata server for one, nor take its one-process lock
    # (/tmp/libtpu_lockfile), so compiles can run beside each other and beside a process that loaded libtpu.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      kw = dict(chip_config_name=topo.chip_config) if topo.chip_config else {}
      return topologies.get_topology_desc(topo.name, platform="tpu", **kw).devices, None
    except RuntimeError as e:
      if "TPU support not installed" in str(e):
        raise RuntimeError(f"--topology {topology}: needs the libtpu package (pip install 'jax[tpu]'); no TPU "
                           "is needed") from e
      raise
  gpu_note = ("'fits' compares with all of the GPU's memory; JAX's GPU client takes only 75% of it unless "
              "XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise")
  n = _host_devices_needed(topo)
  if not n:  # a GPU, compiled by the CUDA plugin for a device it is told about
    target = _gpu_target_config(topology.split("-")[0])
    return topologies.get_topology_desc(platform="cuda", target_config=target, topology=topo.name).devices, gpu_note
  cpus = jax.devices("cpu")
  if len(cpus) < n:
    raise RuntimeError(f"--topology {topology}: compiling on the CPU needs {n} host devices, JAX has {len(cpus)}. "
                       f"Call aot.prepare_host({topology!r}) before any JAX computation (or start with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n})"
                       + ("; or install the CUDA plugin (pip install 'jax[cuda12-local]') to compile for the "
                          "GPU itself" if topo.platform == "cuda" else ""))
  if topo.platform == "cuda":
    return cpus[:n], (f"no CUDA plugin: compiled for {n} simulated CPU devices, so the memory is the CPU "
                      "compiler's estimate, not the GPU's (pip install 'jax[cuda12-local]' for the GPU compiler)")
  return cpus[:n], None


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard shape x dtype size)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_inputs(cfg: ConfigDict, mesh, tx):
  """(graphdef, params, opt_state, batch, frozen): ShapeDtypeStructs with this mesh's shardings, nothing
  allocated. `params` are what trains (all, or LoRA adapters, or the unfrozen layers), `frozen` the rest."""
  model = abstract_dual_encoder(cfg)
  graphdef, trainable, frozen = nnx.split(model, trained.trainable(cfg), ...)
  params = abstract_like(trainable, sharding.state_shardings(trainable, mesh, cfg.rules))
  frozen = abstract_like(frozen, sharding.state_shardings(frozen, mesh, cfg.rules))
  opt_state = sharding.abstract_optimizer(tx, params, mesh)
  spec = BatchSpec(cfg.batch_size, cfg.data.n_neg, cfg.data.query_len, cfg.data.doc_len)
  trunk_width = model.query.backbone.cfg.hidden_size if cfg.model.trunk_cache else 0  # batches of cached states
  batch = {k: jax.ShapeDtypeStruct(s, np.float32 if k.endswith("_trunk") else np.int32,
                                   sharding=sharding.batch_sharding(mesh, len(s)))
           for k, s in spec.shapes(trunk_width).items()}
  return graphdef, params, opt_state, batch, frozen


def compile_report(cfg: ConfigDict, topology: str) -> dict:
  """Lowers and compiles `cfg`'s Stage 1 train step for `topology` and reports per-device memory: parameters
  and optimizer state from their shardings, the rest from the compiled executable's memory analysis."""
  topo = _topology(topology)
  devices, note = fake_devices(topology)
  try:
    mesh = sharding.make_mesh(cfg.mesh, devices)
  except ValueError as e:
    raise ValueError(f"config field `mesh` {tuple(cfg.mesh)} does not fit --topology {topology} ({len(devices)} "
                     f"devices): {e}. Override it, e.g. --config.mesh='(1,-1,1)'") from e
  tx = make_optimizer(cfg.optim, cfg.num_steps)
  graphdef, params, opt_state, batch, frozen = abstract_inputs(cfg, mesh, tx)
  t0 = time.perf_counter()
  keyed = () if stage1.dropout_seed(cfg) is None else (jax.ShapeDtypeStruct((), np.int32),)  # LoRA dropout's step
  lowered = stage1.jit_train_step(cfg, graphdef, tx, mesh, params, opt_state).lower(params, opt_state, batch, frozen,
                                                                                   *keyed)
  t1 = time.perf_counter()
  report = dict(
      topology=topology, description=topo.description, platform=devices[0].platform,
      device_kind=devices[0].device_kind, num_devices=len(devices), mesh=dict(mesh.shape),
      rules=[list(r) for r in cfg.rules], batch_size=cfg.batch_size, chunks=cfg.chunks,
      num_params=sum(x.size for x in jax.tree.leaves((params, frozen))),
      trained_params=sum(x.size for x in jax.tree.leaves(params)), params_bytes=_bytes_per_device(params),
      frozen_bytes=_bytes_per_device(frozen), opt_state_bytes=_bytes_per_device(opt_state),
      batch_bytes=_bytes_per_device(batch),
      hbm_bytes=topo.hbm_bytes, note=note, error=None)
  try:
    mem = lowered.compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose buffers exceed the chip's HBM, saying how much it needed.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = re.search(r"temporaries \(([\d.]+)G\)", str(e))
    args = report["params_bytes"] + report["frozen_bytes"] + report["opt_state_bytes"] + report["batch_bytes"]
    temp = float(needed.group(1)) * GiB if needed else None
    return dict(report, argument_bytes=args, output_bytes=None, alias_bytes=None, temp_bytes=temp, code_bytes=None,
                total_bytes=args + temp if temp else None, fits=False, error=str(e).splitlines()[0],
                lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
  t2 = time.perf_counter()
  # The step's peak: inputs, plus outputs not written into donated inputs, plus temporaries (activations,
  # gradients, gathered FSDP weights, collectives' buffers) and the program itself.
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
           + mem.generated_code_size_in_bytes)
  return dict(report, argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
              alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
              code_bytes=mem.generated_code_size_in_bytes, total_bytes=total,
              fits=None if report["hbm_bytes"] is None else bool(total <= report["hbm_bytes"]),
              lower_s=t1 - t0, compile_s=t2 - t1)


def format_report(r: dict) -> str:
  def size(b):
    return "       ?    " if b is None else f"{b / GiB:8.2f} GiB" if b >= GiB else f"{b / 2**20:8.2f} MiB"

  if r["fits"] is None:
    fits = "n/a (no HBM size for CPU devices)"
  else:
    share = f" ({r['total_bytes'] / r['hbm_bytes']:.0%} of {r['hbm_bytes'] / GiB:.1f} GiB)" if r["total_bytes"] else ""
    fits = ("yes" if r["fits"] else "NO") + share
  lines = [
      f"topology     {r['topology']}: {r['description']} -> {r['num_devices']} x {r['device_kind']} ({r['platform']})",
      f"mesh         {r['mesh']}",
      f"rules        {', '.join(f'{k}->{v}' for k, v in r['rules'])}",
      f"step         batch {r['batch_size']}, {r['chunks']} GradCache chunks, {r['num_params'] / 1e9:.3f}B parameters"
      + (f", {r['trained_params'] / 1e6:.1f}M of them trained" if r["frozen_bytes"] else ""),
      "per device:",
      f"  parameters      {size(r['params_bytes'])}   (trained; shard shapes x dtype)",
      *([f"  frozen          {size(r['frozen_bytes'])}   (LoRA base / frozen layers: no gradient, no optimizer "
         "state)"] if r["frozen_bytes"] else []),
      f"  optimizer state {size(r['opt_state_bytes'])}   (shard shapes x dtype)",
      f"  batch           {size(r['batch_bytes'])}",
  ]
  if r["error"]:
    lines += [f"  temporaries     {size(r['temp_bytes'])}   (what the compiler said it needed)",
              f"  total           {size(r['total_bytes'])}   fits: {fits}",
              f"compiler     {r['error']}"]
  else:
    lines += [
        f"  arguments       {size(r['argument_bytes'])}   (compiler: parameters + optimizer state + batch)",
        f"  outputs         {size(r['output_bytes'])}   of which {size(r['alias_bytes']).strip()} reuse donated inputs",
        f"  temporaries     {size(r['temp_bytes'])}   (compiler: activations, gradients, gathered weights)",
        f"  program         {size(r['code_bytes'])}",
        f"  total           {size(r['total_bytes'])}   fits: {fits}",
    ]
  lines.append(f"compile      lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s")
  if r["note"]:
    lines.append(f"NOTE         {r['note']}")
  return "\n".join(lines)
