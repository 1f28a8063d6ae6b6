"""FedProx: Federated Optimization in Heterogeneous Networks
(Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020).

FedAvg whose clients minimise ``f_k(w) + mu/2 ||w - w_global||^2``: the proximal term keeps local
models near the global one when clients are heterogeneous. ``mu = 0`` is FedAvg.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def proximal_term(mu: float):
  """``(params, global_params, ctx) -> mu/2 * ||params - global_params||^2``; an in-state
  ``mu`` hyperparameter (``ctx.hparams["mu"]``, e.g. from a sweep) replaces ``mu``."""

  def term(params, global_params, ctx=None):
    m = mu
    if ctx is not None and ctx.hparams and "mu" in ctx.hparams:
      m = ctx.hparams["mu"]
    sq = jax.tree.map(lambda p, g: jnp.sum((p - g) ** 2), params, global_params)
    return 0.5 * m * sum(jax.tree.leaves(sq))

  return term


def fedprox(client_optimizer=None, server_optimizer=None, *, mu: float = 0.01,
            **fedavg_kwargs) -> Algorithm:
  """FedProx with proximal coefficient ``mu >= 0``; other arguments as :func:`fedavg`."""
  if not (isinstance(mu, (int, float)) and mu >= 0):
    raise ValueError(f"FedProx mu must be a number >= 0, got {mu!r}")
  base = fedavg(client_optimizer, server_optimizer, **fedavg_kwargs)
  return dataclasses.replace(base, name="fedprox", regularizer=proximal_term(float(mu)))
