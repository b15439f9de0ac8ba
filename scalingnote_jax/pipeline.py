"""`scalingnote pipeline`: the whole recipe in one command, resumable stage by stage.

  scalingnote pipeline --config configs/demo.py --workdir runs/demo
  scalingnote pipeline --config configs/scifact.py --workdir runs/scifact --config.data.path=BEIR_DIR

Stages, in order (each writes WORKDIR/stages/NAME.json when it completes; a rerun skips completed stages and
resumes the interrupted one from its checkpoints or finished chunks):

  data            the BEIR directory (the built-in synthetic corpus is written as one, with its query log)
  teacher         Stage 1: LLM query and document towers, contrastive loss             -> teacher/
  mine            hard negatives from the teacher's own ranking                           -> mined/train.jsonl
  teacher_mined   Stage 1 again from those towers, with the mined negatives (the teacher) -> teacher_mined/
                  (mine and teacher_mined only with mining.num_steps > 0; else teacher/ is the teacher)
  baseline        the small dual tower trained directly on the same examples              -> baseline/
  encode          the corpus by the teacher's document tower                              -> embeddings/documents
  student_L<n>    Stage 2: the teacher's query tower distilled into an n-layer encoder    -> students/L<n>/
  export_L<n>     serving bundles (student + the teacher's document embeddings + index)   -> bundles/L<n>/
  eval            every system on the test split (`eval.evaluate`)                        -> eval/<system>.json
  report          report.json, report.md, plots                                           -> report.*

A stage records a hash of the configuration it ran with: rerunning with a changed configuration stops with
the name of the stage that differs instead of mixing results.

What the workdir keeps: the frozen parameters of the Stage 1 runs (frozen layers, a LoRA base) once per content in
frozen/<fingerprint>/ (the mining round's are the first teacher's), and a finished training stage only its final
checkpoint, what every later stage reads (the others served to resume it; `keep_all_checkpoints=True` keeps them).
"""

from __future__ import annotations

import json
import os

import numpy as np
from ml_collections import ConfigDict

from scalingnote_jax.artifacts import checkpoint
from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.artifacts.lock import holds_lock
from scalingnote_jax.artifacts.stages import Stages
from scalingnote_jax.config import distill_defaults, stage1_defaults
from scalingnote_jax.data import beir, synthetic
from scalingnote_jax.distributed import is_main
from scalingnote_jax.eval import evaluate, report
from scalingnote_jax.index import mining
from scalingnote_jax.serve import bundle
from scalingnote_jax.train import stage1, stage2

# ----------------------------------------------------------------------------------------------------------
# Data: a BEIR directory for every later stage.

def prepare_data(d: ConfigDict, out: str) -> dict:
  """The synthetic corpus as a BEIR directory (train / test qrels and an unlabelled query log), or a given
  BEIR directory checked for its train and test splits, with `query_log` = a text file of unlabelled queries,
  texts of the corpus (`beir.corpus_query_log`: "titles", "conclusions" or both joined by "+"; written to
  `out`) or ""."""
  if d.source == "beir":
    for split in ("train", d.split):
      train = beir.load_beir(d.path, split, unknown="skip")  # bad input fails here, naming file:line
    query_log = d.query_log
    if query_log and not os.path.isfile(query_log):  # e.g. "titles": SciFact's titles are claims like its queries
      texts = beir.corpus_query_log(train.corpus, query_log)
      query_log = os.path.join(out, "query_log.txt")
      if is_main():
        os.makedirs(out, exist_ok=True)
        write_atomic(query_log, "\n".join(texts) + "\n")
    return {"path": os.path.abspath(d.path), "query_log": os.path.abspath(query_log) if query_log else ""}
  if d.source != "synthetic":
    raise ValueError(f"data.source={d.source!r}: expected 'synthetic' or 'beir'")
  data = synthetic.generate(d.num_docs, queries_per_doc=d.queries_per_doc, seed=d.seed, noise=d.noise,
                            unlabelled_per_doc=d.unlabelled_per_doc, style=d.style)
  qids = list(data.queries)
  test = set(np.random.default_rng(d.seed).choice(qids, size=int(len(qids) * d.test_fraction), replace=False).tolist())
  if is_main():
    for name, keep in (("train", lambda q: q not in test), (d.split, lambda q: q in test)):
      qrels = {q: r for q, r in data.qrels.items() if keep(q)}
      beir.write_beir(synthetic.Dataset(data.corpus, data.queries, qrels), out, name)
    write_atomic(os.path.join(out, "query_log.txt"), "\n".join(data.unlabelled) + "\n")
  return {"path": os.path.abspath(out), "query_log": os.path.abspath(os.path.join(out, "query_log.txt"))}


def stage1_config(base: ConfigDict, data: dict, split: str, **fields) -> ConfigDict:
  """A Stage 1 run on the pipeline's data, validated on its config's own `val_split` (a dev split; the train
  split itself: dev queries held out of it) or, without one, on the pipeline's `split`."""
  c = ConfigDict(base.to_dict())
  c.data.update(dict(source="beir", path=data["path"], train_split="train", val_split=base.data.val_split or split))
  for key, value in fields.items():
    target = c
    *parents, leaf = key.split(".")
    for part in parents:
      target = target[part]
    target[leaf] = value
  return c


def student_config(cfg: ConfigDict, layers: int, teacher: str, cache: str, query_log: str) -> ConfigDict:
  c = ConfigDict(cfg.student.to_dict())
  c.teacher, c.teacher_cache = teacher, cache
  if c.student.init == "random":
    c.student.backbone.num_layers = layers
  else:
    c.student.num_layers = layers
  c.data.query_files = tuple(c.data.query_files) + ((query_log,) if query_log else ())
  c.data.unlabelled_per_doc = 0  # the query log is a file of the data directory
  c.eval.max_docs = 0  # validation searches the whole corpus: the `encode` store is reused
  return c


# ----------------------------------------------------------------------------------------------------------

@holds_lock("workdir")  # one pipeline per workdir (each stage also locks its own directory)
def run(cfg: ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  path = lambda *parts: os.path.join(workdir, *parts)  # noqa: E731
  stages = Stages(workdir)
  split = cfg.data.split

  data = stages("data", cfg.data.to_dict(), lambda: prepare_data(cfg.data, path("data")))

  def train(name, c):
    out = stage1.train(c, path(name), resume=True, shared_base=path("frozen"))
    return {"final": out["evals"][-1] if out["evals"] else None}

  def trainer_stage(name, out, config, fn, defaults):
    """`stages(...)` of a stage that trains in `out`; once it is recorded done (now or by an earlier run), only
    its final checkpoint is kept."""
    result = stages(name, config, fn, defaults)
    if is_main() and not cfg.get("keep_all_checkpoints", False):
      checkpoint.prune(os.path.join(out, "checkpoints"))
    return result

  t_cfg = stage1_config(cfg.teacher, data, split)
  trainer_stage("teacher", path("teacher"), t_cfg.to_dict(), lambda: train("teacher", t_cfg), stage1_defaults())

  m = cfg.mining
  mined = path("mined", "train.jsonl") if m.num_steps else ""

  def mine():
    os.makedirs(path("mined"), exist_ok=True)
    mc = mining.MiningConfig(range_min=m.range_min, range_max=m.range_max, num_negatives=m.num_negatives,
                             sampling=m.sampling, seed=m.seed)
    examples = mining.mine_from_checkpoint(path("teacher"), data["path"], "train", mined, mc,
                                           embeddings_dir=path("mined", "documents"), backend="exact")
    return {"queries": len(examples), "negatives": sum(len(e.negative_ids) for e in examples)}
  teacher, n_neg = path("teacher"), cfg.teacher.data.n_neg
  if m.num_steps:  # a mining round: the teacher's own hard negatives, then more steps with them
    stages("mine", m.to_dict(), mine)
    final_cfg = stage1_config(cfg.teacher, data, split, **{"model.init": path("teacher"), "data.train_jsonl": mined,
                                                           "data.n_neg": m.n_neg, "num_steps": m.num_steps})
    trainer_stage("teacher_mined", path("teacher_mined"), final_cfg.to_dict(),
                  lambda: train("teacher_mined", final_cfg), stage1_defaults())
    teacher, n_neg = path("teacher_mined"), m.n_neg

  b_cfg = stage1_config(cfg.baseline, data, split, **{"data.train_jsonl": mined, "data.n_neg": n_neg})
  trainer_stage("baseline", path("baseline"), b_cfg.to_dict(), lambda: train("baseline", b_cfg), stage1_defaults())

  def encode():
    documents = beir.load_corpus(os.path.join(data["path"], "corpus.jsonl"))
    system = evaluate.tower_system(teacher, documents, path("embeddings", "documents"),
                                   batch_size=cfg.eval.batch_size)
    return {"num_docs": len(system.doc_ids), "dim": int(system.d_NxD.shape[1])}
  stages("encode", {"teacher": teacher}, encode)

  students = {}
  for layers in cfg.student_layers:
    s_cfg = student_config(cfg, layers, teacher, path("embeddings"), data["query_log"])
    name = f"L{layers}"
    students[name] = path("bundles", name)

    def distill(s_cfg=s_cfg, name=name):
      out = stage2.distill(s_cfg, path("students", name), resume=True)
      return {"final": out["evals"][-1] if out["evals"] else None, "teacher": out["teacher"]}
    trainer_stage(f"student_{name}", path("students", name), s_cfg.to_dict(), distill, distill_defaults())

  for name, out in students.items():
    stages(f"export_{name}", cfg.export.to_dict(), lambda name=name, out=out: bundle.export(
        path("students", name), out, embeddings=path("embeddings", "documents"), backend=cfg.export.backend)["metrics"])

  def evaluate_all():
    test, counts = evaluate.load_split(data["path"], split)
    kw = dict(num_negatives=cfg.eval.num_negatives, temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size)
    # Dense systems search with the serving index (the same backend as the bundles), encode + search timed.
    towers = lambda model, store_dir: evaluate.tower_system(model, test.corpus, store_dir,  # noqa: E731
                                                            backend=cfg.export.backend)
    systems = {"bm25": lambda: evaluate.Lexical(test.corpus)}
    for model in cfg.eval.zero_shot:
      store_dir = path("eval", "embeddings", os.path.basename(model))
      systems[f"zero-shot {model}"] = lambda model=model, store_dir=store_dir: towers(model, store_dir)
    systems["baseline"] = lambda: towers(path("baseline"), path("eval", "embeddings", "baseline"))
    systems["teacher"] = lambda: towers(teacher, path("embeddings", "documents"))  # the `encode` store
    for name, out in students.items():
      systems[f"student {name}"] = lambda out=out: evaluate.bundle_system(out)
    results = {}
    os.makedirs(path("eval"), exist_ok=True)
    # Each system's result is kept, so an interrupted evaluation redoes only what is missing; a result older
    # than any stage marker (a stage redone since) is evaluated again.
    upstream = max(os.path.getmtime(os.path.join(stages.dir, f)) for f in os.listdir(stages.dir))
    for name, make in systems.items():
      result_file = path("eval", f"{name.replace(' ', '_').replace('/', '_')}.json")
      if os.path.exists(result_file) and os.path.getmtime(result_file) > upstream:
        with open(result_file) as f:
          results[name] = json.load(f)
        continue
      print(f"[pipeline] eval: {name}", flush=True)
      results[name] = evaluate.evaluate(make(), test, **kw)
      if is_main():
        write_atomic(result_file, json.dumps(results[name], indent=1))
    return {"systems": results, **counts}
  evals = stages("eval", cfg.eval.to_dict(), evaluate_all)

  return stages("report", {}, lambda: report.write(workdir, cfg, evals, stages.timings))
