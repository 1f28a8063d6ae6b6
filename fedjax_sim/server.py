"""Server state and the server optimizer step on the aggregated pseudo-gradient."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
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
    hparams: hyperparameters that live in state as arrays, so sweeps vmap over them and a new
      value never recompiles (see :data:`HPARAMS`); ``{}`` for none.
  """
  params: PyTree
  opt_state: Any
  round: jax.Array
  aux: Any = dataclasses.field(default_factory=dict)
  clients: Any = dataclasses.field(default_factory=dict)
  hparams: Any = dataclasses.field(default_factory=dict)


# Hyperparameters a run can hold in its state (``run(hparams=...)``, ``fedjax_sim.sweep``):
HPARAMS = {
    "client_lr_scale": "multiplies every client optimizer update (the client learning rate)",
    "server_lr_scale": "multiplies the server optimizer's update (the server learning rate)",
    "mu": "FedProx's proximal coefficient (replaces the algorithm's mu)",
}


def check_hparams(hparams) -> dict:
  """Validates a ``{name: scalar}`` dict against :data:`HPARAMS`; returns float32 arrays."""
  out = {}
  for name, v in (hparams or {}).items():
    if name not in HPARAMS:
      raise ValueError(f"unknown hyperparameter {name!r}; state can hold {sorted(HPARAMS)}")
    v = np.asarray(v, np.float32)
    if v.shape != () or not np.isfinite(v) or v < 0:
      raise ValueError(f"hyperparameter {name!r} must be a finite scalar >= 0, got {v!r}")
    out[name] = jnp.asarray(v)
  return out


def init(params: PyTree, server_optimizer: optax.GradientTransformation, *, aux: Any = None,
         clients: Any = None, hparams: Any = None) -> ServerState:
  return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                     {} if aux is None else aux, {} if clients is None else clients,
                     {} if hparams is None else hparams)


def step(server_optimizer: optax.GradientTransformation, state: ServerState,
         pseudo_gradient: PyTree, apply: jax.Array) -> tuple[ServerState, jax.Array]:
  """Applies the server optimizer to ``pseudo_gradient`` (mean of ``global - local``).

  ``optax.sgd(1.0)`` makes the new model the weighted mean of the clients' models (FedAvg);
  momentum gives FedAvgM, :func:`fedjax_sim.algorithms.adaptive_server_optimizer` FedAdam /
  FedYogi / FedAdagrad.

  Returns ``(state, applied)``: ``applied`` (scalar bool) is True when the step was taken. It is
  not taken -- params and optimizer state stay as they were, only ``round`` advances -- when
  ``apply`` is False (no client contributed a finite update), or when the aggregate, the new
  params or the new optimizer state hold a NaN/inf: every client's update can be finite while
  their weighted sum overflows, and a non-finite global model would never recover.
  """
  updates, opt_state = server_optimizer.update(pseudo_gradient, state.opt_state, state.params)
  if "server_lr_scale" in state.hparams:
    scale = state.hparams["server_lr_scale"]
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
  params = optax.apply_updates(state.params, updates)
  applied = (jnp.asarray(apply) & tree.all_finite(pseudo_gradient) & tree.all_finite(params)
             & tree.all_finite(opt_state))
  params, opt_state = tree.where(applied, (params, opt_state), (state.params, state.opt_state))
  return state.replace(params=params, opt_state=opt_state, round=state.round + 1), applied


def update(server_optimizer: optax.GradientTransformation, state: ServerState,
           pseudo_gradient: PyTree, apply: jax.Array) -> ServerState:
  """:func:`step` without its ``applied`` flag."""
  return step(server_optimizer, state, pseudo_gradient, apply)[0]
