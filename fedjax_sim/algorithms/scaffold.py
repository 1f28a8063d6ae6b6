"""SCAFFOLD: Stochastic Controlled Averaging for Federated Learning
(Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020), option II.

Each client i keeps a control variate ``c_i`` (population-scale state, zeros at first); the server
keeps ``c``. Local steps correct client drift: ``y <- y - lr (g_i(y) - c_i + c)``, written here as
the linear regularizer ``<c - c_i, y>`` whose gradient is exactly that correction, so any client
optimizer works. After K local steps (option II):

    c_i+ = c_i - c + (x - y) / (K lr)          delta_c_i = c_i+ - c_i
    x    <- server step on mean_i (x - y_i)     c <- c + (|S| / N) mean_i delta_c_i

With ``optax.sgd(1.0)`` on the server (the default) the model update is the paper's with global
step size 1. Clients whose update does not arrive keep their old ``c_i``. The means are weighted
by the algorithm's ``weighting`` (default ``"uniform"``, as in the paper).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def _drift_correction(params, global_params, ctx):
  del global_params
  terms = jax.tree.map(lambda p, c, ci: jnp.sum(p * jax.lax.stop_gradient(c - ci)), params,
                       ctx.server_aux, ctx.state)
  return sum(jax.tree.leaves(terms))


def scaffold(client_lr: float = 0.05, server_optimizer: optax.GradientTransformation | None = None,
             *, weighting: str = "uniform", **fedavg_kwargs) -> Algorithm:
  """SCAFFOLD (option II) with local SGD at ``client_lr`` (the control-variate update divides by
  it); other arguments as :func:`fedjax_sim.algorithms.fedavg`."""
  if not (isinstance(client_lr, (int, float)) and client_lr > 0):
    raise ValueError(f"SCAFFOLD client_lr must be a number > 0, got {client_lr!r}")
  if "client_optimizer" in fedavg_kwargs:
    raise ValueError("SCAFFOLD's control-variate update assumes local SGD: give client_lr"
                     " instead of client_optimizer")
  base = fedavg(optax.sgd(client_lr), server_optimizer, weighting=weighting, **fedavg_kwargs)

  def client_finish(ctx, delta, info):
    k_lr = jnp.maximum(info["steps"], 1).astype(jnp.float32) * client_lr * info["lr_scale"]
    # c_i+ - c_i = -c + (x - y) / (K lr); a client that made no step keeps c_i.
    dc = jax.tree.map(lambda d, c: jnp.where(info["steps"] > 0, d / k_lr.astype(d.dtype) - c, 0),
                      delta, ctx.server_aux)
    new_ci = jax.tree.map(jnp.add, ctx.state, dc)
    return delta, new_ci, dc

  def server_finish(c, update, dc_mean, info, key):
    del key
    frac = info["num_counted"].astype(jnp.float32) / info["population"]
    return update, jax.tree.map(lambda a, d: a + (frac * d).astype(a.dtype), c, dc_mean)

  return dataclasses.replace(base, name="scaffold", regularizer=_drift_correction,
                             client_state_init=tree.zeros_like, server_aux_init=tree.zeros_like,
                             client_finish=client_finish, server_finish=server_finish)
