"""Command line: `scalingnote <command> --config configs/<name>.py[:variant] [--config.field=value ...]`."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "demo": "encode the built-in synthetic corpus with both towers and report throughput",
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="scalingnote", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", required=True, help="configs/<name>.py, optionally :variant")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config fields are set as --config.field=value)")

  from scalingnote_jax.config import load_config

  cfg = load_config(args.config, rest)
  if args.command == "demo":
    from scalingnote_jax import demo

    demo.run(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
