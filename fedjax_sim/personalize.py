"""Personalization after federated training: every client fine-tunes the global model locally.

Each client starts from the global params, takes ``steps`` optimizer steps on batches of its own
training data, and is evaluated on its own held-out data before and after. All clients run as
one compiled program: a ``lax.scan`` over chunks of ``chunk_size`` clients, ``vmap`` over the
clients of a chunk, ``lax.scan`` over each client's local steps (the engine's layout), so memory
follows the chunk, not the population::

  clients [P] ──► chunks [P/K, K] ──scan──► per chunk: train rows [K,S,B], test rows [K,E,Bt]
                                                       vmap_K(eval -> scan_S(step) -> eval)

Batching uses :func:`fedjax_sim.data.federated.batch_indices` with client ``p`` drawing from
``fold_in(key, p)``, so each client's result does not depend on the chunk size.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import evaluation, tree
from fedjax_sim.data.federated import FederatedData, LocalWork, batch_indices
from fedjax_sim.models.core import Model
from fedjax_sim.transfer.unfreeze import param_paths


def summarize(accuracy: np.ndarray, count: np.ndarray, client_ids: np.ndarray,
              worst: int = 5) -> dict[str, Any]:
  """The fairness summary of :func:`fedjax_sim.evaluation.evaluate_clients` for ``[P]``
  per-client accuracies and example counts."""
  acc = np.asarray(accuracy, np.float64)
  cnt = np.asarray(count, np.float64)
  order = np.argsort(acc, kind="stable")[:worst]
  return {
      "accuracy_weighted": float(np.sum(acc * cnt) / max(np.sum(cnt), 1.0)),
      "accuracy_mean": float(acc.mean()),
      "accuracy_p10": float(np.percentile(acc, 10)),
      "accuracy_p50": float(np.percentile(acc, 50)),
      "accuracy_p90": float(np.percentile(acc, 90)),
      "worst_clients": np.asarray(client_ids)[order].tolist(),
      "worst_accuracy": acc[order].tolist(),
  }


def trainable_optimizer(optimizer: optax.GradientTransformation, params: Any,
                        trainable: Callable[[str], bool] | None):
  """``optimizer`` on the leaves whose ``/``-joined path satisfies ``trainable``, zero updates
  on the others (e.g. fine-tune only ``params["head"]``: ``lambda p: p.startswith("head/")``)."""
  if trainable is None:
    return optimizer
  paths = param_paths(params)
  if not any(trainable(p) for p in paths):
    raise ValueError(f"the trainable predicate matches none of the params' paths "
                     f"(some: {paths[:8]})")
  labels = jax.tree.unflatten(jax.tree.structure(params),
                              ["train" if trainable(p) else "freeze" for p in paths])
  return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def make_personalize(model: Model, optimizer: optax.GradientTransformation, *, steps: int,
                     batch_size: int, max_train_size: int, max_test_size: int,
                     eval_batch_size: int = 256, chunk_size: int = 8,
                     return_params: bool = False):
  """Builds the jitted ``f(params, train_arrays, test_arrays, key) -> dict of [P] arrays``.

  ``train_arrays`` / ``test_arrays`` are ``(x [N, ...], y [N], offsets [P], sizes [P])``. The
  result holds ``loss_before``, ``correct_before``, ``loss_after``, ``correct_after`` (sums over
  the client's test examples), ``count`` (its test examples) and, with ``return_params``,
  ``params`` (the personalized params stacked ``[P, ...]``).
  """
  work = LocalWork(batch_size, local_epochs=None, local_steps=steps)
  eval_work = LocalWork(eval_batch_size, local_epochs=1)
  grad_fn = jax.value_and_grad(model.batch_loss, has_aux=True)

  def evaluate(params, x, y, mask):
    return evaluation.batched_metrics(model, params, x, y, mask)

  def one_client(global_params, tx, ty, tm, ex, ey, em):
    l0, c0, n = evaluate(global_params, ex, ey, em)

    def step(carry, batch):
      p, s = carry
      (_, (_, _, count)), g = grad_fn(p, *batch)
      u, s_new = optimizer.update(g, s, p)
      return tree.where(count > 0, (optax.apply_updates(p, u), s_new), (p, s)), None

    (local, _), _ = jax.lax.scan(step, (global_params, optimizer.init(global_params)),
                                 (tx, ty, tm))
    l1, c1, _ = evaluate(local, ex, ey, em)
    out = {"loss_before": l0, "correct_before": c0, "loss_after": l1, "correct_after": c1,
           "count": n}
    if return_params:
      out["params"] = local
    return out

  per_chunk = jax.vmap(one_client, in_axes=(None, 0, 0, 0, 0, 0, 0))

  @jax.jit
  def personalize(params, train_arrays, test_arrays, key):
    tx, ty, toffs, tsizes = train_arrays
    ex, ey, eoffs, esizes = test_arrays
    p = tsizes.shape[0]
    k = min(chunk_size, p)
    n_chunks = math.ceil(p / k)
    pad = n_chunks * k - p

    def chunked(a):
      return jnp.concatenate([a, jnp.zeros(pad, a.dtype)]).reshape(n_chunks, k)

    ids = jnp.arange(n_chunks * k, dtype=jnp.int32).reshape(n_chunks, k)

    def chunk(_, inp):
      cids, to, ts, eo, es = inp
      rows, mask = batch_indices(key, cids, to, ts, work, max_train_size)
      rows = jnp.clip(rows, 0, ty.shape[0] - 1)
      erows, emask = batch_indices(jax.random.key(0), cids, eo, es, eval_work, max_test_size)
      erows = jnp.clip(erows, 0, ey.shape[0] - 1)
      return None, per_chunk(params, tx[rows], ty[rows], mask, ex[erows], ey[erows], emask)

    _, out = jax.lax.scan(chunk, None, (ids, chunked(toffs), chunked(tsizes), chunked(eoffs),
                                        chunked(esizes)))
    return jax.tree.map(lambda a: a.reshape((n_chunks * k,) + a.shape[2:])[:p], out)

  return personalize


def _device_arrays(data: FederatedData):
  return (jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"], jnp.int32),
          jnp.asarray(data.offsets[:-1], jnp.int32), jnp.asarray(data.sizes, jnp.int32))


def personalize(model: Model, params: Any, train: FederatedData, test: FederatedData,
                optimizer: optax.GradientTransformation, *, steps: int, batch_size: int = 16,
                seed: int = 0, chunk_size: int = 8, eval_batch_size: int = 256,
                trainable: Callable[[str], bool] | None = None, return_params: bool = False,
                worst: int = 5) -> dict[str, Any]:
  """Fine-tunes ``params`` on every client's own data and evaluates before and after.

  Args:
    model: the model the params belong to (e.g. a head on cached features).
    params: the global params after federated training.
    train: each client's fine-tuning data.
    test: each client's held-out data: the same clients in the same order (checked by id).
    optimizer: the local optax optimizer (its state starts fresh for every client).
    steps: local steps per client (``batch_size`` examples each, cycling over reshuffled passes
      of the client's data).
    seed: the shuffles; client ``p`` uses ``fold_in(key(seed), p)``.
    chunk_size: clients per vmapped chunk (bounds memory).
    trainable: optional predicate over ``/``-joined param paths; only matching leaves are
      fine-tuned (e.g. ``lambda p: p.startswith("head/")`` for a partially unfrozen model).
    return_params: also return the personalized params, stacked ``[P, ...]``.

  Returns:
    ``{"before": {...}, "after": {...}, "count", "client_ids"}`` where ``before`` / ``after``
    hold per-client ``accuracy`` and ``loss`` arrays ``[P]`` and a ``summary`` (example-weighted
    and client-mean accuracy, 10/50/90th percentiles, worst clients), plus ``params`` if asked.
  """
  if train.num_clients != test.num_clients or not np.array_equal(train.client_ids,
                                                                 test.client_ids):
    raise ValueError(f"train and test must hold the same clients in the same order "
                     f"({train.num_clients} vs {test.num_clients} clients)")
  for name, d in (("train", train), ("test", test)):
    model.check_input(d.arrays["x"].shape[1:], f"personalize {name} data")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
    raise ValueError(f"steps must be a positive integer, got {steps!r}")
  opt = trainable_optimizer(optimizer, params, trainable)
  f = make_personalize(model, opt, steps=int(steps), batch_size=batch_size,
                       max_train_size=train.max_client_size, max_test_size=test.max_client_size,
                       eval_batch_size=eval_batch_size, chunk_size=chunk_size,
                       return_params=return_params)
  out = jax.device_get(f(params, _device_arrays(train), _device_arrays(test),
                         jax.random.key(seed)))
  cnt = np.asarray(out["count"], np.float64)
  result: dict[str, Any] = {"count": cnt, "client_ids": test.client_ids}
  for when in ("before", "after"):
    acc = np.asarray(out[f"correct_{when}"], np.float64) / np.maximum(cnt, 1.0)
    result[when] = {"accuracy": acc,
                    "loss": np.asarray(out[f"loss_{when}"], np.float64) / np.maximum(cnt, 1.0),
                    "summary": summarize(acc, cnt, test.client_ids, worst)}
  if return_params:
    result["params"] = out["params"]
  return result


# --------------------------------------------------- personalized algorithms' own models (Ditto, APFL)

def has_personal_models(state: Any) -> bool:
  """Whether ``state`` (a :class:`~fedjax_sim.server.ServerState`) holds per-client personal
  models: its per-client algorithm state defines ``personal_params(global_params, hparams)``
  (:class:`fedjax_sim.algorithms.ditto.DittoState`, :class:`fedjax_sim.algorithms.apfl.APFLState`)."""
  stores = getattr(getattr(state, "clients", None), "algorithm", None)
  return callable(getattr(stores, "personal_params", None))


def personal_params(state: Any, ids: jax.Array) -> Any:
  """The personal models of clients ``ids [K]`` (population positions), stacked ``[K, ...]``:
  each client's ``personal_params(state.params, state.hparams)`` of its row of
  ``state.clients.algorithm`` (Ditto: ``v_k``; APFL: ``alpha_i v_i + (1 - alpha_i) w``)."""
  stores = state.clients.algorithm
  population = jax.tree.leaves(stores)[0].shape[0]
  rows = jax.tree.map(lambda a: a[jnp.clip(ids, 0, population - 1)], stores)
  return jax.vmap(lambda row: row.personal_params(state.params, state.hparams))(rows)


def _check_personal(state: Any, data: FederatedData, model: Model, where: str) -> None:
  if not has_personal_models(state):
    raise ValueError(f"{where}: the state's per-client algorithm state "
                     f"({type(getattr(getattr(state, 'clients', None), 'algorithm', None)).__name__})"
                     " holds no personal models; train with a personalized algorithm "
                     "(fedjax_sim.algorithms.ditto, apfl)")
  population = jax.tree.leaves(state.clients.algorithm)[0].shape[0]
  if data.num_clients != population:
    raise ValueError(f"{where}: the data holds {data.num_clients} clients but the state has "
                     f"personal models for {population}: pass each client's held-out data, the "
                     "training population's clients in the same order")
  model.check_input(data.arrays["x"].shape[1:], f"{where} data")


def make_personal_evaluate(model: Model, max_client_size: int, batch_size: int = 256,
                           chunk_size: int = 32):
  """Jitted ``f(state, x, y, offsets [P], sizes [P]) -> {loss, accuracy, count}`` (``[P]`` each):
  every client's personal model (:func:`personal_params`) on its own examples
  (:func:`fedjax_sim.evaluation.make_client_evaluate`, chunked and vmapped over clients)."""
  return evaluation.make_client_evaluate(model, max_client_size, batch_size, chunk_size,
                                         params_of=personal_params)


def evaluate_personal(model: Model, state: Any, data: FederatedData, batch_size: int = 256,
                      chunk_size: int = 32, worst: int = 5) -> dict[str, Any]:
  """Each client's PERSONAL model (from ``state.clients.algorithm``, e.g. after
  ``fs.run(fs.algorithms.ditto(...), ...)``: ``res.state``) on that client's data ``data`` (its
  held-out examples: the training population's clients in the same order).

  Returns what :func:`fedjax_sim.evaluation.evaluate_clients` returns: per-client ``loss``,
  ``accuracy``, ``count`` (``[P]``), ``client_ids`` and the ``summary`` (weighted and mean
  accuracy, 10/50/90th percentiles over clients, worst clients). Raises ValueError if the state
  holds no personal models or the data has another number of clients.
  """
  _check_personal(state, data, model, "evaluate_personal")
  f = make_personal_evaluate(model, data.max_client_size, batch_size, chunk_size)
  out = jax.device_get(f(state, *_device_arrays(data)))
  acc = np.asarray(out["accuracy"], np.float64)
  cnt = np.asarray(out["count"], np.float64)
  return {"loss": np.asarray(out["loss"]), "accuracy": acc, "count": cnt,
          "client_ids": data.client_ids, "summary": summarize(acc, cnt, data.client_ids, worst)}


PERSONAL_PREFIX = "personal_"


def training_metrics(clients: dict) -> dict[str, float]:
  """The round's personal-model metrics during local training, from ``RoundOutput.clients``
  (the ``[C]`` arrays ``personal_loss`` / ``personal_accuracy`` that Ditto's and APFL's programs
  report): ``train_personal_loss`` and ``train_personal_accuracy``, example-weighted over the
  clients with finite updates, as ``train_loss`` / ``train_accuracy``; ``{}`` if the round has
  none."""
  if "personal_accuracy" not in clients:
    return {}
  w = np.asarray(clients["count"], np.float64) * np.asarray(clients["finite"], bool)
  if w.sum() <= 0:
    return {}
  return {f"train_personal_{m}": float(np.sum(w * np.asarray(clients[f"personal_{m}"],
                                                             np.float64)) / w.sum())
          for m in ("loss", "accuracy")}


def personal_eval_callback(model: Model, data: FederatedData, every: int = 10, *,
                           rounds: int | None = None, include_global: bool = False,
                           batch_size: int = 256, chunk_size: int = 32):
  """A ``fs.run(callback=...)`` that evaluates every client's personal model on its held-out
  ``data`` every ``every`` rounds (and at round ``rounds``, the last, if given).

  Its history columns (``run`` adds a callback's returned scalars to the round's record, so they
  are checkpointed with the history): every round, ``train_personal_loss`` and
  ``train_personal_accuracy`` (:func:`training_metrics`); at evaluation rounds
  ``personal_accuracy_weighted``, ``_mean``, ``_p10``,
  ``_p50``, ``_p90`` (percentiles over clients, as the client evaluation's; plot them with
  ``History.client_percentiles(prefix="personal_")``). With ``include_global``, also the global
  model on the same per-client data as ``client_accuracy_*``
  (:data:`fedjax_sim.history.CLIENT_PREFIX`), for the personalization gain.
  """
  from fedjax_sim.history import CLIENT_PREFIX
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every <= 0:
    raise ValueError(f"every must be a positive integer, got {every!r}")
  f = make_personal_evaluate(model, data.max_client_size, batch_size, chunk_size)
  g = (evaluation.make_client_evaluate(model, data.max_client_size, batch_size, chunk_size)
       if include_global else None)
  arrays = _device_arrays(data)
  client_ids = data.client_ids
  checked = []

  def scalars(out, prefix):
    acc = np.asarray(out["accuracy"], np.float64)
    s = summarize(acc, np.asarray(out["count"], np.float64), client_ids)
    return {prefix + k: v for k, v in s.items() if isinstance(v, float)}

  def callback(r, state, out):
    rec = training_metrics(out.clients)
    if r % every and r != rounds:
      return rec
    if not checked:
      _check_personal(state, data, model, "personal_eval_callback")
      checked.append(True)
    rec.update(scalars(jax.device_get(f(state, *arrays)), PERSONAL_PREFIX))
    if g is not None:
      rec.update(scalars(jax.device_get(g(state.params, *arrays)), CLIENT_PREFIX))
    return rec

  return callback
