"""InfoNCE over the global batch, computed without ever materialising B_global x B_global logits.

A batch holds B queries, each with G = 1 + n_neg documents (slot 0 is its positive, then hard negatives).
Every query is scored against all B_global * G documents of the global batch. Under `shard_map` each device
keeps its B_local queries, all-gathers the document embeddings over the batch axes and computes only
B_local x B_global*G logits; the gather's transpose (a reduce-scatter) sends gradients back to the devices
that own the documents.

A document that is a positive of the query (besides the labelled slot: a shared positive, or a mined
"negative" that is actually relevant) is masked out of that query's softmax, as are padding slots (id < 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from scalingnote_jax.sharding import BATCH_AXES


def _masked_ce(logits_BxN, labels_B, exclude_BxN):
  """Sum over rows of cross-entropy, ignoring excluded columns (never the label's)."""
  cols = jnp.arange(logits_BxN.shape[1])
  exclude_BxN = exclude_BxN & (cols[None, :] != labels_B[:, None])
  logits_BxN = jnp.where(exclude_BxN, -jnp.inf, logits_BxN)
  label_logit_B = jnp.take_along_axis(logits_BxN, labels_B[:, None], axis=1)[:, 0]
  ce_B = jax.nn.logsumexp(logits_BxN, axis=1) - label_logit_B
  correct_B = jnp.argmax(logits_BxN, axis=1) == labels_B
  return ce_B.sum(), correct_B.sum()


def _loss_sums(q_BlxD, d_BlxGxD, ids_BlxG, pos_BlxP, scale, offset, gather, symmetric: bool):
  """Summed losses of the local rows. `gather` concatenates an array over all devices' rows (identity when
  unsharded); `offset` is the index of this device's first row in the global batch."""
  b_local, g, dim = d_BlxGxD.shape
  q = q_BlxD.astype(jnp.float32)
  d = d_BlxGxD.astype(jnp.float32)
  d_all_NxD = gather(d).reshape(-1, dim)  # N = B_global * G
  ids_all_N = gather(ids_BlxG).reshape(-1)
  logits_BlxN = scale * (q @ d_all_NxD.T)
  labels_Bl = (offset + jnp.arange(b_local)) * g
  is_positive_BlxN = ((ids_all_N[None, :, None] == pos_BlxP[:, None, :]) & (pos_BlxP[:, None, :] >= 0)).any(-1)
  ce, correct = _masked_ce(logits_BlxN, labels_Bl, is_positive_BlxN | (ids_all_N < 0)[None, :])
  if symmetric:  # each positive document against every query of the global batch
    q_all_BgxD, pos_all_BgxP = gather(q), gather(pos_BlxP)
    logits_dq_BlxBg = scale * (d[:, 0] @ q_all_BgxD.T)
    shared_BlxBg = (ids_BlxG[:, 0, None, None] == pos_all_BgxP[None, :, :]).any(-1)
    ce_dq, _ = _masked_ce(logits_dq_BlxBg, offset + jnp.arange(b_local), shared_BlxBg)
    ce = (ce + ce_dq) / 2
  return ce, correct


def contrastive_loss(q_BxD, d_BxGxD, doc_ids_BxG, pos_ids_BxP, scale, *, mesh: Mesh | None = None,
                     symmetric: bool = False):
  """Mean InfoNCE (and accuracy) over the global batch. `scale` = 1 / temperature.

  With a `mesh`, inputs are batch-sharded over BATCH_AXES and the loss runs per device under shard_map.
  Without one it is computed in one piece (the reference the sharded version is tested against).
  """
  b_global = q_BxD.shape[0]
  if mesh is None:
    ce, correct = _loss_sums(q_BxD, d_BxGxD, doc_ids_BxG, pos_ids_BxP, scale, 0, lambda x: x, symmetric)
    return ce / b_global, correct / b_global

  def per_device(q, d, ids, pos, scale):
    gather = lambda x: jax.lax.all_gather(x, BATCH_AXES, axis=0, tiled=True)  # noqa: E731
    offset = jax.lax.axis_index(BATCH_AXES) * q.shape[0]
    ce, correct = _loss_sums(q, d, ids, pos, scale, offset, gather, symmetric)
    return jax.lax.psum(ce, BATCH_AXES) / b_global, jax.lax.psum(correct, BATCH_AXES) / b_global

  batch = P(BATCH_AXES)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(batch, batch, batch, batch, P()),
                       out_specs=(P(), P()))(q_BxD, d_BxGxD, doc_ids_BxG, pos_ids_BxP, scale)


def distillation_loss(s_BxD, t_BxD, *, mse_weight: float = 1.0, cosine_weight: float = 1.0,
                      normalized_mse: bool = False):
  """Stage 2: a student's query embeddings against the frozen teacher's (unit norm). Returns
  (loss, (mse, cosine)): mse = mean over rows of the squared L2 distance (of the normalised student vector
  with `normalized_mse`, else of its raw output), cosine = mean cosine similarity;
  loss = mse_weight * mse + cosine_weight * (1 - cosine)."""
  s_BxD, t_BxD = s_BxD.astype(jnp.float32), t_BxD.astype(jnp.float32)
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
  cosine = jnp.mean(jnp.sum(unit(s_BxD) * unit(t_BxD), axis=-1))
  mse = jnp.mean(jnp.sum(((unit(s_BxD) if normalized_mse else s_BxD) - t_BxD) ** 2, axis=-1))
  return mse_weight * mse + cosine_weight * (1.0 - cosine), (mse, cosine)


RANKING_LOSSES = ("bce", "ranknet", "listnet")


def ranking_loss(kind: str, scores_BxG, labels_BxG, where_BxG):
  """A cross-encoder's loss over groups of G candidates per query (rax): `bce` pointwise sigmoid
  cross-entropy on relevant (label > 0) or not, mean over candidates; `ranknet` pairwise logistic loss over
  every pair whose labels differ, mean over pairs; `listnet` listwise softmax cross-entropy against the labels
  normalised to a distribution (ListNet's top-one probabilities), mean over groups. Slots where `where` is
  False (padding) take no part."""
  import rax

  scores, labels = scores_BxG.astype(jnp.float32), labels_BxG.astype(jnp.float32)
  if kind == "bce":
    return rax.pointwise_sigmoid_loss(scores, (labels > 0).astype(jnp.float32), where=where_BxG)
  if kind == "ranknet":
    return rax.pairwise_logistic_loss(scores, labels, where=where_BxG)
  if kind == "listnet":
    return rax.softmax_loss(scores, labels, where=where_BxG, label_fn=rax.utils.normalize_probabilities)
  raise ValueError(f"loss={kind!r}: expected one of {RANKING_LOSSES}")
