"""Real checkpoints vs stored torch references (tests/make_fixtures.py): all-MiniLM-L6-v2 (HF safetensors
directory) and SmolLM2-135M-Instruct (Q4_1 GGUF: dequantized, q/k un-permuted, BPE tokenizer from the GGUF
metadata)."""

import numpy as np
import pytest

from helpers import FIXTURES, SENTENCES
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.models import load_backbone
from scalingnote_jax.models.tokenizer import Tokenizer

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)


def test_minilm_embeddings_match_sentence_transformers_recipe(minilm_dir):
  ref = np.load(f"{FIXTURES}/minilm_reference.npz")
  enc = Encoder.from_pretrained(minilm_dir)
  assert enc.cfg.pooling == "mean" and enc.cfg.max_length == 256  # from the sentence-transformers files
  ids = enc.tokenizer.encode(SENTENCES, max_length=128)
  assert ids == [list(r[m == 1]) for r, m in zip(ref["ids"], ref["mask"])]
  emb = enc.encode(SENTENCES)
  assert emb.dtype == np.float32 and emb.shape == (len(SENTENCES), 384)
  assert np.abs(emb - ref["embeddings"]).max() <= 1e-3


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf):
  ref = np.load(f"{FIXTURES}/smollm2_reference.npz")
  tok = Tokenizer.from_pretrained(smollm2_gguf)
  ids = tok.encode(SENTENCES, max_length=512)
  assert ids == [list(r[m == 1]) for r, m in zip(ref["ids"], ref["mask"])]
  model, cfg = load_backbone(smollm2_gguf)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5
  hidden = np.asarray(model(ref["ids"], ref["mask"]))
  assert np.abs(hidden - ref["hidden"])[ref["mask"] == 1].max() <= 1e-3
