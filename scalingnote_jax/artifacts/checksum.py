"""Content checksums of the files an artifact is made of: recorded when it is written, verified when it is
loaded, so that a flipped byte is an error naming the file instead of wrong answers. SHA-256 reads ~1.1 GB/s
on one core here (a 1.17 GB file, the size of the 1M-document ScaNN index, hashes in 1.06 s, page-cached)."""

from __future__ import annotations

import hashlib
import os

from scalingnote_jax.artifacts.lock import LOCK_FILE


def sha256_of(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def digest_tree(root: str, skip: tuple[str, ...] = ()) -> dict[str, dict]:
  """{relative path: {"bytes", "sha256"}} of every file under `root` but `skip` (relative paths) and locks."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in sorted(names):
      full = os.path.join(directory, name)
      rel = os.path.relpath(full, root)
      if name != LOCK_FILE and rel not in skip:
        out[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_of(full)}
  return dict(sorted(out.items()))


def verify_tree(root: str, files: dict[str, dict | int], error: type[Exception], what: str) -> None:
  """Raises `error` naming the first file of `files` that is missing, of another size or other content.
  An int entry (an older format) is a size only."""
  for rel, expected in files.items():
    full = os.path.join(root, rel)
    nbytes, digest = (expected, None) if isinstance(expected, int) else (expected["bytes"], expected["sha256"])
    if not os.path.isfile(full):
      raise error(f"{what}: file {rel} listed in the manifest is missing")
    if os.path.getsize(full) != nbytes:
      raise error(f"{what}: file {rel} has {os.path.getsize(full)} bytes, the manifest says {nbytes} "
                  "(truncated or replaced)")
    if digest is not None and sha256_of(full) != digest:
      raise error(f"{what}: file {rel} does not match its checksum in the manifest (corrupted or modified)")
