"""Byzantine-robust aggregators.

* :func:`coordinate_median` and :func:`trimmed_mean`: coordinate-wise median and beta-trimmed
  mean (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018).
* :func:`krum`: Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning
  with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).
* :func:`norm_bounded_mean`: clip every client's update to an L2 norm bound, then take the
  weighted mean (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
  2019).

Median, trimmed mean and Krum need every update of the cohort at once, so their state is a
*buffer*: the updates ``[capacity, ...]`` (one pytree, leaves with a leading client axis), their
weights ``[capacity]`` and a chunk counter. ``accumulate`` writes chunk ``i`` of K clients at rows
``[i*K, (i+1)*K)``; ``combine`` concatenates the D device buffers along the client axis. Memory is
therefore ``O(C * num_params)`` (like an unchunked round), not ``O(num_params)`` as for
:func:`~fedjax_sim.aggregators.mean`.

Clients with weight 0 (padding, dropped for non-finite updates) are ignored. Among the remaining
*valid* clients median, trimmed mean and Krum are **unweighted** (every valid client counts once,
whatever its example count, as in the papers); ``finalize`` still returns the sum of the valid
weights as ``total_weight``, so the server skips the step when nobody contributed (the update is
then 0). :func:`norm_bounded_mean` is streaming and weighted like the mean.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.base import Aggregator, mean

PyTree = Any


class BufferState(NamedTuple):
  updates: PyTree        # leaves [capacity, ...]
  weights: jax.Array     # [capacity]
  num_chunks: jax.Array  # int32 scalar: chunks written so far


def _lead(x: jax.Array, ndim: int) -> jax.Array:
  """``[C]`` -> ``[C, 1, ..., 1]`` broadcastable against a ``ndim``-rank leaf."""
  return jnp.reshape(x, x.shape + (1,) * (ndim - 1))


def buffered(reduce) -> Aggregator:
  """Buffering aggregator finishing with ``reduce(updates [cap, ...], valid [cap]) -> update``.

  The shared buffer of the robust aggregators here and of
  :func:`fedjax_sim.aggregators.secure.secure_sum` (which replaces ``finalize``).
  """

  def init(params, num_clients=None):
    if num_clients is None:
      raise ValueError("buffering (robust) aggregators need init(params, num_clients)")
    ups = jax.tree.map(lambda p: jnp.zeros((num_clients,) + jnp.shape(p), jnp.result_type(p)),
                       params)
    return BufferState(ups, jnp.zeros((num_clients,), jnp.float32), jnp.zeros((), jnp.int32))

  def accumulate(state, deltas, weights):
    k = weights.shape[0]
    start = state.num_chunks * k
    keep = weights > 0
    ups = jax.tree.map(
        lambda buf, d: jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(_lead(keep, d.ndim), d, 0).astype(buf.dtype), start, axis=0),
        state.updates, deltas)
    w = jax.lax.dynamic_update_slice_in_dim(state.weights, weights.astype(jnp.float32), start, 0)
    return BufferState(ups, w, state.num_chunks + 1)

  def finalize(state, key=None, client_ids=None):
    del key, client_ids
    valid = state.weights > 0
    return reduce(state.updates, valid), jnp.sum(jnp.where(valid, state.weights, 0.0))

  def combine(states):
    flat = lambda a: jnp.reshape(a, (a.shape[0] * a.shape[1],) + a.shape[2:])
    return BufferState(jax.tree.map(flat, states.updates), flat(states.weights),
                       jnp.sum(states.num_chunks))

  return Aggregator(init, accumulate, finalize, combine)


def _sorted_valid(x: jax.Array, valid: jax.Array):
  """Sorts ``x [cap, ...]`` along the client axis with invalid rows pushed to the end (+inf)."""
  xf = x.astype(jnp.float32)
  return jnp.sort(jnp.where(_lead(valid, x.ndim), xf, jnp.inf), axis=0)


def _take_row(s: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(s, i, axis=0, keepdims=False)


def coordinate_median() -> Aggregator:
  """Coordinate-wise median of the valid clients' updates (Yin et al. 2018).

  Unweighted; an even number n of valid clients gives the mean of the two middle values (like
  ``np.median``). Returns zeros when no client is valid.
  """

  def reduce(updates, valid):
    n = jnp.sum(valid.astype(jnp.int32))

    def leaf(x):
      s = _sorted_valid(x, valid)
      lo = _take_row(s, jnp.maximum((n - 1) // 2, 0))
      hi = _take_row(s, jnp.maximum(n // 2, 0))
      return jnp.where(n > 0, 0.5 * (lo + hi), 0.0).astype(x.dtype)

    return jax.tree.map(leaf, updates)

  return buffered(reduce)


def trimmed_mean(beta: float) -> Aggregator:
  """Coordinate-wise beta-trimmed mean (Yin et al. 2018).

  Per coordinate, the ``floor(beta * n)`` largest and smallest values of the n valid clients are
  dropped and the rest averaged (unweighted). ``beta = 0`` is the unweighted mean.

  Args:
    beta: trimmed fraction at each end, ``0 <= beta < 0.5``.
  """
  beta = float(beta)
  if not 0.0 <= beta < 0.5:
    raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta!r}")

  def reduce(updates, valid):
    n = jnp.sum(valid.astype(jnp.int32))
    t = jnp.floor(beta * n.astype(jnp.float32)).astype(jnp.int32)

    def leaf(x):
      s = _sorted_valid(x, valid)
      idx = jnp.arange(x.shape[0])
      keep = (idx >= t) & (idx < n - t)
      total = jnp.sum(jnp.where(_lead(keep, x.ndim), s, 0.0), axis=0)
      return (total / jnp.maximum(n - 2 * t, 1).astype(jnp.float32)).astype(x.dtype)

    return jax.tree.map(leaf, updates)

  return buffered(reduce)


def krum(num_byzantine: int, multi_m: int = 1) -> Aggregator:
  """Krum / Multi-Krum (Blanchard et al. 2017).

  Each valid client i is scored by the sum of squared L2 distances from its update to its
  ``n - f - 2`` nearest other valid updates (n valid clients, f = ``num_byzantine``); the update
  with the lowest score is returned (``multi_m = 1``, Krum), or the unweighted mean of the
  ``multi_m`` lowest-scoring ones (Multi-Krum). The guarantee needs ``n > 2f + 2``: the cohort
  size is checked when the round is built (``Aggregator.validate``, so ``run`` raises
  ``ValueError``). If drops leave fewer valid clients at run time, the neighbour count is clamped
  to at least 1 (and ``multi_m`` to n) instead of failing inside the compiled round.

  Args:
    num_byzantine: f >= 0, the number of Byzantine clients tolerated.
    multi_m: m >= 1 updates averaged (1 = Krum).
  """
  f, m = int(num_byzantine), int(multi_m)
  if f != num_byzantine or f < 0:
    raise ValueError(f"krum needs an integer num_byzantine >= 0, got {num_byzantine!r}")
  if m != multi_m or m < 1:
    raise ValueError(f"krum needs an integer multi_m >= 1, got {multi_m!r}")

  def validate(cohort_size):
    if cohort_size <= 2 * f + 2:
      raise ValueError(f"krum with num_byzantine={f} needs cohort_size > 2f + 2 = {2 * f + 2}, "
                       f"got {cohort_size}")
    if m > cohort_size:
      raise ValueError(f"krum multi_m={m} exceeds cohort_size={cohort_size}")

  def reduce(updates, valid):
    cap = valid.shape[0]
    n = jnp.sum(valid.astype(jnp.int32))
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.zeros((cap, cap), jnp.float32)
    sq = jnp.zeros((cap,), jnp.float32)
    for x in jax.tree.leaves(updates):
      x2 = jnp.reshape(x, (cap, -1)).astype(jnp.float32)
      gram = gram + jnp.matmul(x2, x2.T, precision=hi)
      sq = sq + jnp.sum(x2 * x2, axis=1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    eye = jnp.eye(cap, dtype=bool)
    dist = jnp.where(valid[None, :] & ~eye, dist, jnp.inf)     # only other valid neighbours
    dist = jnp.sort(dist, axis=1)
    num_nb = jnp.maximum(n - f - 2, 1)
    take = (jnp.arange(cap)[None, :] < num_nb) & jnp.isfinite(dist)
    scores = jnp.where(valid, jnp.sum(jnp.where(take, dist, 0.0), axis=1), jnp.inf)
    best = jnp.argsort(scores)[: min(m, cap)]                  # invalid ones (inf) sort last
    sel = (jnp.arange(best.shape[0]) < jnp.minimum(n, m)).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(sel), 1.0)
    return jax.tree.map(
        lambda x: (jnp.tensordot(sel, x[best].astype(jnp.float32), axes=1) / count).astype(x.dtype),
        updates)

  agg = buffered(reduce)
  return agg._replace(validate=validate)


def norm_bounded_mean(max_norm: float) -> Aggregator:
  """Weighted mean of norm-clipped updates (Sun et al. 2019, "norm difference clipping").

  Each client's update (all leaves together) is scaled by ``min(1, max_norm / ||delta||_2)``
  before the weighted mean. Streaming: the memory of one update, like the mean.

  Args:
    max_norm: the L2 bound M > 0.
  """
  max_norm = float(max_norm)
  if not max_norm > 0:
    raise ValueError(f"norm_bounded_mean needs max_norm > 0, got {max_norm!r}")
  inner = mean()

  def accumulate(state, deltas, weights):
    sq = sum(jnp.sum(jnp.reshape(d.astype(jnp.float32) ** 2, (d.shape[0], -1)), axis=1)
             for d in jax.tree.leaves(deltas))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-30))
    clipped = jax.tree.map(lambda d: d * _lead(scale, d.ndim).astype(d.dtype), deltas)
    return inner.accumulate(state, clipped, weights)

  return inner._replace(accumulate=accumulate)
