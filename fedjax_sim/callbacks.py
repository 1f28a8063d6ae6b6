"""Callbacks for :func:`fedjax_sim.run`: early stopping with the best model, metric loggers
(CSV, TensorBoard, any ``log(metrics, step=...)`` function such as Weights & Biases'), and
:func:`chain` to use several at once.

A callback is called after every round as ``callback(round, state, out)`` (``out`` the round's
:class:`~fedjax_sim.engine.RoundOutput`, whose ``metrics`` are the training metrics of the
history: ``train_loss``, ``train_accuracy``, ``update_norm``, ...) and may return a dict: its
numbers join the round's history record and ``"stop": True`` ends the run. Test metrics are
added to the record after the callbacks run, so a callback that needs them evaluates the model
itself (:class:`EarlyStopping` with ``eval_data``); loggers write them from the final history
(:meth:`MetricLogger.write_history`).

Weights & Biases in three lines::

  import wandb; wandb.init(project="fl")
  res = fs.run(algo, model, data, rounds=100, cohort_size=10,
               callback=fs.callbacks.log_with(wandb.log))
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from fedjax_sim import evaluation
from fedjax_sim.models.core import Model, label_dtype


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The scalar entries of ``metrics`` as Python floats (arrays of other shapes are skipped)."""
  out = {}
  for k, v in jax.device_get(dict(metrics)).items():
    a = np.asarray(v)
    if a.shape == () and a.dtype.kind in "biuf":
      out[k] = float(a)
  return out


class EarlyStopping:
  """Stops the run when ``metric`` has not improved for ``patience`` checks, and keeps the best
  model (on the host: :attr:`best_params`, :attr:`best_round`, :attr:`best_value`).

  The metric is a training metric of the round (``train_loss``, ... from ``out.metrics``,
  checked every round), or, with ``model`` and ``eval_data`` (a dict with ``x``, ``y``), one of
  :func:`fedjax_sim.evaluation.make_evaluate`'s (``loss``, ``accuracy``, or a regression model's
  ``mse``, ``r2``) on ``eval_data``, checked every ``every`` rounds (keep it apart from the test
  set you report: a validation split). ``mode`` is ``"min"`` or ``"max"``; an improvement must
  beat the best by more than ``min_delta``. Every checked round's record gets
  ``early_stopping_value`` and ``early_stopping_best`` (a NaN value counts as no improvement).
  """

  def __init__(self, metric: str = "train_loss", *, mode: str = "min", patience: int = 5,
               min_delta: float = 0.0, model: Model | None = None, eval_data=None,
               every: int = 1, batch_size: int = 1000):
    if mode not in ("min", "max"):
      raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    for name, v in (("patience", patience), ("every", every)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
      raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
    if (model is None) != (eval_data is None):
      raise ValueError("give both model and eval_data (to stop on an evaluation metric) or "
                       "neither (to stop on a training metric of the round)")
    self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
    self.every = every
    self._evaluate = None
    if model is not None:
      arrays = evaluation.as_arrays(eval_data)
      self._evaluate = evaluation.make_evaluate(model, batch_size)
      self._xy = (arrays["x"], np.asarray(arrays["y"], label_dtype(model)))
    self.best_value = math.inf if mode == "min" else -math.inf
    self.best_round: int | None = None
    self.best_params = None
    self.bad_checks = 0

  def _better(self, v: float) -> bool:
    if self.mode == "min":
      return v < self.best_value - self.min_delta
    return v > self.best_value + self.min_delta

  def __call__(self, r: int, state, out) -> dict:
    if self._evaluate is not None:
      if r % self.every:
        return {}
      metrics = _scalars(self._evaluate(state.params, *self._xy))
    else:
      metrics = _scalars(out.metrics)
    if self.metric not in metrics:
      raise ValueError(f"EarlyStopping: no metric {self.metric!r}; this run has "
                       f"{sorted(metrics)}")
    v = metrics[self.metric]
    if math.isfinite(v) and self._better(v):
      self.best_value, self.best_round, self.bad_checks = v, r, 0
      self.best_params = jax.device_get(state.params)
    else:
      self.bad_checks += 1
    rec = {"early_stopping_value": v, "early_stopping_best": self.best_value}
    if self.bad_checks >= self.patience:
      rec["stop"] = True
    return rec


class MetricLogger:
  """Base of the loggers: a callback writing each round's training metrics (``out.metrics``)
  with :meth:`write`, and :meth:`write_history` for a finished run's whole history (test
  metrics, seconds, communication)."""

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    raise NotImplementedError

  def __call__(self, r: int, state, out) -> dict:
    self.write(int(r), _scalars(out.metrics))
    return {}

  def write_history(self, history: Mapping[str, np.ndarray]) -> None:
    """Writes every round of ``history`` (NaN entries, e.g. rounds without evaluation, are
    left out)."""
    keys = [k for k in history if k != "round"]
    self.columns(keys)
    for i, r in enumerate(np.asarray(history["round"])):
      self.write(int(r), {k: float(history[k][i]) for k in keys
                          if not math.isnan(float(history[k][i]))})

  def columns(self, keys) -> None:
    """Announces every metric name to come (a CSV file's header); no-op by default."""

  def close(self) -> None:
    pass


class FunctionLogger(MetricLogger):
  """Calls ``log(metrics, step=round)`` (e.g. ``wandb.log``, ``mlflow.log_metrics``)."""

  def __init__(self, log: Callable[..., Any]):
    if not callable(log):
      raise ValueError(f"log must be callable, got {log!r}")
    self.log = log

  def write(self, step, metrics):
    self.log(dict(metrics), step=step)


def log_with(log: Callable[..., Any]) -> FunctionLogger:
  """A callback calling ``log(metrics, step=round)`` after every round (Weights & Biases:
  ``callback=fs.callbacks.log_with(wandb.log)``; see the module docstring)."""
  return FunctionLogger(log)


class CSVLogger(MetricLogger):
  """Writes metrics to a CSV file ``path``: one row per written round, a ``round`` column and
  one column per metric (those of the first row written, or all of a history's with
  :meth:`write_history`; later keys not in them are dropped, missing ones left empty). The file is flushed after every row, so a killed run
  keeps what it wrote."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = None
    self._writer = None

  def columns(self, keys):
    if self._writer is None:
      self._file = open(self.path, "w", newline="")
      self._writer = csv.DictWriter(self._file, ["round", *keys], extrasaction="ignore")
      self._writer.writeheader()

  def write(self, step, metrics):
    self.columns(list(metrics))
    self._writer.writerow({"round": step, **metrics})
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file, self._writer = None, None


def _summary_writer(logdir: str):
  """TensorBoard's writer from flax (which needs TensorFlow) or tensorboardX, whichever is
  installed; fedjax_sim does not depend on either."""
  try:
    from flax.metrics.tensorboard import SummaryWriter
    w = SummaryWriter(logdir)
    return lambda tag, value, step: w.scalar(tag, value, step), w.flush, w.close
  except ImportError:
    pass
  try:
    from tensorboardX import SummaryWriter
  except ImportError as e:
    raise ImportError("TensorBoardLogger needs TensorFlow (flax.metrics.tensorboard) or "
                      "tensorboardX: pip install tensorboardX") from e
  w = SummaryWriter(logdir)
  return lambda tag, value, step: w.add_scalar(tag, value, step), w.flush, w.close


class TensorBoardLogger(MetricLogger):
  """Writes metrics as TensorBoard scalars (one tag per metric, the round as the step) to
  ``logdir``, through ``flax.metrics.tensorboard`` or ``tensorboardX`` (whichever is
  installed; ImportError naming them otherwise)."""

  def __init__(self, logdir: str | Path):
    self._scalar, self._flush, self._close = _summary_writer(str(logdir))

  def write(self, step, metrics):
    for k, v in metrics.items():
      self._scalar(k, v, step)
    self._flush()

  def close(self):
    self._close()


def chain(*callbacks) -> Callable:
  """One callback calling ``callbacks`` in order: their returned numbers are merged (later ones
  win) and the run stops if any asks to. ``check_run`` and ``max_rounds`` of those that have
  them are honoured (the smallest cap wins)."""
  callbacks = tuple(c for c in callbacks if c is not None)

  class Chain:
    def __call__(self, r, state, out):
      merged, stop = {}, False
      for c in callbacks:
        extra = c(r, state, out)
        if isinstance(extra, dict):
          extra = dict(extra)
          stop |= bool(extra.pop("stop", False))
          merged.update(extra)
      return {**merged, "stop": True} if stop else merged

    def check_run(self, **kw):
      for c in callbacks:
        if callable(getattr(c, "check_run", None)):
          c.check_run(**kw)

  capped = [c for c in callbacks if callable(getattr(c, "max_rounds", None))]
  if capped:
    Chain.max_rounds = lambda self: min(int(c.max_rounds()) for c in capped)
  return Chain()
