"""Semi-supervised step on unlabeled target data: confident pseudo-labels (self-training).

With few labels per client, a federated head trained on them can label the clients' unlabeled
examples (Lee 2013, "Pseudo-Label"; FixMatch's confidence threshold, Sohn et al. 2020): each
client runs the broadcast global model on its own unlabeled examples, keeps those whose softmax
confidence is at least ``threshold`` with the arg-max class as label, and adds them to its
labelled examples for the next federated training. Nothing leaves a client but what the next
training round sends anyway (the model update); the pseudo-labels stay local.

Usual loop: train the head on the labels, :func:`with_pseudo_labels`, train again (from the
first head or from scratch) on the enlarged population.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_sim.data.federated import FederatedData
from fedjax_sim.models.core import Model
from fedjax_sim.transfer.encoders import encode


class PseudoLabels(NamedTuple):
  """Outcome of :func:`pseudo_labels`: ``labels [N]`` (arg-max class), ``confidence [N]`` (its
  softmax probability) and ``keep [N]`` (``confidence >= threshold``)."""
  labels: np.ndarray
  confidence: np.ndarray
  keep: np.ndarray


def _check_threshold(threshold) -> float:
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not (
      0.0 < float(threshold) <= 1.0):
    raise ValueError(f"threshold must be a confidence in (0, 1], got {threshold!r}")
  return float(threshold)


def pseudo_labels(model: Model, params: Any, x: np.ndarray, threshold: float = 0.9,
                  batch_size: int = 512) -> PseudoLabels:
  """The model's confident predictions on unlabeled examples ``x [N, *model.input_shape]``:
  softmax of ``model.apply(params, x)`` (one jitted pass in batches), its arg-max and maximum,
  and which rows reach ``threshold``.

  Raises:
    ValueError: ``threshold`` outside (0, 1], or ``x`` not of the model's input shape.
  """
  threshold = _check_threshold(threshold)
  x = np.asarray(x)
  model.check_input(x.shape[1:], "unlabeled data")
  probs = encode(lambda p, xb: jax.nn.softmax(model.apply(p, xb), axis=-1), params, x,
                 batch_size)
  labels = probs.argmax(-1).astype(np.int32)
  conf = probs.max(-1)
  return PseudoLabels(labels, conf, conf >= threshold)


def with_pseudo_labels(model: Model, params: Any, labelled: FederatedData,
                       unlabeled: FederatedData, threshold: float = 0.9,
                       batch_size: int = 512) -> tuple[FederatedData, np.ndarray]:
  """Each client's labelled examples plus its own confidently pseudo-labelled ones.

  Args:
    model, params: the (global) model that labels, e.g. a federated head.
    labelled: P clients with ``x`` and ``y``.
    unlabeled: the same P clients (by position) with ``x`` (any ``y`` is ignored); a client may
      have no unlabeled examples only if the population allows it (FederatedData does not: give
      every client at least one).
    threshold: minimum softmax confidence of a kept pseudo-label.

  Returns:
    ``(population, added)``: the P clients, client ``p`` holding ``labelled.client(p)`` followed
    by its kept pseudo-labelled rows (in their order), same ids and ``num_classes``; and
    ``added [P]``, how many pseudo-labelled rows each client gained.

  Raises:
    ValueError: different numbers of clients, different example shapes, or a bad threshold.
  """
  threshold = _check_threshold(threshold)
  if labelled.num_clients != unlabeled.num_clients:
    raise ValueError(f"labelled has {labelled.num_clients} clients but unlabeled has "
                     f"{unlabeled.num_clients}; they must be the same clients, by position")
  xl, xu = labelled.arrays["x"], unlabeled.arrays["x"]
  if xl.shape[1:] != xu.shape[1:]:
    raise ValueError(f"labelled examples have shape {xl.shape[1:]} but unlabeled ones "
                     f"{xu.shape[1:]}")
  if "y" not in labelled.arrays:
    raise ValueError("labelled has no 'y'")
  pl = pseudo_labels(model, params, xu, threshold, batch_size)
  clients, added = [], np.zeros(labelled.num_clients, np.int64)
  for p in range(labelled.num_clients):
    lo, hi = unlabeled.offsets[p], unlabeled.offsets[p + 1]
    keep = np.flatnonzero(pl.keep[lo:hi]) + lo
    own = labelled.client(p)
    added[p] = keep.size
    clients.append({"x": np.concatenate([own["x"], xu[keep].astype(own["x"].dtype)]),
                    "y": np.concatenate([own["y"], pl.labels[keep].astype(own["y"].dtype)])})
  return (FederatedData.from_clients(clients, labelled.client_ids, labelled.num_classes), added)
