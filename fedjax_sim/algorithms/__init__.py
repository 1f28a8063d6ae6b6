"""Federated algorithms, one short module each, and a registry by name."""
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedopt import (adaptive_server_optimizer, fedadagrad, fedadam, fedavgm,
                                          fedyogi)
from fedjax_sim.algorithms.fedbuff import fedbuff   # asynchronous: run with fedjax_sim.run_async
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox, proximal_term
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.mime import mime
from fedjax_sim.algorithms.mimelite import mimelite

REGISTRY = {"fedavg": fedavg, "fedavgm": fedavgm, "fedprox": fedprox, "fedadam": fedadam,
            "fedyogi": fedyogi, "fedadagrad": fedadagrad, "scaffold": scaffold, "fednova": fednova,
            "feddyn": feddyn, "mimelite": mimelite, "mime": mime}


def make(name: str, **kwargs) -> Algorithm:
  """Algorithm by name (see ``REGISTRY``)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(REGISTRY)}")
  return REGISTRY[name](**kwargs)


__all__ = ["Algorithm", "REGISTRY", "adaptive_server_optimizer", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbuff", "fednova",
           "fedprox", "fedyogi", "make", "proximal_term", "scaffold"]
__all__ += ["feddyn", "mime", "mimelite"]
