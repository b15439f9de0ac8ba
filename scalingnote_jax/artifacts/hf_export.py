"""`scalingnote export-hf`: a trained tower leaves the project as a Hugging Face / sentence-transformers folder
(models/st_folder.py): a Stage 1 workdir's towers (LoRA merged) as OUT/query and OUT/document (OUT itself
when tied), a Stage 2 student as OUT. Written beside OUT, checked (the backbone read back computes what the
trained one does), then moved into place whole."""

from __future__ import annotations

import os
import shutil
import uuid

import jax
import numpy as np

from scalingnote_jax.artifacts import trained
from scalingnote_jax.artifacts.files import fsync_tree, replace_dir
from scalingnote_jax.models import load_backbone
from scalingnote_jax.models.st_folder import save_folder

PROBE_IDS = np.arange(2, 18, dtype=np.int32).reshape(2, 8)  # token ids every vocabulary has


def export_hf(workdir: str, out: str) -> dict:
  """Writes the towers of `workdir` to `out` (which must not exist or be empty); returns {folder: kind}."""
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"{out}: exists and is not empty; export into a new directory")
  if os.path.exists(os.path.join(workdir, trained.RERANKER_FILE)):
    raise ValueError(f"{workdir}: a reranker; rerankers are not exported yet")
  if os.path.exists(os.path.join(workdir, trained.STUDENT_FILE)):
    tower, tokenizer, _ = trained.load_tower(workdir)
    towers = {"": tower}
  elif trained.is_stage1_workdir(workdir):
    model, tokenizer, cfg = trained.load_stage1(workdir)  # adapters merged into the weights
    towers = {"": model.query} if cfg.tied else {"query": model.query, "document": model.doc}
  else:
    raise ValueError(f"{workdir}: neither a Stage 1 nor a Stage 2 workdir")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    for sub, tower in towers.items():
      folder = os.path.join(tmp, sub)
      os.makedirs(folder, exist_ok=True)
      save_folder(tower, tokenizer, folder)
      _check_read_back(tower.backbone, folder)
    fsync_tree(tmp)
    replace_dir(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {os.path.join(out, sub) if sub else out: sub or "tower" for sub in towers}


def _check_read_back(backbone, folder: str) -> None:
  """The exported backbone, loaded as any user would load it, computes what the trained one does."""
  mask = np.ones_like(PROBE_IDS)
  want = np.asarray(jax.device_get(backbone(PROBE_IDS, mask)), np.float32)
  got = np.asarray(load_backbone(folder)[0](PROBE_IDS, mask), np.float32)
  if not np.allclose(got, want, atol=1e-5):
    raise RuntimeError(f"{folder}: the exported backbone does not compute what the trained one does "
                       f"(max difference {np.abs(got - want).max():.2e}); nothing was exported")
