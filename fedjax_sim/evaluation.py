"""Per-client evaluation: the global model on every client's own data, vectorized.

This is the fairness view FL papers report: not just the mean accuracy but its spread over
clients (10th/50th/90th percentiles) and the worst clients.
"""

from __future__ import annotations

import functools

import math
from typing import Any, Callable, Mapping, NamedTuple

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


class Metric(NamedTuple):
  """An evaluation metric computed from sums over examples (FedJAX's ``metrics_fn_map`` in
  spirit: a metric is declared once and evaluated with the model, batch by batch).

  Attributes:
    sums: ``(outputs [B, ...], labels [B], mask [B]) -> pytree of arrays``: the masked sums of
      ONE batch (``outputs`` is what ``model.apply`` returns, e.g. logits ``[B, K]``; padded rows
      have ``mask`` False and must contribute nothing). The sums of all batches are added.
    result: ``summed pytree -> array``: the metric from the summed statistics (a scalar, or an
      array such as per-class accuracy ``[K]``).
  """
  sums: Callable[[jax.Array, jax.Array, jax.Array], Any]
  result: Callable[[Any], jax.Array]


def _class_sums(num_classes: int):
  def sums(logits, y, mask):
    m = mask.astype(jnp.float32)
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * m[:, None]
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {"correct": jnp.sum(onehot * hit[:, None], 0), "count": jnp.sum(onehot, 0)}
  return sums


def _per_class(s):
  # a class absent from the evaluation data has no accuracy: NaN, ignored by the summaries
  return jnp.where(s["count"] > 0, s["correct"] / jnp.maximum(s["count"], 1.0), jnp.nan)


def per_class_accuracy(num_classes: int) -> Metric:
  """``[K]`` accuracy on the examples of each class (recall per class; NaN for a class with no
  example)."""
  return Metric(_class_sums(_check_k(num_classes)), _per_class)


def balanced_accuracy(num_classes: int) -> Metric:
  """Macro-averaged accuracy: the mean over the classes present of per-class accuracy."""
  return Metric(_class_sums(_check_k(num_classes)), lambda s: jnp.nanmean(_per_class(s)))


def worst_class_accuracy(num_classes: int) -> Metric:
  """The lowest per-class accuracy over the classes present."""
  return Metric(_class_sums(_check_k(num_classes)), lambda s: jnp.nanmin(_per_class(s)))


def class_metrics(num_classes: int) -> dict[str, Metric]:
  """``{"per_class_accuracy", "balanced_accuracy", "worst_class_accuracy"}``: what a reader of
  results on imbalanced data expects next to the (example-weighted) accuracy."""
  return {"per_class_accuracy": per_class_accuracy(num_classes),
          "balanced_accuracy": balanced_accuracy(num_classes),
          "worst_class_accuracy": worst_class_accuracy(num_classes)}


def _check_k(num_classes) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
  return int(num_classes)


def _check_metrics(metrics) -> dict[str, Metric]:
  if metrics is None:
    return {}
  if not isinstance(metrics, Mapping):
    raise ValueError(f"metrics must be a dict {{name: Metric}}, got {type(metrics).__name__}")
  for name, m in metrics.items():
    if not isinstance(name, str) or name in ("loss", "accuracy"):
      raise ValueError(f"metrics: names must be strings other than 'loss'/'accuracy' (always "
                       f"computed), got {name!r}")
    if not isinstance(m, Metric):
      raise ValueError(f"metrics[{name!r}] must be a fedjax_sim.evaluation.Metric, got "
                       f"{type(m).__name__}")
  return dict(metrics)


@functools.lru_cache(maxsize=8)
def run_evaluate(model: Model, batch_size: int = 1000):
  """:func:`make_evaluate` ``(model, batch_size)``, kept for the last few models: the
  evaluation of :func:`fedjax_sim.run` compiles once per model and evaluation set shape, not once
  per run (a Model is immutable and hashed by identity)."""
  return make_evaluate(model, batch_size)


def make_evaluate(model: Model, batch_size: int = 1000,
                  metrics: Mapping[str, Metric] | None = None):
  """Builds jitted ``evaluate(params, x [N,...], y [N]) -> {"loss", "accuracy", **metrics}``
  over all N examples, in batches of ``batch_size`` (``lax.map``) so memory stays bounded.

  ``metrics`` (``{name: Metric}``, e.g. :func:`class_metrics`) adds ``name: Metric.result(sums
  over all batches)`` for each; the model's outputs are computed once per batch for all.

  For a regression model (``model.task == "regression"``; float targets ``y``) it returns
  ``{"loss", "accuracy", "mse", "r2"}``: ``accuracy`` is NaN (there are no classes), ``mse`` the
  mean squared error and ``r2`` the coefficient of determination ``1 - SSE / SST`` (``SST``
  around the mean of ``y``: predicting the mean scores 0)."""
  metrics = _check_metrics(metrics)
  if model.is_regression:
    if metrics:
      raise ValueError("metrics: declared metrics are for classification models; a regression "
                       "model's evaluation reports mse and r2")
    return make_regression_evaluate(model, batch_size)

  @jax.jit
  def evaluate(params, x, y):
    xp, mp = pad_batches(x, batch_size)
    yp, _ = pad_batches(y, batch_size)

    def one(batch):
      bx, by, bm = batch
      out = model.apply(params, bx)
      m = bm.astype(jnp.float32)
      # as Model.batch_loss, from the one forward pass the extra metrics share
      loss_sum = jnp.sum(model.loss(out, by) * m)
      correct = jnp.sum((jnp.argmax(out, -1) == by) * m)
      return loss_sum, correct, {k: mt.sums(out, by, bm) for k, mt in metrics.items()}

    loss_sum, correct, sums = jax.lax.map(one, (xp, yp, mp))
    n = y.shape[0]
    res = {"loss": jnp.sum(loss_sum) / n, "accuracy": jnp.sum(correct) / n}
    for k, mt in metrics.items():
      res[k] = mt.result(jax.tree.map(lambda a: jnp.sum(a, 0), sums[k]))
    return res

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


def flatten_metrics(values: Mapping[str, Any], prefix: str = "test_") -> dict[str, float]:
  """History columns from an evaluation: scalars as ``prefix + name``, arrays ``[K]`` as
  ``prefix + name + "_" + i`` (e.g. ``test_per_class_accuracy_3``)."""
  out = {}
  for k, v in values.items():
    a = np.asarray(v, np.float64)
    if a.ndim == 0:
      out[prefix + k] = float(a)
    else:
      out.update({f"{prefix}{k}_{i}": float(x) for i, x in enumerate(a.reshape(-1))})
  return out


def metrics_callback(model: Model, eval_data: Any, metrics: Mapping[str, Metric], *,
                     every: int = 10, rounds: int | None = None, batch_size: int = 1000):
  """A ``run(callback=...)`` that adds ``metrics`` of the global model on ``eval_data`` to the
  history every ``every`` rounds (and at round ``rounds``), as :func:`flatten_metrics` columns.

  ``run`` itself records only ``test_loss``/``test_accuracy``; this puts any declared metric
  (e.g. :func:`class_metrics`) in the same history, from the state the callback receives."""
  arrays = as_arrays(eval_data)
  model.check_input(arrays["x"].shape[1:], "metrics_callback eval_data")
  evaluate = make_evaluate(model, batch_size, metrics)
  x, y = jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"], jnp.int32)
  every = int(every)
  if every < 1:
    raise ValueError(f"metrics_callback: every must be >= 1, got {every!r}")

  def callback(round_, state, out):
    del out
    if round_ % every and round_ != rounds:
      return None
    values = jax.device_get(evaluate(state.params, x, y))
    return flatten_metrics({k: v for k, v in values.items() if k in metrics})

  return callback


def client_metrics_callback(model: Model, data: FederatedData,
                            metrics: Mapping[str, Metric] | None = None, *, every: int = 10,
                            rounds: int | None = None, batch_size: int = 256,
                            chunk_size: int = 32):
  """A ``run(callback=...)`` that evaluates the global model on every client of ``data`` every
  ``every`` rounds (and at round ``rounds``) and adds per-client percentile columns to the
  history: ``client_accuracy_mean/_p10/_p50/_p90`` and the same for each scalar declared metric
  (e.g. ``client_balanced_accuracy_p10``); ``History.client_percentiles(name)`` reads them back
  and :func:`fedjax_sim.history.plot` draws the accuracy band."""
  from fedjax_sim.history import CLIENT_PREFIX
  model.check_input(data.arrays["x"].shape[1:], "client_metrics_callback data")
  every = int(every)
  if every < 1:
    raise ValueError(f"client_metrics_callback: every must be >= 1, got {every!r}")
  metrics = _check_metrics(metrics)
  f = make_client_evaluate(model, data.max_client_size, batch_size, chunk_size, metrics=metrics)
  arrays = (jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"], label_dtype(model)),
            jnp.asarray(data.offsets[:-1], jnp.int32), jnp.asarray(data.sizes, jnp.int32))

  def callback(round_, state, out):
    del out
    if round_ % every and round_ != rounds:
      return None
    values = jax.device_get(f(state.params, *arrays))
    cols = _percentiles("accuracy", np.asarray(values["accuracy"], np.float64))
    for name in metrics:
      v = np.asarray(values[name], np.float64)
      if v.ndim == 1:
        cols.update(_percentiles(name, v))
    return {CLIENT_PREFIX + k: v for k, v in cols.items()}

  return callback


def as_arrays(data: Any) -> dict[str, np.ndarray]:
  """Evaluation data as flat arrays: accepts a dict with ``x``/``y`` or a FederatedData."""
  if isinstance(data, FederatedData):
    return data.centralized()
  if isinstance(data, dict) and "x" in data and "y" in data:
    return {"x": np.asarray(data["x"]), "y": np.asarray(data["y"])}
  raise ValueError("eval_data must be a FederatedData or a dict with 'x' and 'y' arrays, got "
                   f"{type(data).__name__}")


def batched_metrics(model: Model, params, x, y, mask, metrics: Mapping[str, Metric] | None = None):
  """ONE client's summed ``(loss, correct, count)`` over masked batches ``x [S, B, ...]``,
  ``y [S, B]``, ``mask [S, B]`` (a scan over the batches); with ``metrics`` also
  ``{name: Metric.result(summed sums)}`` as a fourth element, from the same forward pass."""
  if not metrics:
    def body(carry, batch):
      _, (loss_sum, correct, count) = model.batch_loss(params, *batch)
      return carry, (loss_sum, correct, count)
    _, (l, c, n) = jax.lax.scan(body, None, (x, y, mask))
    return jnp.sum(l), jnp.sum(c), jnp.sum(n)

  def body_m(carry, batch):
    bx, by, bm = batch
    out = model.apply(params, bx)
    m = bm.astype(jnp.float32)
    return carry, (jnp.sum(model.loss(out, by) * m), jnp.sum((jnp.argmax(out, -1) == by) * m),
                   jnp.sum(m), {k: mt.sums(out, by, bm) for k, mt in metrics.items()})
  _, (l, c, n, sums) = jax.lax.scan(body_m, None, (x, y, mask))
  return jnp.sum(l), jnp.sum(c), jnp.sum(n), {
      k: mt.result(jax.tree.map(lambda a: jnp.sum(a, 0), sums[k])) for k, mt in metrics.items()}


def make_client_evaluate(model: Model, max_client_size: int, batch_size: int = 256,
                         chunk_size: int = 32, params_of=None,
                         metrics: Mapping[str, Metric] | None = None):
  """Builds jitted ``f(params, x [N,...], y [N], offsets [P], sizes [P]) -> dict of [P] arrays``
  (``loss``, ``accuracy``, ``count``; for a regression model ``accuracy`` is the MSE): each client's examples in masked batches of
  ``batch_size``, ``chunk_size`` clients at a time (vmap inside a scan, bounded memory).

  ``metrics`` (``{name: Metric}``, classification only) adds each declared metric per client
  (``[P]`` for a scalar metric, ``[P, ...]`` otherwise; NaN where a client has no examples of
  what it measures, e.g. a class it does not hold).

  With ``params_of``, every client is evaluated on its own model: ``params_of(params, ids [K])``
  returns the models of a chunk's clients stacked ``[K, ...]`` (``params`` is then whatever it
  reads, e.g. a personalized algorithm's server state: :func:`fedjax_sim.personalize.
  evaluate_personal`)."""
  metrics = _check_metrics(metrics)
  if metrics and model.is_regression:
    raise ValueError("metrics: declared metrics are for classification models")
  work = LocalWork(batch_size, local_epochs=1)
  per_chunk = jax.vmap(lambda p, x, y, m: batched_metrics(model, p, x, y, m, metrics),
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

    _, outs = jax.lax.scan(chunk, None, (ids.reshape(n_chunks, k), offs, szs))
    outs = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:p], outs)
    l, c, n = outs[:3]
    res = {"loss": l / jnp.maximum(n, 1), "accuracy": c / jnp.maximum(n, 1), "count": n}
    if metrics:
      res.update(outs[3])
    return res

  return evaluate


def evaluate_clients(model: Model, params: Any, data: FederatedData, batch_size: int = 256,
                     chunk_size: int = 32, worst: int = 5,
                     metrics: Mapping[str, Metric] | None = None) -> dict[str, Any]:
  """Accuracy and loss of ``params`` on every client of ``data``.

  Returns a dict with per-client arrays ``loss``, ``accuracy``, ``count`` (``[P]``, in population
  order), ``client_ids``, and a ``summary``: example-weighted and client-mean accuracy, 10/50/90th
  percentiles over clients, and the ids and accuracies of the ``worst`` clients. ``metrics``
  (``{name: Metric}``, e.g. :func:`class_metrics`) adds each declared metric per client, and for
  each scalar one ``{name}_mean`` and ``{name}_p10/_p50/_p90`` to the summary (over the clients
  where it is defined: NaN entries, e.g. a client's balanced accuracy over classes it does not
  hold, are left out).
  """
  model.check_input(data.arrays["x"].shape[1:], "evaluate_clients data")
  f = make_client_evaluate(model, data.max_client_size, batch_size, chunk_size, metrics=metrics)
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
  result = {"loss": np.asarray(out["loss"]), "accuracy": acc, "count": cnt,
            "client_ids": data.client_ids, "summary": summary}
  for name in metrics or {}:
    values = np.asarray(out[name], np.float64)
    result[name] = values
    if values.ndim == 1:
      summary.update(_percentiles(name, values))
  return result


def _percentiles(name: str, values: np.ndarray) -> dict[str, float]:
  """``{name}_mean`` and ``{name}_p10/_p50/_p90`` over the finite entries (NaN if none)."""
  ok = values[np.isfinite(values)]
  if ok.size == 0:
    return {f"{name}_{s}": float("nan") for s in ("mean", "p10", "p50", "p90")}
  return {f"{name}_mean": float(ok.mean()),
          **{f"{name}_p{q}": float(np.percentile(ok, q)) for q in (10, 50, 90)}}
