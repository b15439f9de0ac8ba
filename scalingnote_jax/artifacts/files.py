"""Atomic writes: a reader sees the old file (or directory) or the new one whole, never a half-written one,
and what a rename made visible is on disk first."""

from __future__ import annotations

import os
import shutil
import uuid


def write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def fsync_tree(directory: str) -> None:
  """Flush file contents and directory entries to disk before the rename makes them visible."""
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def replace_dir(src: str, dst: str) -> None:
  """Move the complete directory `src` to `dst`, replacing a directory there.

  rename(2) cannot replace a non-empty directory, so an old one is first renamed aside and deleted only
  once the new one is in place. A crash between the two renames leaves the old one complete under
  `.NAME.old-*` beside `dst`.
  """
  parent = os.path.dirname(dst)
  old = None
  if os.path.lexists(dst):
    old = os.path.join(parent, f".{os.path.basename(dst)}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    if old is not None:
      os.rename(old, dst)  # put the previous one back
    raise
  _fsync_dir(parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


CACHE_ENV = "SCALINGNOTE_CACHE_DIR"  # default ~/.cache/scalingnote


def cache_dir(*parts: str) -> str:
  """A path under the user's cache of derived data that runs share and may always recompute (an evaluation's
  corpus embeddings, a frozen trunk's hidden states): $SCALINGNOTE_CACHE_DIR, else ~/.cache/scalingnote."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "scalingnote")
  return os.path.join(root, *parts)
