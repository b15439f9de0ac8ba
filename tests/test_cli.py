"""The command line as a new user meets it: --version, defaults in --help, both override forms, one-line
errors (tests/test_pipeline.py checks a real one and --debug), and no PyTorch warning from the tokenizer."""

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
