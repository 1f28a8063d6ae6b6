"""FedNova: Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization
(Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020).

With unequal local work (steps, learning rates, momentum), plain FedAvg weights client i by how
far it moved, ``p_i ||a_i||_1``, and converges to a different objective. FedNova averages
*normalised* updates and rescales by the effective amount of local work.

The paper's general form. Client i starts from ``x`` and its local optimizer makes
``x - y_i = eta G_i a_i`` where ``G_i = [g_{i,1}, ..., g_{i,tau_i}]`` are its stochastic
gradients, ``eta`` the base learning rate and ``a_i`` the vector of how much each gradient
contributes. Then::

    d_i = G_i a_i / ||a_i||_1 = (x - y_i) / (eta ||a_i||_1)
    x <- x - eta tau_eff sum_i p_i d_i,         tau_eff = sum_i p_i ||a_i||_1

Here: local SGD with learning rate ``eta s_i`` (``eta = client_lr``; ``s_i`` is the client's
learning-rate scale: ``Heterogeneity(learning_rate_scale=...)`` times the in-state hyperparameter
``client_lr_scale``, the engine's per-client ``lr_scale``) and heavy-ball momentum ``rho``
(optax's ``sgd(momentum=rho)``: ``u_k = rho u_{k-1} + g_k``, ``y <- y - eta s_i u_k``). After
``tau_i`` steps, ``x - y_i = eta s_i sum_{k=1}^{tau_i} (1 - rho^(tau_i - k + 1)) / (1 - rho) g_k``,
so the per-client learning rate belongs in the normalising vector::

    a_{i,k} = s_i (1 - rho^(tau_i - k + 1)) / (1 - rho)
    ||a_i||_1 = s_i (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)    (= s_i tau_i, rho = 0)

The engine hands the server ``mean_i(x - y_i)`` as the pseudo-gradient, so ``client_finish``
uploads ``(x - y_i) / ||a_i||_1 = eta d_i`` with ``||a_i||_1`` (the engine averages both with the
weights p_i) and ``server_finish`` returns ``tau_eff * sum_i p_i eta d_i``: with the default
server optimizer ``sgd(1)`` that is the update above. ``p_i`` are the aggregation weights
(normalised by the engine). A client with ``s_i`` twice another's but the same gradients thus
gets the same ``d_i`` and the same say in the average; only ``tau_eff`` grows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def _a_norm(tau: jax.Array, momentum: float) -> jax.Array:
  """``||a_i||_1 / s_i`` for ``tau`` local SGD steps with heavy-ball momentum ``rho``."""
  tau = tau.astype(jnp.float32)
  if momentum == 0:
    return tau
  rho = momentum
  return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)


def fednova(client_lr: float = 0.05, server_optimizer: optax.GradientTransformation | None = None,
            *, momentum: float = 0.0, **fedavg_kwargs) -> Algorithm:
  """FedNova with local SGD (``client_lr``, optional heavy-ball ``momentum``); other arguments
  as :func:`fedjax_sim.algorithms.fedavg`. Per-client steps, learning-rate scales and momentum
  all enter ``||a_i||_1`` (module docstring). With equal ``||a_i||_1`` it is FedAvg."""
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
    # ||a_i||_1 includes the client's learning-rate scale s_i (module docstring).
    a = jnp.maximum(_a_norm(info["steps"], momentum) * info["lr_scale"].astype(jnp.float32),
                    1e-12)
    return jax.tree.map(lambda d: d / a.astype(d.dtype), delta), None, a

  def server_finish(aux, update, tau_eff, info, key):
    del info, key
    return jax.tree.map(lambda u: u * tau_eff.astype(u.dtype), update), aux

  return dataclasses.replace(base, name="fednova", client_finish=client_finish,
                             server_finish=server_finish)
