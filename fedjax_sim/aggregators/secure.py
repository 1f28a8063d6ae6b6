"""Secure aggregation, simulated faithfully: pairwise additive masking in fixed-point modular
arithmetic (Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017).

The protocol, as simulated here, for a cohort of C clients with distinct ids::

  encode     client a: q_a = round(clip(x_a, -clip, clip) * scale)  (two's complement, mod 2^m)
  mask       client a: y_a = q_a + sum_{b in N(a)} s_ab * PRG(seed(a, b)) [+ PRG(self_seed(a))]
                        s_ab = +1 if id_a < id_b else -1            (all mod 2^m)
                        N(a): every other client (SecAgg), or a's k neighbours (SecAgg+)
  server     receives y_a from the alive clients A (the others dropped out)
  recovery   sum_{a in A} y_a  - sum_{a in A, d in N(a) not in A} s_ad PRG(seed(a, d))
                               - sum_{a in A} PRG(self_seed(a))
             = sum_{a in A} q_a   (mod 2^m)  -- exactly: the pairwise masks among A cancel
  decode     interpret the sum as a signed m-bit integer, divide by scale

The pairwise seeds ``seed(a, b) = fold_in(fold_in(k_pair, min id), max id)`` stand for the
Diffie–Hellman agreed secrets (both ends derive the same seed; ``secure_sum(...,
key_agreement="x25519")`` runs the real X25519 agreement instead, :func:`x25519_seeds`), and the self seeds for the
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

**SecAgg+ (sparse masking).** With ``secure_sum(..., graph="harary")`` each client masks only
with its ``k = O(log C)`` neighbours in a random Harary graph (Bell, Bonawitz, Gascón, Lepoint,
Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020):
``k`` from :func:`harary_degree` (the paper's conditions: the honest survivors stay connected
and a Shamir threshold exists among ``k`` neighbours, for given rates of colluding and dropped
clients), the graph from :func:`mask_graph`. Masks of every edge still cancel, so the sum is
exact and drop-outs are recovered as above, over the drop-outs' edges only. Where this simulation
deviates from the paper: (1) the graph spans the round's client *slots* (padding slots are
clients that dropped out), (2) its random relabelling is drawn from the round's OS-entropy secret
rather than by the server (the server learns the graph in the protocol; the revealed sum does not
depend on it), (3) the Shamir sharing of the seeds among neighbours is not simulated, so the
server always recovers, even when more clients drop than the degree was chosen for (where the
real protocol would abort the round).

**Cost of the simulation.** Masking generates one PRG vector of length n per edge of the mask
graph, ``E = C (C - 1) / 2`` (complete) or ``C k / 2`` (Harary), one ``lax.scan`` step each
(not per client and partner: each pair's mask is drawn once for both ends), plus C self masks;
recovery regenerates only the masks of edges between a survivor and a drop-out (``lax.cond``
skips the others) and the survivors' self masks. ``O(E n)`` work, ``O(C n)`` memory. On CPU the
PRG (threefry, 20 rounds) dominates, at a few ns per 32-bit word when one ``n``-vector is drawn
at a time (3-4x faster per word than drawing a ``[C, n]`` block at once, which spills the
caches; jax's ``rbg`` key implementations were no faster on CPU).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from fedjax_sim.aggregators.base import Aggregator
from fedjax_sim.aggregators.robust import buffered
from fedjax_sim.transforms.compression import unflatten

PyTree = Any

_PAIR_TAG, _SELF_TAG, _GRAPH_TAG = 0x5A1, 0x5E1F, 0x6A7


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


# ------------------------------------------------------------------------------ mask graphs
GRAPHS = ("complete", "harary")


def complete_edges(num_nodes: int) -> np.ndarray:
  """``int32 [C (C-1)/2, 2]``: every pair ``(i, j)``, ``i < j``, of the nodes ``0..C-1``
  (SecAgg: every client masks with every other)."""
  i, j = np.triu_indices(int(num_nodes), k=1)
  return np.stack([i, j], axis=1).astype(np.int32)


def harary_edges(num_nodes: int, degree: int) -> np.ndarray:
  """``int32 [C k/2, 2]``: the edges of the Harary graph ``H_{k,C}`` on the nodes ``0..C-1``:
  node ``i`` is joined to ``i +- 1, ..., i +- k/2 (mod C)``. Every node has exactly ``k``
  neighbours (no edge is listed twice, as ``k < C``); the graph is ``k``-connected.

  ``ValueError`` unless ``k`` is even and ``2 <= k <= C - 1``.
  """
  c, k = int(num_nodes), degree
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k % 2 or not 2 <= k <= c - 1:
    raise ValueError(f"a Harary mask graph on {c} clients needs an even number of neighbours in "
                     f"2..{c - 1}, got {degree!r}")
  i = np.repeat(np.arange(c), k // 2)
  return np.stack([i, (i + np.tile(np.arange(1, k // 2 + 1), c)) % c], axis=1).astype(np.int32)


def harary_degree(num_clients: int, adversarial_rate: float = 0.1, dropout_rate: float = 0.1,
                  security_bits: int = 40, correctness_bits: int = 20) -> int:
  """The smallest even degree ``k`` of SecAgg+'s random Harary graph for ``C = num_clients``
  clients, of which a fraction ``adversarial_rate`` may collude with an honest-but-curious server
  and a fraction ``dropout_rate`` may drop out (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure
  Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020): ``C - 1`` (the complete
  graph, plain SecAgg) when no smaller degree qualifies. ``k`` grows as ``O(log C)``.

  ``k`` qualifies when (union bounds over a uniformly random relabelling of ``H_{k,C}``):

  * security: removing the colluding and dropped clients leaves the graph connected, except with
    probability ``< 2**-(security_bits + 1)`` (``H_{k,C}`` is disconnected only by ``k/2``
    consecutive removed nodes at two separate places of its ring);
  * a Shamir threshold ``t`` exists such that, except with probability ``2**-(security_bits + 1)``
    per client, fewer than ``t`` of a client's ``k`` neighbours collude (so they cannot rebuild
    its secrets) while, except with probability ``2**-correctness_bits`` per client, at least
    ``t`` of them survive (so the server can recover it if it drops). Neighbour counts are
    hypergeometric.
  """
  c = int(num_clients)
  for name, rate in (("adversarial_rate", adversarial_rate), ("dropout_rate", dropout_rate)):
    if not 0.0 <= float(rate) < 1.0:
      raise ValueError(f"harary_degree {name} must be in [0, 1), got {rate!r}")
  if float(adversarial_rate) + float(dropout_rate) > 0.9:
    raise ValueError("harary_degree: adversarial_rate + dropout_rate must be <= 0.9, got "
                     f"{adversarial_rate!r} + {dropout_rate!r}")
  if c < 2:
    raise ValueError(f"harary_degree needs at least 2 clients, got {num_clients!r}")
  from scipy.stats import hypergeom   # noqa: PLC0415 - scipy comes with jax; only needed here

  eps = 1e-12   # keeps float rounding of rate * C on the safe side
  bad_adv = math.floor((float(adversarial_rate) + eps) * c)
  bad = bad_adv + math.floor((float(dropout_rate) + eps) * c)
  alive = math.ceil((1.0 - float(dropout_rate) - eps) * c)
  log_sec = -(security_bits + 1) * math.log(2.0)
  q_sec = 2.0 ** -(security_bits + 1) / c
  q_cor = 2.0 ** -correctness_bits / c
  for k in range(2, c - 1, 2):
    if k <= bad:   # can `bad` removed nodes cut the ring twice (k/2 in a row, at 2 places)?
      log_p = (math.log(c) + math.log(c - k - 1) - math.log(2.0) + math.lgamma(bad + 1)
               + math.lgamma(c - k + 1) - math.lgamma(c + 1) - math.lgamma(bad - k + 1))
      if log_p >= log_sec:
        continue
    t = np.arange(k + 1)
    # t1: fewer than t1 + 1 colluding neighbours (P[X > t1] <= q_sec).
    t1 = int(np.argmax(hypergeom.sf(t, c, bad_adv, k) <= q_sec))
    # t2: the largest t with P[surviving neighbours < t] <= q_cor.
    ok = np.concatenate([[True], hypergeom.cdf(t, c, alive, k) <= q_cor])
    t2 = int(np.flatnonzero(ok).max())
    if t2 > t1:
      return k
  return c - 1


def mask_degree(num_clients: int, graph: str = "complete", neighbours: int | None = None,
                adversarial_rate: float = 0.1, dropout_rate: float = 0.1) -> int:
  """Pairwise masks per client: ``C - 1`` for the complete graph; for ``"harary"``,
  ``neighbours`` or else :func:`harary_degree` (capped at ``C - 1``)."""
  c = int(num_clients)
  if graph not in GRAPHS:
    raise ValueError(f"secure aggregation graph must be one of {GRAPHS}, got {graph!r}")
  if graph == "complete":
    return c - 1
  k = harary_degree(c, adversarial_rate, dropout_rate) if neighbours is None else neighbours
  return min(k, c - 1)


def mask_graph(key: jax.Array, num_clients: int, degree: int) -> jax.Array:
  """``int32 [E, 2]``: the pairs of client slots that share a pairwise mask. ``degree >= C - 1``:
  every pair (:func:`complete_edges`); otherwise the Harary graph ``H_{degree,C}``
  (:func:`harary_edges`) with its nodes relabelled by a uniformly random permutation drawn from
  ``key`` (SecAgg+'s random Harary graph)."""
  c = int(num_clients)
  if degree >= c - 1:
    return jnp.asarray(complete_edges(c))
  perm = jax.random.permutation(jax.random.fold_in(key, _GRAPH_TAG), c).astype(jnp.int32)
  return perm[jnp.asarray(harary_edges(c, degree))]


def _edges(edges, num_clients):
  return jnp.asarray(complete_edges(num_clients) if edges is None else edges, jnp.int32)


def _seeds(key, client_ids, edges, edge_keys):
  """Scan inputs and a function giving an edge's PRG seed: derived from ``key`` and the ids
  (simulated key agreement) or, given ``edge_keys [E]``, that edge's agreed key."""
  if edge_keys is None:
    return edges, (lambda x: (x, _pair_seed(key, client_ids[x[0]], client_ids[x[1]])))
  return (edges, edge_keys), (lambda x: x)


def _add_pair_masks(key, client_ids, acc, edges, rows, partners, ring_bits, edge_keys=None):
  """``acc [C, n]`` plus, for every edge ``(a, b)``, ``s_ab PRG(seed(a, b))`` in row a if
  ``rows[a] & partners[b]`` and ``s_ba PRG(seed(a, b))`` in row b if ``rows[b] & partners[a]``.

  One pair's mask is generated once for both of its rows, and not at all (``lax.cond``) when
  neither row takes it; a ``scan`` over the edges keeps each PRG vector (``n`` words) in cache,
  which is ~3x faster per word on CPU than one ``[C, n]`` block of vmapped draws.
  """
  n = acc.shape[1]
  xs, edge_seed = _seeds(key, client_ids, edges, edge_keys)

  def step(acc, x):
    edge, seed = edge_seed(x)
    a, b = edge[0], edge[1]
    id_a, id_b = client_ids[a], client_ids[b]
    take_a, take_b = rows[a] & partners[b], rows[b] & partners[a]

    def add(acc):
      p = _prg(seed, n, ring_bits)
      signed = jnp.where(id_a < id_b, p, jnp.uint32(0) - p)      # s_ab p (mod 2^32)
      acc = acc.at[a].add(jnp.where(take_a, signed, jnp.uint32(0)))
      return acc.at[b].add(jnp.where(take_b, jnp.uint32(0) - signed, jnp.uint32(0)))

    return jax.lax.cond(take_a | take_b, add, lambda acc: acc, acc), None

  acc, _ = jax.lax.scan(step, acc, xs)
  return acc


def pairwise_masks(key: jax.Array, client_ids: jax.Array, partners: jax.Array, n: int,
                   ring_bits: int = 32, edges: jax.Array | None = None,
                   edge_keys: jax.Array | None = None) -> jax.Array:
  """Row a: ``sum_{b neighbour of a, partners[b]} s_ab PRG(seed(a, b))  mod 2**ring_bits``,
  ``uint32 [C, n]``.

  Args:
    key: the round's key.
    client_ids: ``[C]`` int32 distinct client ids.
    partners: ``[C]`` bool, which clients b are summed over.
    n: vector length.
    edges: ``int32 [E, 2]`` slot pairs that share a mask (:func:`mask_graph`); default: every
      pair (the complete graph).
    edge_keys: optional ``[E]`` PRNG keys, the pairs' agreed seeds (:func:`x25519_edge_keys`);
      default: derived from ``key`` and the two ids.

  ``O(E n)`` work (``E = C (C-1)/2`` for the complete graph), ``O(C n)`` memory.
  """
  client_ids = client_ids.astype(jnp.int32)
  c = client_ids.shape[0]
  acc = _add_pair_masks(key, client_ids, jnp.zeros((c, n), jnp.uint32), _edges(edges, c),
                        jnp.ones(c, bool), partners.astype(bool), ring_bits, edge_keys)
  return acc & _ring_mask(ring_bits)


def self_masks(key: jax.Array, client_ids: jax.Array, n: int, ring_bits: int = 32) -> jax.Array:
  """``[C, n]``: each client's self mask ``PRG(self_seed(a))`` (the double-masking term)."""
  return jax.lax.map(lambda c: _prg(_self_seed(key, c), n, ring_bits),
                     client_ids.astype(jnp.int32))


def _fold_self_masks(key, client_ids, take, n, ring_bits):
  """``sum_{a: take[a]} PRG(self_seed(a))``, ``uint32 [n]`` (skipping the others)."""
  def step(acc, x):
    c, t = x
    return jax.lax.cond(t, lambda acc: acc + _prg(_self_seed(key, c), n, ring_bits),
                        lambda acc: acc, acc), None
  acc, _ = jax.lax.scan(step, jnp.zeros((n,), jnp.uint32), (client_ids, take))
  return acc


def mask_updates(key: jax.Array, client_ids: jax.Array, encoded: jax.Array, alive: jax.Array,
                 ring_bits: int = 32, self_mask: bool = True,
                 edges: jax.Array | None = None,
                 edge_keys: jax.Array | None = None) -> jax.Array:
  """The server's view: each client's masked update, ``uint32 [C, n]``.

  Every client masks with every neighbour of the mask graph (the pairwise keys were agreed
  before anyone dropped out), so a single ``masked[a]`` is uniform over the ring whatever
  ``encoded[a]`` is (as soon as it has a neighbour, or ``self_mask``).

  Args:
    key: the masks' root secret (seeds derive from it and the ids; :func:`secret_key`).
    client_ids: ``[C]`` int32 distinct client ids.
    encoded: ``uint32 [C, n]`` ring elements (:func:`encode`).
    alive: ``[C]`` bool; rows of dropped clients (never received) are 0.
    ring_bits: the ring is ``Z_{2**ring_bits}``.
    self_mask: add each client's self mask (Bonawitz's double masking).
    edges: ``int32 [E, 2]`` slot pairs sharing a mask (:func:`mask_graph`); default: all pairs.
    edge_keys: optional ``[E]`` agreed pair keys (:func:`x25519_edge_keys`); default: derived
      from ``key`` and the ids.

  ``O(E n)`` work: each pair's mask is generated once (pairs of two dropped clients not at all).
  """
  client_ids = client_ids.astype(jnp.int32)
  alive = alive.astype(bool)
  c, n = encoded.shape
  masked = _add_pair_masks(key, client_ids, encoded.astype(jnp.uint32), _edges(edges, c), alive,
                           jnp.ones(c, bool), ring_bits, edge_keys)
  if self_mask:
    masked = masked + self_masks(key, client_ids, n, ring_bits)
  masked = masked & _ring_mask(ring_bits)
  return jnp.where(alive[:, None], masked, jnp.uint32(0))


def recovered_masks(key: jax.Array, client_ids: jax.Array, alive: jax.Array, n: int,
                    ring_bits: int = 32, self_mask: bool = True,
                    edges: jax.Array | None = None,
                    edge_keys: jax.Array | None = None) -> jax.Array:
  """What the server subtracts from the sum of the alive clients' masked rows, ``uint32 [n]``:
  ``sum_{a alive} (sum_{d dropped neighbour of a} s_ad PRG(seed(a, d)) + PRG(self_seed(a)))``
  (the recovery step: it regenerates only the masks of alive-dropped edges and the alive
  clients' self masks, from the recovered seeds)."""
  client_ids = client_ids.astype(jnp.int32)
  alive = alive.astype(bool)
  xs, edge_seed = _seeds(key, client_ids, _edges(edges, client_ids.shape[0]), edge_keys)

  def step(acc, x):
    edge, seed = edge_seed(x)
    a, b = edge[0], edge[1]
    id_a, id_b = client_ids[a], client_ids[b]

    def add(acc):
      p = _prg(seed, n, ring_bits)
      # Row a's term s_ab p if a is alive (b dropped), else row b's term -s_ab p.
      return acc + jnp.where((id_a < id_b) == alive[a], p, jnp.uint32(0) - p)

    return jax.lax.cond(alive[a] != alive[b], add, lambda acc: acc, acc), None

  acc, _ = jax.lax.scan(step, jnp.zeros((n,), jnp.uint32), xs)
  if self_mask:
    acc = acc + _fold_self_masks(key, client_ids, alive, n, ring_bits)
  return acc & _ring_mask(ring_bits)


def unmask_sum(key: jax.Array, client_ids: jax.Array, masked: jax.Array, alive: jax.Array,
               ring_bits: int = 32, self_mask: bool = True,
               edges: jax.Array | None = None,
               edge_keys: jax.Array | None = None) -> jax.Array:
  """The revealed sum ``sum_{a alive} encoded[a] mod 2**ring_bits``, ``uint32 [n]``.

  Sums the alive clients' masked rows (the masks of alive-alive edges cancel), then removes the
  masks they share with dropped neighbours and their self masks, which the server recomputes
  from the recovered seeds (:func:`recovered_masks`). ``edges``, ``edge_keys`` as in
  :func:`mask_updates`.
  """
  alive = alive.astype(bool)
  n = masked.shape[1]
  total = jnp.sum(jnp.where(alive[:, None], masked, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
  total = total - recovered_masks(key, client_ids, alive, n, ring_bits, self_mask, edges,
                                  edge_keys)
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
  neighbours: int = 0        # pairwise masks (key agreements) per client: C - 1, or SecAgg+'s k
  prg_words_per_client: int = 0   # mask words a client generates: (neighbours + self mask) * n


def cost(num_params: int, cohort_size: int, bits: int, clip: float,
         ring_bits: int | None = None, neighbours: int | None = None,
         self_mask: bool = True) -> Cost:
  """The wire cost and worst-case rounding error of secure aggregation (the masked vector only;
  the key agreement and secret sharing add ``O(neighbours)`` keys and shares per client on top),
  and the masking work: ``neighbours`` pairwise masks per client (default ``C - 1``, the
  complete graph; see :func:`mask_degree` for SecAgg+'s sparse graph)."""
  need = bits_needed(bits, cohort_size)
  ring = min(need, 32) if ring_bits is None else ring_bits
  check_bits(bits, ring)
  check_ring(bits, ring, cohort_size)
  k = int(cohort_size) - 1 if neighbours is None else min(int(neighbours), int(cohort_size) - 1)
  return Cost(int(bits), ring, ring - int(bits), need, math.ceil(ring * num_params / 8),
              4 * int(num_params), float(clip) / (2.0 * (2 ** (bits - 1) - 1)), k,
              (k + int(bool(self_mask))) * int(num_params))


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


# ------------------------------------------------------------------------ key agreement
KEY_AGREEMENTS = ("simulated", "x25519")


def _x25519():
  """The ``cryptography`` package's X25519, or ``ImportError`` saying how to install it."""
  try:
    from cryptography.hazmat.primitives.asymmetric import x25519   # noqa: PLC0415 - optional
  except ImportError as e:
    raise ImportError("secure_sum(key_agreement='x25519') needs the cryptography package: "
                      "pip install 'fedjax_sim[secagg]' (or pip install cryptography)") from e
  return x25519


class KeyAgreementCost(NamedTuple):
  """Host cost of one round's X25519 key agreement (all clients, one after another)."""
  num_clients: int      # key pairs generated
  exchanges: int        # Diffie-Hellman computations: 2 per edge (both ends)
  seconds: float        # key generation + exchanges + hashing, wall-clock


def x25519_seeds(num_clients: int, edges: np.ndarray, seed_bytes: int
                 ) -> tuple[np.ndarray, KeyAgreementCost]:
  """Real pairwise key agreement on the host: every client slot generates a fresh X25519 key
  pair; for each edge ``(a, b)`` client a computes ``DH(sk_a, pk_b)`` and client b
  ``DH(sk_b, pk_a)`` (equal, checked), hashed with SHA-256 (domain-separated) into the edge's
  ``seed_bytes``-byte PRG seed. Returns ``(uint8 [E, seed_bytes], cost)``."""
  x25519 = _x25519()
  edges = np.asarray(edges)
  t0 = time.perf_counter()
  secret = [x25519.X25519PrivateKey.generate() for _ in range(int(num_clients))]
  public = [sk.public_key() for sk in secret]
  out = np.empty((edges.shape[0], seed_bytes), np.uint8)
  for e, (a, b) in enumerate(edges.tolist()):
    shared = secret[a].exchange(public[b])
    if shared != secret[b].exchange(public[a]):
      raise RuntimeError("X25519: the two ends of a pair agreed on different secrets")
    out[e] = np.frombuffer(hashlib.sha256(b"fedjax_sim secagg pair seed" + shared).digest(),
                           np.uint8)[:seed_bytes]
  return out, KeyAgreementCost(int(num_clients), 2 * int(edges.shape[0]),
                               time.perf_counter() - t0)


def x25519_edge_keys(edges: jax.Array, num_clients: int,
                     on_cost: Callable[[KeyAgreementCost], None] | None = None) -> jax.Array:
  """``[E]`` PRNG keys (the default implementation's) whose key data are the X25519-agreed
  seeds of the edges ``int32 [E, 2]`` (:func:`x25519_seeds`, on the host through an
  ``io_callback``: fresh key pairs every call). ``on_cost`` receives the round's cost."""
  shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  nbytes = int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize

  def host(e):
    seeds, c = x25519_seeds(num_clients, e, nbytes)
    if on_cost is not None:
      on_cost(c)
    return seeds.view(shape.dtype).reshape((e.shape[0],) + tuple(shape.shape))

  data = io_callback(host, jax.ShapeDtypeStruct((edges.shape[0],) + tuple(shape.shape),
                                                shape.dtype), edges, ordered=False)
  return jax.random.wrap_key_data(data)


def secure_sum(clip: float, bits: int = 16, ring_bits: int = 32, weight_bound: float | None = None,
               self_mask: bool = True,
               on_view: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
               graph: str = "complete", neighbours: int | None = None,
               adversarial_rate: float = 0.1, dropout_rate: float = 0.1,
               key_agreement: str = "simulated") -> Aggregator:
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

  **Mask graph.** ``graph="complete"`` (default) is SecAgg: each of the round's ``C`` client
  slots masks with the ``C - 1`` others. ``graph="harary"`` is SecAgg+ (Bell et al. 2020, see
  :func:`harary_degree`): each slot masks only with its ``k`` neighbours in a Harary graph
  ``H_{k,C}`` relabelled by a fresh random permutation every round (:func:`mask_graph`), ``k =
  neighbours`` or, by default, the smallest degree that :func:`harary_degree` finds secure for
  ``adversarial_rate`` and ``dropout_rate`` (``O(log C)``: 22 for C = 100, 48 for C = 1000 at
  the defaults); if that is ``C - 1`` or more the graph is complete. The sum is exact either way
  (the masks of every edge cancel, the drop-outs' edges are recovered).

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
    graph: ``"complete"`` (SecAgg, every pair of clients shares a mask) or ``"harary"``
      (SecAgg+: each client masks with ``neighbours`` clients of a random Harary graph).
    neighbours: the Harary graph's degree k (even, >= 2); default: :func:`harary_degree` of
      the round's client slots. Only with ``graph="harary"``.
    adversarial_rate: for the default degree: the fraction of clients that may collude with
      the server (security 2^-40).
    dropout_rate: for the default degree: the fraction of clients expected to drop out (the
      server recovers every drop-out here whatever the rate; see the module docstring).
    key_agreement: ``"simulated"`` (pair seeds derived from the round's OS-entropy secret and
      the two ids) or ``"x25519"``: real Diffie-Hellman key agreement per pair (fresh X25519
      key pairs every round, ``cryptography`` package: the ``secagg`` extra), on the host; its
      cost (:class:`KeyAgreementCost`) is appended to ``agg.finalize.key_agreement_costs``.

  Memory ``O(C n)`` (the buffer), work ``O(C k n)`` (``k`` masks per client: ``C - 1`` for
  the complete graph).
  """
  check_bits(bits, ring_bits)
  clip = float(clip)
  if not clip > 0 or not math.isfinite(clip):
    raise ValueError(f"secure_sum needs a finite clip > 0, got {clip!r}")
  if weight_bound is not None and not float(weight_bound) > 0:
    raise ValueError(f"secure_sum weight_bound must be > 0, got {weight_bound!r}")
  if graph not in GRAPHS:
    raise ValueError(f"secure_sum graph must be one of {GRAPHS}, got {graph!r}")
  if neighbours is not None:
    if graph != "harary":
      raise ValueError(f"secure_sum neighbours={neighbours!r} needs graph='harary' (the "
                       "complete graph has C - 1)")
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or \
        neighbours < 2 or neighbours % 2:
      raise ValueError(f"secure_sum neighbours must be an even integer >= 2, got {neighbours!r}")
  harary_degree(2, adversarial_rate, dropout_rate)   # checks the rates
  if key_agreement not in KEY_AGREEMENTS:
    raise ValueError(f"secure_sum key_agreement must be one of {KEY_AGREEMENTS}, got "
                     f"{key_agreement!r}")
  if key_agreement == "x25519":
    _x25519()   # ImportError now, not inside the compiled round
  key_agreement_costs: list[KeyAgreementCost] = []

  def degree(num_clients):
    return mask_degree(num_clients, graph, neighbours, adversarial_rate, dropout_rate)

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
    edges = mask_graph(key, cap, degree(cap))
    edge_keys = (x25519_edge_keys(edges, cap, key_agreement_costs.append)
                 if key_agreement == "x25519" else None)
    masked = mask_updates(key, ids, enc, valid, ring_bits, self_mask, edges, edge_keys)
    if on_view is not None:
      jax.debug.callback(lambda *view: on_view(*(np.asarray(v) for v in view)), masked, ids,
                         valid)
    total = unmask_sum(key, ids, masked, valid, ring_bits, self_mask, edges, edge_keys)
    total_w = jnp.sum(w)
    mean = decode(total, clip, bits, ring_bits) * (w_ref / jnp.maximum(total_w, 1e-30))
    template = jax.tree.map(lambda x: x[0], state.updates)
    return unflatten(mean, template), total_w

  finalize.degree = degree   # pairwise masks per client for C slots (benchmarks, cost records)
  finalize.key_agreement_costs = key_agreement_costs   # one per round with "x25519"
  agg = buffered(lambda updates, valid: updates)   # reuse the buffer; finalize is our own
  return agg._replace(finalize=finalize, validate=validate)
