"""Data-centric remedies for imbalanced clients, as parts of the client program (issue 17).

Label skew (a client, or the whole population, sees some classes far more often than others)
biases a softmax classifier towards the frequent classes. The remedies here change what ONE
client computes in a local step, so they run inside the engine's vmapped, jitted round (keyed,
static shapes, no host round-trip) and compose with any algorithm's client program:

* **Loss correction by a label prior** (:func:`logit_adjustment`, :func:`fedlc_calibration`):
  the cross-entropy is taken over ``logits + offsets[y']`` instead of ``logits``, where the
  offsets come from the client's own label prior (FedLC-style, per client) or from the global
  prior. Predictions still use the raw logits, so the model learns the balanced ("class-
  conditional") classifier.
* **On-device augmentation** of a client's batch before its step (:mod:`fedjax_sim.augment`).

:func:`remedied` wraps any client factory (``algorithm.client``) with these::

    offsets = fs.remedies.logit_adjustment(train_data, tau=1.0, prior="client")
    algo = fs.algorithms.fedavg(optax.sgd(0.05))
    algo = algo.replace(client=fs.remedies.remedied(algo.client, logit_offsets=offsets))

Label priors are computed ONCE on the host from the :class:`~fedjax_sim.data.FederatedData`
before the run (:func:`label_counts`) and closed over by the compiled round as a constant
``[P, num_classes]`` array, indexed by ``ctx.client_id`` inside the step. In a real deployment
each client knows its own label counts, so the per-client prior needs no communication; the
global prior is the sum of the clients' counts (one secure-aggregation round of a ``[K]``
vector), which the simulator reads off the data directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.client import Batch, ClientFactory, ClientProgram
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.models.core import Model

# (batch, key) -> batch with the same shapes: a per-client, per-step rewrite of a local batch.
Augment = Callable[[Batch, jax.Array], Batch]
PRIORS = ("client", "global")


def label_counts(data: FederatedData, num_classes: int | None = None) -> np.ndarray:
  """``[P, K]`` float64: how many examples of each class each client holds (host, once, before
  the run). ``K = num_classes``, or ``data.num_classes`` when not given."""
  if not isinstance(data, FederatedData):
    raise ValueError(f"label_counts needs a FederatedData, got {type(data).__name__}")
  k = num_classes if num_classes is not None else data.num_classes
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError("label_counts needs num_classes (an int >= 1): give it, or build the "
                     f"FederatedData with num_classes=; got {k!r}")
  k = int(k)
  y = np.asarray(data.arrays["y"]).astype(np.int64)
  if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= k)):
    raise ValueError(f"label_counts: labels must be integers in [0, {k}) with one per example")
  owner = np.repeat(np.arange(data.num_clients), np.asarray(data.sizes))
  counts = np.zeros((data.num_clients, k), np.float64)
  np.add.at(counts, (owner, y), 1.0)
  return counts


def _check_tau(tau: float, where: str) -> float:
  if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and np.isfinite(tau)
                                   and tau >= 0):
    raise ValueError(f"{where}: tau must be a finite number >= 0, got {tau!r}")
  return float(tau)


def _counts_for(data: FederatedData, prior: str, num_classes, where: str) -> np.ndarray:
  if prior not in PRIORS:
    raise ValueError(f"{where}: prior must be one of {PRIORS}, got {prior!r}")
  counts = label_counts(data, num_classes)
  return counts if prior == "client" else counts.sum(0)


def _check_smoothing(smoothing, where: str) -> None:
  if isinstance(smoothing, bool) or not (isinstance(smoothing, (int, float))
                                         and np.isfinite(smoothing) and smoothing > 0):
    raise ValueError(f"{where}: smoothing must be a finite number > 0, got {smoothing!r}")


def logit_adjustment(data: FederatedData, *, tau: float = 1.0, prior: str = "client",
                     smoothing: float = 1.0, num_classes: int | None = None) -> np.ndarray:
  """Offsets ``tau * log pi`` of the logit-adjusted loss (Menon et al., ICLR 2021), float32.

  ``pi`` is the label prior: per client (``prior="client"``, ``[P, K]``: each client corrects
  its own skew, as FedLC and FedRS do with their own calibrations) or global (``"global"``,
  ``[K]``: the population's long tail). ``pi_y = (n_y + smoothing) / (n + K smoothing)``: the
  additive ``smoothing`` keeps classes a client never saw at a finite offset (``smoothing=0``
  would give ``-inf``, dropping those classes from the client's softmax altogether). With
  ``tau = 1`` this is the balanced softmax (Ren et al., NeurIPS 2020).
  """
  tau = _check_tau(tau, "logit_adjustment")
  _check_smoothing(smoothing, "logit_adjustment")
  counts = _counts_for(data, prior, num_classes, "logit_adjustment") + smoothing
  pi = counts / counts.sum(-1, keepdims=True)
  return (tau * np.log(pi)).astype(np.float32)


def fedlc_calibration(data: FederatedData, *, tau: float = 1.0, prior: str = "client",
                      smoothing: float = 1.0, num_classes: int | None = None) -> np.ndarray:
  """Offsets ``-tau * (n_y + smoothing)^(-1/4)`` of FedLC's calibrated loss (Zhang et al.,
  "Federated Learning with Label Distribution Skew via Logits Calibration", ICML 2022), float32.

  The paper's pairwise margin ``tau n_y^{-1/4}`` subtracted from class y's logit; the rare
  classes get the larger margin. ``smoothing`` (> 0, default 1) keeps the margin of a class
  the client never saw finite (the paper leaves ``n_y = 0`` unspecified). ``prior`` as
  :func:`logit_adjustment`.
  """
  tau = _check_tau(tau, "fedlc_calibration")
  _check_smoothing(smoothing, "fedlc_calibration")
  counts = _counts_for(data, prior, num_classes, "fedlc_calibration") + smoothing
  return (-tau * counts ** -0.25).astype(np.float32)


def adjusted_cross_entropy(logits: jax.Array, labels: jax.Array, offsets: jax.Array) -> jax.Array:
  """Per-example ``CE(logits + offsets, labels)``: ``logits [B, K]``, ``labels [B]``, ``offsets``
  ``[K]`` (broadcast over the batch) -> ``[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(add_offsets(logits, offsets), labels)


def generalized_cross_entropy(q: float = 0.7):
  """The generalized cross-entropy ``(1 - p_y^q) / q`` (Zhang & Sabuncu, NeurIPS 2018), a loss
  robust to label noise: ``q -> 0`` is the cross-entropy, ``q = 1`` the MAE. Per-example
  ``(logits [B, K], labels [B]) -> [B]``; use it as a model's loss,
  ``dataclasses.replace(model, loss=generalized_cross_entropy(0.7))``."""
  if isinstance(q, bool) or not (isinstance(q, (int, float)) and 0 < q <= 1):
    raise ValueError(f"generalized_cross_entropy q must be in (0, 1], got {q!r}")
  q = float(q)

  def loss(logits, labels):
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return (1.0 - jnp.exp(q * logp)) / q   # p^q as exp(q log p): stable for tiny p
  return loss


def symmetric_cross_entropy(alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0):
  """The symmetric cross-entropy ``alpha CE + beta RCE`` (Wang, Ma, Chen, Luo, Yi, Bailey,
  "Symmetric Cross Entropy for Robust Learning with Noisy Labels", ICCV 2019), a loss robust
  to label noise. ``RCE = -sum_k p_k log q_k`` is the cross-entropy with the roles of the
  prediction ``p`` and the one-hot label ``q`` swapped, ``log 0`` taken as ``log_zero`` (the
  paper's ``A = -4``): ``RCE = -log_zero (1 - p_y)``. Defaults are the paper's CIFAR-10 values.
  Per-example ``(logits [B, K], labels [B]) -> [B]``; use it as a model's loss."""
  for name, v in (("alpha", alpha), ("beta", beta)):
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
      raise ValueError(f"symmetric_cross_entropy {name} must be a finite number >= 0, got {v!r}")
  if isinstance(log_zero, bool) or not (isinstance(log_zero, (int, float))
                                        and np.isfinite(log_zero) and log_zero < 0):
    raise ValueError(f"symmetric_cross_entropy log_zero must be a finite number < 0, got "
                     f"{log_zero!r}")
  alpha, beta, a = float(alpha), float(beta), float(log_zero)

  def loss(logits, labels):
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return alpha * -logp + beta * -a * (1.0 - jnp.exp(logp))
  return loss


def add_offsets(logits: jax.Array, offsets: jax.Array) -> jax.Array:
  """``logits [..., K] + offsets [K]``, broadcast explicitly over the leading axes."""
  return logits + jnp.reshape(offsets, (1,) * (logits.ndim - 1) + offsets.shape[-1:])


def _check_offsets(offsets: Any, model: Model) -> jax.Array:
  a = np.asarray(offsets)
  if a.ndim not in (1, 2) or a.shape[-1] != model.num_classes:
    raise ValueError(f"logit_offsets must have shape [num_classes] or [num_clients, "
                     f"num_classes] with num_classes = {model.num_classes} (model "
                     f"{model.name!r}), got {a.shape}")
  if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
    raise ValueError("logit_offsets must be finite numbers (use smoothing > 0 for classes a "
                     "client never saw)")
  return jnp.asarray(a, jnp.float32)


def remedied(base: ClientFactory, *, logit_offsets: Any = None,
             augment: Augment | None = None, mixup: float | None = None) -> ClientFactory:
  """``base`` (any client factory, e.g. ``algorithm.client``) with label-skew remedies.

  Args:
    base: the client program factory to wrap; its carry, state, upload and metrics are kept.
    logit_offsets: ``[K]`` (one for all clients) or ``[P, K]`` (row ``ctx.client_id`` for each
      client; P must be the population of the training data) added to the logits inside the
      training loss (:func:`logit_adjustment`, :func:`fedlc_calibration`): the step trains on
      ``model.loss(logits + offsets, y)``, so the correction applies to whatever loss the model
      declares. Computed on the host before the run and closed over (a constant of the
      compiled round). The training metrics (``train_loss``) are those of the adjusted loss;
      ``correct`` counts raw-logit predictions.
    augment: ``(batch, key) -> batch`` applied to each local batch before the step (the mask is
      kept), with a key derived from the step's key (distinct per client and step); see
      :mod:`fedjax_sim.augment`.
    mixup: ``alpha > 0`` enables mixup (Zhang et al., ICLR 2018) after ``augment``: example i
      becomes ``lam_i x_i + (1 - lam_i) x_j`` (``j`` a random valid row of the batch,
      ``lam_i ~ Beta(alpha, alpha)`` per example) and its loss ``lam_i L(y_i) + (1 - lam_i)
      L(y_j)`` (the paper's loss on soft labels, exactly, for a cross-entropy ``L``).

  The wrapped step builds, at trace time, the model with this client's loss and runs the base
  program's step with it: no engine change, and any algorithm's program (FedProx's, SCAFFOLD's,
  Ditto's) gets the remedy. The base program must take its loss from the model it is built with
  (every program of :mod:`fedjax_sim.algorithms` does).
  """
  if not callable(base):
    raise ValueError(f"remedied: base must be a client factory (model, optimizer) -> "
                     f"ClientProgram, got {type(base).__name__}")
  if augment is not None and not callable(augment):
    raise ValueError(f"remedied: augment must be a function (batch, key) -> batch, got "
                     f"{type(augment).__name__}")
  if mixup is not None and (isinstance(mixup, bool) or not isinstance(mixup, (int, float))
                            or not (np.isfinite(mixup) and mixup > 0)):
    raise ValueError(f"remedied: mixup must be None or a Beta parameter alpha > 0, got "
                     f"{mixup!r}")

  def factory(model: Model, optimizer: optax.GradientTransformation) -> ClientProgram:
    outer = base(model, optimizer)
    offsets = None if logit_offsets is None else _check_offsets(logit_offsets, model)

    def client_loss(ctx):
      if offsets is None:
        return model.loss
      row = offsets if offsets.ndim == 1 else offsets[ctx.client_id]
      return lambda logits, y: model.loss(add_offsets(logits, row), y)

    def step(carry, batch, ctx, key):
      loss = client_loss(ctx)
      if augment is not None:
        # fold_in with constants so the base step's own key stays independent of ours
        aug = augment(batch, jax.random.fold_in(key, 0x5A5A))
        batch = Batch(aug.x, aug.y, batch.mask)
      if mixup is not None:
        batch, loss = _mixup(batch, loss, float(mixup), jax.random.fold_in(key, 0xA5A5))
      if loss is model.loss:
        return outer.step(carry, batch, ctx, key)
      return base(dataclasses.replace(model, loss=loss), optimizer).step(carry, batch, ctx, key)

    return ClientProgram(outer.init, step, outer.final)

  return factory


def _mixup(batch: Batch, loss, alpha: float, key):
  """The mixed batch and its loss ``lam L(logits, y) + (1 - lam) L(logits, y[j])``."""
  b = batch.y.shape[0]
  k1, k2 = jax.random.split(key)
  valid = jnp.where(batch.mask, 0.0, -jnp.inf)
  valid = jnp.where(jnp.any(batch.mask), valid, 0.0)
  j = jax.random.categorical(k1, jnp.broadcast_to(valid, (b, b)), axis=1)
  lam = jax.random.beta(k2, alpha, alpha, (b,)).astype(batch.x.dtype)
  lam_x = lam.reshape((b,) + (1,) * (batch.x.ndim - 1))
  x = lam_x * batch.x + (1 - lam_x) * batch.x[j]
  y_b = batch.y[j]

  def mixed_loss(logits, y):
    return lam * loss(logits, y) + (1 - lam) * loss(logits, y_b)

  return Batch(x, batch.y, batch.mask), mixed_loss
