"""FedNova: Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization
(Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020).

With unequal local work, plain FedAvg over-weights clients that take more steps and converges to
a different objective. FedNova averages *normalised* updates ``d_i = (x - y_i) / tau_i`` and
rescales by the effective number of steps ``tau_eff = sum_i p_i tau_i``:

    x <- x - server_lr * tau_eff * sum_i p_i d_i

where ``tau_i`` is client i's number of local SGD steps (``||a_i||_1`` for plain SGD in the paper's
notation; with the client's momentum rho, ``a_i`` has entries ``(1 - rho^j) / (1 - rho)`` and its
L1 norm is used). ``p_i`` are the aggregation weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def _a_norm(tau: jax.Array, momentum: float) -> jax.Array:
  """``||a_i||_1`` for ``tau`` local SGD steps with heavy-ball momentum ``rho``."""
  tau = tau.astype(jnp.float32)
  if momentum == 0:
    return tau
  rho = momentum
  return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)


def fednova(client_lr: float = 0.05, server_optimizer: optax.GradientTransformation | None = None,
            *, momentum: float = 0.0, **fedavg_kwargs) -> Algorithm:
  """FedNova with local SGD (``client_lr``, optional ``momentum``); other arguments as
  :func:`fedjax_sim.algorithms.fedavg`. With equal ``tau_i`` it is FedAvg."""
  if not (isinstance(client_lr, (int, float)) and client_lr > 0):
    raise ValueError(f"FedNova client_lr must be a number > 0, got {client_lr!r}")
  if not 0 <= momentum < 1:
    raise ValueError(f"FedNova momentum must lie in [0, 1), got {momentum!r}")
  if "client_optimizer" in fedavg_kwargs:
    raise ValueError("FedNova's normalisation assumes local SGD with heavy-ball momentum: give client_lr"
                     " and momentum instead of client_optimizer")
  opt = optax.sgd(client_lr, momentum=momentum or None)
  base = fedavg(opt, server_optimizer, **fedavg_kwargs)

  def client_finish(ctx, delta, info):
    a = jnp.maximum(_a_norm(info["steps"], momentum), 1e-12)
    return jax.tree.map(lambda d: d / a.astype(d.dtype), delta), None, a

  def server_finish(aux, update, tau_eff, info, key):
    del info, key
    return jax.tree.map(lambda u: u * tau_eff.astype(u.dtype), update), aux

  return dataclasses.replace(base, name="fednova", client_finish=client_finish,
                             server_finish=server_finish)
