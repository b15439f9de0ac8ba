"""The dual encoder of Stage 1: a query tower, a document tower (the same object when tied) and the softmax
temperature of the contrastive loss."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from scalingnote_jax.models.tower import Tower

MAX_SCALE = 100.0  # 1 / temperature is capped, as in CLIP


class DualEncoder(nnx.Module):
  """Query and document towers (separate parameters unless tied) and the softmax temperature."""

  def __init__(self, query: Tower, doc: Tower, temperature: float, learn_temperature: bool):
    self.query, self.doc = query, doc  # `doc is query` when tied
    self.log_scale = nnx.Param(jnp.log(jnp.float32(1.0 / temperature))) if learn_temperature else None
    self.fixed_scale = 1.0 / temperature

  def scale(self):
    if self.log_scale is None:
      return jnp.float32(self.fixed_scale)
    return jnp.minimum(jnp.exp(self.log_scale[...]), MAX_SCALE)
