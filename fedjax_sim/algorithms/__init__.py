"""Federated algorithms, one short module each, and a registry by name."""
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg

REGISTRY = {"fedavg": fedavg}


def make(name: str, **kwargs) -> Algorithm:
  """Algorithm by name (see ``REGISTRY``)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(REGISTRY)}")
  return REGISTRY[name](**kwargs)


__all__ = ["Algorithm", "REGISTRY", "fedavg", "make"]
