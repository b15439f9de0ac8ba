"""Trained models in the workdirs trainers leave, and the code that reads them back (for encoding, serving,
evaluation and the next stage). Trainers write them; nothing else needs a trainer to read one.

  a Stage 1 workdir     config.json (the run's config: what rebuilds the dual encoder), checkpoints/ (orbax:
                        the trained parameters, optimizer state, data iterator), metrics.jsonl, tensorboard/;
                        with LoRA or frozen layers also base.json (the fingerprint of the frozen parameters,
                        saved once, and where they are: base/, or in a pipeline WORKDIR/frozen/<fingerprint>/,
                        shared by the runs whose frozen parameters are the same)
  a one-tower workdir   the same, plus a spec (student.json of a Stage 2 student, reranker.json of a
                        reranker): backbone and tower configs, tokenizer, init; a student's also names its
                        teacher by fingerprints
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from scalingnote_jax import models, sharding
from scalingnote_jax.artifacts.checkpoint import Checkpointer, abstract_like, fingerprint, leaf_digests
from scalingnote_jax.artifacts.files import fsync_tree, replace_dir, write_atomic
from scalingnote_jax.config import stage1_defaults, with_defaults
from scalingnote_jax.models import bert, llm, lora
from scalingnote_jax.models.dual import DualEncoder
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.models.st_folder import sentence_transformers_folder
from scalingnote_jax.models.tower import Tower, TowerConfig

CONFIG_FILE = "config.json"
STUDENT_FILE = "student.json"
RERANKER_FILE = "reranker.json"
BASE_DIR, BASE_FILE = "base", "base.json"
BASE_ARRAYS, BASE_LEAVES = "arrays", "leaves.json"  # inside a base directory


def read_config(workdir: str, defaults: ConfigDict | None = None) -> ConfigDict:
  """A workdir's recorded config; with `defaults`, fields added since it was written hold their defaults."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    recorded = json.load(f)
  return ConfigDict(recorded) if defaults is None else with_defaults(recorded, defaults)


def restore(abstract_module: nnx.Module, ckpt: Checkpointer, step: int, mesh, rules, tx=None, trainable=nnx.Param):
  """(graphdef, params, opt_state, data_state) of checkpoint `step`, restored straight into `mesh`'s
  shardings under `rules` (they may differ from the saving run's). Without `tx` only the parameters are
  read. `trainable`: the parameters a checkpoint holds (the rest are the frozen base, `read_base`)."""
  graphdef, abstract, _ = nnx.split(abstract_module, trainable, ...)
  abstract = abstract_like(abstract, sharding.state_shardings(abstract, mesh, rules))
  abstract_opt = None if tx is None else sharding.abstract_optimizer(tx, abstract, mesh)
  params, opt_state, data_state = ckpt.restore(step, abstract, abstract_opt)
  return graphdef, params, opt_state, data_state


def _load(workdir: str, abstract_of, mesh, step: int | None, defaults=None,
          trainable_of=lambda cfg: nnx.Param) -> tuple[nnx.Module, ConfigDict]:
  """(module, config) of a workdir's checkpoint `step` (default: the latest complete one), with its frozen
  base when it has one."""
  cfg = read_config(workdir, defaults)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  abstract, trainable = abstract_of(cfg), trainable_of(cfg)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep)
  try:
    if step is not None and step not in ckpt.manager.all_steps():
      raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint of step {step} (there are: "
                              f"{sorted(ckpt.manager.all_steps())}); a finished pipeline stage keeps only its final "
                              "one, unless its config sets keep_all_checkpoints=True")
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir}/checkpoints: no complete checkpoint")
    graphdef, params, _, _ = restore(abstract, ckpt, step, mesh, cfg.rules, trainable=trainable)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, params, read_base(workdir, abstract, trainable, mesh, cfg.rules)), cfg


def write_base(workdir: str, frozen: nnx.State, shared: str | None = None) -> None:
  """Saves a run's frozen parameters once (a LoRA run's backbone, frozen lower layers) with their
  fingerprint, so that checkpoints hold only what trains. Nothing when nothing is frozen.

  The base goes to `workdir`/base, or with `shared` (a pipeline's WORKDIR/frozen) to `shared`/<fingerprint>,
  written only when no earlier run stored the same parameters there (a mining round's frozen parameters are
  its teacher's). base.json records the fingerprint and where the base lives, relative to `workdir` (a
  moved pipeline workdir still reads)."""
  if not jax.tree.leaves(frozen):
    return
  workdir = os.path.abspath(workdir)
  digest = fingerprint(frozen)
  where = os.path.join(os.path.abspath(shared), digest) if shared else os.path.join(workdir, BASE_DIR)
  if not (shared and os.path.isdir(where)):  # a directory there is complete: it appears by a rename, whole
    _save_base(where, frozen)
  if jax.process_index() == 0:
    write_atomic(os.path.join(workdir, BASE_FILE), json.dumps({"fingerprint": digest,
                                                               "dir": os.path.relpath(where, workdir)}))


def _save_base(where: str, frozen: nnx.State) -> None:
  """`frozen` in the directory `where` (replacing one there): arrays/ holds each distinct leaf once, keyed by its
  content hash, and leaves.json maps every leaf path to its hash. (Untied towers start from one model: their
  frozen embeddings and blocks are the same arrays, and being frozen they stay so; a demo teacher's base is
  half its size this way.) Written in a staging directory renamed into place, so a crash never leaves a
  partial base under `where`; the staging name is the same on every process, as orbax saves collectively."""
  leaves = leaf_digests(frozen)
  distinct = {}
  for path, x in jax.tree_util.tree_flatten_with_path(frozen)[0]:
    distinct.setdefault(leaves[jax.tree_util.keystr(path)], x)
  staging = os.path.join(os.path.dirname(where), f".{os.path.basename(where)}.partial")
  os.makedirs(staging, exist_ok=True)  # (one a crash left is overwritten)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(staging, BASE_ARRAYS), distinct, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    write_atomic(os.path.join(staging, BASE_LEAVES), json.dumps(leaves, indent=1))
    fsync_tree(staging)
    replace_dir(staging, where)
  if jax.process_count() > 1:  # no process goes on before the base is in place
    multihost_utils.sync_global_devices("write_base")


def read_base(workdir: str, abstract_module: nnx.Module, trainable, mesh, rules) -> nnx.State:
  """The frozen parameters `write_base` saved (empty when nothing is frozen), in `mesh`'s shardings, checked
  against the fingerprint recorded with them."""
  _, _, abstract = nnx.split(abstract_module, trainable, ...)
  if not jax.tree.leaves(abstract):
    return abstract
  base_file = os.path.join(workdir, BASE_FILE)
  if not os.path.isfile(base_file):
    raise FileNotFoundError(f"{workdir}: no {BASE_FILE}: the frozen parameters of this run were never saved")
  with open(base_file) as f:
    recorded = json.load(f)
  where = os.path.normpath(os.path.join(os.path.abspath(workdir), recorded.get("dir", BASE_DIR)))  # (orbax: absolute)
  if not os.path.isdir(where):
    raise FileNotFoundError(f"{where}: missing: the frozen parameters that {base_file} names (a pipeline's are in "
                            "its frozen/ directory: copy or move the pipeline workdir whole)")
  abstract = abstract_like(abstract, sharding.state_shardings(abstract, mesh, rules))
  try:
    if os.path.isfile(os.path.join(where, BASE_LEAVES)):
      frozen = _restore_base(where, abstract)
    else:  # a base written before distinct leaves were stored once: the whole tree
      frozen = ocp.StandardCheckpointer().restore(where, abstract)
  except Exception as e:  # noqa: BLE001 -- orbax / tensorstore raise many kinds for an unreadable file
    raise ValueError(f"{where}: the frozen parameters of {workdir} could not be read ({type(e).__name__}: {e})") from e
  if fingerprint(frozen) != recorded["fingerprint"]:
    raise ValueError(f"{where}: the frozen parameters do not match the fingerprint in {BASE_FILE} of {workdir} "
                     "(corrupted or replaced)")
  return frozen


def _restore_base(where: str, abstract: nnx.State) -> nnx.State:
  """The tree `_save_base` wrote, each leaf restored from its distinct array into its own sharding."""
  with open(os.path.join(where, BASE_LEAVES)) as f:
    leaves = json.load(f)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  paths = [jax.tree_util.keystr(path) for path, _ in flat]
  if set(paths) != set(leaves):
    raise ValueError(f"{where}/{BASE_LEAVES}: the leaves stored ({len(leaves)}) are not this model's frozen "
                     f"parameters ({len(paths)}; e.g. {sorted(set(paths) ^ set(leaves))[:2]})")
  distinct = {}
  for path, (_, x) in zip(paths, flat):
    distinct.setdefault(leaves[path], x)
  arrays = ocp.StandardCheckpointer().restore(os.path.join(where, BASE_ARRAYS), distinct)
  return jax.tree_util.tree_unflatten(treedef, [jax.device_put(arrays[leaves[path]], x.sharding)
                                                for path, (_, x) in zip(paths, flat)])


def _backbone(fields: dict, **overrides):
  """A backbone config from its fields with their `kind` ("llm" or "bert")."""
  fields = dict(fields)
  cls = {"llm": llm.LLMConfig, "bert": bert.BertConfig}[fields.pop("kind")]
  return cls(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------------------
# A Stage 1 workdir: the dual encoder.

def is_stage1_workdir(path: str) -> bool:
  """A trainer's workdir (config.json, checkpoints/) that is not a one-tower one (a student's, a reranker's)."""
  return (os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints"))
          and not any(os.path.exists(os.path.join(path, f)) for f in (STUDENT_FILE, RERANKER_FILE)))


def backbone_config(m: ConfigDict):
  """The backbone config of a `model` section with `init="random"`."""
  return _backbone(m.backbone.to_dict(), dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)


def checkpoint_overrides(m: ConfigDict) -> dict:
  """Backbone fields a config sets over a checkpoint's: dtypes, remat, and `num_layers` (> 0: keep the first
  layers only, e.g. a small dual tower from a larger encoder)."""
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
              **({"num_layers": m.num_layers} if m.num_layers else {}))


def lora_config(m: ConfigDict) -> lora.LoRAConfig | None:
  """The LoRA adapters of a `model` section (None: the backbone trains whole)."""
  if not m.lora.rank:
    return None
  return lora.LoRAConfig(rank=m.lora.rank, alpha=m.lora.alpha, targets=tuple(m.lora.targets) or lora.TARGETS,
                         dropout=m.lora.dropout)


def _towers(model: DualEncoder, cfg: ConfigDict) -> tuple:
  """The distinct towers (one when tied)."""
  return (model.query,) if cfg.tied else (model.query, model.doc)


def add_adapters(model: DualEncoder, cfg: ConfigDict) -> None:
  """The config's LoRA adapters on both towers' backbones (one set when tied)."""
  adapters = lora_config(cfg.model)
  if adapters is not None:
    rngs = nnx.Rngs(cfg.model.seed + 1)
    for tower in _towers(model, cfg):
      lora.add(tower.backbone, adapters, rngs)


def trainable(cfg: ConfigDict):
  """The nnx filter of what a Stage 1 run trains: every parameter; with LoRA the adapters and what is not a
  backbone (temperature, projection); with `freeze_layers` K all but the embeddings and the first K blocks."""
  m = cfg.model
  if m.lora.rank and m.freeze_layers:
    raise ValueError(f"model.lora.rank={m.lora.rank} with model.freeze_layers={m.freeze_layers}: LoRA freezes the "
                     "whole backbone already; set one of them")
  if m.freeze_layers < 0:
    raise ValueError(f"model.freeze_layers={m.freeze_layers}: expected >= 0 (the number of lower blocks frozen)")
  if not m.lora.rank and not m.freeze_layers:
    return nnx.Param

  def is_trainable(path, var) -> bool:
    if not isinstance(var, nnx.Param):
      return False
    if isinstance(var, nnx.LoRAParam) or "backbone" not in path:
      return True
    if m.lora.rank:
      return False
    inside = path[path.index("backbone") + 1:]
    if inside[0] == "layers":
      return inside[1] >= m.freeze_layers
    return inside[0] == "norm"  # the final norm follows the trained blocks; embeddings stay frozen
  return is_trainable


def previous_round(cfg: ConfigDict) -> ConfigDict:
  """The config of the Stage 1 run that `model.init` names (a warm start, e.g. after mining negatives).
  The towers keep that run's structure, so the parts that define it must agree."""
  prev = read_config(cfg.model.init, stage1_defaults())
  for key in ("tied", "tower", "loss.learn_temperature"):
    a, b = prev, cfg
    for part in key.split("."):
      a, b = a[part], b[part]
    if (a.to_dict() if isinstance(a, ConfigDict) else a) != (b.to_dict() if isinstance(b, ConfigDict) else b):
      raise ValueError(f"model.init={cfg.model.init}: its {key} ({a}) differs from this config's ({b})")
  return prev


def _create_dual_encoder(cfg: ConfigDict, adapters: bool = True) -> DualEncoder:
  """The dual encoder a Stage 1 config describes, randomly initialised (its structure, under eval_shape). A
  warm start from a workdir has that run's towers, its adapters merged, and this run's adapters."""
  m = cfg.model
  if is_stage1_workdir(m.init):
    model = _create_dual_encoder(previous_round(cfg), adapters=False)
  else:
    bcfg = backbone_config(m) if m.init == "random" else models.backbone_config(m.init, **checkpoint_overrides(m))
    tower_cfg = TowerConfig(**cfg.tower)
    query = Tower.create(bcfg, tower_cfg, nnx.Rngs(m.seed))
    doc = query if cfg.tied else Tower.create(bcfg, tower_cfg, nnx.Rngs(m.seed if m.doc_seed is None else m.doc_seed))
    model = DualEncoder(query, doc, cfg.loss.temperature, cfg.loss.learn_temperature)
  if adapters:
    add_adapters(model, cfg)
  return model


def abstract_dual_encoder(cfg: ConfigDict) -> DualEncoder:
  """The dual encoder a Stage 1 config describes, with no memory behind it (for restoring into)."""
  return nnx.eval_shape(lambda: _create_dual_encoder(cfg))


def stage1_tokenizer(cfg: ConfigDict) -> Tokenizer:
  """The towers' tokenizer, following `model.init` back through warm-started rounds."""
  m = cfg.model
  if is_stage1_workdir(m.init):
    return stage1_tokenizer(previous_round(cfg))
  return Tokenizer.from_pretrained(m.tokenizer or m.init)


def load_stage1(workdir: str, mesh=None, step: int | None = None) -> tuple[DualEncoder, Tokenizer, ConfigDict]:
  """The dual encoder of a Stage 1 workdir (its latest checkpoint unless `step`), its tokenizer and config.
  LoRA adapters come merged into the base weights: the same function, at no cost for encoding and serving."""
  model, cfg = _load(workdir, abstract_dual_encoder, mesh, step, stage1_defaults(), trainable)
  for tower in _towers(model, cfg):
    lora.merge(tower.backbone)
  return model, stage1_tokenizer(cfg), cfg


# ----------------------------------------------------------------------------------------------------------
# A one-tower workdir (a Stage 2 student, a reranker): the tower its spec describes.

def tower_spec(s: ConfigDict, tower: ConfigDict, teacher_dim: int | None = None) -> dict:
  """What student.json (a reranker's reranker.json) records: backbone config (with its kind), tower config,
  tokenizer, init. `s`: init / num_layers / tokenizer / backbone / dtypes; `tower`: TowerConfig fields
  (unset ones follow the checkpoint) and `projection` (None, an int, or "auto": to `teacher_dim` when the
  backbone's width differs)."""
  if s.init == "random":
    bcfg, model_dir, tokenizer = backbone_config(s), None, s.tokenizer
  else:
    model_dir = models.resolve_path(s.init)
    full = models.backbone_config(model_dir).num_layers
    bcfg = models.backbone_config(model_dir, num_layers=s.num_layers or full, dtype=s.dtype,
                                  param_dtype=s.param_dtype, remat=s.remat)
    tokenizer = s.tokenizer or model_dir
  fields = {k: v for k, v in tower.items() if k != "projection" and v is not None}
  projection = tower.projection
  if projection == "auto":
    projection = teacher_dim if bcfg.hidden_size != teacher_dim else None
  folder = model_dir if model_dir and os.path.isdir(model_dir) else None
  if folder and isinstance(bcfg, bert.BertConfig) and sentence_transformers_folder(folder).dense:
    raise ValueError(f"{s.init}: its sentence-transformers Dense module would be left out of this tower (it has its "
                     "own `projection`); start from a folder without one")
  tower = TowerConfig.default_for(bcfg, folder, projection_dim=projection or None, **fields)
  kind = "bert" if isinstance(bcfg, bert.BertConfig) else "llm"
  return {"backbone": {"kind": kind, **dataclasses.asdict(bcfg)}, "tower": dataclasses.asdict(tower),
          "tokenizer": tokenizer, "init": model_dir or "random"}


def tower_configs(spec: dict):
  """(backbone config, tower config) of a spec."""
  return _backbone(spec["backbone"]), TowerConfig(**spec["tower"])


def abstract_tower(spec: dict) -> Tower:
  bcfg, tcfg = tower_configs(spec)
  return nnx.eval_shape(lambda: Tower.create(bcfg, tcfg, nnx.Rngs(0)))


def read_spec(workdir: str, spec_file: str = STUDENT_FILE) -> dict:
  with open(os.path.join(workdir, spec_file)) as f:
    return json.load(f)


def load_tower(workdir: str, mesh=None, step: int | None = None,
               spec_file: str = STUDENT_FILE) -> tuple[Tower, Tokenizer, dict]:
  """The tower of a Stage 2 workdir (or of a workdir with another `spec_file`: a reranker's), latest
  checkpoint unless `step`, its tokenizer and its spec."""
  spec = read_spec(workdir, spec_file)
  tower, _ = _load(workdir, lambda cfg: abstract_tower(spec), mesh, step)
  return tower, Tokenizer.from_pretrained(spec["tokenizer"]), spec
