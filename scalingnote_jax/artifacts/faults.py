"""Failpoints for fault-injection tests. `SCALINGNOTE_FAILPOINT=name:n` SIGKILLs this process the n-th time
it reaches the point `name` (as an OOM killer, a lost host or `kill -9` would), so a test can stop a run at a
chosen moment: during a checkpoint save, between steps, mid-encoding, mid-export. Unset (always, outside
tests), a failpoint reads one environment variable."""

from __future__ import annotations

import collections
import os
import signal

_reached = collections.Counter()


def failpoint(name: str) -> None:
  spec = os.environ.get("SCALINGNOTE_FAILPOINT")
  if not spec or spec.partition(":")[0] != name:
    return
  _reached[name] += 1
  if _reached[name] == int(spec.partition(":")[2] or 1):
    os.kill(os.getpid(), signal.SIGKILL)
