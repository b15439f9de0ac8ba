"""Sentence-transformers folders, both ways: what a folder's `modules.json` adds to its Transformer (pooling,
length, a linear Dense, Normalize, prompts) as tower settings, and a tower written as such a folder (the HF
model files beside `modules.json`, `1_Pooling`, `2_Dense`, `sentence_bert_config.json`, prompts), loadable
by sentence-transformers and transformers."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors.numpy import load_file, save_file

from scalingnote_jax.models import save_backbone

TOWER_FILE = "scalingnote_tower.json"  # an exported tower's exact settings (TowerConfig fields)
ST_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")  # sentence_transformers.models.<name>, in this order
IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


@dataclasses.dataclass(frozen=True)
class SentenceTransformersFolder:
  """What a sentence-transformers folder adds to its Transformer: `fields` (TowerConfig fields: pooling,
  max_length, normalize, projection, prompts) and `dense` (the directory of a Dense module's weights)."""
  fields: dict
  dense: str | None = None
  modules: tuple[str, ...] = ()  # the module types modules.json lists (none: a plain HF folder)


def sentence_transformers_folder(model_dir: str) -> SentenceTransformersFolder:
  """Reads a sentence-transformers folder as its `modules.json` lists it. A module this tower cannot
  compute (another type, an activation, a pooling mode) is an error naming it, never dropped: the
  embeddings would silently differ. Without modules.json: `1_Pooling` and `sentence_bert_config.json` if present."""
  def read(*parts):
    fn = os.path.join(model_dir, *parts)
    return fn, _read_json(fn)

  fields, dense = {}, None
  max_length = (read("sentence_bert_config.json")[1] or {}).get("max_seq_length")
  if max_length:
    fields["max_length"] = max_length
  fn, modules = read("modules.json")
  if modules is None:  # a plain HF folder, perhaps with sentence-transformers' side files
    pooling = _pooling_mode(*read("1_Pooling", "config.json"))
    return SentenceTransformersFolder({**fields, **({"pooling": pooling} if pooling else {})})
  kinds = []
  for m in sorted(modules, key=lambda m: m.get("idx", 0)):
    kind = str(m.get("type", "")).rsplit(".", 1)[-1]
    if not str(m.get("type", "")).startswith("sentence_transformers.") or kind not in ST_TYPES:
      raise ValueError(f"{fn}: module {m.get('name')!r} of type {m.get('type')!r} is not supported (supported: "
                       f"{', '.join(ST_TYPES)}); loading the folder without it would change its embeddings")
    kinds.append(kind)
    path = m.get("path", "")
    if kind == "Pooling":
      pfn, pool_cfg = read(path, "config.json")
      fields["pooling"] = _pooling_mode(pfn, pool_cfg or {})
      if (pool_cfg or {}).get("include_prompt") is False:
        raise ValueError(f"{pfn}: include_prompt=false (the prompt's tokens left out of pooling) is not supported")
    elif kind == "Dense":
      dfn, d = read(path, "config.json")
      if d is None or d.get("activation_function", IDENTITY[0]) not in IDENTITY:
        raise ValueError(f"{dfn}: only a linear Dense module (activation Identity) is supported, got "
                         f"{(d or {}).get('activation_function', 'no config.json')!r}")
      if not os.path.exists(os.path.join(model_dir, path, "model.safetensors")):
        raise ValueError(f"{os.path.join(model_dir, path)}: a Dense module's weights are read from "
                         "model.safetensors only (pickled pytorch_model.bin is never loaded)")
      if not isinstance(d.get("out_features"), int):
        raise ValueError(f"{dfn}: field 'out_features' missing or not an integer")
      fields.update(projection_dim=d["out_features"], projection_bias=bool(d.get("bias", True)))
      dense = os.path.join(model_dir, path)
  if kinds[:1] != ["Transformer"] or kinds != sorted(kinds, key=ST_TYPES.index) or len(set(kinds)) != len(kinds):
    raise ValueError(f"{fn}: modules {kinds}: expected Transformer, then at most one each of Pooling, Dense, "
                     "Normalize in that order")
  fields["normalize"] = "Normalize" in kinds
  prompts = (read("config_sentence_transformers.json")[1] or {}).get("prompts") or {}
  escape = lambda p: p.replace("{", "{{").replace("}", "}}")  # noqa: E731  (the prompt is a format string)
  if prompts.get("query"):
    fields["query_prompt"] = escape(prompts["query"]) + "{text}"
  document = next((prompts[k] for k in ("document", "passage", "corpus") if prompts.get(k)), "")
  if document:
    fields["document_prompt"] = escape(document) + "{title} {text}"
  return SentenceTransformersFolder(fields, dense, tuple(kinds))


def _pooling_mode(fn: str, pool: dict | None) -> str | None:
  if not pool:
    return None
  modes = [name for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                                  ("pooling_mode_lasttoken", "last")) if pool.get(key)]
  others = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v and k not in (
      "pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_lasttoken")]
  if len(modes) != 1 or others:
    raise ValueError(f"{fn}: unsupported pooling mode {pool}")
  return modes[0]


def load_dense(tower, dense_dir: str) -> None:
  """A sentence-transformers Dense module's weights (torch's linear [out, in]) into the tower's projection."""
  weights = load_file(os.path.join(dense_dir, "model.safetensors"))
  kernel = weights["linear.weight"].T
  if tower.projection is None or kernel.shape != tower.projection.kernel.shape:
    raise ValueError(f"{dense_dir}/model.safetensors: linear.weight {weights['linear.weight'].shape} does not fit "
                     f"the projection {None if tower.projection is None else tower.projection.kernel.shape[::-1]}")
  tower.projection.kernel[...] = jnp.asarray(kernel, tower.projection.kernel.dtype)
  if tower.projection.bias is not None:
    tower.projection.bias[...] = jnp.asarray(weights["linear.bias"], tower.projection.bias.dtype)


def read_saved_tower(model_dir: str) -> dict | None:
  """The TowerConfig fields an exported folder records, or None."""
  return _read_json(os.path.join(model_dir, TOWER_FILE))


def _read_json(fn: str):
  """A folder's JSON file, None when absent; invalid JSON is an error naming the file and line."""
  if not os.path.exists(fn):
    return None
  with open(fn) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{fn}:{e.lineno}: invalid JSON: {e.msg}") from None


def save_folder(tower, tokenizer, out_dir: str) -> None:
  """Writes `tower` (its backbone as HF's base model, LoRA merged beforehand) with `tokenizer` as a
  sentence-transformers folder in the existing directory `out_dir`. EOS appending moves into the exported
  tokenizer's template, so transformers' and sentence-transformers' tokenization is the tower's own."""
  cfg = tower.cfg
  save_backbone(tower.backbone, out_dir)
  save_tokenizer(tokenizer, out_dir, max_length=cfg.max_length, append_eos=cfg.append_eos)
  saved = dataclasses.replace(cfg, append_eos=False)  # (the tokenizer appends it now)
  _write(out_dir, TOWER_FILE, dataclasses.asdict(saved))

  width = tower.backbone.cfg.hidden_size
  modules = [("Transformer", "")]
  modes = {m: cfg.pooling == name for m, name in (("pooling_mode_cls_token", "cls"),
                                                  ("pooling_mode_mean_tokens", "mean"),
                                                  ("pooling_mode_lasttoken", "last"))}
  _write(out_dir, "1_Pooling/config.json", {"word_embedding_dimension": width, **modes, "pooling_mode_max_tokens": False,
                                            "pooling_mode_mean_sqrt_len_tokens": False,
                                            "pooling_mode_weightedmean_tokens": False, "include_prompt": True})
  modules.append(("Pooling", "1_Pooling"))
  if tower.projection is not None:
    kernel = np.asarray(tower.projection.kernel[...], np.float32)
    weights = {"linear.weight": np.ascontiguousarray(kernel.T)}
    if tower.projection.bias is not None:
      weights["linear.bias"] = np.asarray(tower.projection.bias[...], np.float32)
    _write(out_dir, "2_Dense/config.json", {"in_features": kernel.shape[0], "out_features": kernel.shape[1],
                                            "bias": tower.projection.bias is not None,
                                            "activation_function": IDENTITY[0]})
    save_file(weights, os.path.join(out_dir, "2_Dense", "model.safetensors"), metadata={"format": "pt"})
    modules.append(("Dense", "2_Dense"))
  if cfg.normalize:
    modules.append(("Normalize", f"{len(modules)}_Normalize"))
  _write(out_dir, "modules.json", [{"idx": i, "name": str(i), "path": path,
                                    "type": f"sentence_transformers.models.{kind}"}
                                   for i, (kind, path) in enumerate(modules)])
  _write(out_dir, "sentence_bert_config.json", {"max_seq_length": cfg.max_length, "do_lower_case": False})
  prefix = lambda template: (template[:-len("{text}")].replace("{{", "{").replace("}}", "}")  # noqa: E731
                             if template.endswith("{text}") and "{title}" not in template else None)
  prompts = {k: p for k, p in (("query", prefix(cfg.query_prompt)), ("document", prefix(cfg.document_prompt)))
             if p}  # sentence-transformers prompts are prefixes: a template with a title slot stays in TOWER_FILE
  _write(out_dir, "config_sentence_transformers.json", {"prompts": prompts, "default_prompt_name": None,
                                                        "similarity_fn_name": "cosine"})


def save_tokenizer(tokenizer, out_dir: str, *, max_length: int, append_eos: bool, pad_id: int | None = None) -> None:
  """tokenizer.json (an appended EOS moved into its single and pair templates, so transformers' tokenization is
  ours), tokenizer_config.json (cut to `max_length`, padded on the right with `pad_id`, default the tokenizer's)
  and the special ids `Tokenizer.from_pretrained` reads."""
  pad_id = tokenizer.pad_id if pad_id is None else pad_id
  tok = tokenizers.Tokenizer.from_str(tokenizer.tok.to_str())
  if append_eos:
    eos = tok.id_to_token(tokenizer.eos_id)
    template = tokenizers.processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                        special_tokens=[(eos, tokenizer.eos_id)])
    tok.post_processor = (template if tok.post_processor is None
                          else tokenizers.processors.Sequence([tok.post_processor, template]))
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  _write(out_dir, "scalingnote_tokenizer.json", {"pad_id": pad_id, "eos_id": tokenizer.eos_id})
  special = {k: tok.id_to_token(i) for k, i in (("pad_token", pad_id), ("eos_token", tokenizer.eos_id))
             if i is not None}
  _write(out_dir, "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                            "model_max_length": max_length, "padding_side": "right", **special})


def _write(out_dir: str, name: str, obj) -> None:
  path = os.path.join(out_dir, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
