"""SCAFFOLD: Stochastic Controlled Averaging for Federated Learning
(Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020).

Each client i keeps a control variate ``c_i`` (population-scale state, zeros at first); the server
keeps ``c``. Local steps correct client drift: the client optimizer is fed ``g_i(y) - c_i + c``
instead of the gradient ``g_i(y)`` (``y <- y - lr (g_i(y) - c_i + c)`` with local SGD). After K
local steps::

    c_i+ = (1/K) sum_k g_i(y_k)                 delta_c_i = c_i+ - c_i
    x    <- server step on mean_i (x - y_i)      c <- c + (|S| / N) mean_i delta_c_i

Deviation, stated: the paper's option II computes ``c_i+ = c_i - c + (x - y_i) / (K lr)``. With
local SGD at any (per-client) learning rate that is exactly the mean of the local gradients used
here, since ``x - y_i = lr sum_k (g_k - c_i + c)``; the mean of the gradients stays the paper's
quantity for every other client optimizer too, which is why SCAFFOLD takes a ``client_optimizer``
like every algorithm instead of a learning rate. With ``optax.sgd(1.0)`` on the server (the
default) the model update is the paper's with global step size 1. Clients whose update does not
arrive keep their old ``c_i``. The means are weighted by the algorithm's ``weighting`` (default
``"uniform"``, as in the paper).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree
from fedjax_sim.algorithms.base import Algorithm, reject_renamed
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import (ClientProgram, ClientResult, add_sums, objective_grad,
                               scale_updates, zero_sums)


class ScaffoldCarry(NamedTuple):
  params: Any
  opt_state: Any
  grad_sum: Any      # sum of the raw local gradients g_i(y_k)
  sums: dict


def scaffold_client(model, optimizer) -> ClientProgram:
  """Local training on drift-corrected gradients; ``final`` returns ``c_i+`` as the new state and
  ``delta_c_i`` as the upload."""
  grad_fn = objective_grad(model)

  def init(ctx):
    p = ctx.global_params
    return ScaffoldCarry(p, optimizer.init(p), tree.zeros_like(p), zero_sums())

  def step(carry, batch, ctx, key):
    (_, (loss_sum, correct, count)), g = grad_fn(carry.params, batch, ctx, key)
    corrected = jax.tree.map(lambda gi, c, ci: gi + (c - ci).astype(gi.dtype), g, ctx.server,
                             ctx.state)
    updates, opt_state = optimizer.update(corrected, carry.opt_state, carry.params)
    params = optax.apply_updates(carry.params, scale_updates(updates, ctx.lr_scale))
    return ScaffoldCarry(params, opt_state, jax.tree.map(jnp.add, carry.grad_sum, g),
                         add_sums(carry.sums, loss_sum, correct, count))

  def final(carry, ctx):
    steps = carry.sums["steps"]
    k = jnp.maximum(steps, 1).astype(jnp.float32)
    # a client that made no step keeps c_i
    new_ci = jax.tree.map(lambda s, ci: jnp.where(steps > 0, s / k.astype(s.dtype), ci),
                          carry.grad_sum, ctx.state)
    dc = jax.tree.map(jnp.subtract, new_ci, ctx.state)
    delta = jax.tree.map(jnp.subtract, ctx.global_params, carry.params)
    return ClientResult(delta, new_ci, dc, dict(carry.sums))

  return ClientProgram(init, step, final)


def _update_control_variate(ctx, update):
  frac = ctx.num_counted.astype(jnp.float32) / ctx.population
  return update, jax.tree.map(lambda c, d: c + (frac * d).astype(c.dtype), ctx.state, ctx.upload)


def scaffold(client_optimizer: optax.GradientTransformation | None = None,
             server_optimizer: optax.GradientTransformation | None = None, *,
             weighting: str = "uniform", **fedavg_kwargs) -> Algorithm:
  """SCAFFOLD (module docstring); arguments as :func:`fedjax_sim.algorithms.fedavg` (default
  ``weighting="uniform"``, as in the paper)."""
  reject_renamed("SCAFFOLD", fedavg_kwargs)
  base = fedavg(client_optimizer, server_optimizer, weighting=weighting, **fedavg_kwargs)
  return dataclasses.replace(base, name="scaffold", client=scaffold_client,
                             client_state_init=tree.zeros_like, server_state_init=tree.zeros_like,
                             server_finish=_update_control_variate)
