"""What `export-hf` writes, loaded by the torch-side libraries people run (the Python 3.11 floor tier installs
torch and sentence-transformers: `make test-floor`): sentence-transformers encodes as our Encoder does, for a
BERT student shape and for a decoder tower, so the export tables (the import tables in reverse) are right."""

import numpy as np
import pytest
from flax import nnx

from scalingnote_jax.encoder import Encoder
from scalingnote_jax.models import load_backbone
from scalingnote_jax.models.llm import LLMConfig
from scalingnote_jax.models.st_folder import save_folder
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.models.tower import Tower, TowerConfig

pytestmark = pytest.mark.floor
st = pytest.importorskip("sentence_transformers", reason="torch-side interop runs in the floor tier (make test-floor)")

QUERIES = ["what lowers blood pressure", "dense retrieval with a small query encoder", "x"]
DOCS = ["Beta blockers and diet both lower blood pressure in adults.",
        "A distilled query encoder keeps most of an LLM retriever's quality. " * 8, "short"]


def randomize_projection(tower):
  rng = np.random.default_rng(0)
  for var in (tower.projection.kernel, tower.projection.bias):
    if var is not None:
      var[...] = rng.normal(0, 0.1, var.shape).astype(np.float32)


@pytest.mark.parametrize("which", ["bert", "decoder"])
def test_sentence_transformers_encodes_an_export_as_we_do(tmp_path, which, minilm_dir, smollm2_gguf):
  if which == "bert":  # a student's shape: MiniLM's first two layers and a projection to the teacher's width
    backbone, _ = load_backbone(minilm_dir, num_layers=2)
    tower = Tower(backbone, TowerConfig.default_for(backbone.cfg, minilm_dir, projection_dim=16,
                                                    query_prompt="query: {text}"), rngs=nnx.Rngs(1))
    tokenizer = Tokenizer.from_pretrained(minilm_dir)
  else:  # a decoder tower: GQA, q/k/v bias (Qwen2-like on Llama), last-token pooling on an appended EOS
    tokenizer = Tokenizer.from_pretrained(smollm2_gguf)
    cfg = LLMConfig(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=128, tie_word_embeddings=True, rope_theta=1e5, eos_token_id=tokenizer.eos_id)
    tower = Tower.create(cfg, TowerConfig(pooling="last", append_eos=True, max_length=32,
                                          query_prompt="Query: {text}", projection_dim=8), nnx.Rngs(2))
  if tower.projection is not None:
    randomize_projection(tower)
  enc = Encoder(tower, tokenizer)
  save_folder(tower, tokenizer, str(tmp_path))

  model = st.SentenceTransformer(str(tmp_path), device="cpu")
  np.testing.assert_allclose(model.encode(QUERIES, prompt_name="query"), enc.encode_queries(QUERIES), atol=1e-5)
  np.testing.assert_allclose(model.encode(DOCS), enc.encode(DOCS), atol=1e-5)  # (documents without a title)
  assert model.max_seq_length == tower.cfg.max_length
