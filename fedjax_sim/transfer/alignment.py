"""Domain alignment losses for the joint objective ``a * f_src + b * g_tgt + c * align``.

When the target clients' inputs are shifted from the source's (rotated, inverted or noisy
images, another text domain), the frozen encoder's features of target examples drift away from
those the source head was fit on. An alignment term pulls the target features (through whatever
part of the encoder is trainable) back towards the source feature distribution. The source side
enters only as *aggregated moments* (no source example is needed on a target client):

* CORAL (Sun & Saenko, 2016, "Deep CORAL"): ``||C_S - C_T||_F^2 / (4 D^2)`` between the source
  feature covariance ``C_S [D, D]`` and the covariance of the target batch's features.
* MMD (Gretton et al., 2012) with a Gaussian kernel, approximated with random Fourier features
  ``phi`` (Rahimi & Recht, 2007): ``||mean phi(source) - mean phi(target batch)||^2``; the source
  shares ``mean phi(source) [R]``. With ``kernel="linear"`` it is the squared distance of the
  feature means (the source shares its mean ``[D]``).

* Moment matching (``"moments"``): the mean over features of the squared differences of the
  per-feature means and variances, ``sum_d [(mu_S - mu_T)_d^2 + (var_S - var_T)_d^2] / D``.

Both are computed from the source features' moments: :func:`source_moments` gives them from a
centralized array or, federatedly, from source clients' per-client sums aggregated like updates
(:func:`fedjax_sim.transfer.transferability.aggregate_statistics`). The same function gives the
target clients' aggregated moments, and :func:`affine_map` the closed-form mapping between the
domains that zeroes the moment-matching term: ``f -> scale * f + shift`` per feature, the
simplest "mapping between domains" (it costs the target clients one round of sums, no labels and
no training).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.data.federated import FederatedData
from fedjax_sim.transfer.transferability import aggregate_statistics

AlignFn = Callable[[jax.Array, jax.Array], jax.Array]


class RandomFourierFeatures(NamedTuple):
  """``phi(f) = sqrt(2 / R) cos(f W + b)`` with ``W [D, R] ~ N(0, 1 / bandwidth^2)`` and
  ``b [R] ~ U[0, 2 pi)``: ``phi(u) . phi(v) -> exp(-||u - v||^2 / (2 bandwidth^2))``."""
  w: jax.Array
  b: jax.Array

  def __call__(self, f: jax.Array) -> jax.Array:
    r = self.w.shape[1]
    return jnp.sqrt(2.0 / r) * jnp.cos(f.astype(jnp.float32) @ self.w + self.b[None, :])


def random_fourier_features(key: jax.Array, dim: int, num_features: int = 512,
                            bandwidth: float = 1.0) -> RandomFourierFeatures:
  """Random Fourier features of the Gaussian kernel of width ``bandwidth`` on ``dim`` inputs."""
  if dim <= 0 or num_features <= 0 or not bandwidth > 0:
    raise ValueError(f"random_fourier_features needs dim > 0, num_features > 0 and bandwidth > 0 "
                     f"(got {dim}, {num_features}, {bandwidth})")
  kw, kb = jax.random.split(key)
  return RandomFourierFeatures(jax.random.normal(kw, (dim, num_features)) / bandwidth,
                               jax.random.uniform(kb, (num_features,), maxval=2 * np.pi))


class Moments(NamedTuple):
  """Source feature moments: ``mean [D]``, unbiased ``cov [D, D]``, ``count``, and the mean
  random-Fourier embedding ``rff_mean [R]`` (None without ``rff``)."""
  mean: np.ndarray
  cov: np.ndarray
  count: float
  rff_mean: np.ndarray | None = None


def masked_moments(f: jax.Array, mask: jax.Array | None = None):
  """``(mean [D], unbiased covariance [D, D], count)`` of the unmasked rows of ``f [B, D]``."""
  f = f.reshape(f.shape[0], -1).astype(jnp.float32)
  m = jnp.ones(f.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
  n = jnp.sum(m)
  mu = jnp.sum(f * m[:, None], 0) / jnp.maximum(n, 1.0)
  c = (f - mu[None, :]) * m[:, None]
  return mu, c.T @ c / jnp.maximum(n - 1.0, 1.0), n


def source_moments(features, rff: RandomFourierFeatures | None = None, *,
                   aggregator=None) -> Moments:
  """The moments the source side shares.

  Args:
    features: source features ``[N, D]`` (centralized), or a FederatedData of them (source
      clients): each client then sends its sums ``sum f``, ``sum f f^T`` (and ``sum phi(f)``),
      aggregated like updates; only the aggregate is used.
    rff: random Fourier features for the MMD's source embedding (the same ``rff`` the target
      side uses).
  """
  if isinstance(features, FederatedData):
    def stat(x, y, mask, extra):
      del y, extra
      f = x.reshape(x.shape[0], -1).astype(jnp.float32) * mask[:, None]
      out = {"f": jnp.sum(f, 0), "ff": f.T @ f}
      if rff is not None:
        out["phi"] = jnp.sum(rff(f) * mask[:, None], 0)
      return out
    if "y" not in features.arrays:
      features = FederatedData(dict(features.arrays, y=np.zeros(features.num_examples, np.int32)),
                               features.offsets, features.client_ids)
    s, n = aggregate_statistics(stat, features, aggregator=aggregator)
    mu = s["f"] / n
    cov = (s["ff"] - n * np.outer(mu, mu)) / max(n - 1.0, 1.0)
    return Moments(mu, (cov + cov.T) / 2, n, None if rff is None else s["phi"] / n)
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if f.shape[0] < 2:
    raise ValueError(f"source_moments needs at least 2 source examples, got {f.shape[0]}")
  phi = None if rff is None else np.asarray(rff(jnp.asarray(f, jnp.float32))).mean(0)
  return Moments(f.mean(0), np.cov(f.T).reshape(f.shape[1], f.shape[1]), float(f.shape[0]), phi)


def coral_loss(source_cov: jax.Array, target: jax.Array, mask: jax.Array | None = None):
  """``||source_cov - cov(target)||_F^2 / (4 D^2)`` (Deep CORAL) for target features ``[B, D]``."""
  _, ct, _ = masked_moments(target, mask)
  d = ct.shape[0]
  return jnp.sum((jnp.asarray(source_cov, jnp.float32) - ct) ** 2) / (4.0 * d * d)


def mmd_loss(source_embedding: jax.Array, target: jax.Array, mask: jax.Array | None = None,
             rff: RandomFourierFeatures | None = None):
  """Squared MMD between the source and the target batch's features ``[B, D]``.

  With ``rff`` (Gaussian kernel, random Fourier features), ``source_embedding`` is the source's
  mean embedding ``[R]``; without, the linear kernel: ``source_embedding`` is the source's
  feature mean ``[D]``."""
  f = target.reshape(target.shape[0], -1).astype(jnp.float32)
  m = jnp.ones(f.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
  phi = f if rff is None else rff(f)
  mu_t = jnp.sum(phi * m[:, None], 0) / jnp.maximum(jnp.sum(m), 1.0)
  return jnp.sum((jnp.asarray(source_embedding, jnp.float32) - mu_t) ** 2)


def affine_map(source: Moments, target: Moments, eps: float = 1e-6):
  """Closed-form per-feature map ``f -> scale * f + shift`` taking the target features' mean and
  variance to the source's: ``scale = sd_S / sd_T``, ``shift = mu_S - scale * mu_T`` (each
  ``[D]``; ``sd`` from the diagonal of the unbiased covariances, ``eps`` added to ``sd_T``).

  It is the exact minimiser of the ``"moments"`` alignment over per-feature affine maps (the
  mapped target moments equal the source's) and, for features whose target distribution is an
  affine, per-feature transform of the source's, it undoes the shift. Like AdaBN (Li et al.
  2016), but from aggregated moments of federated clients rather than a batch.
  """
  if np.shape(source.mean) != np.shape(target.mean):
    raise ValueError(f"affine_map: source moments have {np.shape(source.mean)} features, target "
                     f"{np.shape(target.mean)}")
  if not eps >= 0:
    raise ValueError(f"affine_map needs eps >= 0, got {eps}")
  sd_s = np.sqrt(np.maximum(np.diag(np.asarray(source.cov, np.float64)), 0.0))
  sd_t = np.sqrt(np.maximum(np.diag(np.asarray(target.cov, np.float64)), 0.0))
  scale = sd_s / (sd_t + eps)
  shift = np.asarray(source.mean, np.float64) - scale * np.asarray(target.mean, np.float64)
  return scale.astype(np.float32), shift.astype(np.float32)


def moment_loss(source_mean: jax.Array, source_var: jax.Array, target: jax.Array,
                mask: jax.Array | None = None):
  """``mean_d [(mu_S - mu_T)_d^2 + (var_S - var_T)_d^2]`` for target features ``[B, D]`` (the
  unbiased variances of the unmasked rows), against the source's mean and variance ``[D]``."""
  mu, cov, _ = masked_moments(target, mask)
  return (jnp.mean((jnp.asarray(source_mean, jnp.float32) - mu) ** 2)
          + jnp.mean((jnp.asarray(source_var, jnp.float32) - jnp.diag(cov)) ** 2))


def make_align(kind: str, moments: Moments, rff: RandomFourierFeatures | None = None) -> AlignFn:
  """An ``align(features [B, D], mask [B]) -> scalar`` term for
  :func:`fedjax_sim.transfer.joint_objective_model`: ``"coral"``, ``"mmd"`` (needs
  ``rff`` and ``moments.rff_mean``), ``"mmd_linear"`` or ``"moments"``."""
  if kind == "coral":
    cov = jnp.asarray(moments.cov, jnp.float32)
    return lambda f, mask: coral_loss(cov, f, mask)
  if kind == "mmd":
    if rff is None or moments.rff_mean is None:
      raise ValueError("align='mmd' needs the random Fourier features (rff=) and source moments "
                       "computed with the same rff")
    emb = jnp.asarray(moments.rff_mean, jnp.float32)
    return lambda f, mask: mmd_loss(emb, f, mask, rff)
  if kind == "mmd_linear":
    mu = jnp.asarray(moments.mean, jnp.float32)
    return lambda f, mask: mmd_loss(mu, f, mask)
  if kind == "moments":
    mu = jnp.asarray(moments.mean, jnp.float32)
    var = jnp.asarray(np.diag(moments.cov), jnp.float32)
    return lambda f, mask: moment_loss(mu, var, f, mask)
  raise ValueError(f"unknown alignment {kind!r}; choose 'coral', 'mmd', 'mmd_linear' or "
                   f"'moments'")
