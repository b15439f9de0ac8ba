"""`scalingnote export-hf`: a trained model leaves the project as a Hugging Face / sentence-transformers folder
(models/st_folder.py): a Stage 1 workdir's towers (LoRA merged) as OUT/query and OUT/document (OUT itself
when tied), a Stage 2 student as OUT, a reranker as OUT: a sequence-classification model
(`BertForSequenceClassification`, `LlamaForSequenceClassification`, ...) that `transformers` and
`sentence_transformers.CrossEncoder` load, refused when that class cannot compute what the reranker does.
Written beside OUT, checked (read back, it computes what the trained model does), then moved into place whole."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.files import fsync_tree, replace_dir
from scalingnote_jax.models import backbone_config, bert, create_backbone, llm, load_backbone
from scalingnote_jax.models.checkpoint import SafetensorsReader, load_params, save_params
from scalingnote_jax.models.st_folder import save_folder, save_tokenizer

PROBE_IDS = np.arange(2, 18, dtype=np.int32).reshape(2, 8)  # token ids every vocabulary has
# BertForSequenceClassification scores tanh(pooler(h_CLS)); our reranker scores h_CLS linearly. A pooler of
# POOLER_SCALE * I with the classifier scaled by 1 / POOLER_SCALE computes tanh(e h) / e = h (1 - (e h)^2 / 3 + ...):
# for |h| <= 8 (MiniLM's largest [CLS] features) within 8e-8 relative, float32's rounding. A power of two: exact.
POOLER_SCALE = 2.0 ** -14
IDENTITY = "torch.nn.modules.linear.Identity"  # sentence-transformers' CrossEncoder applies a sigmoid by default
HEADS = {"bert": ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"),
         "llm": ("score.weight",)}


def export_hf(workdir: str, out: str) -> dict:
  """Writes the model of `workdir` to `out` (which must not exist or be empty); returns {folder: kind}."""
  _check_out(out)
  if os.path.exists(os.path.join(workdir, trained.RERANKER_FILE)):
    tower, tokenizer, _ = trained.load_tower(workdir, spec_file=trained.RERANKER_FILE)
    return export_reranker(tower, tokenizer, out)
  if os.path.exists(os.path.join(workdir, trained.STUDENT_FILE)):
    tower, tokenizer, _ = trained.load_tower(workdir)
    towers = {"": tower}
  elif trained.is_stage1_workdir(workdir):
    model, tokenizer, cfg = trained.load_stage1(workdir)  # adapters merged into the weights
    towers = {"": model.query} if cfg.tied else {"query": model.query, "document": model.doc}
  else:
    raise ValueError(f"{workdir}: neither a Stage 1, a Stage 2 nor a reranker workdir")

  def write(tmp: str) -> None:
    for sub, tower in towers.items():
      folder = os.path.join(tmp, sub)
      os.makedirs(folder, exist_ok=True)
      save_folder(tower, tokenizer, folder)
      _check_read_back(tower.backbone, load_backbone(folder)[0], folder)

  _publish(out, write)
  return {os.path.join(out, sub) if sub else out: sub or "tower" for sub in towers}


def export_reranker(tower, tokenizer, out: str) -> dict:
  """Writes a reranker (a tower with a score head: `train/rerank.py`) to `out` as a sequence-classification
  folder; a reranker that class cannot reproduce is refused before anything is written. Returns {out: kind}."""
  _check_out(out)
  architecture, pad_id = _sequence_classification(tower, tokenizer)
  kind = "bert" if isinstance(tower.backbone.cfg, bert.BertConfig) else "llm"

  def write(tmp: str) -> None:
    _save_reranker(tower, tokenizer, tmp, architecture, pad_id)
    exported = _read_backbone(tmp, HEADS[kind])
    _check_read_back(tower.backbone, exported, tmp)
    _check_scores(tower, exported, tmp, tokenizer.eos_id, pad_id)

  _publish(out, write)
  return {out: "reranker"}


def _sequence_classification(tower, tokenizer) -> tuple[str, int]:
  """(HF architecture, pad id) of the sequence-classification model that computes what the reranker does; a
  ValueError naming every difference when there is none."""
  cfg, bcfg = tower.cfg, tower.backbone.cfg
  problems = []
  if tower.projection is None or cfg.projection_dim != 1 or cfg.normalize:
    problems.append("not a score head (a projection to 1 output, not normalised)")
  if (cfg.query_prompt.format(text="x").strip() != "x"
      or cfg.document_prompt.format(title="", text="x").strip() != "x"):
    problems.append(f"prompts {cfg.query_prompt!r} / {cfg.document_prompt!r}: sentence-transformers' CrossEncoder "
                    "scores the (query, document) texts as given")
  if isinstance(bcfg, bert.BertConfig):
    architecture, pad_id = "BertForSequenceClassification", tokenizer.pad_id
    if cfg.pooling != "cls":
      problems.append(f"pooling={cfg.pooling!r}: {architecture} scores the [CLS] token (pooling='cls')")
  else:
    architecture = bcfg.to_hf()["architectures"][0].replace("Model", "ForSequenceClassification")
    pad_id = _pad_besides_eos(tokenizer)
    if cfg.pooling != "last" or not cfg.append_eos:
      problems.append(f"pooling={cfg.pooling!r}, append_eos={cfg.append_eos}: {architecture} scores the last "
                      "token that is not padding, which needs pooling='last' on an appended EOS")
    if pad_id is None:
      problems.append(f"the tokenizer has no special token besides EOS ({tokenizer.eos_id}) to pad with: "
                      f"{architecture} would take the EOS for padding")
    bias = 0.0 if tower.projection is None or tower.projection.bias is None else float(tower.projection.bias[0])
    if bias != 0.0:
      problems.append(f"score bias {bias:.4g}: {architecture}'s score layer has none (every score would shift)")
    if tokenizer.tok.post_processor is None:
      problems.append("the tokenizer has no pair template, so a newline goes between query and document; a "
                      "Hugging Face tokenizer's pair encoding cannot put it there and truncate the same way")
  if problems:
    raise ValueError(f"this reranker cannot be exported as {architecture}: " + "; ".join(problems))
  return architecture, pad_id


def _pad_besides_eos(tokenizer) -> int | None:
  """A pad id other than EOS (`*ForSequenceClassification` scores the last token that is not padding, and that
  must be the EOS a pair ends with): the tokenizer's, else its lowest-numbered other special token."""
  if tokenizer.pad_id != tokenizer.eos_id:
    return tokenizer.pad_id
  special = [i for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.special and i != tokenizer.eos_id]
  return min(special) if special else None


def _save_reranker(tower, tokenizer, folder: str, architecture: str, pad_id: int) -> None:
  """The backbone under its task model's prefix (the import table in reverse), the score head, config.json and
  the tokenizer (cut to the reranker's length, EOS in its pair template)."""
  bcfg = tower.backbone.cfg
  is_bert = isinstance(bcfg, bert.BertConfig)
  path = os.path.join(folder, "model.safetensors")
  save_params(tower.backbone, (bert if is_bert else llm).hf_rows(bcfg, "bert." if is_bert else "model."), path)
  tensors = load_file(path)
  weight = np.asarray(jax.device_get(tower.projection.kernel[...]), np.float32).T  # [1, hidden]
  if is_bert:
    # Our reranker reads every token as segment 0; HF's pair encoding marks the document's tokens 1.
    types = tensors["bert.embeddings.token_type_embeddings.weight"]
    tensors["bert.embeddings.token_type_embeddings.weight"] = np.repeat(types[:1], len(types), axis=0)
    width = bcfg.hidden_size
    tensors.update({"bert.pooler.dense.weight": np.eye(width, dtype=np.float32) * POOLER_SCALE,
                    "bert.pooler.dense.bias": np.zeros(width, np.float32), "classifier.weight": weight / POOLER_SCALE,
                    "classifier.bias": np.zeros(1, np.float32) if tower.projection.bias is None
                    else np.asarray(jax.device_get(tower.projection.bias[...]), np.float32)})
  else:
    tensors["score.weight"] = weight
  save_file(tensors, path, metadata={"format": "pt"})
  hf = {**bcfg.to_hf(), "architectures": [architecture], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "pad_token_id": pad_id if not is_bert else bcfg.pad_token_id,
        "sentence_transformers": {"activation_fn": IDENTITY}}  # raw scores, as our predict gives
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_tokenizer(tokenizer, folder, max_length=tower.cfg.max_length, append_eos=tower.cfg.append_eos, pad_id=pad_id)


def _read_backbone(folder: str, head: tuple[str, ...]):
  """The backbone of an exported task model, its head's tensors set aside (`load_backbone` refuses them)."""
  cfg = backbone_config(folder)
  arch, prefix = (bert, "bert.") if isinstance(cfg, bert.BertConfig) else (llm, "model.")
  return load_params(lambda: create_backbone(cfg, nnx.Rngs(0)), arch.hf_rows(cfg, prefix), SafetensorsReader(folder),
                     lambda name: name in head or arch.hf_ignored(name))


def _check_read_back(backbone, exported, folder: str) -> None:
  """The exported backbone, loaded as any user would load it, computes what the trained one does."""
  mask = np.ones_like(PROBE_IDS)
  _check_agree(exported(PROBE_IDS, mask), backbone(PROBE_IDS, mask), folder, "backbone")


def _check_scores(tower, exported, folder: str, eos_id: int | None, pad_id: int) -> None:
  """The exported model's score, computed as transformers' task model computes it from the folder's tensors,
  is the reranker's, on a padded batch of pairs."""
  ids, mask = PROBE_IDS.copy(), np.ones_like(PROBE_IDS)
  ids[1, 5:], mask[1, 5:] = pad_id, 0
  head = load_file(os.path.join(folder, "model.safetensors"))
  if isinstance(tower.backbone.cfg, bert.BertConfig):
    types = np.broadcast_to(np.arange(ids.shape[1]) >= 3, ids.shape).astype(np.int32)  # the document's segment
    cls = np.asarray(exported(ids, mask, types), np.float32)[:, 0]
    pooled = np.tanh(cls @ head["bert.pooler.dense.weight"].T + head["bert.pooler.dense.bias"])
    got = pooled @ head["classifier.weight"].T + head["classifier.bias"]
  else:
    ids[0, 7], ids[1, 4] = eos_id, eos_id  # each pair ends with EOS
    last = np.array([np.flatnonzero(row != pad_id).max() for row in ids])  # the last token that is not padding
    hidden = np.asarray(exported(ids, mask), np.float32)
    got = hidden[np.arange(len(ids)), last] @ head["score.weight"].T
  _check_agree(got[:, 0], tower(ids, mask)[:, 0], folder, "score")


def _check_agree(got, want, folder: str, what: str) -> None:
  got, want = np.asarray(got, np.float32), np.asarray(jax.device_get(want), np.float32)
  if not np.allclose(got, want, atol=1e-5):
    raise RuntimeError(f"{folder}: the exported {what} does not compute what the trained one does "
                       f"(max difference {np.abs(got - want).max():.2e}); nothing was exported")


def _check_out(out: str) -> None:
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"{out}: exists and is not empty; export into a new directory")


def _publish(out: str, write) -> None:
  """`write(tmp)` fills a directory beside `out` (and checks it); then it replaces `out` whole."""
  _check_out(out)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    os.makedirs(tmp)
    write(tmp)
    fsync_tree(tmp)
    replace_dir(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
