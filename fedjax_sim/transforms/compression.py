"""Compressed client updates: stochastic quantization, random-rotation quantization, top-k.

Every transform here returns the *decoded* (dense, float) update, i.e. what the server holds
after decompressing the client's message, so it composes with :func:`~fedjax_sim.transforms.chain`
(e.g. after :func:`~fedjax_sim.transforms.clip_by_norm`) and with every aggregator. What the
encoding costs on the wire is declared by ``wire_bytes(params)`` and recorded by
:func:`fedjax_sim.run` in the history (``bytes_up_per_client``, ``bytes_up``).

* :func:`stochastic_quantize`: unbiased stochastic rounding to ``2**bits`` evenly spaced levels
  between the update's min and max (one pair of float32 scales per update, or per leaf)
  (QSGD-style; Alistarh et al. 2017, Suresh et al. 2017 "Distributed Mean Estimation with Limited
  Communication").
* :func:`hadamard_quantize`: the same quantizer applied after a random rotation
  ``R = H D`` (random signs ``D``, normalized Walsh–Hadamard ``H``), which spreads the update's
  mass evenly over the coordinates so that the min/max range, hence the quantization error,
  shrinks from ``O(max|x|)`` to ``O(||x|| sqrt(log d / d))`` (Suresh et al. 2017). The server
  inverts the rotation; the decoded update is still unbiased.
* :func:`top_k`: keeps the ``fraction`` of coordinates largest in magnitude over the whole
  flattened update, optionally with error feedback (Stich, Cordonnier, Jaggi 2018; Karimireddy
  et al. 2019): each client keeps what it did not send in a residual and adds it to its next
  update (stateful transform, state ``[num_params]`` per client).

Randomness: a transform receives the client's key ``fold_in(round transform key, client_id)``.
The rotation's signs are drawn from it as well: the server can regenerate them (the key is a
function of the round key and the client id), so they cost nothing on the wire.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.transforms.base import UpdateTransform, stateless

PyTree = Any

SCALE_BYTES = 8   # one float32 minimum and one float32 maximum per quantized group
VALUE_BYTES = 4   # a float32 value of top-k
INDEX_BYTES = 4   # an int32 coordinate index of top-k


def check_bits(bits) -> int:
  """``bits`` as an int, or ``ValueError`` unless it is an integer in ``1..16``."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
    raise ValueError(f"quantization bits must be an integer in 1..16, got {bits!r}")
  return int(bits)


def _check_fraction(fraction) -> float:
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or \
      not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"top-k fraction must lie in (0, 1], got {fraction!r}")
  return float(fraction)


def flatten(tree: PyTree) -> jax.Array:
  """All leaves of ``tree`` as one float32 vector ``[num_params]`` (leaf order of
  ``jax.tree.leaves``)."""
  leaves = jax.tree.leaves(tree)
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def unflatten(vec: jax.Array, like: PyTree) -> PyTree:
  """Inverse of :func:`flatten`: ``vec [num_params]`` -> a pytree shaped and typed like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for x in leaves:
    n = int(np.size(x))
    out.append(jnp.reshape(vec[i:i + n], jnp.shape(x)).astype(jnp.result_type(x)))
    i += n
  return treedef.unflatten(out)


def _num_params(params: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def quantize_vector(x: jax.Array, key: jax.Array, bits: int) -> jax.Array:
  """Unbiased stochastic uniform quantization of ``x [n]`` (float32), decoded.

  The ``L = 2**bits`` levels are ``lo + j * step`` for ``j = 0..L-1``, ``lo = min x``,
  ``step = (max x - lo) / (L - 1)``; ``t = (x - lo) / step`` is rounded to ``floor(t)`` or
  ``floor(t) + 1`` with probabilities making ``E[level] = t``, i.e. ``floor(t + u)`` with
  ``u ~ U[0, 1)``. So ``E[decoded] = x`` and ``|decoded - x| < step``. A constant vector is
  returned exactly. The message is ``bits`` per coordinate plus ``lo`` and ``max`` (2 floats).
  """
  lo, hi = jnp.min(x), jnp.max(x)
  levels = float(2 ** bits - 1)
  step = (hi - lo) / levels
  safe = jnp.where(step > 0, step, 1.0)
  t = (x - lo) / safe
  u = jax.random.uniform(key, x.shape, jnp.float32)
  q = jnp.clip(jnp.floor(t + u), 0.0, levels)                  # the integer sent, 0..L-1
  return jnp.where(step > 0, lo + q * step, x)


def stochastic_quantize(bits: int, per_leaf: bool = False) -> UpdateTransform:
  """Unbiased stochastic uniform quantization of the update to ``2**bits`` levels.

  Args:
    bits: bits per coordinate, an integer in ``1..16``.
    per_leaf: one min/max range per leaf (each leaf quantized on its own; better when leaves
      have different scales, e.g. weights vs biases) instead of one for the whole update.

  Wire size: ``ceil(bits * num_params / 8)`` bytes plus 8 bytes (float32 min and max) per range.
  """
  bits = check_bits(bits)

  def apply(delta, key, client_id):
    del client_id
    if per_leaf:
      leaves, treedef = jax.tree.flatten(delta)
      keys = jax.random.split(key, len(leaves))
      return treedef.unflatten([
          jnp.reshape(quantize_vector(jnp.ravel(x).astype(jnp.float32), k, bits),
                      x.shape).astype(x.dtype) for x, k in zip(leaves, keys)])
    return unflatten(quantize_vector(flatten(delta), key, bits), delta)

  def wire_bytes(params):
    groups = len(jax.tree.leaves(params)) if per_leaf else 1
    return math.ceil(bits * _num_params(params) / 8) + SCALE_BYTES * groups

  return stateless(apply, wire_bytes)


def next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def fwht(x: jax.Array) -> jax.Array:
  """Normalized fast Walsh–Hadamard transform of ``x [d]``, ``d`` a power of two.

  ``H / sqrt(d)`` is orthonormal and symmetric, so ``fwht(fwht(x)) == x``. ``log2(d)`` butterfly
  stages of ``O(d)`` each.
  """
  d = x.shape[0]
  if d & (d - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {d}")
  h = 1
  while h < d:
    y = jnp.reshape(x, (d // (2 * h), 2, h))
    a, b = y[:, 0, :], y[:, 1, :]
    x = jnp.reshape(jnp.stack([a + b, a - b], axis=1), (d,))
    h *= 2
  return x / jnp.sqrt(jnp.float32(d))


def random_rotation(x: jax.Array, key: jax.Array, inverse: bool = False) -> jax.Array:
  """``R x = H D x`` (or ``R^T x = D H x`` with ``inverse``) for ``x [d]``, ``d`` a power of two,
  ``D`` random signs from ``key``."""
  signs = jnp.where(jax.random.bernoulli(key, 0.5, x.shape), 1.0, -1.0).astype(x.dtype)
  return signs * fwht(x) if inverse else fwht(signs * x)


def hadamard_quantize(bits: int) -> UpdateTransform:
  """Random-rotation (Hadamard) quantization (Suresh et al. 2017).

  The flattened update ``x [n]`` is zero-padded to ``d = 2**ceil(log2 n)``, rotated by
  ``R = H D`` (random signs ``D`` from the client's key, normalized Walsh–Hadamard ``H``),
  quantized with :func:`quantize_vector` (one min/max range) and rotated back with ``R^T``; the
  first ``n`` coordinates are returned. Unbiased (``R^T`` is linear and the quantizer unbiased)
  with mean squared error ``O(||x||^2 log d / 2**(2 bits))`` instead of
  ``O(n (max x - min x)^2 / 2**(2 bits))``.

  Args:
    bits: bits per rotated coordinate, an integer in ``1..16``.

  Wire size: ``ceil(bits * d / 8) + 8`` bytes, ``d`` the padded length (all ``d`` rotated
  coordinates are needed to invert the rotation; e.g. 7,850 -> 8,192 for logistic regression on
  784 inputs, 199,210 -> 262,144 (+32%) for the 2NN). The rotation's signs come from a seed the
  server can recompute and are not sent.
  """
  bits = check_bits(bits)

  def apply(delta, key, client_id):
    del client_id
    x = flatten(delta)
    n = x.shape[0]
    d = next_pow2(n)
    k_rot, k_q = jax.random.split(key)
    y = random_rotation(jnp.pad(x, (0, d - n)), k_rot)
    z = random_rotation(quantize_vector(y, k_q, bits), k_rot, inverse=True)
    return unflatten(z[:n], delta)

  def wire_bytes(params):
    return math.ceil(bits * next_pow2(_num_params(params)) / 8) + SCALE_BYTES

  return stateless(apply, wire_bytes)


def top_k_count(fraction: float, num_params: int) -> int:
  """How many coordinates :func:`top_k` keeps: ``max(1, round(fraction * num_params))``."""
  return max(1, min(num_params, int(round(fraction * num_params))))


def sparsify(x: jax.Array, k: int) -> jax.Array:
  """``x [n]`` with all but its ``k`` largest-magnitude coordinates set to 0 (ties: lowest
  index first, as ``lax.top_k``)."""
  _, idx = jax.lax.top_k(jnp.abs(x), k)
  return jnp.zeros_like(x).at[idx].set(x[idx])


def top_k(fraction: float, error_feedback: bool = True) -> UpdateTransform:
  """Top-k sparsification over the whole flattened update, optionally with error feedback.

  Keeps the ``k = max(1, round(fraction * num_params))`` coordinates of largest magnitude.

  With ``error_feedback`` the transform is stateful: client i keeps a residual ``e_i``
  (``float32 [num_params]``, zero at the start), compresses ``v = delta + e_i`` and keeps
  ``e_i <- v - topk(v)``, exactly what it did not send, to add to its next update. The engine
  stores one residual per client of the population (``ServerState.clients.transform``; a
  client whose update was not counted, e.g. dropped, keeps its old residual).

  Args:
    fraction: share of coordinates kept, in ``(0, 1]``.
    error_feedback: keep and re-inject the residual.

  Wire size: ``k * (4 + 4)`` bytes (float32 value and int32 index per kept coordinate).
  """
  fraction = _check_fraction(fraction)

  def compress(v):
    return sparsify(v, top_k_count(fraction, v.shape[0]))

  def wire_bytes(params):
    return top_k_count(fraction, _num_params(params)) * (VALUE_BYTES + INDEX_BYTES)

  if not error_feedback:
    def apply(delta, key, client_id):
      del key, client_id
      return unflatten(compress(flatten(delta)), delta)
    return stateless(apply, wire_bytes)

  def init(params):
    return jnp.zeros((_num_params(params),), jnp.float32)

  def apply_ef(delta, key, client_id, residual):
    del key, client_id
    v = flatten(delta) + residual
    sent = compress(v)
    return unflatten(sent, delta), v - sent

  return UpdateTransform(apply_ef, init, wire_bytes)
