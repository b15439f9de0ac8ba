"""Command line: `scalingnote <command> --config configs/<name>.py[:variant] [--config.field=value ...]`."""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {
    "demo": "encode the built-in synthetic corpus with both towers and report throughput",
    "train": "Stage 1: train dual LLM towers with the cross-device contrastive loss",
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="scalingnote", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", required=True, help="configs/<name>.py, optionally :variant")
    if name == "train":
      p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
      p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config fields are set as --config.field=value)")

  from scalingnote_jax.config import load_config

  cfg = load_config(args.config, rest)
  if args.command == "demo":
    from scalingnote_jax import demo

    demo.run(cfg)
  elif args.command == "train":
    from scalingnote_jax.train import stage1

    out = stage1.train(cfg, args.workdir, resume=args.resume)
    if out["evals"]:
      print(json.dumps({"final": out["evals"][-1]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
