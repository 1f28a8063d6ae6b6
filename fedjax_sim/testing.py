"""A plain sequential reference for the vectorized round, a test population, and assertion helpers.

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
from fedjax_sim import heterogeneity as het_mod
from fedjax_sim.algorithms.base import Algorithm, ServerContext
from fedjax_sim.client import Batch, ClientContext
from fedjax_sim.data.federated import FederatedData, batch_indices
from fedjax_sim.models.core import Model


@functools.lru_cache(maxsize=None)
def _jitted_program(algorithm: Algorithm, model: Model):
  program = algorithm.client(model, algorithm.client_optimizer)
  return jax.jit(program.init), jax.jit(program.step), jax.jit(program.final)


_client_rows = jax.jit(batch_indices, static_argnames=("work", "max_client_size"))


def _row(store, i):
  return jax.tree.map(lambda s: jnp.asarray(s[i]), store)


def _finite(t) -> bool:
  return all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in jax.tree.leaves(t)
             if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact))


def sequential_round(algorithm: Algorithm, model: Model, data: FederatedData,
                     state: server.ServerState, key: jax.Array, cohort_size: int,
                     weights: np.ndarray | None = None,
                     heterogeneity: het_mod.Heterogeneity | None = None,
                     cohort_sampling: str = "uniform"):
  """One federated round computed client by client, step by step, with the weighted mean.

  ``state`` comes from :func:`fedjax_sim.engine.init_state`. The algorithm's client program is
  run one client at a time and one jitted step per non-empty batch (no vmap, no chunks, no
  masks over clients), its update transform one client at a time, and the aggregate is a float64
  running weighted sum. Returns ``(new_state, metrics)`` with ``metrics`` holding
  ``train_loss``, ``num_nonfinite`` and ``num_counted``.
  """
  work = algorithm.work
  p_init, p_step, p_final = _jitted_program(algorithm, model)
  keys = engine.round_keys(key)
  het_arrays = None
  if heterogeneity is not None:
    het_arrays = het_mod.to_device(heterogeneity, data.sizes, work)
  sw = jnp.asarray(data.sizes, jnp.float32) if cohort_sampling == "size" else None
  on = None
  if het_arrays is not None and het_arrays.availability is not None:
    on = het_mod.online(het_arrays, keys.availability, state.round, data.num_clients)
  ids, valid = engine.sample_cohort(keys.sample, data.num_clients, cohort_size, on, sw)
  ids = np.asarray(ids)[np.asarray(valid)]
  w_all = data.sizes.astype(np.float32) if weights is None else np.asarray(weights, np.float32)
  if weights is None and algorithm.weighting == "uniform":
    w_all = np.ones(data.num_clients, np.float32)
  x_all, y_all = data.arrays["x"], data.arrays["y"]
  global_params = state.params
  stores = jax.tree.map(np.array, state.clients)
  acc = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), global_params)
  up_acc = None
  total_w, loss_sum, count, nonfinite, counted = 0.0, 0.0, 0.0, 0, 0
  for cid in ids:
    cid = int(cid)
    rows, mask = _client_rows(keys.batch, jnp.asarray([cid]), jnp.asarray([data.offsets[cid]]),
                              jnp.asarray([data.sizes[cid]]), work, data.max_client_size)
    straggler, dropped, lr_scale = False, False, 1.0
    if heterogeneity is not None:
      mask, cond = het_mod.apply(heterogeneity, het_arrays, keys.heterogeneity,
                                 jnp.asarray([cid], jnp.int32), mask, work)
      straggler, dropped = bool(cond.straggler[0]), bool(cond.dropped[0])
      lr_scale = 1.0 if cond.lr_scale is None else float(cond.lr_scale[0])
    if "client_lr_scale" in state.hparams:
      lr_scale *= float(state.hparams["client_lr_scale"])
    rows, mask = np.clip(np.asarray(rows[0]), 0, data.num_examples - 1), np.asarray(mask[0])
    ctx = ClientContext(jnp.asarray(cid, jnp.int32), global_params, _row(stores.algorithm, cid),
                        state.aux, state.hparams, jnp.asarray(lr_scale, jnp.float32),
                        jax.random.fold_in(keys.client, cid),
                        jnp.asarray(data.sizes[cid], jnp.int32))
    carry, t = p_init(ctx), 0
    for s in range(rows.shape[0]):
      if not mask[s].any():
        continue   # an empty step is a no-op by definition
      carry = p_step(carry, Batch(x_all[rows[s]], y_all[rows[s]], mask[s]), ctx,
                     jax.random.fold_in(ctx.key, t))
      t += 1
    res = p_final(carry, ctx)
    delta, new_tr = algorithm.update_transform.apply(
        res.delta, jax.random.fold_in(keys.transform, cid), jnp.asarray(cid, jnp.int32),
        _row(stores.transform, cid))
    delta = jax.tree.map(lambda d: np.asarray(d, np.float64), delta)
    c_loss, c_count = float(res.metrics["loss_sum"]), float(res.metrics["count"])
    finite = _finite(delta) and np.isfinite(c_loss) and _finite(res.upload)
    if not finite:
      nonfinite += 1
    loss_sum += c_loss if finite else 0.0
    count += c_count if finite else 0.0
    if not finite or dropped or (straggler and algorithm.drop_stragglers):
      continue
    counted += 1
    w = float(w_all[cid])
    acc = jax.tree.map(lambda a, d: a + w * d, acc, delta)
    up = jax.tree.map(lambda u: w * np.asarray(u, np.float64), res.upload)
    up_acc = up if up_acc is None else jax.tree.map(np.add, up_acc, up)
    total_w += w
    for store, new in ((stores.algorithm, res.state), (stores.transform, new_tr)):
      jax.tree.map(lambda s, n: s.__setitem__(cid, np.asarray(n)), store, new)
  params, opt_state, aux = global_params, state.opt_state, state.aux
  new_stores = stores
  if total_w > 0:
    update = jax.tree.map(lambda a, p: jnp.asarray(a / total_w, p.dtype), acc, global_params)
    upload = jax.tree.map(lambda u: jnp.asarray(u / total_w, jnp.float32), up_acc)
    sctx = ServerContext(global_params, state.aux, upload, jnp.asarray(counted, jnp.int32),
                         jnp.asarray(total_w, jnp.float32), cohort_size, data.num_clients,
                         state.hparams, keys.server)
    update, aux = algorithm.server_finish(sctx, update)
    updates, opt_state = algorithm.server_optimizer.update(update, state.opt_state, global_params)
    if "server_lr_scale" in state.hparams:
      updates = jax.tree.map(lambda u: u * state.hparams["server_lr_scale"], updates)
    params = optax.apply_updates(global_params, updates)
    if not (_finite(update) and _finite(params) and _finite(opt_state) and _finite(aux)):
      # as the engine: a non-finite aggregate or step leaves the whole state as it was
      params, opt_state, aux = global_params, state.opt_state, state.aux
      new_stores = state.clients
  new_state = state.replace(params=params, opt_state=opt_state, round=state.round + 1, aux=aux,
                            clients=jax.tree.map(jnp.asarray, new_stores))
  return new_state, {"train_loss": loss_sum / count if count > 0 else float("nan"),
                     "num_nonfinite": nonfinite,
                     "num_counted": counted}


def sequential_run(algorithm: Algorithm, model: Model, data: FederatedData, *, rounds: int,
                   cohort_size: int, seed: int = 0, init_params: Any = None,
                   weights: np.ndarray | None = None,
                   heterogeneity: het_mod.Heterogeneity | None = None,
                   hparams: dict | None = None, cohort_sampling: str = "uniform"):
  """``rounds`` sequential rounds with the same keys as :func:`fedjax_sim.run`. Returns the
  final ServerState and the list of per-round metrics."""
  key_init, key_rounds = jax.random.split(jax.random.key(seed))
  params = init_params if init_params is not None else model.init(key_init)
  state = engine.init_state(algorithm, params, data.num_clients, hparams)
  history = []
  for r in range(1, rounds + 1):
    state, m = sequential_round(algorithm, model, data, state, jax.random.fold_in(key_rounds, r),
                                cohort_size, weights, heterogeneity, cohort_sampling)
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


RAGGED_SIZES = (1, 3, 7, 20, 33, 50, 64, 99, 120, 150, 180, 200)


def ragged_clients(sizes=RAGGED_SIZES, dim: int = 8, num_classes: int = 4,
                   seed: int = 0) -> FederatedData:
  """A small learnable population with ragged clients, the one the test suite shares.

  Client ``i`` holds ``sizes[i]`` examples ``x ~ N(0, 1)`` of shape ``[dim]`` with labels
  ``argmax(x @ W)`` for one random ``W [dim, num_classes]``; deterministic in ``seed``. The
  default sizes 1..200 exercise partial last batches, single-example clients and several steps.
  """
  return FederatedData.from_clients(
      tiny_logistic_clients(sizes, dim, num_classes, seed, labels="linear"),
      num_classes=num_classes)


# --- tiny NumPy float64 references for multinomial logistic regression -------------------------
# Plain NumPy, sharing no code with the engine: what the NumPy references of the papers'
# equations in the tests are built from.

def tiny_logistic_clients(sizes, dim: int, num_classes: int,
                          seed: int | np.random.Generator = 0, *, labels: str = "random",
                          label_noise: float = 0.0, shift: float = 0.0) -> list[dict]:
  """Client data for a tiny multinomial logistic regression, as ``FederatedData.from_clients``
  takes it: client ``i`` is ``{"x": [sizes[i], dim] float32, "y": [sizes[i]] int32}``.

  Features are ``x ~ N(0, 1) + shift * i`` (``shift`` makes the clients heterogeneous). Labels
  are uniform over ``num_classes`` (``labels="random"``) or ``argmax(x @ W + label_noise * e)``
  for one ``W [dim, num_classes] ~ N(0, 1)`` drawn first and ``e ~ N(0, 1)`` per example
  (``labels="linear"``: learnable). Deterministic in ``seed``; a ``np.random.Generator`` is used
  (and advanced) as it is, so a caller can draw more from it afterwards.
  """
  if labels not in ("random", "linear"):
    raise ValueError(f"labels must be 'random' or 'linear', got {labels!r}")
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, num_classes)) if labels == "linear" else None
  clients = []
  for i, n in enumerate(sizes):
    x = rng.normal(size=(n, dim))
    if shift:
      x = x + shift * i
    x = x.astype(np.float32)
    if w is None:
      y = rng.integers(0, num_classes, n)
    else:
      z = x @ w
      if label_noise:
        z = z + label_noise * rng.normal(size=(n, num_classes))
      y = np.argmax(z, 1)
    clients.append({"x": x, "y": y.astype(np.int32)})
  return clients


def np_logistic_grad(params, x, y) -> tuple[np.ndarray, np.ndarray]:
  """Gradient of the mean softmax cross-entropy of ``x @ W + b`` over the batch, in float64.

  Args:
    params: ``(W [dim, k], b [k])``.
    x: ``[n, dim]`` features.
    y: ``[n]`` integer labels in ``[0, k)``.

  Returns:
    ``(dW [dim, k], db [k])``.
  """
  w, b = params
  x = np.asarray(x, np.float64)
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(p.shape[1])[y]) / len(y)
  return x.T @ d, d.sum(0)


def np_sgd_iterates(params, x, y, steps: int, lr: float, *, batch_size: int | None = None,
                    momentum: float = 0.0, correction=None) -> list[tuple]:
  """Local SGD on a tiny multinomial logistic regression in float64: the iterates
  ``[params_0, ..., params_steps]``, each ``(W [dim, k], b [k])``.

  Step t reads the rows ``(t B + j) mod n``, ``j < B``, of ``x [n, dim]``, ``y [n]`` (the stored
  order, no shuffle; ``B = batch_size``, default n: full-batch gradient descent), takes
  ``g_t = grad(params_t)`` (:func:`np_logistic_grad`) plus ``correction(params_t)`` if given (a
  function of the iterate returning a ``(W, b)``-shaped pair, e.g. a proximal term), and
  steps with heavy-ball momentum: ``u_t = momentum u_{t-1} + g_t``, ``params_{t+1} =
  params_t - lr u_t``.
  """
  x = np.asarray(x, np.float64)
  n = len(y)
  bsz = n if batch_size is None else batch_size
  p = tuple(np.asarray(a, np.float64) for a in params)
  u = tuple(np.zeros_like(a) for a in p)
  path = [p]
  for t in range(steps):
    idx = (t * bsz + np.arange(bsz)) % n
    g = np_logistic_grad(p, x[idx], y[idx])
    if correction is not None:
      g = tuple(gj + cj for gj, cj in zip(g, correction(p)))
    u = tuple(momentum * uj + gj for uj, gj in zip(u, g))
    p = tuple(pj - lr * uj for pj, uj in zip(p, u))
    path.append(p)
  return path


def np_local_sgd(params, x, y, steps: int, lr: float, **kwargs) -> tuple:
  """The last iterate ``(W [dim, k], b [k])`` of :func:`np_sgd_iterates` (same arguments)."""
  return np_sgd_iterates(params, x, y, steps, lr, **kwargs)[-1]
