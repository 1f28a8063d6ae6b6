"""The :class:`Algorithm` description shared by every federated algorithm.

An algorithm is static configuration (closed over by the compiled round): the client and server
optax optimizers, how much local work clients do, the client program, how updates are
transformed, weighted and aggregated, and what the algorithm keeps between rounds. Every part
has one signature and a default that does nothing, so the engine never asks "is there a hook?".

Where the parts run in a round (see :mod:`fedjax_sim.engine`)::

  client i:  ctx = ClientContext(i, global params, clients.algorithm[i], server state, hparams,
                                 lr_scale_i, key_i, n_i)
             program = algorithm.client(model, client_optimizer)
             carry = program.init(ctx); carry = program.step(carry, batch_t, ctx, key_t) ...
             ClientResult(delta_i, state_i, upload_i, metrics_i) = program.final(carry, ctx)
             delta_i, transform_state_i = update_transform.apply(delta_i, key, i, ...)
  server:    update = aggregator(delta_i, w_i);  upload = sum_i w_i upload_i / sum_i w_i
             update, server state = server_finish(ServerContext(...), update)
             server optimizer step on update
             clients.algorithm[i] = state_i   for every client whose update counted
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import optax

from fedjax_sim.aggregators import Aggregator, mean
from fedjax_sim.client import ClientFactory, EmptyState, local_training
from fedjax_sim.data.federated import LocalWork
from fedjax_sim.transforms.base import IDENTITY, UpdateTransform

PyTree = Any
WEIGHTINGS = ("examples", "uniform")


class ServerContext(NamedTuple):
  """What the algorithm's ``server_finish`` sees after aggregation.

  Attributes:
    params: the global model before this round's server step.
    state: the algorithm's server-side state (``ServerState.aux``).
    upload: the weighted mean of the counted clients' uploads (``ClientResult.upload``), or
      ``EmptyState()``.
    num_counted: int32 number of clients whose update counted.
    total_weight: float32 sum of their aggregation weights.
    cohort_size: the round's cohort size C (static).
    population: the population size P (static).
    hparams: in-state hyperparameters.
    key: a fresh key for server-side randomness (e.g. DP noise).
  """
  params: PyTree
  state: Any
  upload: Any
  num_counted: jax.Array
  total_weight: jax.Array
  cohort_size: int
  population: int
  hparams: Any
  key: jax.Array


def no_state(params: PyTree) -> Any:
  """``EmptyState()``: the client or server state of an algorithm that keeps none."""
  del params
  return EmptyState()


def pass_through(ctx: ServerContext, update: PyTree) -> tuple[PyTree, Any]:
  """The default ``server_finish``: the aggregate unchanged, the server state unchanged."""
  return update, ctx.state


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """Static description of a federated algorithm (see :func:`fedjax_sim.algorithms.fedavg`).

  Attributes:
    name: display name.
    client_optimizer: the clients' optax optimizer (its state starts fresh every round).
    server_optimizer: the optax optimizer applied to the aggregated pseudo-gradient.
    work: local work per round (:class:`~fedjax_sim.data.federated.LocalWork`).
    weighting: ``"examples"`` (p_i = n_i) or ``"uniform"`` aggregation weights.
    aggregator: how client updates are reduced (default: weighted mean).
    update_transform: per-client rewrite of updates after local training (clipping,
      compression, simulated attacks; default: identity).
    client: ``(model, client_optimizer) -> ClientProgram`` (default: local training).
    client_state_init: ``params -> ONE client's persistent state`` (default: none).
    server_state_init: ``params -> server-side state`` (default: none).
    server_finish: ``(ServerContext, update) -> (update, server state)``, run after
      aggregation and before the server optimizer (default: pass-through).
    hparams: hyperparameters the algorithm declares with their defaults ``{name: float}``:
      they live in ``ServerState.hparams`` as arrays (read by the program as ``ctx.hparams``),
      so :func:`fedjax_sim.sweep.sweep` can vmap over them and ``run(hparams=...)`` can set them
      without recompiling.
    drop_stragglers: under simulated heterogeneity, discard the updates of clients that stopped
      part-way (as FedAvg does in the FedProx paper) instead of aggregating their partial work.
    fixed_weighting: the weighting is part of the algorithm's guarantee (DP-FedAvg): ``run``
      then refuses custom ``client_weights``.
  """
  name: str
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  work: LocalWork
  weighting: str = "examples"
  aggregator: Aggregator = dataclasses.field(default_factory=mean)
  update_transform: UpdateTransform = IDENTITY
  client: ClientFactory = dataclasses.field(default_factory=local_training)
  client_state_init: Callable[[PyTree], Any] = no_state
  server_state_init: Callable[[PyTree], Any] = no_state
  server_finish: Callable[[ServerContext, PyTree], tuple[PyTree, Any]] = pass_through
  hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
  drop_stragglers: bool = False
  fixed_weighting: bool = False

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
    for name in ("client_optimizer", "server_optimizer"):
      opt = getattr(self, name)
      if not (hasattr(opt, "init") and hasattr(opt, "update")):
        raise ValueError(f"{name} must be an optax GradientTransformation, got {type(opt).__name__}")
    # None means "the default" (e.g. dataclasses.replace(algo, update_transform=None))
    if self.update_transform is None:
      object.__setattr__(self, "update_transform", IDENTITY)
    if self.aggregator is None:
      object.__setattr__(self, "aggregator", mean())
    if not isinstance(self.aggregator, Aggregator):
      raise ValueError(f"aggregator must be a fedjax_sim.aggregators.Aggregator, got "
                       f"{type(self.aggregator).__name__}")
    if not isinstance(self.update_transform, UpdateTransform):
      raise ValueError(f"update_transform must be a fedjax_sim.transforms.UpdateTransform, got "
                       f"{type(self.update_transform).__name__}")
    for k, v in self.hparams.items():
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{self.name}: hyperparameter {k!r} must be a finite number >= 0, "
                         f"got {v!r}")

  def replace(self, **changes) -> "Algorithm":
    """A copy with ``changes`` (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


def reject_renamed(algorithm: str, kwargs: dict) -> None:
  """A clear error for the options SCAFFOLD and FedNova took before every algorithm took a
  ``client_optimizer`` first (``client_lr``, FedNova's client ``momentum``)."""
  for old in ("client_lr", "momentum"):
    if old in kwargs:
      raise ValueError(f"{algorithm} takes no {old!r}: pass the local optimizer as "
                       f"client_optimizer, e.g. optax.sgd(learning_rate, momentum=rho)")
