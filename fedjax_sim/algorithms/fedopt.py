"""Server optimizers on the averaged client update: FedAvgM (Hsu, Qi, Brown 2019) and
FedAdagrad / FedAdam / FedYogi of "Adaptive Federated Optimization" (Reddi, Charles, Zaheer,
Garrett, Rush, Konečný, Kumar, McMahan, ICLR 2021).

All are FedAvg with another optax server optimizer applied to the pseudo-gradient
``mean(global - local)``. ``tau`` is the paper's adaptivity (optax's ``eps``); the paper's
defaults are beta1 = 0.9, beta2 = 0.99, tau = 1e-3.
"""

from __future__ import annotations

import dataclasses

import optax

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def _check_lr(server_lr):
  if not (isinstance(server_lr, (int, float)) and server_lr > 0):
    raise ValueError(f"server_lr must be a number > 0, got {server_lr!r}")


def _named(name: str, server_optimizer, client_optimizer, kwargs) -> Algorithm:
  return dataclasses.replace(fedavg(client_optimizer, server_optimizer, **kwargs), name=name)


def fedavgm(client_optimizer=None, *, server_lr: float = 1.0, momentum: float = 0.9,
            **kwargs) -> Algorithm:
  """FedAvg with server momentum."""
  _check_lr(server_lr)
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
  return _named("fedavgm", optax.sgd(server_lr, momentum=momentum), client_optimizer, kwargs)


def fedadam(client_optimizer=None, *, server_lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3, **kwargs) -> Algorithm:
  """FedAdam (Reddi et al. 2021, Algorithm 2)."""
  _check_lr(server_lr)
  return _named("fedadam", optax.adam(server_lr, b1=b1, b2=b2, eps=tau), client_optimizer, kwargs)


def fedyogi(client_optimizer=None, *, server_lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3, **kwargs) -> Algorithm:
  """FedYogi (Reddi et al. 2021, Algorithm 2)."""
  _check_lr(server_lr)
  return _named("fedyogi", optax.yogi(server_lr, b1=b1, b2=b2, eps=tau), client_optimizer, kwargs)


def fedadagrad(client_optimizer=None, *, server_lr: float = 1e-1, tau: float = 1e-3,
               **kwargs) -> Algorithm:
  """FedAdagrad (Reddi et al. 2021, Algorithm 2)."""
  _check_lr(server_lr)
  return _named("fedadagrad", optax.adagrad(server_lr, eps=tau), client_optimizer, kwargs)
