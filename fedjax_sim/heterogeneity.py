"""Heterogeneous clients as masks: unequal local work, stragglers, drop-outs, availability.

Systems heterogeneity never becomes a Python branch: every effect is a mask on the
``[C, S, B]`` example mask of :func:`fedjax_sim.data.federated.batch_indices` (a masked step
leaves the client's parameters and optimizer state unchanged) or a zero aggregation weight:

* per-client **batch size** ``b_i <= B``: only the first ``b_i`` slots of each batch are used
  (masking within the maximum batch; in epoch mode a client then sees ``b_i / B`` of its data per
  epoch);
* per-client **local work**: at most ``local_steps[i]`` non-empty steps, or ``local_epochs[i]``
  of the algorithm's ``E`` epochs (epoch mode);
* **stragglers**: each round a client is a straggler with probability ``straggler_fraction``
  and stops part-way. As in the FedProx paper's simulation (Li et al. 2020, section 5.2), in
  epoch mode with ``E > 1`` it runs ``e ~ Uniform{1, ..., E-1}`` epochs' worth of steps;
  otherwise (``E = 1`` or step mode) ``Uniform{1, ..., K-1}`` of its K steps. Whether its partial
  update counts is the algorithm's choice (``Algorithm.drop_stragglers``: FedAvg in the paper
  drops them, FedProx keeps them);
* **drop-outs**: with probability ``dropout_fraction`` a client trains but its update never
  arrives (weight 0, client state not written back);
* per-client **learning rate**: ``learning_rate_scale[i]`` multiplies the client optimizer's
  updates;
* **availability**: client i is online in round t with probability ``availability[t % T, i]``
  (``[P]`` or ``[T, P]``, e.g. a diurnal pattern); cohorts are drawn among online clients only,
  and shrink (masked) when fewer than C are online.

All draws come from the round key folded with the client id, so they do not depend on chunking or
devices, and the sequential reference (:mod:`fedjax_sim.testing`) sees the same ones.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.data.federated import LocalWork
from fedjax_sim.registry import Registry

# Descriptions of heterogeneous clients by name (the command line's [heterogeneity] table; its
# options are the Heterogeneity fields, per-client arrays given as lists).
REGISTRY = Registry("heterogeneity")


@REGISTRY.register("default")
@dataclasses.dataclass(frozen=True, eq=False)
class Heterogeneity:
  """Static description of how clients differ in compute and availability.

  Attributes:
    straggler_fraction: probability in [0, 1] that a cohort client is a straggler this round.
    dropout_fraction: probability in [0, 1) that a client's update never arrives.
    local_steps: optional ``[P]`` cap on each client's non-empty local steps (>= 1).
    local_epochs: optional ``[P]`` epochs per client (1..E; needs the algorithm in epoch mode).
    learning_rate_scale: optional ``[P]`` positive multiplier of each client's learning rate.
    batch_size: optional ``[P]`` per-client batch sizes in ``1..B``.
    availability: optional ``[P]`` or ``[T, P]`` probabilities in [0, 1] of being online.
  """
  straggler_fraction: float = 0.0
  dropout_fraction: float = 0.0
  local_steps: np.ndarray | None = None
  local_epochs: np.ndarray | None = None
  learning_rate_scale: np.ndarray | None = None
  batch_size: np.ndarray | None = None
  availability: np.ndarray | None = None

  def validate(self, population: int, work: LocalWork):
    """Raises ``ValueError`` naming the field for out-of-range values or wrong lengths."""
    if not 0.0 <= self.straggler_fraction <= 1.0:
      raise ValueError(f"straggler_fraction must lie in [0, 1], got {self.straggler_fraction!r}")
    if not 0.0 <= self.dropout_fraction < 1.0:
      raise ValueError(f"dropout_fraction must lie in [0, 1), got {self.dropout_fraction!r}")
    for name in ("local_steps", "local_epochs", "learning_rate_scale", "batch_size"):
      v = getattr(self, name)
      if v is None:
        continue
      v = np.asarray(v)
      if v.shape != (population,):
        raise ValueError(f"heterogeneity.{name} has shape {v.shape}, expected ({population},): "
                         "one value per client of the population")
      if not np.all(np.isfinite(v)) or np.any(v <= 0):
        bad = int(np.flatnonzero(~np.isfinite(v) | (v <= 0))[0])
        raise ValueError(f"heterogeneity.{name}[{bad}] = {v[bad]}; values must be > 0")
    if self.local_epochs is not None:
      if work.local_epochs is None:
        raise ValueError("heterogeneity.local_epochs needs the algorithm in epoch mode "
                         "(local_epochs=E); use heterogeneity.local_steps with local_steps")
      if np.max(self.local_epochs) > work.local_epochs:
        raise ValueError(f"heterogeneity.local_epochs has {np.max(self.local_epochs)} > the "
                         f"algorithm's {work.local_epochs} local epochs (the maximum)")
    if self.batch_size is not None and np.max(self.batch_size) > work.batch_size:
      raise ValueError(f"heterogeneity.batch_size has {np.max(self.batch_size)} > the algorithm's "
                       f"batch size {work.batch_size} (the maximum batch)")
    if self.availability is not None:
      a = np.asarray(self.availability)
      if a.ndim not in (1, 2) or a.shape[-1] != population:
        raise ValueError(f"heterogeneity.availability has shape {a.shape}, expected "
                         f"({population},) or (T, {population})")
      if not np.all((a >= 0) & (a <= 1)):
        raise ValueError("heterogeneity.availability must hold probabilities in [0, 1]")


class HeterogeneityArrays(NamedTuple):
  """The per-client arrays of a :class:`Heterogeneity` on the device (``None`` where unused).

  ``step_cap [P]`` int32 (from local_steps / local_epochs), ``lr_scale [P]``, ``batch_cap [P]``
  int32, ``availability [T, P]``.
  """
  step_cap: jax.Array | None = None
  lr_scale: jax.Array | None = None
  batch_cap: jax.Array | None = None
  availability: jax.Array | None = None


def to_device(het: Heterogeneity, sizes: np.ndarray, work: LocalWork) -> HeterogeneityArrays:
  """Per-client arrays for the round; ``sizes [P]`` are the clients' example counts."""
  cap = None
  if het.local_steps is not None:
    cap = np.asarray(het.local_steps, np.int64)
  if het.local_epochs is not None:
    b = np.asarray(het.batch_size) if het.batch_size is not None else work.batch_size
    per_epoch = np.maximum(1, np.ceil(np.asarray(sizes) / b).astype(np.int64))
    # Steps are laid out pass by pass, each pass padded to the largest client's; capping the
    # number of non-empty steps at e_i passes' worth stops the client after e_i epochs.
    ecap = np.asarray(het.local_epochs, np.int64) * per_epoch
    cap = ecap if cap is None else np.minimum(cap, ecap)
  avail = None
  if het.availability is not None:
    avail = jnp.asarray(np.atleast_2d(np.asarray(het.availability, np.float32)))
  return HeterogeneityArrays(
      None if cap is None else jnp.asarray(cap, jnp.int32),
      None if het.learning_rate_scale is None else jnp.asarray(het.learning_rate_scale,
                                                               jnp.float32),
      None if het.batch_size is None else jnp.asarray(het.batch_size, jnp.int32),
      avail)


class ClientConditions(NamedTuple):
  """This round's conditions for a chunk of K clients (all ``[K]``)."""
  straggler: jax.Array
  dropped: jax.Array
  lr_scale: jax.Array | None


def _straggler_budget(key, total, work: LocalWork):
  """Steps a straggler completes out of its ``total`` non-empty steps (>= 1 when total >= 1)."""
  if work.local_epochs is not None and work.local_epochs > 1:
    e = jax.random.randint(key, (), 1, work.local_epochs)
    return (total * e) // work.local_epochs
  u = jax.random.uniform(key)
  return jnp.clip(jnp.floor(u * (total - 1)).astype(jnp.int32) + 1, 1, jnp.maximum(total - 1, 1))


def apply(het: Heterogeneity, arrays: HeterogeneityArrays, key: jax.Array, client_ids: jax.Array,
          mask: jax.Array, work: LocalWork):
  """Masks a chunk's local work. ``mask [K, S, B]`` -> ``(mask [K, S, B], ClientConditions)``.

  ``key`` is the round's heterogeneity key; client i draws from ``fold_in(key, client_ids[i])``.
  """
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(client_ids)

  def one(k, cid, m):
    k_strag, k_budget, k_drop = jax.random.split(k, 3)
    if arrays.batch_cap is not None:
      m = m & (jnp.arange(m.shape[1]) < arrays.batch_cap[cid])[None, :]
    nonempty = jnp.any(m, axis=1)
    done = jnp.cumsum(nonempty)              # non-empty steps up to and including each step
    total = done[-1]
    budget = total if arrays.step_cap is None else jnp.minimum(total, arrays.step_cap[cid])
    straggler = jax.random.uniform(k_strag) < het.straggler_fraction
    straggler = straggler & (budget > 1)     # a one-step client cannot stop part-way
    budget = jnp.where(straggler, _straggler_budget(k_budget, budget, work), budget)
    m = m & (done <= budget)[:, None]
    dropped = jax.random.uniform(k_drop) < het.dropout_fraction
    return m, straggler, dropped

  mask, straggler, dropped = jax.vmap(one)(keys, client_ids, mask)
  lr = None if arrays.lr_scale is None else arrays.lr_scale[client_ids]
  return mask, ClientConditions(straggler, dropped, lr)


def online(arrays: HeterogeneityArrays, key: jax.Array, round_index: jax.Array,
           population: int) -> jax.Array | None:
  """``[P]`` bool: which clients are online in round ``round_index`` (None: all of them)."""
  if arrays.availability is None:
    return None
  a = arrays.availability[round_index % arrays.availability.shape[0]]
  return jax.random.uniform(key, (population,)) < a
