"""On-device augmentation and minority generation for ONE client's local batch (issue 17).

Each function here builds an :data:`~fedjax_sim.remedies.Augment`, ``(batch, key) -> batch``
with the same shapes and the same mask: pure, keyed, vectorized over the batch, so it runs inside
the engine's vmapped step (``fedjax_sim.remedies.remedied(..., augment=...)`` gives it a key per
client and local step). Padded rows (``mask`` False) are never read as a source for valid rows.
:func:`compose` chains augmentations with independent keys.

Image augmentations take ``image_shape = (H, W, C)``; the batch's ``x`` may be stored flat
(``[B, H*W*C]``, as :func:`fedjax_sim.datasets.fashion_mnist` gives by default) or as images.

Minority generation keeps static shapes by replacing rows of the batch rather than adding rows:
:func:`balanced_resample` redraws the batch so that every class present in it is equally
frequent, :func:`smote` moves examples towards a random same-class partner (SMOTE, Chawla et
al. 2002, within the batch: the client's other examples of the class are what it can see).
``balanced_resample`` followed by ``smote`` generates new points for the rare classes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.client import Batch


def _check_prob(p, name):
  if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
    raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
  return float(p)


def _check_image_shape(image_shape):
  s = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
  if s is None or len(s) != 3 or not all(isinstance(d, int) and d >= 1 for d in s):
    raise ValueError(f"image_shape must be (height, width, channels) of ints >= 1, got "
                     f"{image_shape!r}")
  return s


def _as_images(x, image_shape):
  b = x.shape[0]
  if x.size // max(b, 1) != image_shape[0] * image_shape[1] * image_shape[2]:
    raise ValueError(f"augmentation for images {image_shape}: examples of shape {x.shape[1:]} "
                     f"do not hold {image_shape[0] * image_shape[1] * image_shape[2]} values")
  return x.reshape((b,) + image_shape)


def _per_row(p, b, key):
  return jax.random.uniform(key, (b,)) < p


def _bcast(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def gaussian_noise(std: float, prob: float = 1.0):
  """Adds ``N(0, std^2)`` noise to every feature of a fraction ``prob`` of the examples."""
  if isinstance(std, bool) or not (isinstance(std, (int, float)) and std >= 0):
    raise ValueError(f"gaussian_noise std must be a number >= 0, got {std!r}")
  prob = _check_prob(prob, "gaussian_noise prob")

  def aug(batch: Batch, key):
    k1, k2 = jax.random.split(key)
    on = _bcast(_per_row(prob, batch.x.shape[0], k1), batch.x)
    noise = std * jax.random.normal(k2, batch.x.shape, batch.x.dtype)
    return batch._replace(x=jnp.where(on, batch.x + noise, batch.x))
  return aug


def random_masking(rate: float, prob: float = 1.0, fill: float = 0.0):
  """Sets each feature to ``fill`` with probability ``rate`` (random masking), for a fraction
  ``prob`` of the examples."""
  rate = _check_prob(rate, "random_masking rate")
  prob = _check_prob(prob, "random_masking prob")

  def aug(batch: Batch, key):
    k1, k2 = jax.random.split(key)
    on = _bcast(_per_row(prob, batch.x.shape[0], k1), batch.x)
    drop = jax.random.uniform(k2, batch.x.shape) < rate
    return batch._replace(x=jnp.where(on & drop, jnp.asarray(fill, batch.x.dtype), batch.x))
  return aug


def random_erasing(image_shape, size: tuple[int, int], prob: float = 0.5, fill: float = 0.0):
  """Random erasing (Zhong et al. 2020) with a fixed rectangle ``size = (h, w)`` at a uniformly
  random position, on a fraction ``prob`` of the examples (static shapes: the size is fixed,
  the position is drawn per example)."""
  image_shape = _check_image_shape(image_shape)
  h, w = (int(s) for s in size)
  if not (1 <= h <= image_shape[0] and 1 <= w <= image_shape[1]):
    raise ValueError(f"random_erasing size {size!r} must fit in the image {image_shape[:2]}")
  prob = _check_prob(prob, "random_erasing prob")

  def aug(batch: Batch, key):
    b = batch.x.shape[0]
    img = _as_images(batch.x, image_shape)
    k1, k2, k3 = jax.random.split(key, 3)
    r0 = jax.random.randint(k1, (b, 1, 1), 0, image_shape[0] - h + 1)
    c0 = jax.random.randint(k2, (b, 1, 1), 0, image_shape[1] - w + 1)
    rows = jnp.arange(image_shape[0])[None, :, None]
    cols = jnp.arange(image_shape[1])[None, None, :]
    box = (rows >= r0) & (rows < r0 + h) & (cols >= c0) & (cols < c0 + w)
    box = box & _per_row(prob, b, k3)[:, None, None]
    img = jnp.where(box[..., None], jnp.asarray(fill, img.dtype), img)
    return batch._replace(x=img.reshape(batch.x.shape))
  return aug


def random_shift(image_shape, max_shift: int):
  """Translates each image by ``(dy, dx)`` uniform in ``[-max_shift, max_shift]``, filling
  with zeros."""
  image_shape = _check_image_shape(image_shape)
  if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
    raise ValueError(f"random_shift max_shift must be an int >= 0, got {max_shift!r}")
  s = max_shift
  hh, ww, cc = image_shape

  def aug(batch: Batch, key):
    b = batch.x.shape[0]
    img = jnp.pad(_as_images(batch.x, image_shape), ((0, 0), (s, s), (s, s), (0, 0)))
    d = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
    out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (hh, ww, cc)))(img, d)
    return batch._replace(x=out.reshape(batch.x.shape))
  return aug


def random_flip(image_shape, prob: float = 0.5):
  """Mirrors a fraction ``prob`` of the images left-right (not for classes that a flip changes,
  e.g. digits)."""
  image_shape = _check_image_shape(image_shape)
  prob = _check_prob(prob, "random_flip prob")

  def aug(batch: Batch, key):
    img = _as_images(batch.x, image_shape)
    on = _per_row(prob, img.shape[0], key)[:, None, None, None]
    return batch._replace(x=jnp.where(on, img[:, :, ::-1], img).reshape(batch.x.shape))
  return aug


def _same_class_partner(key, y, mask):
  """For each row i, a uniformly random valid row ``j != i`` with ``y[j] == y[i]`` (i itself
  when there is none): ``[B]`` int32."""
  eye = jnp.eye(y.shape[0], dtype=bool)
  same = (y[:, None] == y[None, :]) & mask[None, :] & ~eye
  # no same-class partner (a class seen once, or a padded row): the row picks itself
  logits = jnp.where(jnp.any(same, 1, keepdims=True), jnp.where(same, 0.0, -jnp.inf),
                     jnp.where(eye, 0.0, -jnp.inf))
  return jax.random.categorical(key, logits, axis=1).astype(jnp.int32)


def smote(prob: float = 1.0):
  """SMOTE within the batch: a fraction ``prob`` of the valid examples ``x_i`` become
  ``x_i + u (x_j - x_i)``, ``u ~ U(0, 1)``, ``j`` a random other valid example of the same class
  in the batch (none: the example stays); labels unchanged. (The paper draws ``j`` among the k nearest same-class
  neighbours; any same-class partner keeps the point on a same-class segment without a
  nearest-neighbour search per step.)"""
  prob = _check_prob(prob, "smote prob")

  def aug(batch: Batch, key):
    k1, k2, k3 = jax.random.split(key, 3)
    j = _same_class_partner(k1, batch.y, batch.mask)
    u = jax.random.uniform(k2, (batch.x.shape[0],), batch.x.dtype)
    u = jnp.where(_per_row(prob, batch.x.shape[0], k3), u, 0.0)
    return batch._replace(x=batch.x + _bcast(u, batch.x) * (batch.x[j] - batch.x))
  return aug


def balanced_resample():
  """Redraws the valid rows of the batch (with replacement) so that each class present in it
  is drawn with equal probability: a slot draws a class uniformly among those present, then a
  uniformly random valid example of that class. Padded rows stay padded."""

  def aug(batch: Batch, key):
    y, m = batch.y, batch.mask
    b = y.shape[0]
    same = (y[:, None] == y[None, :]) & m[None, :] & m[:, None]
    n_same = jnp.sum(same, 1)                       # [B] size of row j's class (0 if padded)
    # P(row j) = 1 / (#classes present * n_class(j)): uniform over classes, then over the class
    w = jnp.where(m, 1.0 / jnp.maximum(n_same, 1), 0.0)
    logits = jnp.where(m, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf)
    logits = jnp.where(jnp.any(m), logits, 0.0)     # an empty batch: anything (a no-op step)
    idx = jax.random.categorical(key, jnp.broadcast_to(logits, (b, b)), axis=1)
    idx = jnp.where(m, idx, jnp.arange(b))
    return Batch(batch.x[idx], y[idx], m)
  return aug


def compose(*augs: Sequence):
  """Applies ``augs`` in order, each with its own key (``fold_in(key, position)``)."""
  for i, a in enumerate(augs):
    if not callable(a):
      raise ValueError(f"compose: augmentation {i} is not a function (batch, key) -> batch, "
                       f"got {type(a).__name__}")

  def aug(batch: Batch, key):
    for i, a in enumerate(augs):
      batch = a(batch, jax.random.fold_in(key, i))
    return batch
  return aug
