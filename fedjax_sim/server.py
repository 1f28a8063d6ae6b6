"""Server state and the server optimizer step on the aggregated pseudo-gradient."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

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
      variate, an adaptive clipping norm; ``Algorithm.server_state_init``), ``EmptyState()``
      when it has none.
    clients: per-client state for the whole population (:class:`ClientStores`, every leaf
      ``[P, ...]``: SCAFFOLD's control variates, error-feedback residuals). The round gathers
      the cohort's rows and scatters them back.
    hparams: hyperparameters that live in state as arrays, so sweeps vmap over them and a new
      value never recompiles: the generic :data:`HPARAMS` given to the run and those the
      algorithm declares (``Algorithm.hparams``); ``{}`` for none.
  """
  params: PyTree
  opt_state: Any
  round: jax.Array
  aux: Any = optax.EmptyState()
  clients: Any = None
  hparams: Any = dataclasses.field(default_factory=dict)


class ClientStores(NamedTuple):
  """Per-client state of the whole population, every leaf ``[P, ...]``: the algorithm's
  (``Algorithm.client_state_init``) and the update transform's (``UpdateTransform.init``);
  ``EmptyState()`` where there is none."""
  algorithm: Any = optax.EmptyState()
  transform: Any = optax.EmptyState()


# Hyperparameters every run can hold in its state (``run(hparams=...)``, ``fedjax_sim.sweep``);
# an algorithm adds its own (``Algorithm.hparams``, e.g. FedProx's ``mu``).
HPARAMS = {
    "client_lr_scale": "multiplies every client optimizer update (the client learning rate)",
    "server_lr_scale": "multiplies the server optimizer's update (the server learning rate)",
}


def check_hparams(hparams, declared: Mapping[str, float] | None = None) -> dict:
  """Validates a ``{name: scalar}`` dict against :data:`HPARAMS` and the algorithm's
  ``declared`` ones; returns float32 arrays: the declared defaults, overridden by ``hparams``."""
  declared = dict(declared or {})
  known = sorted(set(HPARAMS) | set(declared))
  out = {name: jnp.asarray(v, jnp.float32) for name, v in declared.items()}
  for name, v in (hparams or {}).items():
    if name not in known:
      raise ValueError(f"unknown hyperparameter {name!r}; this run's state can hold {known} "
                       "(the generic ones and those the algorithm declares)")
    v = np.asarray(v, np.float32)
    if v.shape != () or not np.isfinite(v) or v < 0:
      raise ValueError(f"hyperparameter {name!r} must be a finite scalar >= 0, got {v!r}")
    out[name] = jnp.asarray(v)
  return out


def init(params: PyTree, server_optimizer: optax.GradientTransformation, *, aux: Any = None,
         clients: ClientStores | None = None, hparams: Any = None) -> ServerState:
  return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                     optax.EmptyState() if aux is None else aux,
                     ClientStores() if clients is None else clients,
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
