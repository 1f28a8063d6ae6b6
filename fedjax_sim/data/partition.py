"""Partitions of a centralized dataset into clients.

Every function is deterministic given ``seed`` and returns a list of P index arrays (one per
client, into ``[0, N)``) in which every example lands in exactly one client (``natural`` and
``iid`` cover all examples; so do the others).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _check(num_examples: int, num_clients: int):
  if not isinstance(num_clients, (int, np.integer)) or num_clients <= 0:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if num_clients > num_examples:
    raise ValueError(f"cannot split {num_examples} examples into {num_clients} non-empty clients "
                     "(num_clients)")


def iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
  """Uniformly random, equal-sized (within one example) clients."""
  n = len(labels)
  _check(n, num_clients)
  perm = np.random.default_rng(seed).permutation(n)
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0,
              min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
  """Label skew: for every class, its examples are split over clients with proportions drawn
  from Dirichlet(alpha * 1) (Hsu et al. 2019). Small alpha -> each client sees few classes.

  Draws are repeated until every client has at least ``min_size`` examples.
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check(n, num_clients)
  if not alpha > 0:
    raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for idx in by_class:
      p = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(p) for p in out) >= min_size:
      return out
  raise ValueError(f"could not draw a Dirichlet({alpha}) split with every one of {num_clients} "
                   f"clients holding >= {min_size} examples in {max_tries} tries; raise alpha or "
                   "lower num_clients")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2,
           seed: int = 0) -> list[np.ndarray]:
  """McMahan et al. 2017 pathological non-IID split: sort by label, cut into
  ``num_clients * shards_per_client`` equal shards, give each client ``shards_per_client`` random
  shards."""
  labels = np.asarray(labels)
  n = len(labels)
  _check(n, num_clients)
  num_shards = num_clients * shards_per_client
  if shards_per_client <= 0 or num_shards > n:
    raise ValueError(f"cannot cut {n} examples into {num_shards} shards")
  rng = np.random.default_rng(seed)
  # Stable sort with a random tie-break so examples of one label are shuffled across shards.
  order = np.lexsort((rng.random(n), labels))
  pieces = np.array_split(order, num_shards)
  assign = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assign]


def quantity_skew(labels: np.ndarray, num_clients: int, exponent: float = 1.5, seed: int = 0,
                  min_size: int = 1) -> list[np.ndarray]:
  """IID labels but power-law client sizes: size_i proportional to a Pareto(exponent) draw.

  Smaller ``exponent`` -> heavier tail (a few huge clients). Every client gets >= ``min_size``.
  """
  n = len(labels)
  _check(n, num_clients)
  if not exponent > 0:
    raise ValueError(f"exponent must be > 0, got {exponent!r}")
  if min_size * num_clients > n:
    raise ValueError(f"{num_clients} clients of >= {min_size} examples need more than {n} examples")
  rng = np.random.default_rng(seed)
  w = rng.pareto(exponent, num_clients) + 1.0
  if not np.isfinite(w.sum()):
    raise ValueError(f"quantity_skew exponent={exponent!r} is too small: the Pareto draws of "
                     "the client sizes overflow float64; use a larger exponent (e.g. >= 0.05)")
  extra = n - min_size * num_clients
  sizes = min_size + np.floor(w / w.sum() * extra).astype(np.int64)
  sizes[np.argsort(-w)[: n - sizes.sum()]] += 1     # hand out the rounding remainder
  perm = rng.permutation(n)
  return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def natural(client_keys: np.ndarray) -> list[np.ndarray]:
  """One client per distinct key (e.g. writer id, speaker), in sorted key order."""
  keys = np.asarray(client_keys)
  if keys.ndim != 1 or keys.size == 0:
    raise ValueError("client_keys must be a non-empty 1-D array")
  uniq, inverse = np.unique(keys, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity_skew": quantity_skew,
}


def make(name: str, labels: np.ndarray, num_clients: int, seed: int = 0, **params):
  """Partition by name (``iid``, ``dirichlet``, ``shards``, ``quantity_skew``)."""
  if name not in PARTITIONS:
    raise ValueError(f"unknown partition {name!r}; choose from {sorted(PARTITIONS)}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return PARTITIONS[name](labels, num_clients, seed=seed, **params)
