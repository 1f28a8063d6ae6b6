"""Partitions of a centralized dataset into clients.

Every function is deterministic given ``seed`` and returns a list of P index arrays (one per
client, into ``[0, N)``) in which every example lands in at most one client. ``iid``,
``dirichlet``, ``shards`` (without ``shard_size``), ``quantity_skew`` and ``natural`` cover every
example; ``pathological``, ``sized`` and ``shards`` with ``shard_size`` may leave some out, as
their flwr-datasets counterparts do.

The classes at the end (:class:`IidPartitioner`, :class:`DirichletPartitioner`, ...) carry the
names and options of flwr-datasets' partitioners, so that a Flower user's
``DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.5)`` works as written;
each is a thin wrapper over one function above (their docstrings and the README give the
mapping). They are listed in the registry :data:`REGISTRY`.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import numpy as np

from fedjax_sim.registry import Registry


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


def dirichlet(labels: np.ndarray, num_clients: int, alpha, seed: int = 0,
              min_size: int = 1, max_tries: int = 1000,
              self_balancing: bool = False) -> list[np.ndarray]:
  """Label skew: for every class, its examples are split over clients with proportions drawn
  from Dirichlet(alpha) (Hsu et al. 2019). Small alpha -> each client sees few classes.

  ``alpha`` is one concentration (symmetric Dirichlet) or ``[num_clients]`` of them (client i's
  share of every class is drawn with weight ``alpha[i]``). Draws are repeated until every
  client has at least ``min_size`` examples. With ``self_balancing`` (flwr-datasets'
  option), a client already holding more than ``N / num_clients`` examples gets no share of the
  classes split after that point (its proportion is set to 0 and the others renormalised).
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check(n, num_clients)
  try:
    a = np.asarray(alpha, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"dirichlet alpha must be a number > 0 or one per client, got {alpha!r}") \
        from None
  if a.ndim > 1 or (a.ndim == 1 and a.shape != (num_clients,)):
    raise ValueError(f"dirichlet alpha must be one number or {num_clients} of them (one per "
                     f"client), got shape {a.shape}")
  if not np.all(a > 0):
    raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
  a = np.broadcast_to(a, (num_clients,))
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    held = np.zeros(num_clients, np.int64)
    for idx in by_class:
      p = rng.dirichlet(a)
      if self_balancing:
        p = np.where(held > n / num_clients, 0.0, p)
        p = p / p.sum()
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
        held[client] += len(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(p) for p in out) >= min_size:
      return out
  raise ValueError(f"could not draw a Dirichlet({alpha}) split with every one of {num_clients} "
                   f"clients holding >= {min_size} examples in {max_tries} tries; raise alpha or "
                   "lower num_clients")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int | None = 2,
           seed: int = 0, shard_size: int | None = None,
           keep_incomplete_shard: bool = False) -> list[np.ndarray]:
  """McMahan et al. 2017 pathological non-IID split: sort by label, cut into shards, give each
  client ``shards_per_client`` random shards.

  Without ``shard_size``: ``num_clients * shards_per_client`` shards of equal size (within one
  example), covering every example. With ``shard_size`` (flwr-datasets' ``ShardPartitioner``
  options): shards of exactly that many examples, the last incomplete one dropped unless
  ``keep_incomplete_shard``; each client gets ``shards_per_client`` of them at random, or, with
  ``shards_per_client=None``, all shards are dealt out, the first ``num_shards % num_clients``
  clients getting one more.
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check(n, num_clients)
  rng = np.random.default_rng(seed)
  if shard_size is None:
    if shards_per_client is None:
      raise ValueError("shards: give shards_per_client, shard_size, or both")
    num_shards = num_clients * shards_per_client
    if shards_per_client <= 0 or num_shards > n:
      raise ValueError(f"cannot cut {n} examples into {num_shards} shards")
    # Stable sort with a random tie-break so examples of one label are shuffled across shards.
    order = np.lexsort((rng.random(n), labels))
    pieces = np.array_split(order, num_shards)
    assign = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assign]
  if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or \
      not 0 < shard_size <= n:
    raise ValueError(f"shard_size must be an integer in [1, {n}], got {shard_size!r}")
  full = n // shard_size
  usable = full + (keep_incomplete_shard and full * shard_size < n)
  if shards_per_client is None:
    counts = np.full(num_clients, usable // num_clients)
    counts[: usable % num_clients] += 1
  else:
    if shards_per_client <= 0 or num_clients * shards_per_client > full:
      raise ValueError(f"{num_clients} clients x {shards_per_client} shards of {shard_size} "
                       f"examples need {num_clients * shards_per_client * shard_size} examples; "
                       f"there are {n}")
    counts = np.full(num_clients, shards_per_client)
    usable = full   # as flwr-datasets: with both options, only complete shards are drawn
  if counts.min() == 0:
    raise ValueError(f"{usable} shards of {shard_size} examples leave some of the {num_clients} "
                     "clients empty; use a smaller shard_size")
  order = np.lexsort((rng.random(n), labels))
  chosen = rng.permutation(usable)[: counts.sum()]
  return [np.sort(np.concatenate([order[s * shard_size:(s + 1) * shard_size] for s in row]))
          for row in np.split(chosen, np.cumsum(counts)[:-1])]


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
  return _split_sizes(rng, n, sizes)


def _split_sizes(rng, n: int, sizes) -> list[np.ndarray]:
  """Random disjoint index sets of the given sizes (``sum(sizes) <= n``), sorted."""
  perm = rng.permutation(n)
  return [np.sort(p) for p in np.split(perm[: int(np.sum(sizes))], np.cumsum(sizes)[:-1])]


def sized(labels: np.ndarray, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
  """Clients of the given sizes, ``sizes[i]`` random examples for client i (IID labels).

  ``sum(sizes)`` may be below N (the rest is left out), not above; every size must be >= 1.
  """
  n = len(labels)
  sizes = np.asarray(sizes)
  if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer):
    raise ValueError(f"sizes must be a non-empty list of integers, got {sizes!r}")
  if sizes.min() < 1:
    raise ValueError(f"every client size must be >= 1; client {int(np.argmin(sizes))} has "
                     f"{int(sizes.min())}")
  if sizes.sum() > n:
    raise ValueError(f"the client sizes add up to {int(sizes.sum())}, more than the {n} examples")
  return _split_sizes(np.random.default_rng(seed), n, sizes.astype(np.int64))


def pathological(labels: np.ndarray, num_clients: int, classes_per_client: int,
                 mode: str = "random", seed: int = 0) -> list[np.ndarray]:
  """Each client holds exactly ``classes_per_client`` classes (Li et al. 2022, "Federated
  Learning on Non-IID Data Silos", #C=k), each class's examples split evenly (within one)
  among the clients that hold it.

  ``mode`` picks the classes of client p among the sorted distinct labels ``u[0..K-1]``:
  ``"random"``: k distinct classes at random; ``"deterministic"``: ``u[(p + i) % K]`` for
  ``i < k``; ``"first-deterministic"`` (the paper's): ``u[p % K]`` then k - 1 more at random.
  A class no client holds is left out, with a warning (as flwr-datasets does).
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check(n, num_clients)
  uniq = np.unique(labels)
  k = len(uniq)
  if isinstance(classes_per_client, bool) or \
      not isinstance(classes_per_client, (int, np.integer)) or not 0 < classes_per_client <= k:
    raise ValueError(f"classes_per_client must be an integer in [1, {k}] (the labels have {k} "
                     f"classes), got {classes_per_client!r}")
  modes = ("random", "deterministic", "first-deterministic")
  if mode not in modes:
    raise ValueError(f"mode must be one of {modes}, got {mode!r}")
  rng = np.random.default_rng(seed)
  held = np.zeros((num_clients, k), bool)
  for p in range(num_clients):
    if mode == "deterministic":
      held[p, (p + np.arange(classes_per_client)) % k] = True
    elif mode == "random":
      held[p, rng.choice(k, classes_per_client, replace=False)] = True
    else:
      held[p, p % k] = True
      rest = np.setdiff1d(np.arange(k), [p % k])
      held[p, rng.choice(rest, classes_per_client - 1, replace=False)] = True
  parts = [[] for _ in range(num_clients)]
  for c in range(k):
    owners = np.flatnonzero(held[:, c])
    if owners.size == 0:
      continue
    idx = rng.permutation(np.flatnonzero(labels == uniq[c]))
    if owners.size > idx.size:
      raise ValueError(f"class {uniq[c]!r} would be split among {owners.size} clients but has "
                       f"only {idx.size} examples; lower num_clients or classes_per_client, or "
                       "use mode='deterministic'")
    for owner, chunk in zip(owners, np.array_split(idx, owners.size)):
      parts[owner].append(chunk)
  unused = [u.item() for u, used in zip(uniq, held.any(0)) if not used]
  if unused:
    warnings.warn(f"pathological: classes {unused} are held by no client and left out",
                  stacklevel=2)
  return [np.sort(np.concatenate(p)) for p in parts]


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


# --- flwr-datasets names ----------------------------------------------------------------------
# Partitioners by flwr-datasets class name; each entry's options are its constructor's.
REGISTRY = Registry("partitioner")


def _is_table(data) -> bool:
  """A table of named columns (mapping, DataFrame, HF Dataset, pyarrow Table), not an array."""
  return isinstance(data, Mapping) or hasattr(data, "columns") or hasattr(data, "column_names")


def _rows(data) -> int:
  """Number of rows of a label array or a table."""
  if not _is_table(data):
    return len(data)
  from fedjax_sim.data import adapters   # (adapters imports this module)
  return adapters.num_rows(data)


class Partitioner:
  """A partition of a table's rows into clients, named and configured as in flwr-datasets.

  Call it on a table (a mapping of columns, a pandas DataFrame, a ``datasets.Dataset``, a
  ``pyarrow.Table``) or on a 1-D array of labels: it returns one sorted index array per
  client, like the functions of this module, which it wraps. Label-based partitioners read the
  column ``partition_by`` of a table. ``seed`` defaults to flwr-datasets' 42. flwr's ``shuffle``
  (the order of the examples inside a partition) is accepted for compatibility and changes
  nothing here: every round shuffles each client's examples itself (``LocalWork.shuffle``).
  """
  partition_by: str | None = None
  seed: int = 42

  def __call__(self, data) -> list[np.ndarray]:
    if self.partition_by is None:
      return self._split(None, _rows(data))
    if not _is_table(data):   # the labels themselves (an array, a list, a pandas Series)
      labels = np.asarray(data)
    else:
      from fedjax_sim.data import adapters
      labels = adapters.column(data, self.partition_by, what=f"{type(self).__name__}.partition_by")
    return self._split(labels, len(labels))

  def _split(self, labels, n) -> list[np.ndarray]:
    raise NotImplementedError

  def __repr__(self):
    opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({opts})"


@REGISTRY.register()
class IidPartitioner(Partitioner):
  """flwr-datasets' IidPartitioner: equal-sized random clients (:func:`iid`).

  Args:
    num_partitions: number of clients.
    seed: random seed (flwr's FederatedDataset shuffles with 42 before its contiguous shards).
  """

  def __init__(self, num_partitions: int, seed: int = 42):
    self.num_partitions, self.seed = num_partitions, seed

  def _split(self, labels, n):
    return iid(np.zeros(n), self.num_partitions, seed=self.seed)


@REGISTRY.register()
class DirichletPartitioner(Partitioner):
  """flwr-datasets' DirichletPartitioner: label skew by Dirichlet draws per class
  (:func:`dirichlet`; ``min_partition_size`` is its ``min_size``).

  Args:
    num_partitions: number of clients.
    partition_by: the label column.
    alpha: concentration, one number or one per client.
    min_partition_size: draws are repeated until every client has at least this many examples.
    self_balancing: stop giving examples to clients above the average size.
    shuffle: accepted for compatibility (see :class:`Partitioner`).
    seed: random seed.
  """

  def __init__(self, num_partitions: int, partition_by: str, alpha, min_partition_size: int = 10,
               self_balancing: bool = False, shuffle: bool = True, seed: int = 42):
    self.num_partitions, self.partition_by, self.alpha = num_partitions, partition_by, alpha
    self.min_partition_size, self.self_balancing = min_partition_size, self_balancing
    self.shuffle, self.seed = shuffle, seed

  def _split(self, labels, n):
    return dirichlet(labels, self.num_partitions, self.alpha, seed=self.seed,
                     min_size=self.min_partition_size, self_balancing=self.self_balancing)


@REGISTRY.register()
class ShardPartitioner(Partitioner):
  """flwr-datasets' ShardPartitioner: sort by label, deal out shards (:func:`shards`).

  With ``num_shards_per_partition`` alone, the shards are of equal size within one example and
  cover every example (flwr drops the ``N mod (P * k)`` left over); with ``shard_size`` the
  shards and their dealing are flwr's.

  Args:
    num_partitions: number of clients.
    partition_by: the label column.
    num_shards_per_partition: shards per client.
    shard_size: examples per shard.
    keep_incomplete_shard: keep the last, smaller shard (with ``shard_size`` only).
    shuffle: accepted for compatibility (see :class:`Partitioner`).
    seed: random seed.
  """

  def __init__(self, num_partitions: int, partition_by: str,
               num_shards_per_partition: int | None = None, shard_size: int | None = None,
               keep_incomplete_shard: bool = False, shuffle: bool = True, seed: int = 42):
    if num_shards_per_partition is None and shard_size is None:
      raise ValueError("ShardPartitioner: give num_shards_per_partition, shard_size, or both")
    self.num_partitions, self.partition_by = num_partitions, partition_by
    self.num_shards_per_partition, self.shard_size = num_shards_per_partition, shard_size
    self.keep_incomplete_shard, self.shuffle, self.seed = keep_incomplete_shard, shuffle, seed

  def _split(self, labels, n):
    return shards(labels, self.num_partitions, self.num_shards_per_partition, seed=self.seed,
                  shard_size=self.shard_size, keep_incomplete_shard=self.keep_incomplete_shard)


@REGISTRY.register()
class PathologicalPartitioner(Partitioner):
  """flwr-datasets' PathologicalPartitioner: exactly ``num_classes_per_partition`` classes per
  client (:func:`pathological`).

  Args:
    num_partitions: number of clients.
    partition_by: the label column.
    num_classes_per_partition: classes each client holds.
    class_assignment_mode: "random", "deterministic" or "first-deterministic".
    shuffle: accepted for compatibility (see :class:`Partitioner`).
    seed: random seed.
  """

  def __init__(self, num_partitions: int, partition_by: str, num_classes_per_partition: int,
               class_assignment_mode: str = "random", shuffle: bool = True, seed: int = 42):
    self.num_partitions, self.partition_by = num_partitions, partition_by
    self.num_classes_per_partition = num_classes_per_partition
    self.class_assignment_mode, self.shuffle, self.seed = class_assignment_mode, shuffle, seed

  def _split(self, labels, n):
    return pathological(labels, self.num_partitions, self.num_classes_per_partition,
                        mode=self.class_assignment_mode, seed=self.seed)


@REGISTRY.register()
class SizePartitioner(Partitioner):
  """flwr-datasets' SizePartitioner: client i gets ``partition_sizes[i]`` random examples
  (:func:`sized`; flwr takes consecutive rows of the data set that FederatedDataset shuffled).

  Args:
    partition_sizes: examples per client (their sum at most the number of rows).
    seed: random seed.
  """

  def __init__(self, partition_sizes: Sequence[int], seed: int = 42):
    self.partition_sizes, self.seed = list(partition_sizes), seed

  def _split(self, labels, n):
    return sized(np.zeros(n), self.partition_sizes, seed=self.seed)


def id_to_size(num_partitions: int, fn: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
  """flwr-datasets' IdToSizeFncPartitioner sizes: client i (1-based) gets a share ``fn(i) /
  sum_j fn(j)`` of the ``n`` examples, rounded down, the remainder to the last client."""
  if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or \
      num_partitions <= 0:
    raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
  with np.errstate(over="ignore"):
    units = np.asarray(fn(np.linspace(1, num_partitions, num_partitions)), np.float64)
  if not np.all(np.isfinite(units)) or units.min() <= 0:
    raise ValueError(f"the size function overflows or is not positive for {num_partitions} "
                     "clients; use fewer clients")
  sizes = (units / units.sum() * n).astype(np.int64)
  sizes[-1] += n - sizes.sum()
  if sizes.min() < 1:
    raise ValueError(f"{num_partitions} clients of sizes proportional to {fn.__name__}(id) leave "
                     f"client {int(np.argmin(sizes))} without an example out of {n}; use fewer "
                     "clients")
  return sizes


class _IdToSizePartitioner(Partitioner):
  fn: Callable[[np.ndarray], np.ndarray]

  def __init__(self, num_partitions: int, seed: int = 42):
    self.num_partitions, self.seed = num_partitions, seed

  def _split(self, labels, n):
    return sized(np.zeros(n), id_to_size(self.num_partitions, type(self).fn, n), seed=self.seed)


@REGISTRY.register()
class LinearPartitioner(_IdToSizePartitioner):
  """flwr-datasets' LinearPartitioner: client i (1-based) gets a share proportional to i.

  Args:
    num_partitions: number of clients.
    seed: random seed.
  """
  fn = staticmethod(np.asarray)


@REGISTRY.register()
class SquarePartitioner(_IdToSizePartitioner):
  """flwr-datasets' SquarePartitioner: client i (1-based) gets a share proportional to i^2.

  Args:
    num_partitions: number of clients.
    seed: random seed.
  """
  fn = staticmethod(np.square)


@REGISTRY.register()
class ExponentialPartitioner(_IdToSizePartitioner):
  """flwr-datasets' ExponentialPartitioner: client i (1-based) gets a share proportional to
  exp(i).

  Args:
    num_partitions: number of clients.
    seed: random seed.
  """
  fn = staticmethod(np.exp)


@REGISTRY.register()
class NaturalIdPartitioner(Partitioner):
  """flwr-datasets' NaturalIdPartitioner: one client per distinct value of the column
  ``partition_by`` (a user, writer or hospital id; :func:`natural`), in sorted order of the
  values (flwr keeps their order of first appearance). The adapters of
  :mod:`fedjax_sim.data.adapters` name the clients by these values.

  Args:
    partition_by: the column of client ids.
  """

  def __init__(self, partition_by: str):
    self.partition_by = partition_by

  def _split(self, labels, n):
    return natural(labels)
