"""Golden parity: our Flax models vs HF transformers (torch) on tiny random checkpoints (fixtures made by
tests/make_fixtures.py). Float32, max abs diff <= 1e-4 on every non-pad position."""

import numpy as np
import pytest

from helpers import fixture
from scalingnote_jax.models import llm, load_backbone

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)

DECODERS = ["qwen2", "qwen3", "llama", "llama3_rope"]


def max_diff(a, b, mask):
  return float(np.abs(np.asarray(a) - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_transformers(name):
  d, e = fixture(name)
  model, cfg = load_backbone(d, lm_head=True)
  assert cfg.model_type == {"llama3_rope": "llama"}.get(name, name)
  hidden = model(e["ids"], e["mask"])
  assert max_diff(hidden, e["hidden"], e["mask"]) <= 1e-4
  assert max_diff(model.logits(hidden), e["logits"], e["mask"]) <= 1e-4


def test_decoder_variants_are_really_exercised():
  """The fixtures cover what they claim: bias (qwen2), q/k norm and a head_dim != hidden/heads (qwen3),
  an untied head (llama), llama3 rope scaling."""
  cfgs = {n: load_backbone(fixture(n)[0], lm_head=True)[1] for n in DECODERS}
  assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].tie_word_embeddings
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim * cfgs["qwen3"].num_heads != cfgs["qwen3"].hidden_size
  assert not cfgs["llama"].tie_word_embeddings and cfgs["llama"].num_kv_heads < cfgs["llama"].num_heads
  assert dict(cfgs["llama3_rope"].rope_scaling)["rope_type"] == "llama3"


def test_bert_matches_transformers():
  d, e = fixture("bert")
  model, _ = load_backbone(d)
  assert e["type_ids"].any()  # token types are exercised
  assert max_diff(model(e["ids"], e["mask"], e["type_ids"]), e["hidden"], e["mask"]) <= 1e-4


@pytest.mark.parametrize("rows", [("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
                                  ("layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.v_proj.weight")])
def test_a_broken_table_entry_is_caught(monkeypatch, rows):
  """Swapping two same-shaped rows of the import table loads without error but breaks parity: the parity
  test above would catch a wrong table."""
  a, b = rows
  table = {r[0]: r for r in llm.HF_TABLE}
  swapped = tuple((r[0], table[b if r[0] == a else a][1], r[2]) if r[0] in rows else r for r in llm.HF_TABLE)
  monkeypatch.setattr(llm, "HF_TABLE", swapped)
  d, e = fixture("llama")
  model, _ = load_backbone(d)
  assert max_diff(model(e["ids"], e["mask"]), e["hidden"], e["mask"]) > 1e-2


def test_padding_does_not_leak():
  """A sequence's states do not depend on the pad tokens after it (mask works, positions right)."""
  d, e = fixture("qwen3")
  model, _ = load_backbone(d)
  n = int(e["mask"][1].sum())
  alone = model(e["ids"][1:2, :n], e["mask"][1:2, :n])
  junk = e["ids"][1:2].copy()
  junk[0, n:] = 7
  padded = model(junk, e["mask"][1:2])
  np.testing.assert_allclose(np.asarray(padded)[0, :n], np.asarray(alone)[0], atol=1e-5)
