"""The command line as a new user meets it: --version, defaults in --help, both override forms, one-line
errors (tests/test_pipeline.py checks a real one and --debug), and no PyTorch warning from the tokenizer."""

import argparse
import subprocess
import sys

import pytest

from scalingnote_jax import cli


def test_version_and_help_show_what_a_user_needs(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("scalingnote-jax 0.")
  with pytest.raises(SystemExit):
    cli.main(["mine", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "(default: 10)" in text and "--seed SEED of the random sampling (default: 0)" in text
  assert "(default: None)" not in text  # an option without a default says nothing about one


def test_config_overrides_take_the_space_form_too():
  assert cli.config_overrides(["--config.a", "1", "--config.b=x y", "--config.c", "--config.d", "-2"]) == [
      "--config.a=1", "--config.b=x y", "--config.c", "--config.d=-2"]


def test_a_user_error_is_one_line(capsys):
  assert cli.main(["train", "--config", "no/such.py", "--workdir", "w", "--config.num_steps", "3"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("scalingnote: error: no/such.py: no such config file")


def test_loading_a_tokenizer_prints_no_pytorch_warning(minilm_dir):
  out = subprocess.run([sys.executable, "-c", "from scalingnote_jax.models.tokenizer import Tokenizer; "
                        f"print(Tokenizer.from_pretrained({minilm_dir!r}).eos_id)"], capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == "102", out.stderr
  assert "PyTorch" not in out.stderr, out.stderr


def test_every_command_of_the_table_has_its_help_and_the_shared_arguments(capsys):
  """The table (cli.COMMANDS) is the CLI: each command parses with its help, and --config / --workdir /
  --resume exactly where the table says."""
  assert {"pipeline", "train", "distill", "train-reranker", "eval", "serve"} <= set(cli.COMMANDS)
  for name, command in cli.COMMANDS.items():
    with pytest.raises(SystemExit) as e:
      cli.build_parser().parse_args([name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    # (argparse wraps lines after a hyphen too: compared without whitespace)
    assert e.value.code == 0 and "".join(command.help.split()) in "".join(out.split()), name
    assert ("--workdir WORKDIR" in out) == bool(command.workdir), name
    assert ("--resume" in out) == command.resume, name
    assert ("--config CONFIG" in out) == bool(command.config) or name == "compile", name  # compile: optional


def test_one_name_per_concept_across_commands():
  """A BEIR directory is --data and the model a command runs is --checkpoint in every command (argparse lists an
  option's first name as its own); the names some commands had before (--corpus, --model) parse to the same."""
  primary = {}  # dest -> {first option name} over every command
  for name, command in cli.COMMANDS.items():
    if command.arguments is None:
      continue
    p = argparse.ArgumentParser()
    command.arguments(p)
    for action in p._actions:  # (argparse has no public list of a parser's arguments)
      if not action.option_strings:
        continue
      primary.setdefault(action.dest, set()).add(action.option_strings[0])
      assert action.option_strings[0] not in ("--corpus", "--model"), (name, action.option_strings)
      if "BEIR director" in (action.help or ""):
        assert action.option_strings[0] == "--data", (name, action.option_strings)
  assert primary["data"] == {"--data"} and primary["checkpoint"] == {"--checkpoint"}
  assert all(len(names) == 1 for names in primary.values()), primary  # one spelling per destination

  parse = cli.build_parser().parse_args
  for data in ("--data", "--corpus"):
    assert parse(["encode", "--checkpoint", "c", data, "beir", "--out", "o"]).data == "beir"
    assert parse(["export", "student", "--out", "o", data, "beir"]).data == "beir"
  for checkpoint in ("--checkpoint", "--model"):
    args = parse(["rerank", checkpoint, "reranker", "--data", "beir", "--run", "r", "--out", "o"])
    assert args.checkpoint == "reranker" and args.data == "beir"
