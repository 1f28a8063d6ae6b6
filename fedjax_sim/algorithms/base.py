"""The :class:`Algorithm` description shared by every federated algorithm.

An algorithm is static configuration (hashable, closed over by the compiled round): the client
and server optax optimizers, how much local work clients do, how updates are weighted and
aggregated, and an optional extra local objective term.
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
  regularizer: Callable[[Any, Any], Any] | None = None
  update_transform: Any = None   # fedjax_sim.transforms.UpdateTransform applied per client

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
    for name in ("client_optimizer", "server_optimizer"):
      opt = getattr(self, name)
      if not (hasattr(opt, "init") and hasattr(opt, "update")):
        raise ValueError(f"{name} must be an optax GradientTransformation, got {type(opt).__name__}")
