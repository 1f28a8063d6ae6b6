"""Local training of one client as a ``lax.scan`` over its local steps.

The function here is written for ONE client; the engine vmaps it over the client axis (the
library owns that axis, users never write it). Masked examples contribute nothing to the loss,
and a step whose batch is entirely masked leaves parameters and optimizer state unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree
from fedjax_sim.models.core import Model

PyTree = Any


class ClientContext(NamedTuple):
  """What a client knows besides the global model (vmapped with the client, except ``server_aux``).

  Attributes:
    client_id: int32 position of the client in the population.
    state: this client's persistent state (a row of ``ServerState.clients["algorithm"]``), or
      ``None`` for stateless algorithms.
    server_aux: the algorithm's server-side state broadcast to every client (e.g. SCAFFOLD's
      global control variate), or ``None``.
    hparams: the run's in-state hyperparameters (``ServerState.hparams``), e.g. ``mu``.
  """
  client_id: jax.Array
  state: Any = None
  server_aux: Any = None
  hparams: Any = None


class ClientOutput(NamedTuple):
  """What one client sends back (the engine stacks these over C).

  Attributes:
    delta: ``global_params - local_params`` (a pseudo-gradient: the server descends along it).
    metrics: scalars ``loss_sum``, ``correct``, ``count`` (summed over the examples seen in local
      training, before each step's update) and ``steps`` (non-empty local steps).
  """
  delta: PyTree
  metrics: dict[str, jax.Array]


Regularizer = Callable[[PyTree, PyTree, ClientContext], jax.Array]


class ClientLoop(NamedTuple):
  """One client's local training cut into its parts, so that a caller can drive the steps.

  ``init(global_params) -> carry``; ``step(carry, global_params, x [B, ...], y [B], mask [B],
  ctx, lr_scale) -> carry``; ``finish(carry, global_params) -> ClientOutput``. The carry holds
  the local parameters, the client optimizer's state and running metric sums. The engine vmaps
  ``step`` over a chunk of clients and runs it only as many times as that chunk's busiest client
  needs (:func:`fedjax_sim.engine.make_round`); :func:`make_client_train` scans it over S steps.
  """
  init: Callable
  step: Callable
  finish: Callable


def make_client_loop(model: Model, client_optimizer: optax.GradientTransformation,
                     regularizer: Regularizer | None = None) -> ClientLoop:
  """The :class:`ClientLoop` of :func:`make_client_train` (same arguments, same arithmetic)."""

  def objective(params, global_params, x, y, mask, ctx):
    loss, aux = model.batch_loss(params, x, y, mask)
    if regularizer is not None:
      loss = loss + regularizer(params, global_params, ctx)
    return loss, aux

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def init(global_params):
    zero = jnp.zeros((), jnp.float32)
    sums = {"loss_sum": zero, "correct": zero, "count": zero, "steps": jnp.zeros((), jnp.int32)}
    return global_params, client_optimizer.init(global_params), sums

  def step(carry, global_params, bx, by, bm, ctx: ClientContext | None = None, lr_scale=None):
    params, opt_state, sums = carry
    (_, (loss_sum, correct, count)), grads = grad_fn(params, global_params, bx, by, bm, ctx)
    updates, new_opt_state = client_optimizer.update(grads, opt_state, params)
    if lr_scale is not None:
      updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    nonempty = count > 0
    # An all-masked step (padding) leaves parameters and optimizer state as they were.
    params, opt_state = tree.where(nonempty, (new_params, new_opt_state), (params, opt_state))
    sums = {"loss_sum": sums["loss_sum"] + loss_sum, "correct": sums["correct"] + correct,
            "count": sums["count"] + count, "steps": sums["steps"] + nonempty.astype(jnp.int32)}
    return params, opt_state, sums

  def finish(carry, global_params) -> ClientOutput:
    local, _, sums = carry
    return ClientOutput(jax.tree.map(lambda g, l: g - l, global_params, local), dict(sums))

  return ClientLoop(init, step, finish)


def make_client_train(model: Model, client_optimizer: optax.GradientTransformation,
                      regularizer: Regularizer | None = None):
  """Returns ``train(global_params, x [S,B,...], y [S,B], mask [S,B], ctx=None, lr_scale=1.0)
  -> ClientOutput``.

  Args:
    model: the model (per-batch ``apply``).
    client_optimizer: any optax transformation; its state starts fresh every round.
    regularizer: optional extra local objective term ``(params, global_params, ctx) -> scalar``
      (FedProx's proximal term; SCAFFOLD's drift correction is the linear term
      ``<c - c_i, params>``), added to the masked mean batch loss. ``ctx`` is the
      :class:`ClientContext` passed to ``train``.

  ``lr_scale`` multiplies the client optimizer's updates (a per-client learning rate: exact for
  every optax optimizer whose learning rate scales its output, e.g. SGD, momentum, Adam).
  It is a ``lax.scan`` of :func:`make_client_loop`'s step over the S steps.
  """
  loop = make_client_loop(model, client_optimizer, regularizer)

  def train(global_params, x, y, mask, ctx: ClientContext | None = None,
            lr_scale=None) -> ClientOutput:
    def step(carry, batch):
      bx, by, bm = batch
      return loop.step(carry, global_params, bx, by, bm, ctx, lr_scale), None

    carry, _ = jax.lax.scan(step, loop.init(global_params), (x, y, mask))
    return loop.finish(carry, global_params)

  return train
