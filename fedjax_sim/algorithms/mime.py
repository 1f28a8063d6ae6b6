"""Mime: Mimicking Centralized Stochastic Algorithms in Federated Learning
(Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh 2020), Algorithm 1 with SGD with momentum
as the base optimizer (MimeLite: :mod:`fedjax_sim.algorithms.mimelite`).

The server keeps the base optimizer's state, the momentum ``m`` (zeros at first). Clients never
update it: every local step of client i uses the same ``m``. Round t, global model ``x``::

    client i:  y <- x;  for each local batch zeta:
                 g = grad f_i(y; zeta) - grad f_i(x; zeta) + c      (Mime: SVRG-style correction)
                 y <- y - eta ((1 - beta) g + beta m)
               upload grad f_i(x) (the client's full-batch gradient at x)
    server:    x <- x - server_step(mean_i (x - y_i))               (sgd(1): x <- mean_i y_i)
               m <- (1 - beta) mean_i grad f_i(x) + beta m

``c`` is the cohort's mean full-batch gradient at x. ``eta (.)`` is the client optimizer applied
to the direction ``(1 - beta) g + beta m`` (give plain ``optax.sgd(eta)``: an optimizer with its
own state would add statefulness across local steps, which Mime exists to avoid); ``beta`` in
[0, 1) is an in-state hyperparameter (``Algorithm.hparams``: sweepable without recompiling).
Means over clients use the algorithm's ``weighting``; ``grad f_i(x)`` is the mean of the
gradients at x over the examples the client visits in the round (computed on the local batches,
so no extra pass over the data): its full-batch gradient when the local work is whole epochs. The
default ``weighting="examples"`` makes ``mean_i grad f_i(x)`` the gradient over all the cohort's
examples, as FedJAX computes it (the paper writes the uniform ``1/|S|``: ``weighting="uniform"``).

Deviation, stated (Mime's ``c``): the paper (and FedJAX's ``mime``) computes ``c`` at the CURRENT
x in a first pass over the cohort, before local training: two communications per round. A round
here is one pass over the cohort, and a client cannot see the other clients' gradients in it, so
clients use the ``c`` of the PREVIOUS round (``mean_i grad f_i(x)`` uploaded then, the same
quantity that updates ``m``), kept in the server state. A client's own full-batch gradient at x
(computable inside the program in a first pass) is no substitute: ``g`` would then be local SVRG,
with none of the cross-client correction that makes Mime what it is. In round 1 ``c = m = 0``,
so the direction is ``(1 - beta)(grad f_i(y; zeta) - grad f_i(x; zeta)) = 0`` at ``y = x`` and
clients do not move: round 1 is Mime's first communication (it computes ``c`` at ``x_0``), and
round 2 uses the exact ``c``; from round 3 on ``c`` is one server step stale. The exact algorithm
needs a pass over the cohort before local training, which a round here does not have.

FedJAX's momentum is optax's trace ``m <- g + beta m`` and direction ``g + beta m``: the paper's
``(1 - beta)`` form here with the learning rates divided by ``(1 - beta)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import (ClientProgram, ClientResult, add_sums, objective_grad,
                               scale_updates, zero_sums)


class MimeState(NamedTuple):
  """Server state of Mime and MimeLite: the base optimizer's momentum ``m`` and ``c``, the
  cohort's mean full-batch gradient at the global model of the last round."""
  momentum: Any
  grad: Any


class MimeCarry(NamedTuple):
  params: Any
  opt_state: Any
  grad_sum: Any        # sum over visited examples of the gradient at x (count-weighted)
  sums: dict


def mime_state_init(params) -> MimeState:
  return MimeState(tree.zeros_like(params), tree.zeros_like(params))


def mime_program(corrected: bool):
  """``(model, optimizer) -> ClientProgram``: local steps along ``(1 - beta) g + beta m`` with
  ``g`` Mime's corrected gradient (``corrected``) or the plain one (MimeLite); the upload is the
  client's mean gradient at x over the examples it visited."""

  def factory(model, optimizer) -> ClientProgram:
    grad_fn = objective_grad(model)

    def init(ctx):
      p = ctx.global_params
      return MimeCarry(p, optimizer.init(p), tree.zeros_like(p), zero_sums())

    def step(carry, batch, ctx, key):
      # the same key for both: the full-batch correction compares one stochastic forward pass
      (_, (loss_sum, correct, count)), g = grad_fn(carry.params, batch, ctx, key)
      _, gx = grad_fn(ctx.global_params, batch, ctx, key)
      if corrected:
        g = jax.tree.map(lambda gy, g0, c: gy - g0 + c.astype(gy.dtype), g, gx, ctx.server.grad)
      beta = ctx.hparams["beta"]
      d = jax.tree.map(lambda gi, m: ((1 - beta) * gi + beta * m).astype(gi.dtype), g,
                       ctx.server.momentum)
      updates, opt_state = optimizer.update(d, carry.opt_state, carry.params)
      params = optax.apply_updates(carry.params, scale_updates(updates, ctx.lr_scale))
      gsum = jax.tree.map(lambda s, gi: s + count.astype(s.dtype) * gi, carry.grad_sum, gx)
      return MimeCarry(params, opt_state, gsum, add_sums(carry.sums, loss_sum, correct, count))

    def final(carry, ctx):
      n = jnp.maximum(carry.sums["count"], 1.0)
      full_grad = jax.tree.map(lambda s: s / n.astype(s.dtype), carry.grad_sum)
      delta = jax.tree.map(jnp.subtract, ctx.global_params, carry.params)
      return ClientResult(delta, ctx.state, full_grad, dict(carry.sums))

    return ClientProgram(init, step, final)

  return factory


def update_momentum(ctx, update):
  """``m <- (1 - beta) c + beta m`` and ``c`` kept, with ``c`` the uploaded mean full-batch
  gradient at x; the aggregate passes through."""
  beta = ctx.hparams["beta"]
  c = ctx.upload
  m = jax.tree.map(lambda m, g: (beta * m + (1 - beta) * g).astype(m.dtype),
                   ctx.state.momentum, c)
  return update, MimeState(m, jax.tree.map(lambda old, g: g.astype(old.dtype),
                                            ctx.state.grad, c))


def check_beta(name: str, beta) -> float:
  if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 <= beta < 1):
    raise ValueError(f"{name} beta (the base optimizer's momentum) must lie in [0, 1), "
                     f"got {beta!r}")
  return float(beta)


def mime(client_optimizer: optax.GradientTransformation | None = None,
         server_optimizer: optax.GradientTransformation | None = None, *, beta: float = 0.9,
         **fedavg_kwargs) -> Algorithm:
  """Mime with SGD-with-momentum ``beta`` in [0, 1) as the base optimizer (module docstring);
  ``client_optimizer`` is the local step (plain ``optax.sgd(eta)``); other arguments as
  :func:`fedjax_sim.algorithms.fedavg`."""
  beta = check_beta("Mime", beta)
  base = fedavg(client_optimizer, server_optimizer, **fedavg_kwargs)
  return dataclasses.replace(base, name="mime", client=mime_program(corrected=True),
                             server_state_init=mime_state_init, server_finish=update_momentum,
                             hparams={"beta": beta})
