"""Corpus encoding into a resumable zarr store: SIGKILL mid-run and rerun equals one clean run; an
unfinished store is never read as complete; data-parallel encoding over 8 devices equals one device; a
store another tower wrote is not resumed."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from scalingnote_jax import sharding
from scalingnote_jax.data import synthetic
from scalingnote_jax.data.beir import write_beir
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.artifacts.store import encode_corpus, load_embeddings

pytestmark = pytest.mark.slow  # trains, encodes a real corpus or runs processes: in `make test`, not test-fast


def encode_cmd(corpus_dir, out):
  return [sys.executable, "-m", "scalingnote_jax.cli", "encode", "--checkpoint", "all-MiniLM-L6-v2", "--data",
          str(corpus_dir), "--out", str(out), "--chunk-size", "16", "--batch-size", "16"]


def test_sigkill_then_rerun_equals_a_clean_run(tmp_path):
  corpus_dir = write_beir(synthetic.generate(200, seed=5), str(tmp_path / "beir"), "test")
  clean, killed = tmp_path / "clean", tmp_path / "killed"
  env = {**os.environ, "XLA_FLAGS": ""}
  subprocess.run(encode_cmd(corpus_dir, clean), check=True, capture_output=True, env=env, timeout=300)

  proc = subprocess.Popen(encode_cmd(corpus_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=env)
  deadline = time.time() + 200
  while not (killed / "done" / "2").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
  assert not (killed / "COMPLETE").exists()
  with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
    load_embeddings(str(killed))
  finished = len(os.listdir(killed / "done"))
  assert 0 < finished < 13

  subprocess.run(encode_cmd(corpus_dir, killed), check=True, capture_output=True, env=env, timeout=300)
  ids_a, emb_a = load_embeddings(str(clean))
  ids_b, emb_b = load_embeddings(str(killed))
  assert ids_a == ids_b and emb_a.shape == (200, 384)
  np.testing.assert_allclose(emb_b, emb_a, atol=1e-6)


def test_data_parallel_encoding_equals_single_device(tmp_path):
  data = synthetic.generate(70, seed=1)
  mesh = sharding.make_mesh((8, 1, 1))
  single = Encoder.from_pretrained("all-MiniLM-L6-v2")
  parallel = Encoder.from_pretrained("all-MiniLM-L6-v2", mesh=mesh)
  encode_corpus(parallel, data.corpus, str(tmp_path / "p"), chunk_size=32, batch_size=12)
  ids, emb = load_embeddings(str(tmp_path / "p"))
  assert ids == list(data.corpus) and jax.device_count() == 8
  np.testing.assert_allclose(emb, single.encode_documents(list(data.corpus.values())), atol=1e-5)
  assert single.fingerprint == parallel.fingerprint  # the same tower on any mesh: the store is reused
  assert encode_corpus(single, data.corpus, str(tmp_path / "p")) == str(tmp_path / "p")
  other = Encoder.from_pretrained("all-MiniLM-L6-v2", pooling="cls")  # same weights, other embeddings
  with pytest.raises(ValueError, match=f"fingerprint '{parallel.fingerprint}', not this tower's "
                                       f"'{other.fingerprint}'"):  # another tower's store
    encode_corpus(other, data.corpus, str(tmp_path / "p"))
  shrunk = dict(list(data.corpus.items())[:50])
  with pytest.raises(ValueError, match="holds a finished encoding of a different corpus"):  # was: reused silently
    encode_corpus(parallel, shrunk, str(tmp_path / "p"), chunk_size=16)
  edited = {**data.corpus, "d0": {"title": "retitled", "text": "rewritten"}}  # same ids, one text changed
  with pytest.raises(ValueError, match="holds a finished encoding of other texts under the same ids"):
    encode_corpus(parallel, edited, str(tmp_path / "p"))  # was: reused silently, the old row served as the new
  with pytest.raises(ValueError, match="holds a partial encoding of a different corpus"):
    (tmp_path / "p" / "COMPLETE").unlink()
    encode_corpus(parallel, shrunk, str(tmp_path / "p"), chunk_size=32)
  with pytest.raises(ValueError, match="holds a partial encoding of other texts under the same ids"):
    encode_corpus(parallel, edited, str(tmp_path / "p"), chunk_size=32)


def test_a_corrupted_store_is_refused_when_loaded(tmp_path):
  """COMPLETE records a checksum of the rows as written; a store whose bytes changed since is refused, naming it."""
  enc = Encoder.from_pretrained("all-MiniLM-L6-v2")
  corpus = {f"d{i}": f"document {i}" for i in range(10)}
  out = tmp_path / "s"
  encode_corpus(enc, corpus, str(out), chunk_size=4)
  _, emb = load_embeddings(str(out))  # verified
  np.testing.assert_allclose(emb, enc.encode_documents(list(corpus.values())), atol=1e-6)
  chunk = sorted(p for p in (out / "embeddings.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")[1]
  raw = bytearray(chunk.read_bytes())
  raw[-3] ^= 0x40  # one bit of one float (an exponent bit: the value changes, it stays a number)
  chunk.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"s/embeddings.zarr: its contents do not match the checksum in COMPLETE"):
    load_embeddings(str(out))
