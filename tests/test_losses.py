"""The cross-device contrastive loss: sharded over 8 simulated devices == unsharded (loss and gradients),
false negatives masked, per-device memory B_local x B_global rather than B_global^2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalingnote_jax.sharding import batch_sharding, make_mesh
from scalingnote_jax.train.losses import contrastive_loss, distillation_loss

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)


def batch(b=16, g=3, p=2, dim=8, seed=0, trouble=True):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
  q = unit(rng.normal(size=(b, dim)))  # cosine similarity, as the towers produce
  d = unit(rng.normal(size=(b, g, dim)))
  ids = rng.permutation(10 * b * g)[:b * g].reshape(b, g).astype(np.int32)
  pos = np.full((b, p), -1, np.int32)
  pos[:, 0] = ids[:, 0]
  if trouble:  # query 3's second positive is query 5's positive; query 7's hard negative is one of its own
    pos[3, 1] = ids[5, 0]  # positives; query 9 has a padding slot
    pos[7, 1] = ids[7, 2]
    ids[9, 2] = -1
  return q, d, ids, pos


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_sharded_equals_unsharded(mesh_shape, symmetric):
  q, d, ids, pos = batch()
  scale = jnp.float32(20.0)
  mesh = make_mesh(mesh_shape)

  def loss(mesh):
    return lambda q, d, s: contrastive_loss(q, d, ids, pos, s, mesh=mesh, symmetric=symmetric)[0]

  ref, ref_grads = jax.value_and_grad(loss(None), argnums=(0, 1, 2))(q, d, scale)
  put = lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim))  # noqa: E731
  fn = jax.jit(jax.value_and_grad(loss(mesh), argnums=(0, 1, 2)))
  got, grads = fn(put(q), put(d), scale)
  assert abs(float(got) - float(ref)) <= 1e-5
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


def test_reference_matches_a_plain_softmax():
  """The unsharded loss equals cross-entropy over all B*G documents written out naively."""
  q, d, ids, pos = batch(b=4, g=2, p=1, trouble=False)
  logits = 5.0 * q @ d.reshape(-1, d.shape[-1]).T
  labels = np.arange(4) * 2
  lse = np.log(np.exp(logits).sum(1))
  expected = np.mean(lse - logits[np.arange(4), labels])
  got, _ = contrastive_loss(q, d, ids, pos, 5.0)
  assert abs(float(got) - expected) <= 1e-5


def test_positives_are_never_negatives():
  """A query's own positive listed as its hard negative (and scored as high as possible) is masked out of
  its softmax; without the mask the same batch gives a clearly higher loss. Padding slots never count."""
  q, d, ids, pos = batch()
  d[7, 2] = q[7]  # query 7's second positive sits in its negative slot with the top score
  masked = float(contrastive_loss(q, d, ids, pos, 20.0)[0])
  pos_unmasked = pos.copy()
  pos_unmasked[7, 1] = -1
  unmasked = float(contrastive_loss(q, d, ids, pos_unmasked, 20.0)[0])
  assert unmasked > masked + 0.05
  padded = d.copy()
  padded[9, 2] = q[0]  # whatever a padding slot holds, no query sees it
  assert abs(float(contrastive_loss(q, padded, ids, pos, 20.0)[0]) - masked) <= 1e-6


def test_memory_grows_with_local_times_global_batch():
  """Per-device temporary memory of the sharded loss+grad tracks B_local * B_global, far below B_global^2."""
  mesh = make_mesh((8, 1, 1))
  dim, g = 64, 2

  def temp_bytes(b_global, sharded):
    q = jax.ShapeDtypeStruct((b_global, dim), jnp.float32, sharding=batch_sharding(mesh, 2) if sharded else None)
    d = jax.ShapeDtypeStruct((b_global, g, dim), jnp.float32, sharding=batch_sharding(mesh, 3) if sharded else None)
    ids = jax.ShapeDtypeStruct((b_global, g), jnp.int32, sharding=batch_sharding(mesh, 2) if sharded else None)
    pos = jax.ShapeDtypeStruct((b_global, 1), jnp.int32, sharding=batch_sharding(mesh, 2) if sharded else None)
    fn = jax.grad(lambda q, d, ids, pos: contrastive_loss(q, d, ids, pos, 20.0, mesh=mesh if sharded else None)[0],
                  argnums=(0, 1))
    return jax.jit(fn).lower(q, d, ids, pos).compile().memory_analysis().temp_size_in_bytes

  sizes = [512, 1024, 2048]
  sharded = [temp_bytes(b, True) for b in sizes]
  full = [temp_bytes(b, False) for b in sizes]
  logits_local = [(b // 8) * b * g * 4 for b in sizes]
  for s, f, l in zip(sharded, full, logits_local):
    assert s < f / 4, (s, f)  # an 8-way split of the logits, not a replicated B_global^2 matrix
    assert s < 6 * l + 2 * 1024**2, (s, l)
  # doubling B_global (with B_local = B_global / 8) roughly quadruples the local logits, like B_local*B_global
  assert 3 < sharded[2] / sharded[1] < 5.5


@pytest.mark.parametrize("normalized_mse", [False, True])
def test_distillation_loss_matches_numpy(normalized_mse):
  """MSE (squared L2 per row, raw or normalised student) + weight * (1 - cosine); zero only at the teacher."""
  rng = np.random.default_rng(0)
  t = rng.normal(size=(6, 5)).astype(np.float32)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  s = (2.0 * t + 0.3 * rng.normal(size=t.shape)).astype(np.float32)  # roughly aligned, not unit norm
  s_unit = s / np.linalg.norm(s, axis=1, keepdims=True)
  cosine = np.mean(np.sum(s_unit * t, axis=1))
  mse = np.mean(np.sum(((s_unit if normalized_mse else s) - t) ** 2, axis=1))
  loss, (got_mse, got_cos) = distillation_loss(s, t, mse_weight=0.5, cosine_weight=3.0, normalized_mse=normalized_mse)
  np.testing.assert_allclose([float(loss), float(got_mse), float(got_cos)],
                             [0.5 * mse + 3.0 * (1 - cosine), mse, cosine], rtol=1e-5)
  at_teacher, _ = distillation_loss(t, t, normalized_mse=normalized_mse)
  assert abs(float(at_teacher)) < 1e-6
  # a student twice as long as the teacher: no cosine loss, but raw MSE still pulls its norm to the teacher's
  twice, (twice_mse, _) = distillation_loss(2 * t, t, normalized_mse=normalized_mse)
  assert abs(float(twice_mse) - (0.0 if normalized_mse else 1.0)) < 1e-5
