"""One writer per directory: an exclusive `flock` on DIR/.lock, holding who took it (pid, host, start).

The kernel drops the lock when its holder exits however it ends (SIGKILL included), so a killed run never
leaves a stale lock behind: `--resume` just takes it. Another writer is refused with the holder named. In a
multi-process job only process 0 takes it (the processes are one run). flock is not reliable across hosts on
network filesystems: there the lock guards against a second run started on the same host.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import inspect
import json
import os
import socket
import sys

from scalingnote_jax.distributed import is_main

LOCK_FILE = ".lock"


class DirectoryInUse(RuntimeError):
  """Another process holds the directory's lock."""


@contextlib.contextmanager
def locked(directory: str):
  """Holds `directory`'s lock for the block (creating the directory); DirectoryInUse if another has it."""
  if not is_main():
    yield
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with open(path) as f:
        holder = f.read().strip()
      try:
        h = json.loads(holder)
        who = f"pid {h['pid']} on {h['host']} since {h['start']} ({h['command']})"
      except (ValueError, KeyError, TypeError):
        who = "another process"
      raise DirectoryInUse(f"{directory} is in use by {who}: wait for it to finish, or stop it first "
                           f"(its lock: {path})") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "start": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": " ".join(os.path.basename(a) if i == 0 else a
                                                 for i, a in enumerate(sys.argv))[:300]}).encode())
    yield
  finally:
    os.close(fd)  # releases the lock


def holds_lock(param: str):
  """Decorator: the function runs holding the lock of the directory its argument `param` names."""
  def wrap(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
      with locked(signature.bind(*args, **kwargs).arguments[param]):
        return fn(*args, **kwargs)
    return run
  return wrap
