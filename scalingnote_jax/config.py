"""Configs are Python files with `get_config(variant: str = "") -> ConfigDict`; `configs/demo.py:smoke`
picks the variant. Any field can be overridden on the command line: `--config.num_docs=64`.

Every field a trainer reads is declared here with its default (`stage1_defaults`, `distill_defaults`,
`rerank_defaults`); an experiment file starts from one and changes what differs. A config recorded by a run
(a workdir's config.json, a pipeline stage's marker) is compared with `config_changes`, which does not count a
field added since at its default as a change: new fields do not invalidate finished work.

A spec that is not an existing file names a config shipped with the package (the repository's `configs/`,
installed as `scalingnote_jax.configs`): `demo`, `demo.py` and `configs/demo.py` all find it."""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import json
import os

from ml_collections import ConfigDict

from scalingnote_jax.sharding import DEFAULT_RULES

OPTIM = dict(lr=1e-4, warmup_steps=10, schedule="cosine", final_lr_fraction=0.1, weight_decay=0.01, clip_norm=1.0,
             b1=0.9, b2=0.999)  # AdamW with warmup and decay (train/common.make_optimizer)


def stage1_defaults() -> ConfigDict:
  """Stage 1 (`scalingnote train`, train/stage1.py)."""
  c = ConfigDict()
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
  c.rules = DEFAULT_RULES
  c.num_steps = 100
  c.batch_size = 32  # global queries per step
  c.chunks = 1  # GradCache chunks per step (activation memory of batch_size / chunks)
  c.tied = False  # one set of parameters for both towers
  c.log_every = 10
  # init: "random" (with backbone), a HF dir / GGUF / packaged name (its first num_layers layers; 0 = all), or
  # a Stage 1 workdir (a further round from the towers it trained). doc_seed (random init only): the document
  # tower's own seed; None: both towers start from identical weights.
  # lora.rank > 0: LoRA adapters on the backbone's projections (lora.targets, e.g. ("q", "v"); () = all of q, k,
  # v, o, gate, up, down) are trained and the backbone is frozen; lora.dropout: on the adapters' inputs, in
  # training steps only. freeze_layers = K (without LoRA): the embeddings and the first K blocks are frozen.
  # Frozen parameters are saved once (WORKDIR/base), not per checkpoint, and get no optimizer state. trunk_cache (with freeze_layers, decoders, one process): the frozen
  # blocks' hidden states of the training texts are computed once into a store under $SCALINGNOTE_CACHE_DIR
  # (data/trunk.py) and a step runs only the trained blocks.
  c.model = ConfigDict(dict(init="random", num_layers=0, tokenizer="", seed=0, doc_seed=None, dtype="float32",
                            param_dtype="float32", remat=False, backbone=ConfigDict(),
                            lora=ConfigDict(dict(rank=0, alpha=16.0, targets=(), dropout=0.0)), freeze_layers=0,
                            trunk_cache=False))
  c.tower = ConfigDict(dict(pooling="last", append_eos=True, projection_dim=None, normalize=True, max_length=128,
                            query_prompt="{text}", document_prompt="{title}\n{text}"))
  c.loss = ConfigDict(dict(temperature=0.05, learn_temperature=False, symmetric=False))
  c.optim = ConfigDict(OPTIM)
  # source "synthetic" (num_docs, queries_per_doc, val_fraction, n_neg_candidates) or "beir" (path, splits,
  # train_jsonl: mined negatives); train_fraction: a nested subset of the examples (data-size sweeps).
  c.data = ConfigDict(dict(source="synthetic", path="", train_split="train", val_split="", train_jsonl="",
                           num_docs=256, queries_per_doc=2, val_fraction=0.25, n_neg_candidates=8, seed=0,
                           n_neg=1, query_len=32, doc_len=64, train_fraction=1.0))
  c.checkpoint = ConfigDict(dict(every=50, keep=3))
  # at_start: also evaluate the initial towers (step 0); off when that number is already known.
  c.eval = ConfigDict(dict(every=50, at_start=True, num_negatives=256, max_docs=0, seed=0, batch_size=64))
  return c


def distill_defaults() -> ConfigDict:
  """Stage 2 (`scalingnote distill`, train/stage2.py)."""
  c = ConfigDict()
  c.teacher = ""  # a Stage 1 workdir (required)
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor)
  c.rules = DEFAULT_RULES
  c.num_steps = 150
  c.batch_size = 32  # global queries per step
  c.log_every = 50
  # init: a BERT checkpoint (HF dir or packaged name) whose first num_layers layers are kept (0 = all), or
  # "random" with `backbone` (kind="bert", ...) and `tokenizer`.
  c.student = ConfigDict(dict(init="all-MiniLM-L6-v2", num_layers=1, tokenizer="", seed=0, dtype="float32",
                              param_dtype="float32", remat=False, backbone=ConfigDict()))
  # Unset fields follow the checkpoint (sentence-transformers pooling); projection: "auto" = to the teacher's
  # width when the student's differs, an int, or None.
  c.tower = ConfigDict(dict(projection="auto", max_length=64, query_prompt="{text}", pooling=None))
  # loss = mse_weight * |s - t|^2 + cosine_weight * (1 - cos(s, t)); s normalised first with normalized_mse
  c.loss = ConfigDict(dict(mse_weight=1.0, cosine_weight=1.0, normalized_mse=False))
  c.optim = ConfigDict({**OPTIM, "lr": 2e-3, "warmup_steps": 20})
  # Training queries = the teacher's labelled ones + query_files (.txt, or .jsonl with "text"/"query") +,
  # for a synthetic-corpus teacher, unlabelled_per_doc generated queries per document.
  c.data = ConfigDict(dict(query_files=(), unlabelled_per_doc=4, query_len=24, seed=0))
  c.teacher_cache = ""  # where the teacher's embeddings are cached ("" = WORKDIR/teacher)
  c.teacher_encode = ConfigDict(dict(batch_size=64, chunk_size=4096))
  c.checkpoint = ConfigDict(dict(every=150, keep=2))
  c.eval = ConfigDict(dict(every=150, at_start=True, max_docs=0, seed=0, batch_size=64))
  return c


def rerank_defaults() -> ConfigDict:
  """A cross-encoder reranker (`scalingnote train-reranker`, train/rerank.py)."""
  c = ConfigDict()
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor)
  c.rules = DEFAULT_RULES
  c.loss = "listnet"  # bce (pointwise) | ranknet (pairwise) | listnet (listwise)
  # The score head's bias at step 0: "zero", or "prior": the log-odds of a group's relevant pair, log(1 / (G - 1))
  # (the base rate of BCE's labels).
  c.score_bias = "zero"
  c.num_steps = 50
  c.batch_size = 8  # global queries per step, each with a group of data.group_size pairs
  c.log_every = 10
  # init: a checkpoint (HF dir, GGUF or packaged name; its first num_layers layers, 0 = all) or "random" with
  # `backbone` (kind "bert" or "llm") and `tokenizer`.
  c.model = ConfigDict(dict(init="all-MiniLM-L6-v2", num_layers=2, tokenizer="", seed=0, dtype="float32",
                            param_dtype="float32", remat=False, backbone=ConfigDict()))
  # The pair's tokens: query prompt, then document prompt (cut longest-first to max_length); unset fields
  # follow the checkpoint. BERT scores from [CLS]; a decoder from its last token (pooling="last", append_eos).
  c.tower = ConfigDict(dict(pooling="cls", max_length=24, query_prompt="{text}", document_prompt="{title} {text}"))
  # First stage: "bm25" or a TREC run file per split; groups draw the others from each query's top_k.
  # val_split = train_split holds val_fraction of the training queries out as a dev split (as Stage 1 does:
  # the same seed, the same queries).
  c.data = ConfigDict(dict(path="", train_split="train", val_split="test", val_fraction=0.15, train_run="bm25",
                           val_run="bm25", top_k=30, group_size=4, train_fraction=1.0, seed=0))
  c.optim = ConfigDict({**OPTIM, "lr": 5e-4, "warmup_steps": 5})
  c.checkpoint = ConfigDict(dict(every=25, keep=2))
  # Validation reranks each validation query's first-stage top_k; `fuse`: weights of the reranker's score
  # fused with the first stage's at which nDCG@10 is also reported (`scalingnote rerank --fuse`).
  c.eval = ConfigDict(dict(every=50, at_start=False, top_k=10, batch_size=128, fuse=()))
  return c


def sweep_defaults() -> ConfigDict:
  """A sweep (`scalingnote sweep`, scaling/sweep.py): `base` (a Stage 1 or reranker config) trained at each of
  `sizes` ({name: model fields}) x `data_fractions`; `full_data_only` sizes get the largest fraction only."""
  c = ConfigDict()
  c.kind = "retriever"  # "retriever" (Stage 1 runs) or "reranker"
  c.base = ConfigDict()
  c.sizes = ConfigDict()
  c.data_fractions = (1.0,)
  c.full_data_only = ()
  return c


def flat(d: dict, prefix: str = "") -> dict:
  """{"a.b": value} of a nested dict (a ConfigDict's to_dict())."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(old: dict, new: dict, defaults: ConfigDict | None = None) -> dict[str, list]:
  """{field: [old value, new value]} where two configs (nested dicts, as JSON gives them back) differ. A field
  that only one of them has is no change when it holds its value in `defaults`: a config recorded before the
  field existed ran with what the default says."""
  old, new = flat(_json_roundtrip(old)), flat(_json_roundtrip(new))
  known = flat(_json_roundtrip(defaults.to_dict())) if defaults is not None else {}
  missing = object()
  changes = {}
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key, missing), new.get(key, missing)
    if a is missing and key in known and b == known[key] or b is missing and key in known and a == known[key]:
      continue
    if a != b:
      changes[key] = [None if a is missing else a, None if b is missing else b]
  return changes


def with_defaults(recorded: dict, defaults: ConfigDict) -> ConfigDict:
  """A recorded config (a workdir's config.json) with the fields added since it was written, at their
  defaults."""
  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and base[k] else v
    return out
  return ConfigDict(merge(defaults.to_dict(), recorded))


def _json_roundtrip(d: dict) -> dict:
  return json.loads(json.dumps(d, default=str))


def resolve_config_path(path: str) -> str:
  """`path` itself when it exists, else the packaged config of that name."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  packaged = importlib.resources.files("scalingnote_jax.configs") / name
  if os.path.dirname(path) in ("", "configs") and packaged.is_file():
    return str(packaged)
  shipped = sorted(f.name[:-3] for f in importlib.resources.files("scalingnote_jax.configs").iterdir()
                   if f.name.endswith(".py") and "def get_config" in f.read_text())
  raise FileNotFoundError(f"{path}: no such config file, and no packaged config of that name "
                          f"(packaged: {', '.join(shipped)})")


def load_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
  path, _, variant = spec.partition(":")
  path = resolve_config_path(path)
  module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"{path}: defines no get_config(variant)")
  cfg = module.get_config(variant)
  for item in overrides:
    apply_override(cfg, item, path)
  cfg.lock()
  return cfg


def apply_override(cfg: ConfigDict, item: str, source: str) -> None:
  """`key.sub=value`; the value is a Python literal, or a plain string when it is not one."""
  key, eq, raw = item.removeprefix("--config.").partition("=")
  if not eq:
    raise ValueError(f"override {item!r}: expected --config.field=value")
  *parents, leaf = key.split(".")
  node = cfg
  for name in parents + [leaf]:
    if not isinstance(node, ConfigDict) or name not in node:
      fields = sorted(node.keys()) if isinstance(node, ConfigDict) else []
      raise KeyError(f"{source}: no config field {key!r} (fields here: {', '.join(fields)})")
    if name != leaf:
      node = node[name]
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if old is not None and value is not None and type(old) is not type(value):
    raise TypeError(f"{source}: field {key!r} is {type(old).__name__}, got {raw!r}")
  node[leaf] = value
