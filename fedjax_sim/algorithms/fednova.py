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

For local SGD with heavy-ball momentum rho (``optax.sgd(eta, momentum=rho)``) and a per-client
learning-rate scale ``s_i`` (``Heterogeneity(learning_rate_scale=...)`` times the
``client_lr_scale`` hyperparameter), ``a_{i,k} = s_i (1 - rho^(tau_i - k + 1)) / (1 - rho)``.

How ``eta ||a_i||_1`` is measured: every client also runs its own optimizer, with its own
learning-rate scale and on exactly its non-empty steps, on a scalar *probe* whose gradient is 1 at
every step; the probe's displacement is ``eta sum_k a_{i,k} = eta ||a_i||_1`` for any optimizer
whose update is linear in the gradients and independent of the parameters (SGD, momentum,
Nesterov, learning-rate schedules). So FedNova takes a ``client_optimizer`` like every algorithm
and needs no closed form per optimizer; it is the paper's ``||a_i||_1`` for those optimizers. For
others (Adam), the probe gives the displacement a constant unit gradient would cause, a
normalisation of the same kind but not the paper's (the paper defines none for them).

The client uploads ``eta ||a_i||_1`` and sends ``(x - y_i) / (eta ||a_i||_1) = d_i`` as its
update; the engine averages both with the weights p_i, and ``server_finish`` returns
``tau_eff_eta * sum_i p_i d_i`` (``tau_eff_eta = sum_i p_i eta ||a_i||_1``): with the default
server optimizer ``sgd(1)`` that is the update above. With equal ``||a_i||_1`` it is FedAvg.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import Algorithm, reject_renamed
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import (ClientProgram, ClientResult, LocalCarry, local_training,
                               scale_updates)


class NovaCarry(NamedTuple):
  local: LocalCarry
  probe: jax.Array        # scalar "parameter" driven by a unit gradient
  probe_state: Any


def fednova_client(model, optimizer) -> ClientProgram:
  """Local training plus the unit-gradient probe (module docstring)."""
  inner = local_training()(model, optimizer)

  def init(ctx):
    probe = jnp.zeros((), jnp.float32)
    return NovaCarry(inner.init(ctx), probe, optimizer.init(probe))

  def step(carry, batch, ctx, key):
    upd, probe_state = optimizer.update(jnp.ones((), jnp.float32), carry.probe_state, carry.probe)
    probe = optax.apply_updates(carry.probe, scale_updates(upd, ctx.lr_scale))
    return NovaCarry(inner.step(carry.local, batch, ctx, key), probe, probe_state)

  def final(carry, ctx):
    res = inner.final(carry.local, ctx)
    eta_a = jnp.maximum(-carry.probe, 1e-12)          # eta ||a_i||_1 (> 0)
    d = jax.tree.map(lambda x: x / eta_a.astype(x.dtype), res.delta)
    return ClientResult(d, res.state, eta_a, res.metrics)

  return ClientProgram(init, step, final)


def _rescale(ctx, update):
  tau_eff = ctx.upload                                # sum_i p_i eta ||a_i||_1 / sum_i p_i
  return jax.tree.map(lambda u: u * tau_eff.astype(u.dtype), update), ctx.state


def fednova(client_optimizer: optax.GradientTransformation | None = None,
            server_optimizer: optax.GradientTransformation | None = None,
            **fedavg_kwargs) -> Algorithm:
  """FedNova (module docstring); local SGD with heavy-ball momentum is
  ``client_optimizer=optax.sgd(lr, momentum=rho)``. Arguments as
  :func:`fedjax_sim.algorithms.fedavg`."""
  reject_renamed("FedNova", fedavg_kwargs)
  base = fedavg(client_optimizer, server_optimizer, **fedavg_kwargs)
  return dataclasses.replace(base, name="fednova", client=fednova_client, server_finish=_rescale)
