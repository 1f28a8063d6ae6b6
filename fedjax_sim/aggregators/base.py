"""The aggregator interface and the weighted mean."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim import tree

PyTree = Any


class Aggregator(NamedTuple):
  """A streaming reduction over the client axis.

  Attributes:
    init: ``(params_template, num_clients) -> state`` (called inside the compiled round, once per
      device before its scan over chunks). ``num_clients`` (a static Python int) is how many
      client slots (valid or padding) this state will be fed through ``accumulate``: buffering
      aggregators (:mod:`fedjax_sim.aggregators.robust`) size their buffer with it; streaming ones
      ignore it.
    accumulate: ``(state, deltas [K, ...], weights [K]) -> state`` for one chunk of K clients.
      Weights are already 0 for padding and non-finite clients (whose deltas are zeroed).
    finalize: ``(state, key, client_ids) -> (update [...], total_weight scalar)``. ``key`` is
      fresh every round (:attr:`fedjax_sim.engine.RoundKeys.aggregate`) and ``client_ids [cap]``
      are the population ids of the combined state's client slots, in slot order (padding slots
      carry weight 0 and ids outside the population); most aggregators ignore both, secure
      aggregation derives its pairwise masks from them.
    combine: ``states stacked on a leading device axis [D, ...] -> state``: merges the partial
      states of D devices that each folded a share of the cohort.
    validate: ``cohort_size -> None``, called by :func:`fedjax_sim.engine.make_round`
      (so at ``run`` start) to reject cohort sizes the aggregator cannot work with (e.g. Krum
      needs ``C > 2f + 2``) with a ``ValueError``.
  """
  init: Callable[[PyTree, int], Any]
  accumulate: Callable[[Any, PyTree, jax.Array], Any]
  finalize: Callable[[Any, jax.Array, jax.Array], tuple[PyTree, jax.Array]]
  combine: Callable[[Any], Any]
  validate: Callable[[int], None] = lambda cohort_size: None


class MeanState(NamedTuple):
  """``weighted_sum``: float32 (or wider) running sum of ``w_c d_c``; ``total_weight``: float32
  scalar; ``dtypes``: zero-size leaves carrying the update's own dtypes, to cast back to."""
  weighted_sum: PyTree
  total_weight: jax.Array
  dtypes: PyTree = None


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def mean() -> Aggregator:
  """Weighted mean ``sum_c w_c d_c / sum_c w_c`` as a running sum (memory of one update).

  The sum is accumulated in at least float32 whatever the parameters' dtype (bfloat16 / float16
  updates summed in their own precision lose digits and, for float16, overflow at 65504), and
  cast back to the parameters' dtype by ``finalize``. A sum that overflows even float32 comes
  out non-finite; the round then refuses it (:func:`fedjax_sim.server.step`).
  """

  def init(params, num_clients=None):
    del num_clients
    return MeanState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _acc_dtype(p.dtype)), params),
                     jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda p: jnp.zeros((0,), p.dtype), params))

  def accumulate(state, deltas, weights):
    wide = jax.tree.map(lambda d: d.astype(_acc_dtype(d.dtype)), deltas)
    s = jax.tree.map(jnp.add, state.weighted_sum, tree.weighted_sum(wide, weights))
    return MeanState(s, state.total_weight + jnp.sum(weights), state.dtypes)

  def finalize(state, key=None, client_ids=None):
    del key, client_ids
    denom = jnp.maximum(state.total_weight, 1e-30)
    return (jax.tree.map(lambda s, like: (s / denom.astype(s.dtype)).astype(like.dtype),
                         state.weighted_sum, state.dtypes), state.total_weight)

  def combine(states):
    return MeanState(jax.tree.map(lambda a: jnp.sum(a, axis=0), states.weighted_sum),
                     jnp.sum(states.total_weight, axis=0),
                     jax.tree.map(lambda a: a[0], states.dtypes))

  return Aggregator(init, accumulate, finalize, combine)
