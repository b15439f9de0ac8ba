"""GGUF import for the llama architecture: config, tensors (dequantized, q/k rows un-permuted, renamed to HF
names so `llm.HF_TABLE` serves both formats) and the BPE tokenizer built from the GGUF metadata."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np

from scalingnote_jax.models.checkpoint import CheckpointError
from scalingnote_jax.models.llm import LLMConfig

# GGUF tensor name -> HF `LlamaForCausalLM` tensor name.
GGUF_TO_HF = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{}.mlp.down_proj.weight"),
)


def _hf_name(gguf_name: str, source: str) -> str:
  for pattern, hf in GGUF_TO_HF:
    m = re.fullmatch(pattern, gguf_name)
    if m:
      return hf.format(*m.groups())
  raise CheckpointError(f"{source}: unexpected tensor {gguf_name!r} (unknown to the GGUF llama table)")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's interleaving of q/k rows (its convert script permutes them for its RoPE layout)."""
  rows, cols = w.shape
  return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFFile:
  """A GGUF file opened lazily (memory-mapped); tensors are dequantized one at a time on `get`."""

  def __init__(self, path: str):
    import gguf

    if not os.path.exists(path):
      raise CheckpointError(f"{path}: no such file")
    self.source = path
    self.reader = gguf.GGUFReader(path)
    self.fields = {k: f.contents() for k, f in self.reader.fields.items()
                   if not k.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))}
    arch = self.fields.get("general.architecture")
    if arch != "llama":
      raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")
    self._tensors = {_hf_name(t.name, path): t for t in self.reader.tensors}

  def config(self, **overrides) -> LLMConfig:
    f, need = self.fields, self._field
    n_embd, n_head = need("llama.embedding_length"), need("llama.attention.head_count")
    vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
    cfg = LLMConfig(
        vocab_size=vocab, hidden_size=n_embd, num_layers=need("llama.block_count"), num_heads=n_head,
        num_kv_heads=f.get("llama.attention.head_count_kv", n_head), head_dim=n_embd // n_head,
        intermediate_size=need("llama.feed_forward_length"), rope_theta=float(f.get("llama.rope.freq_base", 1e4)),
        rms_norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="lm_head.weight" not in self._tensors, model_type="llama",
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"))
    if "llama.rope.scaling.type" in f and f["llama.rope.scaling.type"] not in ("none", ""):
      raise CheckpointError(f"{self.source}: rope scaling {f['llama.rope.scaling.type']!r} in GGUF is not supported")
    return dataclasses.replace(cfg, **overrides)

  def _field(self, key: str):
    if key not in self.fields:
      raise CheckpointError(f"{self.source}: GGUF metadata field {key!r} is missing")
    return self.fields[key]

  def names(self) -> set[str]:
    return set(self._tensors)

  def get(self, name: str) -> np.ndarray:
    import gguf

    t = self._tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      n_head = self._field("llama.attention.head_count")
      w = unpermute(w, n_head if "q_proj" in name else self.fields.get("llama.attention.head_count_kv", n_head))
    return w

  def tokenizer(self):
    """The BPE tokenizer described by the GGUF metadata, as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = self.fields.get("tokenizer.ggml.model")
    pre = self.fields.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
      raise CheckpointError(f"{self.source}: GGUF tokenizer model {model!r} is not supported (supported: gpt2 BPE)")
    if pre not in GGUF_PRE_TOKENIZERS:
      raise CheckpointError(f"{self.source}: GGUF pre-tokenizer {pre!r} is not supported "
                            f"(supported: {', '.join(GGUF_PRE_TOKENIZERS)}); load the HF directory instead")
    fields = self.reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    token_types = fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre](pre_tokenizers)
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp token type CONTROL: special tokens such as <|im_end|>
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, token_types) if ty == control])
    return tok


GGUF_PRE_TOKENIZERS = {
    # SmolLM: digits split one by one, then GPT-2 byte-level with its regex.
    "smollm": lambda pt: pt.Sequence([pt.Digits(individual_digits=True),
                                      pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt2": lambda pt: pt.ByteLevel(add_prefix_space=False, use_regex=True),
}


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime: float) -> GGUFFile:
  return GGUFFile(path)


def open_gguf(path: str) -> GGUFFile:
  """Opens a GGUF file once per process (parsing its metadata takes seconds); reopens if it changed."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  return _open_cached(path, os.path.getmtime(path))
