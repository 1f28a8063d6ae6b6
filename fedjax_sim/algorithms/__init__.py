"""Federated algorithms, one short module each, and a registry by name."""
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedopt import (adaptive_server_optimizer, fedadagrad, fedadam, fedavgm,
                                          fedyogi)
from fedjax_sim.algorithms.fedbuff import fedbuff   # asynchronous: run with fedjax_sim.run_async
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox, proximal_term
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.registry import Registry

# Every algorithm by name: the command line and config files reach what is registered here.
REGISTRY = Registry("algorithm")
for _factory in (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, scaffold, fednova):
  REGISTRY.register(forwards_to=None if _factory is fedavg else fedavg)(_factory)
REGISTRY.register()(fedbuff)
make = REGISTRY.make   # make(name, **options): Algorithm by name, options checked


__all__ = ["Algorithm", "REGISTRY", "adaptive_server_optimizer", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbuff", "fednova",
           "fedprox", "fedyogi", "make", "proximal_term", "scaffold"]
