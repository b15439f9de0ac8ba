"""LoRA (Hu et al., 2021) on a backbone's projections, as RepLLaMA and Tevatron train LLM retrievers: each
targeted Dense computes x W + (alpha / r) x A B, with W frozen and only A [in, r], B [r, out] trained. The
adapters are flax's `LoRAParam`s, so a trainer tells them from the frozen base by type; a fresh adapter (B = 0)
leaves the model exactly as it was. `merge` folds the adapters into W for encoding, serving and export: the
merged model computes the same function and pays nothing for it."""

from __future__ import annotations

import dataclasses

from flax import nnx

from scalingnote_jax.models.layers import Dense

# The projections of models/llm.py (attention q, k, v, o; SwiGLU gate, up, down) and models/bert.py.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 8
  alpha: float = 16.0  # the update is scaled by alpha / rank
  targets: tuple[str, ...] = TARGETS  # the Dense layers (by attribute name) that get an adapter
  dropout: float = 0.0  # on the adapters' inputs, in training steps only (layers.dropout_key)

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank={self.rank}: expected >= 1")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout={self.dropout}: expected 0 <= dropout < 1")
    if not self.targets:
      raise ValueError("lora.targets is empty: name the projections to adapt, e.g. ('q', 'v')")


def _dense_layers(module: nnx.Module):
  for path, node in nnx.iter_graph(module):
    if isinstance(node, Dense) and path:
      yield path, node


def add(module: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> int:
  """Gives every Dense of `module` named in `cfg.targets` an adapter; returns how many."""
  found = [(path, layer) for path, layer in _dense_layers(module) if path[-1] in cfg.targets]
  if not found:
    names = sorted({str(path[-1]) for path, _ in _dense_layers(module)})
    raise ValueError(f"lora.targets={tuple(cfg.targets)}: no such projection in the model (it has: {names})")
  for _, layer in found:
    layer.add_lora(cfg.rank, cfg.alpha, rngs, cfg.dropout)
  return len(found)


def merge(module: nnx.Module) -> int:
  """Folds every adapter of `module` into its kernel (in place); returns how many there were."""
  layers = [layer for _, layer in _dense_layers(module) if layer.lora_a is not None]
  for layer in layers:
    layer.merge_lora()
  return len(layers)
