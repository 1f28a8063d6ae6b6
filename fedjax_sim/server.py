"""Server state and the server optimizer step on the aggregated pseudo-gradient."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """Global model, server optimizer state, and the algorithm's persistent state.

  Attributes:
    params: the global model.
    opt_state: the server optax optimizer's state.
    round: number of rounds completed (int32 scalar).
    aux: server-side state of the algorithm between rounds (e.g. SCAFFOLD's global control
      variate, an adaptive clipping norm); ``{}`` when it has none.
    clients: per-client state for the whole population, every leaf ``[P, ...]`` (e.g. SCAFFOLD's
      control variates, error-feedback residuals): ``{"algorithm": ..., "transform": ...}``, only
      the keys that exist. The round gathers the cohort's rows and scatters them back.
  """
  params: PyTree
  opt_state: Any
  round: jax.Array
  aux: Any = dataclasses.field(default_factory=dict)
  clients: Any = dataclasses.field(default_factory=dict)


def init(params: PyTree, server_optimizer: optax.GradientTransformation, *, aux: Any = None,
         clients: Any = None) -> ServerState:
  return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                     {} if aux is None else aux, {} if clients is None else clients)


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
  return state.replace(params=params, opt_state=opt_state, round=state.round + 1)
