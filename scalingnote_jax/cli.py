"""Command line: `scalingnote <command> ...`; config-driven commands take `--config configs/<name>.py[:variant]`
and override any field with `--config.field=value`.

Read it bottom up: `COMMANDS` is the table of commands (help, arguments, the function that runs it), each
function below runs one command, and `run` parses, starts jax.distributed and loads the config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable


def to_json(obj) -> str:
  """Strict JSON: a non-finite float (a diverged model's metric) becomes null, never a bare NaN."""
  def finite(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [finite(v) for v in x]
    return x
  return json.dumps(finite(obj), allow_nan=False)


class UsageError(ValueError):
  """Arguments that parse but do not fit together: answered like argparse's own errors (usage, exit 2)."""


def _print_main(obj) -> None:
  from scalingnote_jax import distributed

  if distributed.is_main():
    print(to_json(obj))


# ----------------------------------------------------------------------------------------------------------
# One function per command: (args, cfg) -> exit status; `cfg` is the loaded --config of the commands that take
# one. Each imports what it uses when it runs (every function-local import in the package is here): `scalingnote
# --help` then starts without loading JAX, and jax.distributed starts (in `run`) before any JAX work.

def pipeline(args, cfg) -> int:
  from scalingnote_jax import pipeline as pipeline_lib

  _print_main(pipeline_lib.run(cfg, args.workdir))
  return 0


def train(args, cfg) -> int:
  from scalingnote_jax.train import stage1

  out = stage1.train(cfg, args.workdir, resume=args.resume)
  if out["evals"]:
    _print_main({"final": out["evals"][-1]})
  return 0


def distill(args, cfg) -> int:
  from scalingnote_jax.train import stage2

  out = stage2.distill(cfg, args.workdir, resume=args.resume)
  if out["evals"]:
    _print_main({"teacher": out["teacher"], "final": out["evals"][-1]})
  return 0


def train_reranker(args, cfg) -> int:
  from scalingnote_jax.train import rerank as rerank_lib

  out = rerank_lib.train(cfg, args.workdir, resume=args.resume)
  if out["evals"]:
    _print_main({"final": out["evals"][-1], "first_stage": out["first_stage"]})
  return 0


def rerank(args, cfg) -> int:
  from scalingnote_jax.train import rerank as rerank_lib

  print(to_json(rerank_lib.rerank_file(args.checkpoint, args.data, args.run, args.out, top_k=args.top_k,
                                       batch_size=args.batch_size, fuse=args.fuse)))
  return 0


def export_hf(args, cfg) -> int:
  from scalingnote_jax.artifacts import hf_export

  print(to_json({"folders": hf_export.export_hf(args.workdir, args.out)}))
  return 0


def export(args, cfg) -> int:
  from scalingnote_jax.serve import bundle

  manifest = bundle.export(args.student, args.out, corpus_dir=args.data, embeddings=args.embeddings,
                           teacher=args.teacher, backend=args.backend, batch_size=args.batch_size)
  print(to_json({"out": args.out, "num_docs": manifest["num_docs"], "dim": manifest["dim"],
                 "metrics": manifest["metrics"]}))
  return 0


def evaluate(args, cfg) -> int:
  from scalingnote_jax.eval import evaluate as evaluate_lib

  print(to_json(evaluate_lib.run(data_dir=args.data, split=args.split, bundle=args.bundle, checkpoint=args.checkpoint,
                                 bm25=args.bm25, run_file=args.run_file, embeddings=args.embeddings,
                                 backend=args.backend, drop_self=not args.keep_self, batch_size=args.batch_size,
                                 num_negatives=args.num_negatives, temperature=args.temperature,
                                 save_run=args.save_run, cache=not args.no_cache, k=args.hits, step=args.step,
                                 output=args.output, measure_speed=not args.no_speed)))
  return 0


def sweep(args, cfg) -> int:
  from scalingnote_jax.scaling import sweep as sweep_lib

  rows = sweep_lib.run(cfg, args.workdir)
  _print_main({"results": f"{args.workdir}/results.jsonl", "curves": f"{args.workdir}/curves.jsonl", "runs": len(rows)})
  return 0


def fit_scaling(args, cfg) -> int:
  from scalingnote_jax.scaling import fit

  where = {}
  for item in args.where:
    field, _, value = item.partition("=")
    try:
      where[field] = float(value)
    except ValueError:
      raise UsageError(f"--where {item!r}: expected FIELD=NUMBER") from None
  if args.protocol:
    from scalingnote_jax.scaling import protocols

    given = [flag for flag, value in (("--law", args.law), ("--x", args.x), ("--no-holdout", args.no_holdout)) if value]
    if args.large is not None and args.protocol == "data":
      given.append("--large")
    if given:
      raise UsageError(f"--protocol {args.protocol} fixes its law, axes and held-out points: drop {', '.join(given)}")
    print(to_json(protocols.run(args.results, protocol=args.protocol, y=args.y, large=args.large or 1,
                                bootstrap=args.bootstrap, plot_path=args.plot, where=where, direction=args.direction)))
    return 0
  if not args.law or args.large is not None:
    raise UsageError("--law is required (or --protocol)" if not args.law else "--large goes with --protocol")
  print(to_json(fit.run(args.results, law=args.law, y=args.y, x=args.x, holdout_largest=not args.no_holdout,
                        bootstrap=args.bootstrap, plot_path=args.plot, where=where, direction=args.direction)))
  return 0


def compile_step(args, cfg) -> int:
  from scalingnote_jax import aot

  if args.list_topologies:
    print(aot.list_topologies())
    return 0
  if not (args.config and args.topology):
    raise UsageError("compile needs --config and --topology (or --list-topologies)")
  aot.prepare_host(args.topology)  # before any JAX computation, so before the config is loaded
  from scalingnote_jax.config import load_config

  report = aot.compile_report(load_config(args.config, args.overrides), args.topology)
  print(to_json(report) if args.json else aot.format_report(report))
  return 0


def encode(args, cfg) -> int:
  from scalingnote_jax.index.encode import encode_corpus_dir

  _print_main(encode_corpus_dir(args.checkpoint, args.data, args.out, chunk_size=args.chunk_size,
                                batch_size=args.batch_size))
  return 0


def mine(args, cfg) -> int:
  from scalingnote_jax.index import mining

  if args.method == "dense" and not args.checkpoint:
    raise UsageError("mine --method dense needs --checkpoint")
  mining_cfg = mining.MiningConfig(range_min=args.range_min, range_max=args.range_max,
                                   num_negatives=args.num_negatives, absolute_margin=args.absolute_margin,
                                   relative_margin=args.relative_margin, sampling=args.sampling, seed=args.seed)
  mined = mining.mine_from_checkpoint(args.checkpoint, args.data, args.split, args.out, mining_cfg,
                                      method=args.method, embeddings_dir=args.embeddings, backend=args.backend)
  print(to_json({"out": args.out, "queries": len(mined),
                 "negatives_per_query": sum(len(m.negative_ids) for m in mined) / max(1, len(mined))}))
  return 0


def serve(args, cfg) -> int:
  from scalingnote_jax.serve import http
  from scalingnote_jax.serve.retriever import Retriever

  given = {name: getattr(args, name) for name in ("max_batch", "max_wait_ms", "max_queries", "max_query_chars", "max_k",
                                                 "max_pending", "max_connections", "request_timeout_s",
                                                 "idle_timeout_s")}
  try:
    limits = http.Limits(**{name: value for name, value in given.items() if value is not None})
  except ValueError as e:
    raise UsageError(str(e)) from None
  retriever = Retriever.load(args.bundle, max_batch=limits.max_batch)
  print(f"compiled the query encoder for {retriever.warmup()} batch/length shapes", file=sys.stderr)
  http.serve(retriever, host=args.host, port=args.port, limits=limits)
  return 0


# ----------------------------------------------------------------------------------------------------------
# Each command's own arguments (--config, --workdir and --resume are the table's). One name per concept across
# commands: a BEIR directory is --data, a trained model (workdir, HF dir...) is --checkpoint; the names they had
# before (--corpus, --model) still parse, as aliases listed after them.

def _rerank_args(p):
  p.add_argument("--checkpoint", "--model", required=True, help="a `scalingnote train-reranker` workdir")
  p.add_argument("--data", required=True, help="the BEIR directory with the run's queries and documents")
  p.add_argument("--run", required=True, help="the first stage's TREC run file")
  p.add_argument("--out", required=True, help="the reranked TREC run file")
  p.add_argument("--top-k", type=int, default=100, help="documents per query reranked (the rest are dropped)")
  p.add_argument("--batch-size", type=int, default=64, help="pairs per model call")
  p.add_argument("--fuse", type=float, default=1.0,
                 help="weight of the reranker's score against the first stage's, each min-max normalised per "
                      "query (1: the reranker alone; choose it on a dev split)")


def _export_hf_args(p):
  p.add_argument("workdir", help="a Stage 1 workdir (its towers: OUT/query and OUT/document, or OUT when tied), "
                                 "a Stage 2 workdir (its student: OUT) or a train-reranker workdir (OUT: a "
                                 "sequence-classification model for sentence-transformers' CrossEncoder)")
  p.add_argument("--out", required=True, help="a new directory: Hugging Face / sentence-transformers folders")


def _export_args(p):
  p.add_argument("student", help="a Stage 2 workdir (`scalingnote distill`)")
  p.add_argument("--out", required=True, help="the bundle directory (replaced atomically if it is a bundle)")
  p.add_argument("--data", "--corpus", default=None, help="a BEIR directory whose corpus.jsonl is indexed "
                                                          "(default: the teacher's training corpus)")
  p.add_argument("--embeddings", default=None, help="an existing `scalingnote encode` store of the corpus, "
                                                    "encoded by the teacher's document tower (not re-encoded)")
  p.add_argument("--teacher", default=None, help="the Stage 1 workdir whose document tower encodes the corpus "
                                                 "(default: the one the student was distilled from)")
  p.add_argument("--backend", choices=("scann", "exact"), default="scann", help="the bundle's document index")
  p.add_argument("--batch-size", type=int, default=64, help="documents per encoder call")


def _eval_args(p):
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--bundle", help="a serving bundle (`scalingnote export`): the online path")
  which.add_argument("--checkpoint", help="a Stage 1 workdir, or a HF dir / .gguf / packaged encoder (zero-shot)")
  which.add_argument("--bm25", action="store_true", help="BM25 (bm25s) over the corpus")
  which.add_argument("--run", dest="run_file", help="a TREC run file (e.g. from `scalingnote rerank`): its IR "
                                                    "metrics only")
  p.add_argument("--data", required=True, help="a BEIR directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
  p.add_argument("--split", default="test", help="the qrels file: DATA/qrels/SPLIT.tsv; or held-out: the dev "
                                                  "queries a Stage 1 --checkpoint held out of its train split")
  p.add_argument("--step", type=int, default=None, help="with a Stage 1 --checkpoint: the checkpoint step "
                                                        "(default: the latest)")
  p.add_argument("--embeddings", default=None, help="with --checkpoint: the corpus embedding store (resumable, "
                                                   "reused; default: kept in $SCALINGNOTE_CACHE_DIR, else "
                                                   "~/.cache/scalingnote, under the tower's fingerprint)")
  p.add_argument("--no-cache", action="store_true", help="with --checkpoint and no --embeddings: encode the corpus "
                                                         "into a temporary store, deleted afterwards")
  p.add_argument("--backend", choices=("scann", "exact"), default="exact", help="with --checkpoint: the index")
  p.add_argument("--keep-self", action="store_true", help="keep a document whose id equals the query's")
  p.add_argument("--save-run", default=None, help="also write the system's top --hits per query as a TREC run "
                                                  "file (the input of `scalingnote rerank`)")
  p.add_argument("--output", default=None, help="a directory: also write the metrics as MTEB writes a task's result "
                                                "(DIR/<the --data directory's name>.json, main_score nDCG@10)")
  p.add_argument("--hits", type=int, default=100, help="documents retrieved per query: what the metrics see and "
                                                       "--save-run writes (pyserini's name)")
  p.add_argument("--no-speed", action="store_true", help="skip the throughput pass (queries/s and one query's "
                                                          "latency: the queries searched in batches 4 or more times, ~1 s in all, then 33 alone)")
  p.add_argument("--batch-size", type=int, default=64, help="texts per encoder call")
  p.add_argument("--num-negatives", type=int, default=256, help="sampled documents per query for AUC and "
                                                                 "contrastive entropy (Fang et al.'s 256)")
  p.add_argument("--temperature", type=float, default=None, help="of the contrastive entropy (default: the "
                                                                 "model's own for a Stage 1 workdir, else 0.05)")


def _fit_args(p):
  p.add_argument("results", help="JSONL: one run per line with N and/or D and the metric fields (with --protocol: "
                                 "one evaluation per line with N and step, e.g. a sweep's curves.jsonl)")
  p.add_argument("--law", choices=("n", "d", "nd", "coupled", "power"),
                 help="(required without --protocol) n: (A/N)^alpha + delta; d: (B/D)^beta + delta; nd: a + b N^c + "
                      "d D^e; coupled: [(A/N)^(alpha/beta) + B/D]^beta + delta (Fang et al.); power: a + b x^c")
  p.add_argument("--protocol", choices=("data", "model", "joint"),
                 help="the reranker paper's protocols on evaluations along training (D = step): data: a + b step^c "
                      "per size on all but the last 5, forecasting them; model: a + b N^c on the small sizes' last 10 "
                      "evaluations, forecasting the large sizes' mean; joint: a + b N^c + d step^e on the small "
                      "sizes, forecasting the large")
  p.add_argument("--large", type=int, default=None,
                 help="--protocol model / joint: how many of the largest sizes are forecast (default 1)")
  p.add_argument("--direction", choices=("auto", "rising", "falling"), default="auto",
                 help="whether the field rises with N and D (nDCG, MAP) or falls (a loss); auto: from the field's "
                      "name, else the data")
  p.add_argument("--y", required=True, help="the fitted field, e.g. contrastive_entropy or ndcg_at_10")
  p.add_argument("--x", default=None, help="for n / d / power: the size field (default N, or D for d)")
  p.add_argument("--no-holdout", action="store_true", help="fit every run; no forecast check")
  p.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95%% intervals")
  p.add_argument("--plot", default=None, help="write the data, fit and forecast as a PNG here")
  p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                 help="only the runs whose FIELD equals VALUE (e.g. D=896 for a model-size law at one data size)")


def _compile_args(p):
  p.add_argument("--config", help="configs/<name>.py, optionally :variant")
  p.add_argument("--topology", help="e.g. v5e-256, v5p-128, h100-64 (8 hosts x 8), cpu-8; see --list-topologies")
  p.add_argument("--list-topologies", action="store_true", help="print the known topologies and exit")
  p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _encode_args(p):
  p.add_argument("--checkpoint", required=True, help="a Stage 1 workdir, a HF model dir, a .gguf or a packaged name")
  p.add_argument("--data", "--corpus", required=True, help="a BEIR directory (its corpus.jsonl is encoded)")
  p.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
  p.add_argument("--batch-size", type=int, default=64, help="documents per encoder call")
  p.add_argument("--chunk-size", type=int, default=1024, help="documents per resumable chunk")


def _mine_args(p):
  p.add_argument("--checkpoint", default="", help="with --method dense (required there): a Stage 1 workdir, HF "
                                                  "dir, .gguf or packaged name")
  p.add_argument("--data", required=True, help="a BEIR directory")
  p.add_argument("--split", default="train", help="the queries (and positives) of DATA/qrels/SPLIT.tsv")
  p.add_argument("--out", required=True, help="the JSONL to write ({query_id, query, positive_ids, negative_ids})")
  p.add_argument("--method", choices=("dense", "bm25"), default="dense")
  p.add_argument("--backend", choices=("scann", "exact"), default="scann", help="document index (dense)")
  p.add_argument("--embeddings", default=None, help="corpus embedding store (default: next to --out; reused)")
  p.add_argument("--range-min", type=int, default=10, help="skip the first RANGE_MIN results (likely unjudged "
                                                          "positives); sentence-transformers' range_min")
  p.add_argument("--range-max", type=int, default=100, help="draw negatives from results up to this rank")
  p.add_argument("--num-negatives", type=int, default=8, help="negatives per query")
  p.add_argument("--absolute-margin", type=float, default=None, help="keep a negative only if its score is at "
                                                                    "most the best positive's minus this")
  p.add_argument("--relative-margin", type=float, default=None, help="keep a negative only if its score is at "
                                                                    "most the best positive's times (1 - this)")
  p.add_argument("--sampling", choices=("top", "random"), default="top", help="the highest-ranked candidates, "
                                                                               "or a random draw of them")
  p.add_argument("--seed", type=int, default=0, help="of the random sampling")


def _serve_args(p):
  p.add_argument("bundle", help="a serving bundle directory (serve/bundle.py)")
  p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 answers this machine only; 0.0.0.0 exposes it")
  p.add_argument("--port", type=int, default=8000, help="TCP port")
  # Unset limits keep the defaults of serve.http.Limits.
  p.add_argument("--max-batch", type=int, default=None, help="queries per encoder call (default 64)")
  p.add_argument("--max-wait-ms", type=float, default=None, help="batching window after a first request (default 2)")
  p.add_argument("--max-queries", type=int, default=None, help="queries per request (default 64)")
  p.add_argument("--max-query-chars", type=int, default=None, help="characters per query (default 2048)")
  p.add_argument("--max-k", type=int, default=None, help="results per query (default 1000)")
  p.add_argument("--max-pending", type=int, default=None,
                 help="queries waiting for the encoder before /search answers 503 (default 4096)")
  p.add_argument("--max-connections", type=int, default=None,
                 help="open connections before requests are answered 503 (default 256)")
  p.add_argument("--request-timeout-s", type=float, default=None,
                 help="to send a request's head, and again its body (408) (default 10)")
  p.add_argument("--idle-timeout-s", type=float, default=None,
                 help="an idle keep-alive connection is closed after this (default 5)")


# ----------------------------------------------------------------------------------------------------------
# The table.

@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  run: Callable  # (args, cfg) -> exit status
  arguments: Callable | None = None  # adds the command's own arguments to its parser
  config: str = ""  # the help of a required --config, for the commands that run from a config file
  workdir: str = ""  # the help of a required --workdir
  resume: bool = False  # whether it takes --resume


CONFIG = "configs/<name>.py, optionally :variant (e.g. configs/{}.py)"
RESUME = "continue from the latest checkpoint in --workdir"
COMMANDS = {
    "pipeline": Command("the main job: Stage 1 teacher (with a mining round), a directly-trained small dual "
                        "tower, corpus encoding, Stage 2 students, serving bundles, evaluation and report; rerun "
                        "to resume", pipeline, config=CONFIG.format("demo"),
                        workdir="every stage's output, report.md and report.json go here"),
    "train": Command("Stage 1: train dual LLM towers with the cross-device contrastive loss", train,
                     config=CONFIG.format("tiny"), workdir="checkpoints, metrics.jsonl and TensorBoard files go here",
                     resume=True),
    "distill": Command("Stage 2: distil the frozen LLM query tower of a Stage 1 workdir (--config.teacher) into a "
                       "small BERT query encoder", distill, config=CONFIG.format("distill_tiny"),
                       workdir="checkpoints, cached teacher embeddings and metrics go here", resume=True),
    "train-reranker": Command("a cross-encoder reranker over first-stage candidates, with a pointwise (BCE), "
                              "pairwise (RankNet) or listwise (ListNet) loss", train_reranker,
                              config=CONFIG.format("rerank_tiny"),
                              workdir="checkpoints, reranker.json and metrics.jsonl go here", resume=True),
    "rerank": Command("rerank a TREC run file with a trained reranker; score the output with `scalingnote eval "
                      "--run`", rerank, _rerank_args),
    "export": Command("write a serving bundle: the distilled student, the LLM document tower's embeddings and "
                      "their index, a manifest", export, _export_args),
    "export-hf": Command("write a trained tower (Stage 1, LoRA merged; or a Stage 2 student) as a Hugging Face / "
                         "sentence-transformers folder, or a reranker as a sequence-classification model "
                         "(transformers, sentence-transformers' CrossEncoder)", export_hf, _export_hf_args),
    "eval": Command("one system on a BEIR split: nDCG@10, Recall@10/100, MRR@10, MAP (pytrec_eval), AUC, "
                    "contrastive entropy, throughput; one JSON object", evaluate, _eval_args),
    "sweep": Command("Stage 1 over a ladder of model sizes x data sizes, resumable run by run; writes "
                     "WORKDIR/results.jsonl (and curves.jsonl, the evaluations along training) for fit-scaling",
                     sweep, config=CONFIG.format("sweep_tiny"),
                     workdir="runs/<run>/, results.jsonl and curves.jsonl go here"),
    "fit-scaling": Command("fit a scaling law to sweep results (JSONL, one run per line) and forecast the largest "
                           "run from the others; or, with --protocol, the reranker paper's protocols on evaluations "
                           "along training (a sweep's curves.jsonl)", fit_scaling, _fit_args),
    "compile": Command("compile the Stage 1 step ahead of time for a fake topology (TPU pod, GPU hosts) and print "
                       "per-device memory; no such hardware needed", compile_step, _compile_args),
    "encode": Command("encode a BEIR corpus with a document tower into a resumable zarr store", encode, _encode_args),
    "mine": Command("mine hard negatives for a BEIR split into the training JSONL of Stage 1", mine, _mine_args),
    "serve": Command("the online retrieval service over a bundle: POST /search, GET /healthz, GET /metrics, with "
                     "micro-batching (serve/http.py)", serve, _serve_args),
}


def _version() -> str:
  from importlib.metadata import PackageNotFoundError, version

  def of(name):
    try:
      return version(name)
    except PackageNotFoundError:
      return "not installed"
  return f"scalingnote-jax {of('scalingnote-jax')} (jax {of('jax')}, flax {of('flax')}, Python {sys.version.split()[0]})"


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
  """Each option's help ends with its default, unless it has none or its help already says it."""

  def _get_help_string(self, action):
    none = action.default is None or action.default is False or action.default == ""
    if none or "default" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scalingnote", description=__doc__.split("\n\n")[0])
  parser.add_argument("--version", action="version", version=_version())
  parser.add_argument("--debug", action="store_true", help="on an error, print the whole traceback (anywhere on "
                                                           "the line); without it an error is one line")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, command in COMMANDS.items():
    p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=HelpWithDefaults)
    if command.config:
      p.add_argument("--config", required=True, help=command.config)
    if command.workdir:
      p.add_argument("--workdir", required=True, help=command.workdir)
    if command.resume:
      p.add_argument("--resume", action="store_true", help=RESUME)
    if command.arguments:
      command.arguments(p)
  return parser


def config_overrides(rest: list[str]) -> list[str]:
  """`--config.a.b value` as `--config.a.b=value` (absl's flags take both forms)."""
  out, i = [], 0
  while i < len(rest):
    item = rest[i]
    if item.startswith("--config.") and "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
      out.append(f"{item}={rest[i + 1]}")
      i += 2
    else:
      out.append(item)
      i += 1
  return out


def run(argv: list[str]) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  args.overrides = config_overrides(rest)
  from scalingnote_jax import distributed

  distributed.initialize()  # multi-process when a launch script (launch/) says so; before any JAX work
  takes_config = hasattr(args, "config")
  bad = [a for a in args.overrides if not (takes_config and a.startswith("--config."))]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}"
                 + (" (config fields are set as --config.field=value)" if takes_config else ""))
  command = COMMANDS[args.command]
  cfg = None
  if command.config:
    from scalingnote_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
  try:
    return command.run(args, cfg)
  except UsageError as e:
    parser.error(str(e))


def _quiet_background_failures() -> None:
  """A checkpoint save that fails in the background (a full disk) is reported once, as the CheckpointWriteError
  that stops the run; without this, orbax logs the same error with its traceback from each of its threads and
  tensorstore prints a traceback for every write still pending on orbax's closed event loop (~500 lines
  before the one that names the problem). `--debug` keeps them."""
  import logging

  class FromOrbaxThreads(logging.Filter):  # orbax's records through absl begin "[process=N]"
    def filter(self, record):
      return not (record.levelno >= logging.ERROR and str(record.msg).startswith("[process="))

  class UnretrievedWrites(logging.Filter):  # asyncio, at exit, on each failed write's future nobody awaited
    def filter(self, record):
      exc = record.exc_info[1] if record.exc_info else None
      return not (str(record.msg).startswith(("Future exception was never retrieved",
                                               "Task exception was never retrieved")) and "Error writing" in str(exc))

  for name, quiet in (("absl", FromOrbaxThreads), ("asyncio", UnretrievedWrites)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, quiet) for f in logger.filters):
      logger.addFilter(quiet())
  previous = sys.unraisablehook
  if getattr(previous, "quiet", False):
    return

  def unraisablehook(u):  # where tensorstore reports an error its completion callback could not deliver
    if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"):
      previous(u)
  unraisablehook.quiet = True
  sys.unraisablehook = unraisablehook


def main(argv: list[str] | None = None) -> int:
  """`scalingnote ...`: an error is one line on stderr and exit status 1 (`--debug` raises it instead); a
  preemption notice exits 143 after its checkpoint."""
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = "--debug" in argv
  if not debug:
    _quiet_background_failures()
  try:
    return run([a for a in argv if a != "--debug"])
  except Exception as e:
    from scalingnote_jax import distributed  # (here, as in `run`: --help starts without loading JAX)
    from scalingnote_jax.train.common import Preempted  # (here: importing it loads orbax, slow for --help)

    if isinstance(e, Preempted):
      print(f"scalingnote: {e}", file=sys.stderr, flush=True)
      return 128 + 15  # as if killed by SIGTERM: schedulers requeue the job, and --resume continues it
    if debug:
      raise
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # a KeyError's str() is a repr
    print(f"scalingnote: error: {message or type(e).__name__} ({type(e).__name__}; --debug prints the "
          "traceback)", file=sys.stderr, flush=True)
    distributed.exit_now_if_distributed(1)  # not through the shutdown barrier, where a peer may never arrive
    return 1


if __name__ == "__main__":
  sys.exit(main())
