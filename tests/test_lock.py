"""One writer per directory: a second trainer or encoder on a directory in use is refused with the holder
named, before it writes anything; a holder killed with SIGKILL leaves no lock behind."""

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import ROOT
from scalingnote_jax.artifacts.lock import LOCK_FILE, DirectoryInUse, locked


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  from scalingnote_jax.config import load_config
  from scalingnote_jax.artifacts import store
  from scalingnote_jax.train import stage1

  workdir = tmp_path / "run"
  with locked(str(workdir)):
    cfg = load_config(f"{ROOT}/configs/tiny.py:smoke")
    with pytest.raises(DirectoryInUse, match=rf"run is in use by pid {os.getpid()} on .* since "):
      stage1.train(cfg, str(workdir))
    with pytest.raises(DirectoryInUse, match=rf"pid {os.getpid()}"):
      store.encode_corpus(None, {"d0": "text"}, str(workdir))  # refused before the encoder is touched
  assert os.listdir(workdir) == [LOCK_FILE]  # nothing else was written
  with locked(str(workdir)):  # released at the end of the block
    pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from scalingnote_jax.artifacts.lock import locked\n"
       f"with locked({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(DirectoryInUse, match=f"pid {holder.pid} "):
    with locked(str(tmp_path)):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # its record is still there...
  with locked(str(tmp_path)):  # ...but the lock died with it
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
