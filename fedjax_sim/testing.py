"""A plain sequential reference for the vectorized round, and assertion helpers.

:func:`sequential_round` is the definition the vectorized engine must match: a Python loop over
the cohort's clients and over each client's local steps, one jitted step per batch (the way
FedJAX's default backend works), a running weighted sum, then the server optimizer. It shares
with the engine only what defines the experiment (cohort sampling and per-client shuffles from
the round key, the model's loss), never the vmap/scan/chunk/mask machinery under test. It is also
the sequential baseline the benchmarks time. It is never on the hot path.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import engine, server
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.data.federated import FederatedData, batch_indices
from fedjax_sim.models.core import Model


@functools.lru_cache(maxsize=None)
def _make_step(model: Model, client_optimizer, regularizer):
  def objective(params, global_params, x, y, mask):
    loss, aux = model.batch_loss(params, x, y, mask)
    if regularizer is not None:
      loss = loss + regularizer(params, global_params)
    return loss, aux

  @jax.jit
  def step(params, opt_state, global_params, x, y, mask):
    (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, global_params, x, y, mask)
    updates, opt_state = client_optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  return step


_client_rows = jax.jit(batch_indices, static_argnames=("work", "max_client_size"))


def sequential_round(algorithm: Algorithm, model: Model, data: FederatedData,
                     state: server.ServerState, key: jax.Array, cohort_size: int,
                     weights: np.ndarray | None = None):
  """One federated round computed client by client, step by step.

  Returns ``(new_state, metrics)`` with ``metrics`` holding ``train_loss`` and ``num_nonfinite``.
  """
  work = algorithm.work
  step = _make_step(model, algorithm.client_optimizer, algorithm.regularizer)
  k_sample, k_batch, k_transform = engine.round_keys(key)
  ids = np.asarray(engine.sample_cohort(k_sample, data.num_clients, cohort_size))
  w_all = data.sizes.astype(np.float32) if weights is None else np.asarray(weights, np.float32)
  if weights is None and algorithm.weighting == "uniform":
    w_all = np.ones(data.num_clients, np.float32)
  x_all, y_all = data.arrays["x"], data.arrays["y"]
  global_params = state.params
  acc = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), global_params)
  total_w, loss_sum, count, nonfinite = 0.0, 0.0, 0.0, 0
  for cid in ids:
    rows, mask = _client_rows(k_batch, jnp.asarray([cid]), jnp.asarray([data.offsets[cid]]),
                              jnp.asarray([data.sizes[cid]]), work, data.max_client_size)
    rows, mask = np.clip(np.asarray(rows[0]), 0, data.num_examples - 1), np.asarray(mask[0])
    params, opt_state = global_params, algorithm.client_optimizer.init(global_params)
    c_loss, c_count = 0.0, 0.0
    for s in range(rows.shape[0]):
      if not mask[s].any():
        continue   # an empty step is a no-op by definition
      params, opt_state, (l, _, n) = step(params, opt_state, global_params, x_all[rows[s]],
                                          y_all[rows[s]], mask[s])
      c_loss += float(l)
      c_count += float(n)
    delta = jax.tree.map(lambda g, p: g - p, global_params, params)
    if algorithm.update_transform is not None:
      delta = algorithm.update_transform.apply(
          delta, jax.random.fold_in(k_transform, int(cid)), jnp.asarray(cid, jnp.int32))
    delta = jax.tree.map(lambda d: np.asarray(d, np.float64), delta)
    if not (all(np.all(np.isfinite(d)) for d in jax.tree.leaves(delta)) and np.isfinite(c_loss)):
      nonfinite += 1
      continue
    w = float(w_all[cid])
    acc = jax.tree.map(lambda a, d: a + w * d, acc, delta)
    total_w += w
    loss_sum += c_loss
    count += c_count
  if total_w > 0:
    avg = jax.tree.map(lambda a, p: jnp.asarray(a / total_w, p.dtype), acc, global_params)
    updates, opt_state = algorithm.server_optimizer.update(avg, state.opt_state, global_params)
    new_state = server.ServerState(optax.apply_updates(global_params, updates), opt_state,
                                   state.round + 1)
  else:
    new_state = server.ServerState(global_params, state.opt_state, state.round + 1)
  return new_state, {"train_loss": loss_sum / max(count, 1.0), "num_nonfinite": nonfinite}


def sequential_run(algorithm: Algorithm, model: Model, data: FederatedData, *, rounds: int,
                   cohort_size: int, seed: int = 0, init_params: Any = None,
                   weights: np.ndarray | None = None):
  """``rounds`` sequential rounds with the same keys as :func:`fedjax_sim.run`. Returns the
  final ServerState and the list of per-round metrics."""
  key_init, key_rounds = jax.random.split(jax.random.key(seed))
  params = init_params if init_params is not None else model.init(key_init)
  state = server.init(params, algorithm.server_optimizer)
  history = []
  for r in range(1, rounds + 1):
    state, m = sequential_round(algorithm, model, data, state, jax.random.fold_in(key_rounds, r),
                                cohort_size, weights)
    history.append(m)
  return state, history


def assert_trees_close(a, b, atol: float = 1e-5, rtol: float = 0.0):
  """Raises AssertionError with the worst leaf if ``|a - b| > atol + rtol |b|`` anywhere."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), "tree structures differ"
  worst = 0.0
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, f"shapes differ: {x.shape} vs {y.shape}"
    err = np.max(np.abs(x - y) - rtol * np.abs(y)) if x.size else 0.0
    worst = max(worst, float(err))
  assert worst <= atol, f"trees differ by {worst:.3g} > atol {atol:g}"
