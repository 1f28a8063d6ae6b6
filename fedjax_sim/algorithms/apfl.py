"""APFL: Adaptive Personalized Federated Learning (Deng, Kamani, Mahdavi 2020).

Every client i keeps a local model ``v_i`` (population-scale state; ``v_i^0 = w^0``) and a mixing
weight ``alpha_i in [0, 1]``; its personalized model is the mixture
``vbar_i = alpha_i v_i + (1 - alpha_i) w_i`` with its copy ``w_i`` of the global model. The
paper's Algorithm 1, one local step t of a sampled client on a batch xi (all gradients at the
values of step t-1)::

    w_i^t     = w_i^{t-1} - eta grad f_i(w_i^{t-1}; xi)
    v_i^t     = v_i^{t-1} - eta grad_v f_i(vbar_i^{t-1}; xi)       = v - eta alpha_i grad f_i(vbar)
    alpha_i^t = alpha_i^{t-1} - eta grad_alpha f_i(vbar_i^{t-1}; xi)
              = alpha_i^{t-1} - eta < v_i^{t-1} - w_i^{t-1}, grad f_i(vbar_i^{t-1}; xi) >
    vbar_i^t  = alpha_i^t v_i^t + (1 - alpha_i^t) w_i^t

and every tau steps (one round here: ``local_steps``/``local_epochs``) the server averages,
``w = (1/|U|) sum_{i in U} w_i`` (default ``weighting="uniform"``, as in the paper) and broadcasts
it, so every client's ``w_i`` is the global model again. ``alpha_i`` is projected onto [0, 1]
after each step (Section 3.1 constrains ``alpha in [0, 1]``). The adaptive ``alpha`` is the
paper's; with ``adaptive_alpha=False`` it stays fixed at ``alpha``.

Here ``w_i`` is trained as in :func:`fedjax_sim.algorithms.fedavg` (any server optimizer;
``optax.sgd(1.0)``, the default, is the paper's averaging). ``v_i`` and ``alpha_i`` are stepped
by the client optimizer (separate states, fresh every round) on the gradients above, obtained by
differentiating ``f_i(alpha v + (1 - alpha) w)`` in ``v`` and ``alpha``: for ``optax.sgd(eta)``
the lines above exactly, with the paper's shared step size ``eta``.

Deviation, stated: the initial mixing weight ``alpha`` is an in-state hyperparameter
(``hparams["alpha"]``, sweepable without recompiling) and the per-client state keeps
``alpha_i - alpha`` (zero at first), so the per-client weight is ``clip(alpha + offset_i, 0, 1)``:
equal to the paper's ``alpha_i`` for a run with one ``alpha``, and a new ``alpha`` given to a
sweep or a resumed run shifts every client's weight by the same amount.

The personalized model evaluated (:func:`fedjax_sim.personalize.evaluate_personal`) is
``alpha_i v_i + (1 - alpha_i) w`` with the current global model ``w``: after the broadcast every
client's ``w_i`` is ``w``. Per-client metrics (``RoundOutput.clients``): ``personal_loss`` and
``personal_accuracy`` of ``vbar_i`` on the batches it trained on (before each step's update), and
``alpha`` (the client's new mixing weight).
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
from fedjax_sim.client import ClientProgram, ClientResult, LocalCarry, local_training, scale_updates


def mixing_weight(alpha_offset, hparams) -> jax.Array:
  """``alpha_i = clip(hparams["alpha"] + alpha_offset, 0, 1)`` (module docstring)."""
  return jnp.clip(hparams["alpha"] + alpha_offset, 0.0, 1.0)


def mix(alpha, v, w):
  """``alpha v + (1 - alpha) w``, leafwise."""
  return jax.tree.map(lambda a, b: (alpha * a + (1.0 - alpha) * b).astype(a.dtype), v, w)


class APFLState(NamedTuple):
  """One client's persistent state: its local model ``v_i`` and ``alpha_i - alpha``."""
  personal: Any
  alpha_offset: jax.Array

  def personal_params(self, global_params, hparams):
    """The client's personalized model ``alpha_i v_i + (1 - alpha_i) w``."""
    return mix(mixing_weight(self.alpha_offset, hparams), self.personal, global_params)


def apfl_state_init(params) -> APFLState:
  """``v_i^0 = w^0``, ``alpha_i^0 = alpha`` (offset 0)."""
  return APFLState(params, jnp.zeros((), jnp.float32))


class APFLCarry(NamedTuple):
  local: LocalCarry      # w_i
  personal: Any          # v_i
  personal_opt_state: Any
  alpha: jax.Array       # alpha_i (float32 scalar)
  alpha_opt_state: Any
  personal_loss_sum: jax.Array
  personal_correct: jax.Array


def apfl_client(adaptive_alpha: bool):
  """The APFL client program factory (module docstring)."""

  def factory(model, optimizer) -> ClientProgram:
    inner = local_training()(model, optimizer)

    def mixed_loss(v, alpha, w, batch):
      return model.batch_loss(mix(alpha, v, w), batch.x, batch.y, batch.mask)

    # gradients of f_i(vbar) in v (= alpha grad f_i(vbar)) and in alpha (= <v - w, grad f_i(vbar)>)
    mixed_grad = jax.value_and_grad(mixed_loss, argnums=(0, 1), has_aux=True)

    def init(ctx):
      v = ctx.state.personal
      alpha = mixing_weight(ctx.state.alpha_offset, ctx.hparams).astype(jnp.float32)
      zero = jnp.zeros((), jnp.float32)
      return APFLCarry(inner.init(ctx), v, optimizer.init(v), alpha, optimizer.init(alpha),
                       zero, zero)

    def step(carry, batch, ctx, key):
      w = carry.local.params
      (_, (loss_sum, correct, _)), (g_v, g_a) = mixed_grad(carry.personal, carry.alpha, w, batch)
      upd, v_state = optimizer.update(g_v, carry.personal_opt_state, carry.personal)
      v = optax.apply_updates(carry.personal, scale_updates(upd, ctx.lr_scale))
      alpha, a_state = carry.alpha, carry.alpha_opt_state
      if adaptive_alpha:
        upd_a, a_state = optimizer.update(g_a, a_state, alpha)
        alpha = jnp.clip(optax.apply_updates(alpha, scale_updates(upd_a, ctx.lr_scale)), 0.0, 1.0)
      return APFLCarry(inner.step(carry.local, batch, ctx, key), v, v_state, alpha, a_state,
                       carry.personal_loss_sum + loss_sum, carry.personal_correct + correct)

    def final(carry, ctx):
      res = inner.final(carry.local, ctx)
      n = jnp.maximum(res.metrics["count"], 1.0)
      metrics = dict(res.metrics, personal_loss=carry.personal_loss_sum / n,
                     personal_accuracy=carry.personal_correct / n, alpha=carry.alpha)
      offset = ctx.state.alpha_offset + (carry.alpha - mixing_weight(ctx.state.alpha_offset,
                                                                     ctx.hparams))
      return ClientResult(res.delta, APFLState(carry.personal, offset.astype(jnp.float32)),
                          res.upload, metrics)

    return ClientProgram(init, step, final)

  return factory


def apfl(client_optimizer: optax.GradientTransformation | None = None,
         server_optimizer: optax.GradientTransformation | None = None, *, alpha: float = 0.25,
         adaptive_alpha: bool = True, weighting: str = "uniform", **fedavg_kwargs) -> Algorithm:
  """APFL (module docstring) with initial (or, ``adaptive_alpha=False``, fixed) mixing weight
  ``alpha in [0, 1]``. Other arguments as :func:`fedjax_sim.algorithms.fedavg` (default
  ``weighting="uniform"``, as in the paper; ``local_steps`` is the paper's tau)."""
  reject_renamed("APFL", fedavg_kwargs)
  if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha)
                                     and 0.0 <= alpha <= 1.0):
    raise ValueError(f"APFL alpha must be a number in [0, 1], got {alpha!r}")
  if not isinstance(adaptive_alpha, bool):
    raise ValueError(f"APFL adaptive_alpha must be a bool, got {adaptive_alpha!r}")
  base = fedavg(client_optimizer, server_optimizer, weighting=weighting, **fedavg_kwargs)
  return dataclasses.replace(base, name="apfl", client=apfl_client(adaptive_alpha),
                             client_state_init=apfl_state_init, hparams={"alpha": float(alpha)})
