"""Run-once stage markers: a multi-stage job (`scalingnote pipeline`, `scalingnote sweep`) records each finished
stage as WORKDIR/stages/NAME.json (its configuration, its seconds and its result); a rerun skips it, and one
with a changed configuration stops naming the stage and the fields that differ. A field added to the
configuration since the stage ran is no difference while it holds its default (`config.config_changes`)."""

from __future__ import annotations

import hashlib
import json
import os
import time

from ml_collections import ConfigDict

from scalingnote_jax.artifacts.files import write_atomic
from scalingnote_jax.config import config_changes
from scalingnote_jax.distributed import is_main

STAGES_DIR = "stages"


class Stages:
  """Runs each stage once: a stage whose marker exists (with the same configuration) is skipped."""

  def __init__(self, workdir: str, label: str = "pipeline"):
    self.workdir, self.dir, self.label = workdir, os.path.join(workdir, STAGES_DIR), label
    os.makedirs(self.dir, exist_ok=True)
    self.timings: dict[str, float] = {}

  def __call__(self, name: str, config: dict, fn, defaults: ConfigDict | None = None) -> dict:
    """`fn()`'s result, run now or recorded by an earlier run of this stage with the same `config` (a dict);
    `defaults`: the defaults of the config's fields, when it is a trainer's."""
    marker = os.path.join(self.dir, f"{name}.json")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if os.path.exists(marker):
      with open(marker) as f:
        done = json.load(f)
      if "config" in done:
        changes = config_changes(done["config"], config, defaults)
      else:  # a marker written before markers held their configuration: the hash must match
        changes = {"(configuration hash)": [done["config_hash"], digest]} if done["config_hash"] != digest else {}
      if changes:
        fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:5])
        raise ValueError(f"{marker}: stage {name!r} completed with another configuration than this one ({fields}); "
                         "use a new --workdir, or delete that file and the stage's output to redo it")
      print(f"[{self.label}] {name}: done ({done['seconds']:.0f} s), skipped", flush=True)
      self.timings[name] = done["seconds"]
      return done["result"]
    print(f"[{self.label}] {name}: running", flush=True)
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    if is_main():
      write_atomic(marker, json.dumps({"config_hash": digest, "config": json.loads(json.dumps(config, default=str)),
                                       "seconds": seconds, "result": result}, indent=1))
    self.timings[name] = seconds
    print(f"[{self.label}] {name}: done in {seconds:.0f} s", flush=True)
    return result
