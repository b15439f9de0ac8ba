"""What `export-hf` writes, loaded by the torch-side libraries people run (the Python 3.11 floor tier installs
torch and sentence-transformers: `make test-floor`): sentence-transformers encodes as our Encoder does, for a
BERT student shape and for a decoder tower, so the export tables (the import tables in reverse) are right; and
scores an exported reranker as our CrossEncoder does (transformers' sequence-classification models too)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tokenizers
from flax import nnx

from scalingnote_jax.artifacts.hf_export import export_hf, export_reranker
from scalingnote_jax.encoder import CrossEncoder, Encoder
from scalingnote_jax.models import load_backbone
from scalingnote_jax.models.bert import BertConfig
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


# ---------------------------------------------------------------------------------------------------------
# Rerankers: a sequence-classification model (HF's pair encoding, its head) scoring as our CrossEncoder does.

PAIRS = [*zip(QUERIES, DOCS), ("a long query about blood pressure " * 6, DOCS[1])]  # two pairs over max_length


def reranker_workdir(path: str, tower, tokenizer: str) -> str:
  """A workdir as `train-reranker` leaves one (config.json, reranker.json, a checkpoint) holding `tower`."""
  from scalingnote_jax.artifacts.checkpoint import Checkpointer
  from scalingnote_jax.config import rerank_defaults

  kind = "bert" if isinstance(tower.backbone.cfg, BertConfig) else "llm"
  spec = {"backbone": {"kind": kind, **dataclasses.asdict(tower.backbone.cfg)}, "tower": dataclasses.asdict(tower.cfg),
          "tokenizer": tokenizer, "init": "random"}
  os.makedirs(path)
  for name, obj in (("config.json", rerank_defaults().to_dict()), ("reranker.json", spec)):
    with open(os.path.join(path, name), "w") as f:
      json.dump(obj, f)
  ckpt = Checkpointer(os.path.join(path, "checkpoints"), keep=1)
  ckpt.save(1, nnx.state(tower, nnx.Param), {"unused": np.zeros(1, np.float32)}, {})  # (export reads params only)
  ckpt.wait()
  ckpt.close()
  return path


def decoder_reranker(smollm2_gguf):
  """A decoder reranker (last token on an appended EOS, no score bias) with SmolLM2's tokenizer given a pair
  template, as HF decoders' tokenizers have (ByteLevel: the two texts side by side; the GGUF's has none)."""
  gguf = Tokenizer.from_pretrained(smollm2_gguf)
  tok = tokenizers.Tokenizer.from_str(gguf.tok.to_str())
  tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  tokenizer = Tokenizer(tok, pad_id=gguf.pad_id, eos_id=gguf.eos_id, source=smollm2_gguf)
  cfg = LLMConfig(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, tie_word_embeddings=True, rope_theta=1e5, eos_token_id=tokenizer.eos_id)
  tower = Tower.create(cfg, TowerConfig(pooling="last", append_eos=True, projection_dim=1, projection_bias=True,
                                        normalize=False, max_length=24), nnx.Rngs(2))
  tower.projection.kernel[...] = np.random.default_rng(0).normal(0, 0.1, tower.projection.kernel.shape)
  return tower, tokenizer


@pytest.mark.parametrize("which", ["bert", "decoder"])
def test_sentence_transformers_scores_an_exported_reranker_as_we_do(tmp_path, which, minilm_dir, smollm2_gguf):
  import torch
  import transformers

  if which == "bert":  # train-reranker's default: MiniLM's first 2 layers, [CLS] scored, pairs cut to 24 tokens
    backbone, _ = load_backbone(minilm_dir, num_layers=2)
    tower = Tower(backbone, TowerConfig(pooling="cls", append_eos=False, projection_dim=1, projection_bias=True,
                                        normalize=False, max_length=24, document_prompt="{title} {text}"),
                  rngs=nnx.Rngs(0))
    randomize_projection(tower)
    tokenizer = Tokenizer.from_pretrained(minilm_dir)
  else:
    tower, tokenizer = decoder_reranker(smollm2_gguf)
  out = str(tmp_path / "hf")
  assert export_reranker(tower, tokenizer, out) == {out: "reranker"}
  ours = CrossEncoder(tower, tokenizer)
  want = ours.predict(PAIRS)
  assert max(map(len, ours.tokenize_pairs(*zip(*PAIRS)))) == ours.cfg.max_length  # truncation is tested

  model = st.CrossEncoder(out, device="cpu")
  assert model.max_seq_length == ours.cfg.max_length
  np.testing.assert_allclose(model.predict(PAIRS), want, atol=1e-5)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert hf.config.architectures[0] == ("BertForSequenceClassification" if which == "bert"
                                        else "LlamaForSequenceClassification")
  segments = {"return_token_type_ids": which == "bert"}  # the document as segment 1, as BERT tokenizers mark it
  batch = transformers.AutoTokenizer.from_pretrained(out)(*map(list, zip(*PAIRS)), padding=True, truncation=True,
                                                         return_tensors="pt", **segments)
  with torch.no_grad():
    np.testing.assert_allclose(hf(**batch).logits[:, 0].numpy(), want, atol=1e-5)


def test_a_reranker_a_sequence_classification_model_cannot_reproduce_is_refused(tmp_path, smollm2_gguf):
  out = str(tmp_path / "hf")
  tower, tokenizer = decoder_reranker(smollm2_gguf)
  tower.projection.bias[...] = 0.5
  workdir = reranker_workdir(str(tmp_path / "reranker"), tower, smollm2_gguf)  # the GGUF's own tokenizer
  with pytest.raises(ValueError, match="LlamaForSequenceClassification: score bias 0.5.*no pair template"):
    export_hf(workdir, out)
  bert = BertConfig(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
  mean = Tower.create(bert, TowerConfig(pooling="mean", append_eos=False, projection_dim=1, projection_bias=True,
                                        normalize=False, query_prompt="query: {text}"), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"prompts 'query: \{text\}'.*pooling='mean': BertForSequenceClassification"):
    export_reranker(mean, tokenizer, out)
  assert not os.path.exists(out)
