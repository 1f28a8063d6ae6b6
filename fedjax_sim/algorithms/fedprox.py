"""FedProx: Federated Optimization in Heterogeneous Networks
(Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020).

FedAvg whose clients minimise ``f_k(w) + mu/2 ||w - w_global||^2``: the proximal term keeps local
models near the global one when clients are heterogeneous. ``mu = 0`` is FedAvg. ``mu`` is an
in-state hyperparameter (``Algorithm.hparams``): ``run(hparams={"mu": ...})`` and
:func:`fedjax_sim.sweep.sweep` change it without recompiling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import local_training


def proximal_term(params, ctx):
  """``mu/2 * ||params - ctx.global_params||^2`` with ``mu = ctx.hparams["mu"]``."""
  sq = jax.tree.map(lambda p, g: jnp.sum((p - g) ** 2), params, ctx.global_params)
  return 0.5 * ctx.hparams["mu"] * sum(jax.tree.leaves(sq))


def fedprox(client_optimizer=None, server_optimizer=None, *, mu: float = 0.01,
            **fedavg_kwargs) -> Algorithm:
  """FedProx with proximal coefficient ``mu >= 0``; other arguments as :func:`fedavg`."""
  if isinstance(mu, bool) or not (isinstance(mu, (int, float)) and mu >= 0):
    raise ValueError(f"FedProx mu must be a number >= 0, got {mu!r}")
  base = fedavg(client_optimizer, server_optimizer, **fedavg_kwargs)
  return dataclasses.replace(base, name="fedprox", client=local_training(proximal_term),
                             hparams={"mu": float(mu)})
