"""Tokenizers from a HF model directory or a GGUF file, behind one small interface: batch encode with
truncation (or a clear error), optional EOS appended, and query-document pairs for cross-encoders; padding is
the encoder's job (it buckets lengths)."""

from __future__ import annotations

import json
import os

import tokenizers

from scalingnote_jax.models import resolve_path
from scalingnote_jax.models.gguf import open_gguf

SAVED = "scalingnote_tokenizer.json"


class Tokenizer:

  def __init__(self, tok: tokenizers.Tokenizer, *, pad_id: int, eos_id: int | None, source: str):
    tok.no_padding()
    tok.no_truncation()
    self.tok, self.pad_id, self.eos_id, self.source = tok, pad_id, eos_id, source
    self._pair_toks: dict[int, tokenizers.Tokenizer] = {}  # max_length -> a copy that always truncates

  @classmethod
  def from_pretrained(cls, path: str) -> Tokenizer:
    """A HF model directory (tokenizer.json, or files AutoTokenizer converts) or a `.gguf` file."""
    path = resolve_path(path)
    if os.path.exists(os.path.join(path, SAVED)):  # written by `save` (serving bundles)
      with open(os.path.join(path, SAVED)) as f:
        ids = json.load(f)
      return cls(tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")), pad_id=ids["pad_id"],
                 eos_id=ids["eos_id"], source=path)
    if path.endswith(".gguf"):
      f = open_gguf(path)
      cfg = f.config()
      pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
      return cls(f.tokenizer(), pad_id=pad or 0, eos_id=cfg.eos_token_id, source=path)
    transformers = _import_transformers()
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    if not hf.is_fast:
      raise ValueError(f"{path}: tokenizer could not be converted to a fast (tokenizers) tokenizer")
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    pad = hf.pad_token_id if hf.pad_token_id is not None else (eos or 0)
    return cls(hf.backend_tokenizer, pad_id=pad, eos_id=eos, source=path)

  def save(self, directory: str) -> None:
    """tokenizer.json and the special ids: `from_pretrained(directory)` needs nothing else (no transformers)."""
    os.makedirs(directory, exist_ok=True)
    self.tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, SAVED), "w") as f:
      json.dump({"pad_id": self.pad_id, "eos_id": self.eos_id}, f)

  def encode(self, texts: list[str], *, max_length: int, append_eos: bool = False,
             truncate: bool = True) -> list[list[int]]:
    """Token ids per text, at most `max_length` each (EOS included when appended)."""
    if append_eos and self.eos_id is None:
      raise ValueError(f"{self.source}: append_eos is set but the tokenizer has no EOS token")
    budget = max_length - int(append_eos)
    out = [e.ids for e in self.tok.encode_batch(texts)]
    too_long = [i for i, ids in enumerate(out) if len(ids) > budget]
    if too_long and not truncate:
      i = too_long[0]
      raise ValueError(f"input {i} has {len(out[i])} tokens, over max_length={max_length} "
                       f"({len(too_long)} input(s) too long); pass truncate=True to cut them")
    if too_long:  # re-encode with the tokenizer's own truncation, which keeps special tokens like [SEP]
      self.tok.enable_truncation(budget)
      for i, e in zip(too_long, self.tok.encode_batch([texts[i] for i in too_long])):
        out[i] = e.ids
      self.tok.no_truncation()
    return [ids + [self.eos_id] for ids in out] if append_eos else out

  def encode_pairs(self, firsts: list[str], seconds: list[str], *, max_length: int,
                   append_eos: bool = False) -> list[list[int]]:
    """Token ids of each (first, second) pair as one sequence, in the tokenizer's own pair template
    ([CLS] a [SEP] b [SEP] for BERT; a newline between them where it has none, as GGUF decoders), cut
    longest-first to `max_length` (EOS included when appended), as sentence-transformers' CrossEncoder does."""
    if len(firsts) != len(seconds):
      raise ValueError(f"encode_pairs: {len(firsts)} first texts but {len(seconds)} second texts")
    if append_eos and self.eos_id is None:
      raise ValueError(f"{self.source}: append_eos is set but the tokenizer has no EOS token")
    budget = max_length - int(append_eos)
    tok = self._pair_toks.get(budget)
    if tok is None:  # a copy: data-loading threads encode pairs while `encode` toggles truncation on self.tok
      tok = tokenizers.Tokenizer.from_str(self.tok.to_str())
      tok.enable_truncation(budget, strategy="longest_first")
      self._pair_toks[budget] = tok
    if tok.post_processor is None:  # before the second text: truncation cuts from the end and keeps it
      seconds = ["\n" + b for b in seconds]
    out = [e.ids for e in tok.encode_batch(list(zip(firsts, seconds)))]
    return [ids + [self.eos_id] for ids in out] if append_eos else out


def _import_transformers():
  """transformers (for AutoTokenizer only), without its import-time advice that PyTorch is missing: this
  package uses no torch models, so the line would only read like a broken install. Other advice stays on."""
  previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
  os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
  try:
    import transformers
  finally:
    if previous is None:
      del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
    else:
      os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
  return transformers
