"""Per-client evaluation: the global model on every client's own data, vectorized.

This is the fairness view FL papers report: not just the mean accuracy but its spread over
clients (10th/50th/90th percentiles) and the worst clients.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.data.federated import FederatedData, LocalWork, batch_indices
from fedjax_sim.models.core import Model, label_dtype


def pad_batches(x: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Zero-pads ``x [N, ...]`` to whole batches: ``([nb, b, ...], mask [nb, b])``, ``b`` =
  ``min(batch_size, N)``, so a ``lax.map`` over batches has static shapes and bounded memory."""
  n = x.shape[0]
  b = max(1, min(batch_size, n))
  nb = math.ceil(n / b)
  xp = jnp.concatenate([x, jnp.zeros((nb * b - n,) + x.shape[1:], x.dtype)])
  return xp.reshape((nb, b) + x.shape[1:]), (jnp.arange(nb * b) < n).reshape(nb, b)


def make_evaluate(model: Model, batch_size: int = 1000):
  """Builds jitted ``evaluate(params, x [N,...], y [N]) -> {"loss", "accuracy"}`` over all N
  examples, in batches of ``batch_size`` (``lax.map``) so memory stays bounded.

  For a regression model (``model.task == "regression"``; float targets ``y``) it returns
  ``{"loss", "accuracy", "mse", "r2"}``: ``accuracy`` is NaN (there are no classes), ``mse`` the
  mean squared error and ``r2`` the coefficient of determination ``1 - SSE / SST`` (``SST``
  around the mean of ``y``: predicting the mean scores 0)."""
  if model.is_regression:
    return make_regression_evaluate(model, batch_size)

  @jax.jit
  def evaluate(params, x, y):
    xp, mp = pad_batches(x, batch_size)
    yp, _ = pad_batches(y, batch_size)

    def one(batch):
      _, (loss_sum, correct, count) = model.batch_loss(params, *batch)
      return loss_sum, correct

    loss_sum, correct = jax.lax.map(one, (xp, yp, mp))
    n = y.shape[0]
    return {"loss": jnp.sum(loss_sum) / n, "accuracy": jnp.sum(correct) / n}

  return evaluate


def make_regression_evaluate(model: Model, batch_size: int = 1000):
  """:func:`make_evaluate` of a regression model: ``{"loss", "accuracy" (NaN), "mse", "r2"}``."""

  @jax.jit
  def evaluate(params, x, y):
    y = y.astype(jnp.float32)
    xp, mp = pad_batches(x, batch_size)
    yp, _ = pad_batches(y, batch_size)

    def one(batch):
      _, (loss_sum, sse, _) = model.batch_loss(params, *batch)
      return loss_sum, sse

    loss_sum, sse = jax.lax.map(one, (xp, yp, mp))
    n = y.shape[0]
    sst = jnp.sum(jnp.square(y - jnp.mean(y)))
    return {"loss": jnp.sum(loss_sum) / n, "accuracy": jnp.float32(jnp.nan),
            "mse": jnp.sum(sse) / n, "r2": 1.0 - jnp.sum(sse) / jnp.maximum(sst, 1e-30)}

  return evaluate


def as_arrays(data: Any) -> dict[str, np.ndarray]:
  """Evaluation data as flat arrays: accepts a dict with ``x``/``y`` or a FederatedData."""
  if isinstance(data, FederatedData):
    return data.centralized()
  if isinstance(data, dict) and "x" in data and "y" in data:
    return {"x": np.asarray(data["x"]), "y": np.asarray(data["y"])}
  raise ValueError("eval_data must be a FederatedData or a dict with 'x' and 'y' arrays, got "
                   f"{type(data).__name__}")


def batched_metrics(model: Model, params, x, y, mask):
  """ONE client's summed ``(loss, correct, count)`` over masked batches ``x [S, B, ...]``,
  ``y [S, B]``, ``mask [S, B]`` (a scan over the batches)."""
  def body(carry, batch):
    _, (loss_sum, correct, count) = model.batch_loss(params, *batch)
    return carry, (loss_sum, correct, count)
  _, (l, c, n) = jax.lax.scan(body, None, (x, y, mask))
  return jnp.sum(l), jnp.sum(c), jnp.sum(n)


def make_client_evaluate(model: Model, max_client_size: int, batch_size: int = 256,
                         chunk_size: int = 32, params_of=None):
  """Builds jitted ``f(params, x [N,...], y [N], offsets [P], sizes [P]) -> dict of [P] arrays``
  (``loss``, ``accuracy``, ``count``; for a regression model ``accuracy`` is the MSE): each client's examples in masked batches of
  ``batch_size``, ``chunk_size`` clients at a time (vmap inside a scan, bounded memory).

  With ``params_of``, every client is evaluated on its own model: ``params_of(params, ids [K])``
  returns the models of a chunk's clients stacked ``[K, ...]`` (``params`` is then whatever it
  reads, e.g. a personalized algorithm's server state: :func:`fedjax_sim.personalize.
  evaluate_personal`)."""
  work = LocalWork(batch_size, local_epochs=1)
  per_chunk = jax.vmap(lambda p, x, y, m: batched_metrics(model, p, x, y, m),
                       in_axes=(None if params_of is None else 0, 0, 0, 0))

  @jax.jit
  def evaluate(params, x, y, offsets, sizes):
    p = sizes.shape[0]
    k = min(chunk_size, p)
    n_chunks = math.ceil(p / k)
    pad = n_chunks * k - p
    ids = jnp.arange(n_chunks * k, dtype=jnp.int32)
    offs = jnp.concatenate([offsets, jnp.zeros(pad, offsets.dtype)]).reshape(n_chunks, k)
    szs = jnp.concatenate([sizes, jnp.zeros(pad, sizes.dtype)]).reshape(n_chunks, k)

    def chunk(_, inp):
      cids, o, n = inp
      # A fixed key: the order of examples inside a client does not change its metrics.
      rows, mask = batch_indices(jax.random.key(0), cids, o, n, work, max_client_size)
      rows = jnp.clip(rows, 0, y.shape[0] - 1)
      chunk_params = params if params_of is None else params_of(params, cids)
      return None, per_chunk(chunk_params, x[rows], y[rows], mask)

    _, (l, c, n) = jax.lax.scan(chunk, None, (ids.reshape(n_chunks, k), offs, szs))
    l, c, n = (a.reshape(-1)[:p] for a in (l, c, n))
    return {"loss": l / jnp.maximum(n, 1), "accuracy": c / jnp.maximum(n, 1), "count": n}

  return evaluate


def evaluate_clients(model: Model, params: Any, data: FederatedData, batch_size: int = 256,
                     chunk_size: int = 32, worst: int = 5) -> dict[str, Any]:
  """Accuracy and loss of ``params`` on every client of ``data``.

  Returns a dict with per-client arrays ``loss``, ``accuracy``, ``count`` (``[P]``, in population
  order), ``client_ids``, and a ``summary``: example-weighted and client-mean accuracy, 10/50/90th
  percentiles over clients, and the ids and accuracies of the ``worst`` clients.
  """
  model.check_input(data.arrays["x"].shape[1:], "evaluate_clients data")
  f = make_client_evaluate(model, data.max_client_size, batch_size, chunk_size)
  out = jax.device_get(f(params, jnp.asarray(data.arrays["x"]),
                         jnp.asarray(data.arrays["y"], label_dtype(model)),
                         jnp.asarray(data.offsets[:-1], jnp.int32),
                         jnp.asarray(data.sizes, jnp.int32)))
  acc = np.asarray(out["accuracy"], np.float64)
  cnt = np.asarray(out["count"], np.float64)
  order = np.argsort(acc, kind="stable")[:worst]
  summary = {
      "accuracy_weighted": float(np.sum(acc * cnt) / np.sum(cnt)),
      "accuracy_mean": float(acc.mean()),
      "accuracy_p10": float(np.percentile(acc, 10)),
      "accuracy_p50": float(np.percentile(acc, 50)),
      "accuracy_p90": float(np.percentile(acc, 90)),
      "worst_clients": data.client_ids[order].tolist(),
      "worst_accuracy": acc[order].tolist(),
  }
  return {"loss": np.asarray(out["loss"]), "accuracy": acc, "count": cnt,
          "client_ids": data.client_ids, "summary": summary}
