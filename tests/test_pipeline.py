"""`scalingnote pipeline` end to end on the smoke config: every stage, the report, a servable bundle, and
killing it (between stages and inside one) then rerunning gives the uninterrupted run's results without
redoing finished stages."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import ROOT, run_cli

CONFIG = os.path.join(ROOT, "configs", "demo.py") + ":smoke"
STAGES = ["data", "teacher", "mine", "teacher_mined", "baseline", "encode", "student_L1", "export_L1", "eval", "report"]
QUALITY = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map", "auc", "contrastive_entropy")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, installed_wheel):
  """The pipeline as a user of the built wheel runs it: from another directory, the config by its packaged
  name. (The runs below use the checkout's code, so each comparison is also wheel == checkout.)"""
  workdir = tmp_path_factory.mktemp("pipeline") / "run"
  out = run_cli("pipeline", "--config", "demo.py:smoke", "--workdir", str(workdir),
                python=os.path.join(installed_wheel, "bin", "python"), cwd=str(workdir.parent))
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
  md = (workdir / "report.md").read_text()
  assert "| teacher |" in md and "quality_vs_speed.png" in md
  for png in ("quality_vs_speed.png", "training.png"):
    assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # the bundle answers like the evaluation said it does
  from scalingnote_jax.data.beir import load_beir
  from scalingnote_jax.serve.retriever import Retriever

  test = load_beir(str(workdir / "data"), "test")
  ids = Retriever.load(str(workdir / "bundles" / "L1")).search(list(test.queries.values()), k=10).ids
  hits = [bool(set(row) & {d for d, g in test.qrels[q].items() if g > 0}) for q, row in zip(test.queries, ids)]
  assert sum(hits) / len(hits) == pytest.approx(systems["student L1"]["recall_at_10"])


def _run_until(workdir, stop) -> str:
  """Runs the pipeline and SIGKILLs it once `stop(line)` is true for a line it printed; returns its output."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SCALINGNOTE_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "scalingnote_jax.cli", "pipeline", "--config", CONFIG, "--workdir",
                           str(workdir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if stop(line):
      proc.kill()
      break
  proc.wait(timeout=60)
  assert proc.returncode == -9, "the pipeline finished before it could be killed:\n" + "".join(lines)
  return "".join(lines)


@pytest.mark.slow
def test_killed_pipeline_resumes_without_redoing_finished_stages(uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  _run_until(workdir, lambda line: line.startswith("[pipeline] baseline: running"))
  done = {s: os.stat(workdir / "stages" / f"{s}.json").st_mtime_ns for s in STAGES[:4]}
  assert not (workdir / "stages" / "baseline.json").exists()

  # killed again inside a stage, after its first checkpoint
  def mid_student(line, ckpt=workdir / "students" / "L1" / "checkpoints" / "2"):
    if line.startswith("[pipeline] student_L1: running"):
      while not ckpt.is_dir():
        time.sleep(0.05)
      return True
    return False
  second = _run_until(workdir, mid_student)
  for s in STAGES[:4]:
    assert f"[pipeline] {s}: done" in second and f"{s}: running" not in second
  done.update({s: os.stat(workdir / "stages" / f"{s}.json").st_mtime_ns for s in STAGES[4:6]})

  third = run_cli("pipeline", "--config", CONFIG, "--workdir", str(workdir)).stdout
  ran = [line.split()[1].rstrip(":") for line in third.splitlines() if line.endswith(": running")]
  assert ran == STAGES[6:]
  assert all(os.stat(workdir / "stages" / f"{s}.json").st_mtime_ns == t for s, t in done.items())
  # the student resumed from its step-2 checkpoint, and everything equals the uninterrupted run
  steps = [json.loads(line)["step"] for line in (workdir / "students" / "L1" / "metrics.jsonl").open()]
  assert steps == sorted(steps) and steps.count(4) >= 1
  got = json.loads((workdir / "report.json").read_text())["systems"]
  want = json.loads((uninterrupted[0] / "report.json").read_text())["systems"]
  for name in want:
    for key in QUALITY:
      assert got[name][key] == pytest.approx(want[name][key], abs=1e-6), (name, key)


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
  import shutil

  src, _ = uninterrupted
  workdir = tmp_path / "run"
  (workdir / "stages").mkdir(parents=True)
  for name in ("data", "teacher"):  # the finished first stages, as a rerun would find them
    shutil.copytree(src / name, workdir / name)
    shutil.copy(src / "stages" / f"{name}.json", workdir / "stages" / f"{name}.json")
  out = run_cli("pipeline", "--config", CONFIG, "--workdir", str(workdir), "--config.mining.num_steps=0").stdout
  ran = [line.split()[1].rstrip(":") for line in out.splitlines() if line.endswith(": running")]
  assert ran == ["baseline", "encode", "student_L1", "export_L1", "eval", "report"]
  assert not (workdir / "mined").exists() and not (workdir / "teacher_mined").exists()
  assert json.loads((workdir / "stages" / "encode.json").read_text())["config"]["teacher"] == str(workdir / "teacher")
  baseline = json.loads((workdir / "baseline" / "config.json").read_text())
  assert baseline["data"]["train_jsonl"] == "" and baseline["data"]["n_neg"] == 0
  final = json.loads((workdir / "stages" / "teacher.json").read_text())["result"]["final"]
  teacher = json.loads((workdir / "report.json").read_text())["systems"]["teacher"]
  assert teacher["ndcg_at_10"] == pytest.approx(final["ndcg_at_10"], abs=1e-6)
