"""Federated algorithms, one short module each, and a registry by name."""
from fedjax_sim.algorithms.agnostic_fedavg import agnostic_fedavg
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedopt import (adaptive_server_optimizer, fedadagrad, fedadam, fedavgm,
                                          fedyogi)
from fedjax_sim.algorithms.fedbuff import fedbuff   # asynchronous: run with fedjax_sim.run_async
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox, proximal_term
from fedjax_sim.algorithms.hypcluster import hypcluster, hypcluster_evaluate, hypcluster_init, hypcluster_model
from fedjax_sim.algorithms.scaffold import scaffold

REGISTRY = {"fedavg": fedavg, "fedavgm": fedavgm, "fedprox": fedprox, "fedadam": fedadam,
            "fedyogi": fedyogi, "fedadagrad": fedadagrad, "scaffold": scaffold, "fednova": fednova, "agnostic_fedavg": agnostic_fedavg, "hypcluster": hypcluster}


def make(name: str, **kwargs) -> Algorithm:
  """Algorithm by name (see ``REGISTRY``)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(REGISTRY)}")
  return REGISTRY[name](**kwargs)


__all__ = ["Algorithm", "REGISTRY", "adaptive_server_optimizer", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbuff", "fednova",
           "fedprox", "fedyogi", "make", "proximal_term", "scaffold", "agnostic_fedavg", "hypcluster", "hypcluster_evaluate", "hypcluster_init", "hypcluster_model"]
