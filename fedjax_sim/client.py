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


class ClientOutput(NamedTuple):
  """What one client sends back (the engine stacks these over C).

  Attributes:
    delta: ``global_params - local_params`` (a pseudo-gradient: the server descends along it).
    metrics: scalars ``loss_sum``, ``correct``, ``count`` (summed over the examples seen in local
      training, before each step's update) and ``steps`` (non-empty local steps).
  """
  delta: PyTree
  metrics: dict[str, jax.Array]


def make_client_train(model: Model, client_optimizer: optax.GradientTransformation,
                      regularizer: Callable[[PyTree, PyTree], jax.Array] | None = None):
  """Returns ``train(global_params, x [S,B,...], y [S,B], mask [S,B]) -> ClientOutput``.

  Args:
    model: the model (per-batch ``apply``).
    client_optimizer: any optax transformation; its state starts fresh every round.
    regularizer: optional extra local objective term ``(params, global_params) -> scalar`` (e.g.
      FedProx's proximal term), added to the masked mean batch loss.
  """

  def objective(params, global_params, x, y, mask):
    loss, aux = model.batch_loss(params, x, y, mask)
    if regularizer is not None:
      loss = loss + regularizer(params, global_params)
    return loss, aux

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train(global_params, x, y, mask) -> ClientOutput:
    def step(carry, batch):
      params, opt_state = carry
      bx, by, bm = batch
      (_, (loss_sum, correct, count)), grads = grad_fn(params, global_params, bx, by, bm)
      updates, new_opt_state = client_optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      nonempty = count > 0
      params, opt_state = tree.where(nonempty, (new_params, new_opt_state), (params, opt_state))
      return (params, opt_state), (loss_sum, correct, count, nonempty)

    init = (global_params, client_optimizer.init(global_params))
    (local, _), (loss_sum, correct, count, nonempty) = jax.lax.scan(step, init, (x, y, mask))
    delta = jax.tree.map(lambda g, l: g - l, global_params, local)
    metrics = {"loss_sum": jnp.sum(loss_sum), "correct": jnp.sum(correct),
               "count": jnp.sum(count), "steps": jnp.sum(nonempty).astype(jnp.int32)}
    return ClientOutput(delta, metrics)

  return train
