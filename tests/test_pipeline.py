"""`scalingnote pipeline` end to end on the smoke config: every stage, the report, a servable bundle; killed at
chosen points (fault injection) then rerun, it gives the uninterrupted run's results without redoing finished
stages, and whatever a kill leaves loads right or is refused. What the workdir keeps: the teacher's frozen
parameters once for both Stage 1 rounds, and one checkpoint per finished training stage."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, run_cli

CONFIG = os.path.join(ROOT, "configs", "demo.py") + ":smoke"
STAGES = ["data", "teacher", "mine", "teacher_mined", "baseline", "encode", "student_L1", "export_L1", "eval", "report"]
TRAINERS = {"teacher": "teacher", "teacher_mined": "teacher_mined", "baseline": "baseline", "student_L1": "students/L1"}
QUALITY = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map", "auc", "contrastive_entropy")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, installed_wheel):
  """The pipeline as a user of the built wheel runs it: from another directory, the config by its packaged
  name. (The runs below use the checkout's code, so each comparison is also wheel == checkout.) Every checkpoint
  is kept: a killed run's latest one is compared with this run's of the same step."""
  workdir = tmp_path_factory.mktemp("pipeline") / "run"
  out = run_cli("pipeline", "--config", "demo.py:smoke", "--workdir", str(workdir),
                "--config.keep_all_checkpoints=True", python=os.path.join(installed_wheel, "bin", "python"),
                cwd=str(workdir.parent))
  return workdir, out.stdout


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_reports(uninterrupted):
  workdir, stdout = uninterrupted
  assert [line.split()[1].rstrip(":") for line in stdout.splitlines() if line.endswith(": running")] == STAGES
  report = json.loads((workdir / "report.json").read_text())
  systems = report["systems"]
  assert list(systems) == ["bm25", "baseline", "teacher", "student L1"]
  for name, m in systems.items():
    assert m["num_queries"] == 8 and m["num_docs"] == 64 and m["qps"] > 0, name
    assert (m["contrastive_entropy"] is None) == (name == "bm25")
  # the teacher's numbers are those its own validation computed on the same split and corpus: the same
  # contrastive entropy too (one definition, the same sampled negatives, the model's own temperature)
  final = json.loads((workdir / "stages" / "teacher_mined.json").read_text())["result"]["final"]
  assert systems["teacher"]["ndcg_at_10"] == pytest.approx(final["ndcg_at_10"], abs=1e-6)
  assert systems["teacher"]["contrastive_entropy"] == pytest.approx(final["contrastive_entropy"], abs=1e-4)
  assert systems["teacher"]["contrastive_pairs"] == final["contrastive_pairs"] > 0
  r = report["student_retention"]["L1"]["recall_at_10"]
  assert r == pytest.approx(systems["student L1"]["recall_at_10"] / systems["teacher"]["recall_at_10"])
  claim, student, baseline = report["paper_claim"], systems["student L1"], systems["baseline"]
  assert claim["students"]["L1"]["minus_baseline"] == pytest.approx(student["ndcg_at_10"] - baseline["ndcg_at_10"])
  assert claim["students"]["L1"]["speedup"] == pytest.approx(student["qps"] / systems["teacher"]["qps"])
  assert claim["above_baseline"] == (student["ndcg_at_10"] > baseline["ndcg_at_10"])
  md = (workdir / "report.md").read_text()
  assert "| teacher |" in md and "quality_vs_speed.png" in md
  verdict = "holds" if claim["above_baseline"] else "does not hold"
  assert f"students above the directly-trained small dual tower: {verdict};" in md
  for png in ("quality_vs_speed.png", "training.png"):
    assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # the mining round's frozen parameters are the first teacher's: stored once, in frozen/, read by both rounds
  from scalingnote_jax.artifacts import trained

  [base] = os.listdir(workdir / "frozen")
  for name in ("teacher", "teacher_mined"):
    assert json.loads((workdir / name / trained.BASE_FILE).read_text()) == {"fingerprint": base,
                                                                             "dir": f"../frozen/{base}"}
    assert not (workdir / name / trained.BASE_DIR).exists()
  assert checkpoint_steps(workdir / "teacher") == [2, 4]  # (keep_all_checkpoints=True)
  # the bundle answers like the evaluation said it does
  from scalingnote_jax.data.beir import load_beir
  from scalingnote_jax.serve.retriever import Retriever

  test = load_beir(str(workdir / "data"), "test")
  ids = Retriever.load(str(workdir / "bundles" / "L1")).search(list(test.queries.values()), k=10).ids
  hits = [bool(set(row) & {d for d, g in test.qrels[q].items() if g > 0}) for q, row in zip(test.queries, ids)]
  assert sum(hits) / len(hits) == pytest.approx(systems["student L1"]["recall_at_10"])


def _with_finished_stages(src, workdir, names) -> None:
  """`workdir` holding the finished stages `names` of the run in `src`, as a rerun would find them."""
  import shutil

  (workdir / "stages").mkdir(parents=True)
  for name in names:
    shutil.copytree(src / name, workdir / name)
    shutil.copy(src / "stages" / f"{name}.json", workdir / "stages" / f"{name}.json")
  if (src / "frozen").is_dir():  # the frozen parameters the Stage 1 runs share
    shutil.copytree(src / "frozen", workdir / "frozen")


def checkpoint_steps(run) -> list[int]:
  return sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())


def _assert_finished_stages_keep_their_final_checkpoint_only(workdir):
  """Each finished training stage holds one checkpoint, its last step, which later stages read; an earlier step
  asked for by number is an error listing the one there is."""
  from scalingnote_jax.artifacts import trained

  for stage, name in TRAINERS.items():
    if (workdir / "stages" / f"{stage}.json").exists():
      config = json.loads((workdir / "stages" / f"{stage}.json").read_text())["config"]
      assert checkpoint_steps(workdir / name) == [config["num_steps"]], stage
  with pytest.raises(FileNotFoundError, match=r"teacher/checkpoints: no checkpoint of step 2 \(there are: \[4\]\); "
                                              r"a finished pipeline stage keeps only its final one"):
    trained.load_stage1(str(workdir / "teacher"), step=2)


def _run_killed_at(workdir, failpoint: str) -> str:
  """Runs the pipeline with a failpoint that SIGKILLs it (artifacts/faults.py); returns its output."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SCALINGNOTE_CPU_DEVICES="1", JAX_PLATFORMS="cpu", SCALINGNOTE_FAILPOINT=failpoint)
  proc = subprocess.run([sys.executable, "-m", "scalingnote_jax.cli", "pipeline", "--config", CONFIG, "--workdir",
                         str(workdir)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, f"not killed at {failpoint}:\n{proc.stdout}{proc.stderr[-3000:]}"
  return proc.stdout


def _assert_artifacts_load_right_or_are_refused(workdir, reference, done=()):
  """Every artifact a killed run left either loads, verified, equal to the uninterrupted run's (the latest
  checkpoint of each trainer whose stage is not `done`, each embedding store, the bundle), or is refused with
  an error naming it. (A finished stage's artifacts are what later stages load: the final result covers them.)"""
  from scalingnote_jax.artifacts import store, trained
  from scalingnote_jax.serve.bundle import BundleError
  from scalingnote_jax.serve.retriever import Retriever

  def same(a, b):
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  for name, stage, load in [("teacher", "teacher", trained.load_stage1),
                            ("teacher_mined", "teacher_mined", trained.load_stage1),
                            ("baseline", "baseline", trained.load_stage1),
                            ("students/L1", "student_L1", trained.load_tower)]:
    if stage in done:
      continue
    steps = [int(s) for s in os.listdir(workdir / name / "checkpoints") if s.isdigit()] if (
        workdir / name / "checkpoints").is_dir() else []
    if steps:  # the latest committed step: a save the kill interrupted is not one
      got, want = load(str(workdir / name))[0], load(str(reference / name), step=max(steps))[0]
      same(got, want)
  for ids_file in workdir.glob("**/ids.json"):  # embedding stores: complete and equal, or refused as unfinished
    rel = ids_file.parent.relative_to(workdir)
    if any(part.startswith(".") for part in rel.parts):  # a killed export's staging: removed by the next export
      continue
    try:
      ids, emb = store.load_embeddings(str(ids_file.parent))
    except FileNotFoundError as e:
      assert str(ids_file.parent) in str(e) and "unfinished" in str(e)
      continue
    ref_ids, ref_emb = store.load_embeddings(str(reference / rel))
    assert ids == ref_ids
    np.testing.assert_array_equal(emb, ref_emb)
  queries = ["which neutron star has unusual distance", "a compact object"]
  try:
    got = Retriever.load(str(workdir / "bundles" / "L1")).search(queries, k=5)
  except BundleError as e:
    assert "bundles/L1" in str(e)
  else:
    want = Retriever.load(str(reference / "bundles" / "L1")).search(queries, k=5)
    assert got.ids == want.ids


@pytest.mark.slow
def test_a_pipeline_killed_four_times_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
  """Fault injection: SIGKILLed four times in a row (during a checkpoint save, mid-encoding at a random chunk,
  between steps, mid-export; from the mining round on: the first stages are copied finished), each time leaving
  only artifacts that load right or are refused, then rerun: finished stages are not redone and every result
  equals the uninterrupted run's."""
  import random

  seed = random.randrange(1000)
  rng = random.Random(seed)
  # The save and step points are fixed where a kill leaves a committed checkpoint earlier in the same stage,
  # so that Stage 1 (the baseline, killed saving step 4 with step 2 committed) and Stage 2 (the student, killed
  # at step 4) resume mid-run: a random hit can land where the stage just restarts from step 0.
  kills = ["checkpoint.save:3", f"encode.chunk:{rng.randint(1, 2)}", "train.step:2", "export:1"]
  reference, workdir = uninterrupted[0], tmp_path / "run"
  _with_finished_stages(reference, workdir, ("data", "teacher"))
  done = {s: os.stat(workdir / "stages" / f"{s}.json").st_mtime_ns for s in ("data", "teacher")}
  for point in kills:
    out = _run_killed_at(workdir, point)
    for s in done:  # a finished stage is never run again
      assert f"[pipeline] {s}: done" in out and f"{s}: running" not in out, (seed, point)
    done = {s: os.stat(workdir / "stages" / f"{s}.json").st_mtime_ns for s in STAGES
            if (workdir / "stages" / f"{s}.json").exists()}
    _assert_artifacts_load_right_or_are_refused(workdir, reference, done)
  assert "export_L1" not in done, f"killed at {kills} (seed {seed}): the export finished"

  final = run_cli("pipeline", "--config", CONFIG, "--workdir", str(workdir)).stdout
  ran = [line.split()[1].rstrip(":") for line in final.splitlines() if line.endswith(": running")]
  assert ran == [s for s in STAGES if s not in done]
  assert all(os.stat(workdir / "stages" / f"{s}.json").st_mtime_ns == t for s, t in done.items())
  assert [p.name for p in (workdir / "bundles").iterdir()] == ["L1"], "a killed export left files beside the bundle"
  _assert_artifacts_load_right_or_are_refused(workdir, reference)
  _assert_finished_stages_keep_their_final_checkpoint_only(workdir)
  got = json.loads((workdir / "report.json").read_text())["systems"]
  want = json.loads((reference / "report.json").read_text())["systems"]
  for name in want:
    for key in QUALITY:
      assert got[name][key] == pytest.approx(want[name][key], abs=1e-6), (name, key, seed)


@pytest.mark.slow
def test_rerun_with_another_config_names_the_stage(uninterrupted, capsys):
  workdir, _ = uninterrupted
  from scalingnote_jax.cli import main

  # the space form of an override, and the error as one line (--debug raises it)
  assert main(["pipeline", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.optim.lr", "0.5"]) == 1
  err = capsys.readouterr().err.strip()
  assert re.fullmatch(r"scalingnote: error: .*stages/teacher\.json: stage 'teacher' completed with another "
                      r"configuration.*\(ValueError; --debug prints the traceback\)", err), err
  with pytest.raises(ValueError, match=r"stages/teacher\.json: stage 'teacher' completed with another configuration"):
    main(["pipeline", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.optim.lr=0.5", "--debug"])


@pytest.mark.slow
def test_without_a_mining_round_the_first_teacher_is_the_teacher(uninterrupted, tmp_path):
  """mining.num_steps=0: no mine or teacher_mined stage; the first Stage 1 run is the teacher everything after
  it uses (encoded, distilled, evaluated), and the baseline trains without mined negatives."""
  workdir = tmp_path / "run"
  _with_finished_stages(uninterrupted[0], workdir, ("data", "teacher"))
  out = run_cli("pipeline", "--config", CONFIG, "--workdir", str(workdir), "--config.mining.num_steps=0",
                "--config.student_layers=()").stdout  # (no student: what it would distill is the encoded teacher)
  ran = [line.split()[1].rstrip(":") for line in out.splitlines() if line.endswith(": running")]
  assert ran == ["baseline", "encode", "eval", "report"]
  assert not (workdir / "mined").exists() and not (workdir / "teacher_mined").exists()
  assert json.loads((workdir / "stages" / "encode.json").read_text())["config"]["teacher"] == str(workdir / "teacher")
  baseline = json.loads((workdir / "baseline" / "config.json").read_text())
  assert baseline["data"]["train_jsonl"] == "" and baseline["data"]["n_neg"] == 0
  final = json.loads((workdir / "stages" / "teacher.json").read_text())["result"]["final"]
  teacher = json.loads((workdir / "report.json").read_text())["systems"]["teacher"]
  assert teacher["ndcg_at_10"] == pytest.approx(final["ndcg_at_10"], abs=1e-6)
  # the copied teacher, finished before this run, was pruned too (it came with every checkpoint)
  _assert_finished_stages_keep_their_final_checkpoint_only(workdir)
