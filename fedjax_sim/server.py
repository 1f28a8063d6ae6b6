"""Server state and the server optimizer step on the aggregated pseudo-gradient."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """Global model and server optimizer state.

  Attributes:
    params: the global model.
    opt_state: the server optax optimizer's state.
    round: number of rounds completed (int32 scalar).
  """
  params: PyTree
  opt_state: Any
  round: jax.Array


def init(params: PyTree, server_optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32))


def update(server_optimizer: optax.GradientTransformation, state: ServerState,
           pseudo_gradient: PyTree, apply: jax.Array) -> ServerState:
  """Applies the server optimizer to ``pseudo_gradient`` (mean of ``global - local``).

  ``optax.sgd(1.0)`` makes the new model the weighted mean of the clients' models (FedAvg);
  momentum / Adam / Yogi / Adagrad give FedAvgM / FedAdam / FedYogi / FedAdagrad. When ``apply``
  is False (no client contributed a finite update) params and optimizer state stay as they were.
  """
  updates, opt_state = server_optimizer.update(pseudo_gradient, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params, opt_state = tree.where(apply, (params, opt_state), (state.params, state.opt_state))
  return ServerState(params, opt_state, state.round + 1)
