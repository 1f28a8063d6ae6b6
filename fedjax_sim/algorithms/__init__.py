"""Federated algorithms, one short module each, and a registry by name."""
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_sim.algorithms.fedprox import fedprox, proximal_term

REGISTRY = {"fedavg": fedavg, "fedavgm": fedavgm, "fedprox": fedprox, "fedadam": fedadam,
            "fedyogi": fedyogi, "fedadagrad": fedadagrad}


def make(name: str, **kwargs) -> Algorithm:
  """Algorithm by name (see ``REGISTRY``)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(REGISTRY)}")
  return REGISTRY[name](**kwargs)


__all__ = ["Algorithm", "REGISTRY", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox",
           "fedyogi", "make", "proximal_term"]
