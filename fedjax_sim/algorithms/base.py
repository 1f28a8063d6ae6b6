"""The :class:`Algorithm` description shared by every federated algorithm.

An algorithm is static configuration (hashable, closed over by the compiled round): the client
and server optax optimizers, how much local work clients do, how updates are weighted and
aggregated, an optional extra local objective term, and optional hooks for algorithms with
state (SCAFFOLD's control variates) or with their own aggregation rule (FedNova).

Where the hooks run in a round (see :mod:`fedjax_sim.engine`)::

  client i:  ctx = ClientContext(i, clients["algorithm"][i], aux)
             local steps on  loss + regularizer(params, global, ctx)       -> delta_i, steps_i
             client_finish(ctx, delta_i, info_i) -> (delta_i, new_state_i, upload_i)
             update_transform(delta_i)   (clipping, compression, attacks)
  server:    update = aggregator(delta_i, w_i);  upload = sum_i w_i upload_i / sum_i w_i
             server_finish(aux, update, upload, info, key) -> (update, aux)
             server optimizer step on update
             clients["algorithm"][i] = new_state_i   for every client whose update counted
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax

from fedjax_sim.aggregators import Aggregator, mean
from fedjax_sim.data.federated import LocalWork

WEIGHTINGS = ("examples", "uniform")


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """Static description of a federated algorithm (see :func:`fedjax_sim.algorithms.fedavg`)."""
  name: str
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  work: LocalWork
  weighting: str = "examples"
  aggregator: Aggregator = dataclasses.field(default_factory=mean)
  regularizer: Callable[[Any, Any, Any], Any] | None = None   # (params, global, ctx) -> scalar
  update_transform: Any = None   # fedjax_sim.transforms.UpdateTransform applied per client
  # Stateful / custom-aggregation hooks (all optional; see the module docstring).
  client_state_init: Callable[[Any], Any] | None = None    # params -> ONE client's initial state
  server_aux_init: Callable[[Any], Any] | None = None      # params -> server-side state
  client_finish: Callable[[Any, Any, dict], tuple[Any, Any, Any]] | None = None
  server_finish: Callable[[Any, Any, Any, dict, Any], tuple[Any, Any]] | None = None
  # Under simulated heterogeneity (fedjax_sim.heterogeneity), whether the updates of stragglers
  # (clients that stopped part-way) are discarded, as FedAvg does in the FedProx paper, or
  # aggregated with their partial work.
  drop_stragglers: bool = False
  # Whether the algorithm's weighting is part of its guarantee (DP-FedAvg bounds every client's
  # contribution by the same clip norm): run() then refuses custom client_weights.
  fixed_weighting: bool = False

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
    for name in ("client_optimizer", "server_optimizer"):
      opt = getattr(self, name)
      if not (hasattr(opt, "init") and hasattr(opt, "update")):
        raise ValueError(f"{name} must be an optax GradientTransformation, got {type(opt).__name__}")
