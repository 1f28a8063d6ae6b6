"""Ditto: Fair and Robust Federated Learning Through Personalization
(Li, Hu, Beirami, Smith, ICML 2021).

Every client k keeps a personal model ``v_k`` (population-scale state; ``v_k^0 = w^0``) next to the
global model ``w``. Ditto solves, for each client, the bi-level problem::

    min_{v_k} h_k(v_k; w*) = F_k(v_k) + lambda/2 ||v_k - w*||^2,
    w* in argmin_w G(F_1(w), ..., F_K(w))          (G: the FedAvg objective here)

The paper's Algorithm 1, round t, for each sampled client k, on the same local batches::

    w_k^t  <- local training of w from w^t          (the global solver's update, FedAvg)
    v_k    <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t))    s local iterations
    Delta_k^t = w_k^t - w^t
    w^{t+1} = w^t + (1/|S_t|) sum_{k in S_t} Delta_k^t

Here the global model's update is :func:`fedjax_sim.algorithms.fedavg`'s (any server optimizer;
``optax.sgd(1.0)``, the default, is the paper's step), with ``weighting="uniform"`` by default
as in Algorithm 1. Each local step trains ``w_k`` and ``v_k`` on the same batch; the personal
update is the client optimizer (or ``personal_optimizer``, with its own state, fresh every round)
applied to ``grad F_k(v_k) + lambda (v_k - w^t)``: for ``optax.sgd(eta)`` exactly the line
above. ``lambda`` is an in-state hyperparameter (``hparams["lam"]``, sweepable; ``lam = 0`` is
local training alone for ``v_k``, large ``lam`` pulls ``v_k`` to the global model). A client whose
update does not count keeps its old ``v_k``.

Per-client metrics (``RoundOutput.clients``): ``personal_loss`` and ``personal_accuracy`` of
``v_k`` on the batches it trained on (before each step's update, as ``loss``/``accuracy``).
The personal models are ``state.clients.algorithm.personal``
(:func:`fedjax_sim.personalize.evaluate_personal` evaluates them on held-out client data).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import Algorithm, reject_renamed
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import (ClientProgram, ClientResult, LocalCarry, local_training,
                               objective_grad, scale_updates)


class DittoState(NamedTuple):
  """One client's persistent state: its personal model ``v_k`` (same tree as the params)."""
  personal: Any

  def personal_params(self, global_params, hparams):
    """The model this client uses: ``v_k`` (see :func:`fedjax_sim.personalize.personal_params`)."""
    del global_params, hparams
    return self.personal


class DittoCarry(NamedTuple):
  local: LocalCarry      # the global model's local training (w_k)
  personal: Any          # v_k
  personal_opt_state: Any
  personal_loss_sum: jax.Array
  personal_correct: jax.Array


def ditto_term(params, ctx):
  """``lam/2 ||params - w^t||^2`` with ``lam = ctx.hparams["lam"]`` (``w^t = ctx.global_params``)."""
  sq = jax.tree.map(lambda p, g: jnp.sum((p - g) ** 2), params, ctx.global_params)
  return 0.5 * ctx.hparams["lam"] * sum(jax.tree.leaves(sq))


def ditto_client(personal_optimizer: optax.GradientTransformation | None = None):
  """The Ditto client program factory: local training of ``w`` plus the personal steps on ``v``
  (module docstring); ``personal_optimizer=None`` uses the client optimizer."""

  def factory(model, optimizer) -> ClientProgram:
    inner = local_training()(model, optimizer)
    popt = personal_optimizer if personal_optimizer is not None else optimizer
    personal_grad = objective_grad(model, ditto_term)

    def init(ctx):
      v = ctx.state.personal
      zero = jnp.zeros((), jnp.float32)
      return DittoCarry(inner.init(ctx), v, popt.init(v), zero, zero)

    def step(carry, batch, ctx, key):
      (_, (loss_sum, correct, _)), g = personal_grad(carry.personal, batch, ctx,
                                                               jax.random.fold_in(key, 1))
      updates, opt_state = popt.update(g, carry.personal_opt_state, carry.personal)
      v = optax.apply_updates(carry.personal, scale_updates(updates, ctx.lr_scale))
      return DittoCarry(inner.step(carry.local, batch, ctx, key), v, opt_state,
                        carry.personal_loss_sum + loss_sum, carry.personal_correct + correct)

    def final(carry, ctx):
      res = inner.final(carry.local, ctx)
      n = jnp.maximum(res.metrics["count"], 1.0)
      metrics = dict(res.metrics, personal_loss=carry.personal_loss_sum / n,
                     personal_accuracy=carry.personal_correct / n)
      return ClientResult(res.delta, DittoState(carry.personal), res.upload, metrics)

    return ClientProgram(init, step, final)

  return factory


def ditto(client_optimizer: optax.GradientTransformation | None = None,
          server_optimizer: optax.GradientTransformation | None = None, *, lam: float = 0.1,
          personal_optimizer: optax.GradientTransformation | None = None,
          weighting: str = "uniform", **fedavg_kwargs) -> Algorithm:
  """Ditto (module docstring) with regularization ``lam >= 0`` (the paper's lambda).

  ``personal_optimizer`` trains the personal models (default: the client optimizer, as in the
  paper). Other arguments as :func:`fedjax_sim.algorithms.fedavg` (default
  ``weighting="uniform"``, as in the paper's Algorithm 1).
  """
  reject_renamed("Ditto", fedavg_kwargs)
  if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam)
                                   and lam >= 0):
    raise ValueError(f"Ditto lam (lambda) must be a finite number >= 0, got {lam!r}")
  if personal_optimizer is not None and not (hasattr(personal_optimizer, "init")
                                             and hasattr(personal_optimizer, "update")):
    raise ValueError(f"Ditto personal_optimizer must be an optax GradientTransformation, got "
                     f"{type(personal_optimizer).__name__}")
  base = fedavg(client_optimizer, server_optimizer, weighting=weighting, **fedavg_kwargs)
  return dataclasses.replace(base, name="ditto", client=ditto_client(personal_optimizer),
                             client_state_init=DittoState, hparams={"lam": float(lam)})
