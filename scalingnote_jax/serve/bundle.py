"""The serving bundle: everything the online path needs, in one directory, written by `scalingnote export`.

  manifest.json      format, versions, dimensions, evaluation metrics, fingerprints, every file's SHA-256 (last)
  student/           student.json (backbone + tower configs, the teacher's fingerprints), params/ (orbax),
                     tokenizer/ (tokenizer.json + special ids)
  documents/         the LLM document tower's embeddings and ids (an `artifacts.store` store)
  index/             the document index (ScaNN by default) over those embeddings

The student records the fingerprint of the document tower of the teacher it was distilled against; the
document store records the fingerprint of the tower that encoded it. Export and load refuse a bundle where
the two differ: its queries and documents would live in different embedding spaces.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import nnx

from scalingnote_jax import sharding
from scalingnote_jax.artifacts import store, trained
from scalingnote_jax.artifacts.checkpoint import abstract_like, fingerprint
from scalingnote_jax.artifacts.checksum import digest_tree, verify_tree
from scalingnote_jax.artifacts.faults import failpoint
from scalingnote_jax.artifacts.files import fsync_tree, replace_dir
from scalingnote_jax.artifacts.lock import LOCK_FILE, locked
from scalingnote_jax.data.beir import load_corpus
from scalingnote_jax.data.training import load_data
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.index.index import Index
from scalingnote_jax.models.tokenizer import Tokenizer

FORMAT, FORMAT_VERSION, MANIFEST = "scalingnote_jax.bundle", 2, "manifest.json"  # 2: file checksums


class BundleError(ValueError):
  """A bundle that is incomplete, of an unknown version, or whose parts come from different teachers."""


def check_same_teacher(student_spec: dict, documents_fingerprint: str | None, where: str) -> None:
  want = student_spec["teacher"]["doc_fingerprint"]
  if documents_fingerprint != want:
    raise BundleError(
        f"{where}: the document embeddings were encoded by a document tower with fingerprint "
        f"{documents_fingerprint}, but the student was distilled against the teacher whose document tower has "
        f"fingerprint {want} ({student_spec['teacher']['workdir']}): queries and documents would be in different "
        "embedding spaces. Encode the documents with that teacher, or distil a student from this one.")


def _versions() -> dict[str, str]:
  out = {}
  for name in ("scalingnote-jax", "jax", "flax", "orbax-checkpoint", "scann", "tensorstore"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _last_metrics(workdir: str) -> dict:
  """The teacher's and the student's last validation metrics in a Stage 2 metrics.jsonl."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for row in map(json.loads, f):
        for prefix, name in (("teacher/", "teacher"), ("val/", "student")):
          values = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
          if values:
            out[name] = {"step": row["step"], **values}
  return out


def export(student_dir: str, out: str, *, corpus_dir: str | None = None, embeddings: str | None = None,
           teacher: str | None = None, backend: str = "scann", batch_size: int = 64,
           chunk_size: int = 4096) -> dict:
  """Writes the bundle of the Stage 2 workdir `student_dir` to `out` (atomically; an existing bundle there is
  replaced). Documents: an existing `scalingnote encode` store (`embeddings`), or encoded now by the
  teacher's document tower (`teacher`, default: the workdir the student was distilled from) from a BEIR
  `corpus_dir` (default: the teacher's training corpus). Returns the manifest."""
  spec = trained.read_spec(student_dir)
  out = os.path.abspath(out)
  if os.path.lexists(out) and not (os.path.isfile(os.path.join(out, MANIFEST)) or not os.listdir(out)):
    raise FileExistsError(f"{out} exists and is not a bundle: refusing to replace it")
  # Written in a staging directory beside `out`, then renamed into place. One export to `out` at a time (its
  # lock); what a killed export left there is removed by the next one.
  staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.export")
  with locked(staging):
    for name in set(os.listdir(staging)) - {LOCK_FILE}:
      shutil.rmtree(os.path.join(staging, name))
    tmp = tempfile.mkdtemp(dir=staging)
    try:
      # Documents, by the teacher's document tower: an existing store is checked, never re-encoded.
      docs_dir = os.path.join(tmp, "documents")
      if embeddings:
        check_same_teacher(spec, store.store_info(embeddings).get("fingerprint"), embeddings)
        shutil.copytree(embeddings, docs_dir, ignore=shutil.ignore_patterns(LOCK_FILE))  # not its writer's lock
      else:
        mesh = sharding.make_mesh(devices=jax.local_devices())
        model, tokenizer, t_cfg = trained.load_stage1(teacher or spec["teacher"]["workdir"], mesh)
        d_enc = Encoder(model.doc, tokenizer, mesh)
        check_same_teacher(spec, d_enc.fingerprint, teacher or spec["teacher"]["workdir"])
        docs = load_corpus(os.path.join(corpus_dir, "corpus.jsonl")) if corpus_dir else load_data(t_cfg.data)[2]
        store.encode_corpus(d_enc, docs, docs_dir, batch_size=batch_size, chunk_size=chunk_size)
        del model, d_enc
      doc_ids, d_NxD = store.load_embeddings(docs_dir)
      index = Index.build(d_NxD, doc_ids, backend=backend)
      index.save(os.path.join(tmp, "index"))

      # Student: parameters, structure and tokenizer; nothing refers back to the training workdir.
      student, tokenizer, _ = trained.load_tower(student_dir, sharding.make_mesh(devices=jax.devices()[:1]))
      params = nnx.state(student)
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(os.path.join(tmp, "student", "params"), params)
      checkpointer.wait_until_finished()
      checkpointer.close()
      with open(os.path.join(tmp, "student", trained.STUDENT_FILE), "w") as f:
        json.dump({**spec, "tokenizer": "tokenizer"}, f, indent=1)
      tokenizer.save(os.path.join(tmp, "student", "tokenizer"))
      failpoint("export")

      manifest = {
          "format": FORMAT, "format_version": FORMAT_VERSION,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "versions": _versions(),
          "num_docs": len(doc_ids), "dim": int(d_NxD.shape[1]),
          "student": {"fingerprint": fingerprint(params), "source": os.path.abspath(student_dir),
                      "num_layers": spec["backbone"]["num_layers"], "hidden_size": spec["backbone"]["hidden_size"],
                      "projection_dim": spec["tower"]["projection_dim"], "max_length": spec["tower"]["max_length"]},
          "teacher": spec["teacher"],
          "documents": {"fingerprint": store.store_info(docs_dir)["fingerprint"],
                        "corpus": os.path.abspath(corpus_dir) if corpus_dir else "the teacher's training corpus"},
          "index": {"backend": index.backend, "params": index.params},
          "metrics": _last_metrics(student_dir),
          "files": digest_tree(tmp),  # every file of the bundle, verified at load (index/ also by its own manifest)
      }
      with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)  # written last: a directory without it is no bundle
      fsync_tree(tmp)
      replace_dir(tmp, out)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return manifest


def read_manifest(bundle: str) -> dict:
  path = os.path.join(bundle, MANIFEST)
  if not os.path.isfile(path):
    raise BundleError(f"{bundle}: no {MANIFEST} (not a bundle, or one whose export did not finish)")
  with open(path) as f:
    try:
      m = json.load(f)
    except json.JSONDecodeError as e:
      raise BundleError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if m.get("format") != FORMAT or m.get("format_version") not in (1, FORMAT_VERSION):  # 1: no file checksums
    raise BundleError(f"{path}: format {m.get('format')!r} version {m.get('format_version')!r}; this code reads "
                      f"{FORMAT!r} versions 1 to {FORMAT_VERSION}")
  return m


def load_parts(bundle: str, device: jax.Device | None = None):
  """(student tower, its tokenizer, document index, manifest) of a bundle, after checking that the student
  and the documents come from the same teacher. The student's parameters go to `device` (default: the first)."""
  bundle = os.path.abspath(bundle)
  manifest = read_manifest(bundle)
  student_dir = os.path.join(bundle, "student")
  spec = trained.read_spec(student_dir)
  check_same_teacher(spec, store.store_info(os.path.join(bundle, "documents")).get("fingerprint"), bundle)
  verify_tree(bundle, manifest.get("files", {}), BundleError, bundle)  # every byte as exported
  graphdef, abstract = nnx.split(trained.abstract_tower(spec))
  place = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  params = ocp.StandardCheckpointer().restore(os.path.join(student_dir, "params"),
                                              abstract_like(abstract, jax.tree.map(lambda _: place, abstract)))
  index = Index.load(os.path.join(bundle, "index"), expect_dim=manifest["dim"], expect_size=manifest["num_docs"])
  tokenizer = Tokenizer.from_pretrained(os.path.join(student_dir, "tokenizer"))
  if fingerprint(params) != manifest["student"]["fingerprint"]:  # also for bundles without file checksums
    raise BundleError(f"{bundle}: the student's parameters in student/params do not match the fingerprint "
                      "recorded at export (corrupted or replaced)")
  student = nnx.merge(graphdef, params)
  if student.dim != manifest["dim"]:
    raise BundleError(f"{bundle}: the student embeds into {student.dim} dimensions, the index holds {manifest['dim']}")
  return student, tokenizer, index, manifest

