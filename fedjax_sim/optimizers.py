"""Optimizers by name, for the client and server optimizers of a config file.

Entries are optax's own functions (their options are optax's keywords: ``learning_rate``,
``momentum``, ...), plus ``adaptive``: Reddi et al. (2021)'s Algorithm 2 server optimizers
(:func:`fedjax_sim.algorithms.adaptive_server_optimizer`, which differ from optax's ``adam``/
``yogi``/``adagrad`` by having no bias correction and ``tau`` outside the square root).
"""

from __future__ import annotations

import optax

from fedjax_sim.algorithms.fedopt import adaptive_server_optimizer
from fedjax_sim.registry import Registry

REGISTRY = Registry("optimizer")
for _name in ("sgd", "adam", "adamw", "adagrad", "yogi", "rmsprop", "lamb", "lion", "novograd"):
  REGISTRY.register(_name)(getattr(optax, _name))
REGISTRY.register("adaptive")(adaptive_server_optimizer)

__all__ = ["REGISTRY"]
