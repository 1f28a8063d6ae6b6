"""Secure aggregation, simulated faithfully: pairwise additive masking in fixed-point modular
arithmetic (Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017).

The protocol, as simulated here, for a cohort of C clients with distinct ids::

  encode     client a: q_a = round(clip(x_a, -clip, clip) * scale)  (two's complement, mod 2^m)
  mask       client a: y_a = q_a + sum_{b != a} s_ab * PRG(seed(a, b)) [+ PRG(self_seed(a))]
                        s_ab = +1 if id_a < id_b else -1            (all mod 2^m)
  server     receives y_a from the alive clients A (the others dropped out)
  recovery   sum_{a in A} y_a  - sum_{a in A, d not in A} s_ad PRG(seed(a, d))
                               - sum_{a in A} PRG(self_seed(a))
             = sum_{a in A} q_a   (mod 2^m)  -- exactly: the pairwise masks among A cancel
  decode     interpret the sum as a signed m-bit integer, divide by scale

The pairwise seeds ``seed(a, b) = fold_in(fold_in(k_pair, min id), max id)`` stand for the
Diffie–Hellman agreed secrets (both ends derive the same seed), and the self seeds for the
double-masking secrets ``b_a``. In the real protocol the server learns a dropped client's pairwise
secrets, and an alive client's ``b_a``, from Shamir shares held by the survivors; the simulation
lets the server *recompute* the same PRG outputs (no threshold/collusion model is simulated).

**Mask secrets come from OS entropy** (:func:`secret_key`): inside :func:`secure_sum` the root
``k_pair`` of every round is a PRNG key whose every bit (64 for the default threefry) comes
from ``os.urandom``, drawn on the host (a ``jax.experimental.io_callback``), never derived from
the run's seed, the round or the config, so the server's view (the masked vectors, see ``on_view``) cannot be unmasked by someone who knows
the configuration and the seed: a single masked vector is uniform over the ring and independent of
the update. The trained model stays bit-for-bit reproducible: the masks cancel exactly in the
ring, so the revealed sum (hence everything downstream) does not depend on them. Only the masked
view itself differs from run to run. (Earlier versions derived the masks from the round key: a
probe recovered any client's exact update from its masked vector; ``tests`` replays that probe.)

Modular arithmetic is done in ``uint32`` (XLA wraps on overflow) and reduced mod ``2**ring_bits``
by masking the low bits (``2**ring_bits`` divides ``2**32``, so reduction commutes with ``+``
and ``*``).

**Ring size.** A value quantized to ``bits`` signed bits lies in ``[-(2**(bits-1) - 1),
2**(bits-1) - 1]``; a sum of C of them needs ``bits + ceil(log2 C)`` bits to not wrap. So
``ring_bits >= bits + ceil(log2 C)`` (checked); each masked coordinate costs ``ring_bits`` bits on
the wire instead of ``bits`` for the plain quantized update: ``ring_bits - bits`` extra bits, at
least ``ceil(log2 C)`` (see :func:`cost`). Against float32 updates the minimal ring is a saving
whenever ``bits + ceil(log2 C) < 32``.

**Quantization error.** Rounding to the nearest level costs at most ``clip / (2 * (2**(bits-1) -
1))`` per coordinate and client (plus whatever ``clip`` cuts off); e.g. 16 bits and clip 1:
``1.5e-5``.

**Cost of the simulation.** Masking and recovery generate ``O(C^2)`` pairwise PRG vectors of
length n: ``O(C^2 n)`` work (memory ``O(C n)``: pairs are folded one partner at a time). Fine for
cohorts up to ~100 and small models.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from fedjax_sim.aggregators.base import Aggregator
from fedjax_sim.aggregators.robust import buffered
from fedjax_sim.transforms.compression import unflatten

PyTree = Any

_PAIR_TAG, _SELF_TAG = 0x5A1, 0x5E1F


def check_bits(bits, ring_bits: int = 32):
  """``ValueError`` unless ``bits`` is an integer in ``2..min(ring_bits, 24)`` and ``ring_bits`` in
  ``2..32``."""
  if isinstance(ring_bits, bool) or not isinstance(ring_bits, (int, np.integer)) or \
      not 2 <= ring_bits <= 32:
    raise ValueError(f"secure aggregation ring_bits must be an integer in 2..32, got {ring_bits!r}")
  top = min(int(ring_bits), 24)
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= top:
    raise ValueError(f"secure aggregation value bits must be an integer in 2..{top} "
                     f"(ring_bits={ring_bits}), got {bits!r}")


def bits_needed(bits: int, num_clients: int) -> int:
  """Ring bits for a sum of ``num_clients`` values of ``bits`` signed bits not to wrap:
  ``bits + ceil(log2 num_clients)``."""
  return int(bits) + math.ceil(math.log2(max(int(num_clients), 1)))


def check_ring(bits: int, ring_bits: int, num_clients: int):
  """``ValueError`` if a sum of ``num_clients`` ``bits``-bit values can wrap ``2**ring_bits``."""
  need = bits_needed(bits, num_clients)
  if need > ring_bits:
    raise ValueError(f"secure aggregation of {num_clients} clients with {bits}-bit values needs "
                     f"bits + ceil(log2 C) = {need} ring bits, only {ring_bits} available; lower "
                     "the bits or the cohort size")


def scale_for(clip: float, bits: int) -> float:
  """Fixed-point scale: ``clip`` maps to the largest level ``2**(bits-1) - 1``."""
  return float(2 ** (bits - 1) - 1) / float(clip)


def _ring_mask(ring_bits: int) -> jax.Array:
  return jnp.uint32((1 << ring_bits) - 1)


def encode(x: jax.Array, clip: float, bits: int, ring_bits: int = 32,
           key: jax.Array | None = None) -> jax.Array:
  """Fixed-point encoding of floats ``x [...]`` into the ring ``Z_{2**ring_bits}`` (``uint32``).

  ``q = round(clip(x, -clip, clip) * scale)`` (``scale = (2**(bits-1) - 1) / clip``), an integer
  in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, stored as ``q mod 2**ring_bits``. Rounding is to
  the nearest integer, or unbiased stochastic rounding if ``key`` is given.
  """
  check_bits(bits, ring_bits)
  v = jnp.clip(x.astype(jnp.float32), -clip, clip) * jnp.float32(scale_for(clip, bits))
  if key is None:
    q = jnp.round(v)
  else:
    q = jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))
  top = float(2 ** (bits - 1) - 1)
  q = jnp.clip(q, -top, top).astype(jnp.int32)
  return jax.lax.bitcast_convert_type(q, jnp.uint32) & _ring_mask(ring_bits)


def to_signed(total: jax.Array, ring_bits: int = 32) -> jax.Array:
  """Ring elements ``uint32 [...]`` as signed integers (int32) in ``[-2**(m-1), 2**(m-1))``."""
  total = total & _ring_mask(ring_bits)
  if ring_bits < 32:
    half = jnp.uint32(1 << (ring_bits - 1))
    # Sign-extend the m-bit value to 32 bits.
    total = jnp.where(total >= half, total | ~_ring_mask(ring_bits), total)
  return jax.lax.bitcast_convert_type(total, jnp.int32)


def decode(total: jax.Array, clip: float, bits: int, ring_bits: int = 32) -> jax.Array:
  """Inverse of :func:`encode` for a ring element (a sum of encodings): ``float32 [...]``."""
  return to_signed(total, ring_bits).astype(jnp.float32) / jnp.float32(scale_for(clip, bits))


def _prg(key: jax.Array, n: int, ring_bits: int) -> jax.Array:
  """``n`` uniform ring elements from ``key`` (the PRG of the protocol)."""
  return jax.random.bits(key, (n,), jnp.uint32) & _ring_mask(ring_bits)


def _pair_seed(key: jax.Array, id_a: jax.Array, id_b: jax.Array) -> jax.Array:
  k = jax.random.fold_in(key, _PAIR_TAG)
  return jax.random.fold_in(jax.random.fold_in(k, jnp.minimum(id_a, id_b)),
                            jnp.maximum(id_a, id_b))


def _self_seed(key: jax.Array, id_a: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(key, _SELF_TAG), id_a)


def pairwise_masks(key: jax.Array, client_ids: jax.Array, partners: jax.Array, n: int,
                   ring_bits: int = 32) -> jax.Array:
  """Row a: ``sum_{b partner, id_b != id_a} s_ab PRG(seed(a, b))  mod 2**ring_bits``, ``[C, n]``.

  Args:
    key: the round's key.
    client_ids: ``[C]`` int32 distinct client ids.
    partners: ``[C]`` bool, which clients b are summed over.
    n: vector length.

  ``O(C^2 n)`` work, ``O(C n)`` memory (a scan over the partner b).
  """
  client_ids = client_ids.astype(jnp.int32)
  minus_one = jnp.uint32(0xFFFFFFFF)

  def over_b(acc, b_in):
    id_b, is_partner = b_in

    def row(id_a):
      p = _prg(_pair_seed(key, id_a, id_b), n, ring_bits)
      sign = jnp.where(id_a < id_b, jnp.uint32(1), jnp.where(id_a > id_b, minus_one,
                                                              jnp.uint32(0)))
      return p * jnp.where(is_partner, sign, jnp.uint32(0))   # -p mod 2^32 when sign is -1

    return acc + jax.vmap(row)(client_ids), None

  acc0 = jnp.zeros((client_ids.shape[0], n), jnp.uint32)
  acc, _ = jax.lax.scan(over_b, acc0, (client_ids, partners))
  return acc & _ring_mask(ring_bits)


def self_masks(key: jax.Array, client_ids: jax.Array, n: int, ring_bits: int = 32) -> jax.Array:
  """``[C, n]``: each client's self mask ``PRG(self_seed(a))`` (the double-masking term)."""
  return jax.vmap(lambda c: _prg(_self_seed(key, c), n, ring_bits))(client_ids.astype(jnp.int32))


def mask_updates(key: jax.Array, client_ids: jax.Array, encoded: jax.Array, alive: jax.Array,
                 ring_bits: int = 32, self_mask: bool = True) -> jax.Array:
  """The server's view: each client's masked update, ``uint32 [C, n]``.

  Every client masks with every other client of the cohort (the pairwise keys were agreed
  before anyone dropped out), so a single ``masked[a]`` is uniform over the ring whatever
  ``encoded[a]`` is (as soon as the cohort has 2 clients, or ``self_mask``).

  Args:
    key: the masks' root secret (seeds derive from it and the ids; :func:`secret_key`).
    client_ids: ``[C]`` int32 distinct client ids.
    encoded: ``uint32 [C, n]`` ring elements (:func:`encode`).
    alive: ``[C]`` bool; rows of dropped clients (never received) are 0.
    ring_bits: the ring is ``Z_{2**ring_bits}``.
    self_mask: add each client's self mask (Bonawitz's double masking).
  """
  n = encoded.shape[1]
  masked = encoded + pairwise_masks(key, client_ids, jnp.ones_like(alive, bool), n, ring_bits)
  if self_mask:
    masked = masked + self_masks(key, client_ids, n, ring_bits)
  masked = masked & _ring_mask(ring_bits)
  return jnp.where(alive[:, None], masked, jnp.uint32(0))


def unmask_sum(key: jax.Array, client_ids: jax.Array, masked: jax.Array, alive: jax.Array,
               ring_bits: int = 32, self_mask: bool = True) -> jax.Array:
  """The revealed sum ``sum_{a alive} encoded[a] mod 2**ring_bits``, ``uint32 [n]``.

  Sums the alive clients' masked rows (their mutual pairwise masks cancel), then removes the
  masks they share with dropped clients and their self masks, which the server recomputes from
  the recovered seeds (the recovery step).
  """
  n = masked.shape[1]
  total = jnp.sum(jnp.where(alive[:, None], masked, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
  leftover = pairwise_masks(key, client_ids, ~alive, n, ring_bits)
  if self_mask:
    leftover = leftover + self_masks(key, client_ids, n, ring_bits)
  total = total - jnp.sum(jnp.where(alive[:, None], leftover, jnp.uint32(0)), axis=0,
                          dtype=jnp.uint32)
  return total & _ring_mask(ring_bits)


class Cost(NamedTuple):
  """What secure aggregation adds, per client and round (see :func:`cost`)."""
  value_bits: int            # bits of one quantized coordinate
  ring_bits: int             # bits of one masked coordinate on the wire
  extra_bits: int            # ring_bits - value_bits
  min_ring_bits: int         # value_bits + ceil(log2 C): the smallest ring that cannot wrap
  bytes_up: int              # the masked vector: ceil(ring_bits * n / 8)
  float32_bytes: int         # the plain float32 update, for comparison
  max_quantization_error: float   # per coordinate and client: clip / (2 (2**(bits-1) - 1))


def cost(num_params: int, cohort_size: int, bits: int, clip: float,
         ring_bits: int | None = None) -> Cost:
  """The wire cost and worst-case rounding error of secure aggregation (the masked vector only;
  the key agreement and secret sharing add ``O(C)`` keys and shares per client on top)."""
  need = bits_needed(bits, cohort_size)
  ring = min(need, 32) if ring_bits is None else ring_bits
  check_bits(bits, ring)
  check_ring(bits, ring, cohort_size)
  return Cost(int(bits), ring, ring - int(bits), need, math.ceil(ring * num_params / 8),
              4 * int(num_params), float(clip) / (2.0 * (2 ** (bits - 1) - 1)))


def secret_key() -> jax.Array:
  """A PRNG key drawn from fresh OS entropy (``os.urandom``) on the host, every call (also
  inside ``jit`` / ``lax.scan``: a side-effecting ``io_callback``, never cached or folded as a
  constant). Nothing the program knows (seed, round, config) determines it.

  Returns a typed key of the default PRNG implementation (all its key bits random).
  """
  shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))

  def draw():
    nbytes = int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize
    return np.frombuffer(os.urandom(nbytes), shape.dtype).reshape(shape.shape)

  data = io_callback(draw, jax.ShapeDtypeStruct(shape.shape, shape.dtype), ordered=False)
  return jax.random.wrap_key_data(data)


def secure_sum(clip: float, bits: int = 16, ring_bits: int = 32, weight_bound: float | None = None,
               self_mask: bool = True,
               on_view: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
               ) -> Aggregator:
  """Weighted mean computed through simulated secure aggregation (buffering aggregator).

  In ``finalize`` every client slot of the round's buffer is one cohort member (padding and
  clients whose update did not count, weight 0, are treated as drop-outs). Client c encodes its
  weighted update ``(w_c / w_ref) * delta_c`` (coordinates clipped to ``[-clip, clip]``,
  ``bits``-bit fixed point, :func:`encode`), with ``w_ref = max(weight_bound, max_c w_c)`` (by
  default the largest weight of the cohort; weights are public here, as the server knows them to
  divide by the total), so ``w_c / w_ref <= 1`` and no weight is ever cut: a weight above
  ``weight_bound`` raises that round's reference instead of being clipped (the result stays the
  exact weighted mean up to rounding, at a coarser resolution that round); the updates are masked (:func:`mask_updates`), the server sums the masked view
  modulo ``2**ring_bits``, recovers the drop-outs' masks (:func:`unmask_sum`), decodes and
  divides by the total weight::

    update = decode(sum_c q_c) * w_ref / sum_c w_c,   q_c = encode((w_c / w_ref) delta_c)

  equal, in integer space, to the plain sum of the quantized updates (masks cancel exactly).

  The masks' root secret is drawn afresh every round from OS entropy (:func:`secret_key`), and
  the pairwise seeds derive from it and the clients' population ids (as the pairwise key
  agreement of the protocol would give: new masks every round, the same for a pair of clients at
  both ends). The engine's round key is not used: the masked vectors must not be recomputable
  from the config and the seed. The revealed sum does not depend on the masks, so runs stay
  bit-for-bit reproducible. Called by hand, ``finalize(state)`` uses the slot positions as ids.

  Args:
    clip: coordinate bound of the (weighted) updates; clip the updates' L2 norm first
      (``transforms.clip_by_norm(clip)`` bounds every coordinate by ``clip``).
    bits: signed fixed-point bits per coordinate, ``2..min(ring_bits, 24)``.
    ring_bits: the ring ``Z_{2**ring_bits}``, at most 32; the cohort size C must satisfy
      ``bits + ceil(log2 C) <= ring_bits`` (checked when the round is built).
    weight_bound: public reference weight (default: the cohort's largest); a round whose
      largest weight exceeds it uses that weight instead (exact, never clipped).
    self_mask: double masking (self masks, removed for the survivors in the recovery).
    on_view: optional host function called every round with the server's view,
      ``(masked uint32 [cap, n], slot ids int32 [cap], alive bool [cap])`` as numpy arrays (rows
      of drop-outs are 0): for inspecting or dumping what the server receives.

  Memory ``O(C n)`` (the buffer), work ``O(C^2 n)`` (the masks).
  """
  check_bits(bits, ring_bits)
  clip = float(clip)
  if not clip > 0 or not math.isfinite(clip):
    raise ValueError(f"secure_sum needs a finite clip > 0, got {clip!r}")
  if weight_bound is not None and not float(weight_bound) > 0:
    raise ValueError(f"secure_sum weight_bound must be > 0, got {weight_bound!r}")

  def validate(cohort_size):
    check_ring(bits, ring_bits, cohort_size)

  def finalize(state, key=None, client_ids=None):
    valid = state.weights > 0
    w = jnp.where(valid, state.weights, 0.0)
    leaves = jax.tree.leaves(state.updates)
    cap = w.shape[0]
    flat = jnp.concatenate([jnp.reshape(x, (cap, -1)).astype(jnp.float32) for x in leaves],
                           axis=1)
    # Never below the cohort's largest weight: w_c / w_ref > 1 would be cut by the clip.
    w_ref = jnp.max(w) if weight_bound is None else jnp.maximum(jnp.float32(weight_bound),
                                                                 jnp.max(w))
    w_ref = jnp.where(w_ref > 0, w_ref, 1.0)
    enc = encode(flat * (w / w_ref)[:, None], clip, bits, ring_bits)
    del key   # the round key derives from the run's seed; the masks must not
    ids = (jnp.arange(cap, dtype=jnp.int32) if client_ids is None
           else client_ids.astype(jnp.int32))
    key = secret_key()
    masked = mask_updates(key, ids, enc, valid, ring_bits, self_mask)
    if on_view is not None:
      jax.debug.callback(lambda *view: on_view(*(np.asarray(v) for v in view)), masked, ids,
                         valid)
    total = unmask_sum(key, ids, masked, valid, ring_bits, self_mask)
    total_w = jnp.sum(w)
    mean = decode(total, clip, bits, ring_bits) * (w_ref / jnp.maximum(total_w, 1e-30))
    template = jax.tree.map(lambda x: x[0], state.updates)
    return unflatten(mean, template), total_w

  agg = buffered(lambda updates, valid: updates)   # reuse the buffer; finalize is our own
  return agg._replace(finalize=finalize, validate=validate)
