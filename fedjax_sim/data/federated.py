"""Ragged per-client storage and the batching of a cohort into ``[C, S, B, ...]`` arrays.

Storage is flat: every named feature is one array ``[N, ...]`` whose rows are ordered by client,
plus ``offsets[P + 1]`` (client ``p`` owns rows ``offsets[p]:offsets[p + 1]``). There is no Python
object per client, so a population of a million clients costs two small index arrays on top of
the examples, and gathering a cohort costs time proportional to the cohort.

Batching is a pure JAX function of a PRNG key (:func:`batch_indices`), so it can run inside the
compiled round, next to local training, one chunk of clients at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class ClientBatches(NamedTuple):
  """A cohort's local data, cut into local steps.

  Attributes:
    x: ``[C, S, B, ...]`` features.
    y: ``[C, S, B]`` integer labels.
    mask: ``[C, S, B]`` bool; False marks padding (ragged clients, the last partial batch).
  """
  x: jax.Array
  y: jax.Array
  mask: jax.Array


@dataclasses.dataclass(frozen=True)
class LocalWork:
  """How much each client trains per round: a batch size and either epochs or steps.

  With ``local_epochs`` every client makes ``local_epochs`` passes over its own data, each pass a
  fresh shuffle, the last batch of a pass possibly partial (masked). Clients smaller than the
  largest get trailing all-masked steps, which change nothing. With ``local_steps`` every client
  makes exactly that many steps of ``batch_size`` examples, cycling through reshuffled passes.

  With ``shuffle=False`` the order is fixed (FedJAX's ``batch`` / ``repeat().batch`` without a
  shuffle): every pass reads the client's examples in their stored order. In epoch mode pass e
  is ``rows[0:B], rows[B:2B], ...`` (last batch partial); in step mode step t reads stored
  positions ``(t B + j) mod n`` for ``j < B`` (the data repeated, then cut into batches of B, so
  a batch may wrap around). A test or a reproduction gives each client's batch order explicitly
  by storing its examples in that order.
  """
  batch_size: int = 32
  local_epochs: int | None = 1
  local_steps: int | None = None
  shuffle: bool = True

  def __post_init__(self):
    if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size <= 0:
      raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
    if (self.local_epochs is None) == (self.local_steps is None):
      raise ValueError("give exactly one of local_epochs and local_steps "
                       f"(got local_epochs={self.local_epochs!r}, local_steps={self.local_steps!r})")
    for name in ("local_epochs", "local_steps"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
        raise ValueError(f"{name} must be a positive integer, got {v!r}")

  def steps_per_epoch(self, max_client_size: int) -> int:
    return max(1, math.ceil(max_client_size / self.batch_size))

  def num_steps(self, max_client_size: int) -> int:
    """Static number of local steps S for clients of at most ``max_client_size`` examples."""
    if self.local_steps is not None:
      return int(self.local_steps)
    return int(self.local_epochs) * self.steps_per_epoch(max_client_size)


def _client_indices(key, offset, size, work: LocalWork, max_client_size: int):
  """One client's example rows ``[S, B]`` and mask ``[S, B]`` (see :func:`batch_indices`)."""
  b = work.batch_size
  span = work.steps_per_epoch(max_client_size) * b   # padded length of one pass
  pos = jnp.arange(span)
  valid = pos < size

  def one_pass(k):
    # Valid positions get a random key in [0, 1), padding sorts last: the first `size` entries
    # of the argsort are a uniform permutation of the client's own rows.
    u = jnp.where(valid, jax.random.uniform(k, (span,)), 2.0)
    return jnp.argsort(u)

  if not work.shuffle:
    if work.local_steps is None:
      rows = jnp.tile(pos, work.local_epochs).reshape(-1, b)
      mask = jnp.tile(valid, work.local_epochs).reshape(-1, b)
    else:
      rows = (jnp.arange(work.local_steps * b) % jnp.maximum(size, 1)).reshape(work.local_steps, b)
      mask = jnp.broadcast_to(size > 0, rows.shape)
    return offset + rows, mask
  if work.local_steps is None:
    perms = jax.vmap(one_pass)(jax.random.split(key, work.local_epochs))   # [E, span]
    rows = perms.reshape(-1, b)
    mask = jnp.tile(valid, work.local_epochs).reshape(-1, b)
  else:
    # Exactly K full batches: slot t belongs to pass t // size; shuffle within each pass by sorting
    # on (pass + u), then map through one random permutation so a last partial pass is a random
    # subset of the client's examples.
    k_perm, k_order = jax.random.split(key)
    total = work.local_steps * b
    n = jnp.maximum(size, 1)
    t = jnp.arange(total)
    order = jnp.argsort(t // n + jax.random.uniform(k_order, (total,)))
    rows = one_pass(k_perm)[(t % n)[order]].reshape(work.local_steps, b)
    mask = jnp.broadcast_to(size > 0, rows.shape)
  return offset + rows, mask


def local_steps(work: LocalWork, sizes: jax.Array) -> jax.Array:
  """``[C]`` int32 local steps of clients with ``sizes [C]`` examples under ``work``: the fixed
  step count, or ``local_epochs`` passes of ``ceil(size / batch_size)`` batches (at least one
  batch, so an empty client counts one step; callers mask empty clients themselves)."""
  if work.local_steps is not None:
    return jnp.full(jnp.shape(sizes), work.local_steps, jnp.int32)
  per_epoch = jnp.maximum(1, (sizes + work.batch_size - 1) // work.batch_size)
  return (work.local_epochs * per_epoch).astype(jnp.int32)


def batch_indices(key: jax.Array, client_ids: jax.Array, offsets: jax.Array, sizes: jax.Array,
                  work: LocalWork, max_client_size: int, min_client_size: int = 0):
  """Per-client shuffled example rows for one round of local training.

  Args:
    key: the round's PRNG key. Client ``i`` uses ``fold_in(key, client_ids[i])``, so its shuffle
      does not depend on its position in the cohort, the chunk size or the device count (unused
      with ``work.shuffle=False``: the stored order).
    client_ids: ``[C]`` int ids (positions in the population).
    offsets: ``[C]`` first row of each client in the flat arrays.
    sizes: ``[C]`` number of examples per client (0 for padding clients).
    work: batch size and local epochs/steps.
    max_client_size: static bound on ``sizes`` (fixes the number of steps S).
    min_client_size: static lower bound on the non-zero ``sizes`` (0: unknown). Only prunes the
      compiled shuffle bounds that no call can use (a population of equal sizes compiles one).

  Returns:
    ``rows [C, S, B]`` int32 rows of the flat arrays and ``mask [C, S, B]`` bool.
  """
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(client_ids)
  full = work.steps_per_epoch(max_client_size)

  def at(steps: int):
    """The tables computed for clients of at most ``steps * B`` examples, padded to ``S``."""
    rows, mask = jax.vmap(lambda k, o, n: _client_indices(
        k, o, n, work, min(steps * work.batch_size, max_client_size)))(keys, offsets, sizes)
    if work.local_steps is None and steps < full:   # pad each epoch's block to `full` steps
      c, b, e = rows.shape[0], work.batch_size, work.local_epochs
      pad = ((0, 0), (0, 0), (0, full - steps), (0, 0))
      rows = jnp.pad(rows.reshape(c, e, steps, b), pad, mode="edge").reshape(c, e * full, b)
      mask = jnp.pad(mask.reshape(c, e, steps, b), pad).reshape(c, e * full, b)
    return rows.astype(jnp.int32), mask

  # Shuffling costs O(bound) per client, so a population's largest client would make every
  # client pay for its size. The tables are computed at the smallest bound in a ladder (powers
  # of 4 steps) that holds this call's largest client: a client's shuffle only depends on its own
  # rows (uniforms are drawn per position, ``jax_threefry_partitionable``), so the tables'
  # non-padding entries are the same at every bound (only masked padding differs).
  # Up to 16 batches a client, the ladder's switch would cost more than the shuffles it saves.
  ladder = [4 ** j for j in range(32) if 4 ** j < full] + [full]
  # Bounds below the smallest client's batches serve only all-padding calls, which any bound
  # serves: keep the smallest bound that holds the smallest client, and those above it.
  least = -(-max(int(min_client_size), 0) // work.batch_size)
  ladder = [s for s in ladder if s >= least]
  if full <= 16 or len(ladder) == 1:
    return at(full)
  need = -(-jnp.max(sizes) // work.batch_size)
  return jax.lax.switch(jnp.searchsorted(jnp.asarray(ladder), need),
                        [functools.partial(at, s) for s in ladder])


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
  """A population of P clients, stored ragged.

  Attributes:
    arrays: named features, each ``[N, ...]`` with rows grouped by client. The simulator's models
      read ``"x"`` (features) and ``"y"`` (integer labels).
    offsets: ``[P + 1]`` int64; client ``p`` owns rows ``offsets[p]:offsets[p+1]``.
    client_ids: ``[P]`` the clients' names (ints or strings), for reports.
    num_classes: number of label classes (labels are checked to lie in ``[0, num_classes)``).
    task: ``"classification"`` (integer labels ``y``) or ``"regression"`` (real targets ``y
      [N]``, checked finite; ``num_classes`` must then be None). Only a regression model
      (:class:`fedjax_sim.models.Model` with ``task="regression"``) trains on regression data.
  """
  arrays: Mapping[str, np.ndarray]
  offsets: np.ndarray
  client_ids: np.ndarray
  num_classes: int | None = None
  task: str = "classification"
  # Features given as jax Arrays (already in device memory) are kept here and handed to the round
  # as they are; ``arrays`` then holds zero-copy host views of them on a CPU backend. A million
  # clients of 4.8 GB thus exist once, not once on the host and once on the device.
  device_arrays: Mapping[str, Any] = dataclasses.field(default_factory=dict, init=False,
                                                       repr=False)

  def __post_init__(self):
    offsets = np.asarray(self.offsets, dtype=np.int64)
    object.__setattr__(self, "offsets", offsets)
    object.__setattr__(self, "client_ids", np.asarray(self.client_ids))
    object.__setattr__(self, "device_arrays",
                       {k: v for k, v in self.arrays.items() if isinstance(v, jax.Array)})
    object.__setattr__(self, "arrays", {k: np.asarray(v) for k, v in self.arrays.items()})
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0:
      raise ValueError("offsets must be a 1-D array [P+1] starting at 0")
    sizes = np.diff(offsets)
    if np.any(sizes < 0):
      raise ValueError("offsets must be non-decreasing")
    if self.client_ids.shape != (sizes.size,):
      raise ValueError(f"client_ids has shape {self.client_ids.shape}, expected ({sizes.size},)")
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
      raise ValueError(f"client {self.client_name(empty[0])!r} (index {empty[0]}) has no "
                       f"examples; {empty.size} empty client(s) in all. Drop them or change the "
                       "partition.")
    n = int(offsets[-1])
    for name, a in self.arrays.items():
      if a.ndim == 0 or a.shape[0] != n:
        raise ValueError(f"feature {name!r} has shape {a.shape}, expected a leading axis of {n} "
                         "(the total number of examples)")
    if self.task not in ("classification", "regression"):
      raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
    if self.task == "regression" and self.num_classes is not None:
      raise ValueError("regression data has no classes: leave num_classes=None")
    _check_features(self.arrays, self.num_classes, self.client_of_row, self.task)

  def device_array(self, name: str, dtype=None) -> jax.Array:
    """Feature ``name`` (``[N, ...]``) as a jax Array on the default device, cast to ``dtype``.

    Made once and kept (a feature given as a jax Array is used as it is). On a CPU backend the
    population's features exist once: a 64-byte aligned host array becomes the device buffer
    without a copy (``jax.device_put`` uses it in place). An unaligned one (NumPy aligns large
    arrays to 16 bytes) is first moved into aligned memory by :func:`_move_to_aligned`: when the
    population is its only holder (the README path: the user's arrays handed to
    :meth:`from_partition` and not kept) the old array shrinks as the new one fills, so the
    peak stays within one 64 MB block of the data's size; when the caller still holds it, that
    is one copy, as ``device_put`` would make. Afterwards :meth:`adopt_device_array` keeps the
    device array and a zero-copy host view of it in place of the host array. On an accelerator
    the host array is copied to the device and stays. A cast (``dtype`` other than the
    feature's own) is a separate array, not kept.
    """
    a = self.device_arrays.get(name)
    if a is None:
      cpu = jax.local_devices()[0].platform == "cpu"
      if dtype is not None and self.arrays[name].dtype != np.dtype(dtype):
        return jax.device_put(aligned_copy(self.arrays[name], dtype))
      if cpu and self.arrays[name].ctypes.data % _ALIGN:
        # Handed over in a list so that no variable here refers to the array: numpy can then
        # tell whether anything outside the population still does.
        self.arrays[name] = _move_to_aligned([self.arrays.pop(name)])
      a = jax.device_put(self.arrays[name])
      if cpu:
        self.adopt_device_array(name, a)
    return a if dtype is None else a.astype(dtype)

  def adopt_device_array(self, name: str, array) -> None:
    """Keeps ``array`` (a jax Array equal to feature ``name``, e.g. the engine's device copy) and
    a host view of it in place of the host array: on a CPU backend the view is zero-copy, so the
    population's features exist once. Used by :func:`fedjax_sim.engine.to_device`."""
    self.device_arrays[name] = array
    self.arrays[name] = np.asarray(array)

  def client_name(self, p: int):
    """Client ``p``'s id as a plain Python value, so messages read ``'b'``, not ``np.str_('b')``."""
    return self.client_ids[p:p + 1].tolist()[0]

  def client_of_row(self, row: int):
    return self.client_name(int(np.searchsorted(self.offsets, row, side="right")) - 1)

  # --- construction ---------------------------------------------------------------------------
  @classmethod
  def from_partition(cls, arrays: Mapping[str, np.ndarray], partition: Sequence[np.ndarray],
                     client_ids: Sequence | None = None, num_classes: int | None = None,
                     task: str = "classification"):
    """Builds the population from flat arrays and one index array per client.

    Args:
      arrays: named features, each ``[N, ...]`` (same N).
      partition: P index arrays into ``[0, N)``, e.g. from :mod:`fedjax_sim.partition`. An example
        may appear in at most one client.
      client_ids: optional names, default ``0..P-1``.
      num_classes: if given, labels ``arrays["y"]`` are checked against it.
      task: ``"classification"`` or ``"regression"`` (real targets ``y``; see the class).

    Memory: when the clients' rows are already consecutive and in order (``partition`` covers
    ``0..N-1`` in order) the arrays are used as they are, not copied (like the constructor, the
    population then shares them: do not modify them afterwards). Otherwise they are reordered
    into one 64-byte aligned copy, which a CPU device then uses without copying again. Either
    way, on a CPU the features exist once after :meth:`device_array` (which
    :func:`fedjax_sim.engine.to_device` calls) unless the caller keeps its own arrays: an
    unaligned array that only the population holds is moved into aligned memory, not copied.
    """
    lengths = {k: np.shape(v)[0] for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"features have different numbers of examples: {lengths}")
    # No new array object per client where the index arrays are already flat int64 (a million
    # clients' views would cost ~100 MB).
    parts = [p if p.ndim == 1 else p.reshape(-1)
             for p in (np.asarray(p, dtype=np.int64) for p in partition)]
    if not parts:
      raise ValueError("the partition has no clients")
    n = next(iter(lengths.values()))
    offsets = np.concatenate([[0], np.cumsum([p.size for p in parts])])
    ids = np.arange(len(parts)) if client_ids is None else np.asarray(client_ids)
    # Clients that already own consecutive rows in order (every example, once) need no copy;
    # checked a block at a time, without the [N] concatenated order.
    if offsets[-1] == n and _is_consecutive(parts):
      return cls({k: np.asarray(v) for k, v in arrays.items()}, offsets, ids, num_classes, task)
    order = np.concatenate(parts)
    if order.size and (order.min() < 0 or order.max() >= n):
      raise ValueError(f"partition indices must lie in [0, {n})")
    seen = np.zeros(n, bool)
    seen[order] = True
    if int(np.count_nonzero(seen)) != order.size:
      raise ValueError("the partition assigns some example to more than one client")
    return cls({k: take_rows(np.asarray(v), order) for k, v in arrays.items()}, offsets, ids,
               num_classes, task)

  @classmethod
  def from_clients(cls, clients: Sequence[Mapping[str, np.ndarray]], client_ids=None,
                   num_classes: int | None = None, task: str = "classification"):
    """Builds the population from one dict of arrays per client (``task``: see the class)."""
    if not clients:
      raise ValueError("no clients given")
    names = sorted(clients[0])
    ids = np.arange(len(clients)) if client_ids is None else np.asarray(client_ids)
    name = lambda i: ids[i:i + 1].tolist()[0] if ids.shape == (len(clients),) else i  # noqa: E731
    per_client, sizes = {k: [] for k in names}, []
    for i, c in enumerate(clients):
      if sorted(c) != names:
        raise ValueError(f"client {i} has features {sorted(c)}, expected {names}")
      n = None
      for k in names:
        try:
          a = np.asarray(c[k])
        except ValueError as e:   # ragged nested lists
          raise ValueError(f"feature {k!r} of client {name(i)!r} (index {i}) is not a "
                           f"rectangular array: {' '.join(str(e).split())}") from None
        if a.ndim == 0:
          raise ValueError(f"feature {k!r} of client {name(i)!r} (index {i}) is a scalar; "
                           "expected an array [n, ...] of the client's n examples")
        if n is not None and a.shape[0] != n:
          raise ValueError(f"client {name(i)!r} (index {i}) has {n} examples of "
                           f"{names[0]!r} but {a.shape[0]} of {k!r}")
        first = per_client[k][0] if per_client[k] else None
        if first is not None and a.shape[1:] != first.shape[1:]:
          raise ValueError(f"feature {k!r} of client {name(i)!r} (index {i}) has examples of "
                           f"shape {a.shape[1:]}, client {name(0)!r} has {first.shape[1:]}")
        n = a.shape[0]
        per_client[k].append(a)
      sizes.append(n)
    arrays = {}
    for k, parts in per_client.items():   # 64-byte aligned: a CPU device uses them in place
      dtype = np.result_type(*{a.dtype for a in parts})
      arrays[k] = np.concatenate(parts, out=aligned_empty((sum(sizes),) + parts[0].shape[1:],
                                                          dtype))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return cls(arrays, offsets, ids, num_classes, task)

  # --- views ----------------------------------------------------------------------------------
  @property
  def num_clients(self) -> int:
    return self.offsets.size - 1

  @property
  def sizes(self) -> np.ndarray:
    """``[P]`` examples per client."""
    return np.diff(self.offsets)

  @property
  def num_examples(self) -> int:
    return int(self.offsets[-1])

  @property
  def max_client_size(self) -> int:
    return int(self.sizes.max())

  @property
  def min_client_size(self) -> int:
    return int(self.sizes.min())

  def client(self, p: int) -> dict[str, np.ndarray]:
    """Client ``p``'s examples (by position, not by id)."""
    lo, hi = self.offsets[p], self.offsets[p + 1]
    return {k: v[lo:hi] for k, v in self.arrays.items()}

  def subset(self, positions: Sequence[int]) -> "FederatedData":
    """A new population made of the given clients (by position)."""
    positions = np.asarray(positions, dtype=np.int64)
    parts = [np.arange(self.offsets[p], self.offsets[p + 1]) for p in positions]
    return FederatedData.from_partition(self.arrays, parts, self.client_ids[positions],
                                        self.num_classes, self.task)

  def centralized(self) -> dict[str, np.ndarray]:
    """All examples as flat arrays (e.g. for central evaluation)."""
    return dict(self.arrays)

  def label_histogram(self) -> np.ndarray:
    """``[P, num_classes]`` label counts per client (for non-IID heat maps)."""
    if self.task == "regression":
      raise ValueError("label_histogram: regression data has no classes (task='regression')")
    k = self.num_classes or int(self.arrays["y"].max()) + 1
    client_of_row = np.repeat(np.arange(self.num_clients), self.sizes)
    h = np.zeros((self.num_clients, k), np.int64)
    np.add.at(h, (client_of_row, self.arrays["y"].astype(np.int64)), 1)
    return h

  def cohort_batches(self, key: jax.Array, positions: Sequence[int], work: LocalWork,
                     max_client_size: int | None = None) -> ClientBatches:
    """A cohort's data as ``[C, S, B, ...]`` arrays with masks, shuffled per client from ``key``.

    This is the same batching the compiled round does internally, one chunk at a time; it is
    exposed for inspection and for the sequential reference.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if positions.ndim != 1 or positions.size == 0:
      raise ValueError("positions must be a non-empty 1-D array of client positions")
    if positions.min() < 0 or positions.max() >= self.num_clients:
      raise ValueError(f"client positions must lie in [0, {self.num_clients})")
    m = self.max_client_size if max_client_size is None else max_client_size
    rows, mask = batch_indices(key, jnp.asarray(positions), jnp.asarray(self.offsets[positions]),
                               jnp.asarray(self.sizes[positions]), work, m)
    rows = np.clip(np.asarray(rows), 0, self.num_examples - 1)
    return ClientBatches(self.arrays["x"][rows], self.arrays["y"][rows], np.asarray(mask))

  def __repr__(self):
    s = self.sizes
    feats = ", ".join(f"{k}: {v.dtype}{list(v.shape[1:])}" for k, v in self.arrays.items())
    return (f"FederatedData({self.num_clients} clients, {self.num_examples} examples, "
            f"sizes {s.min()}..{s.max()} (mean {s.mean():.1f}), {{{feats}}})")


def is_inexact(dtype) -> bool:
  """Float or complex, including bfloat16 / float8 (ml_dtypes types, which
  ``np.issubdtype(., np.floating)`` does not count as floating)."""
  return jax.dtypes.issubdtype(dtype, jnp.inexact)


def check_numeric(name: str, dtype, where: str = "data"):
  """Features must be real numbers: bool, integer or float (bfloat16 included). Complex, object,
  string and other dtypes raise a ValueError naming the feature."""
  dtype = np.dtype(dtype)
  if dtype.kind in "biu" or (is_inexact(dtype) and dtype.kind != "c"):
    return
  raise ValueError(f"{where}: feature {name!r} has dtype {dtype}; features must be real numbers "
                   "(bool, integer or float)")


# XLA:CPU uses a host array in place, without a copy, when its data starts on a 64-byte boundary
# (NumPy's large allocations start 16 bytes past one).
_ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array whose data starts on a 64-byte boundary: on a CPU backend,
  :func:`jax.device_put` then uses its memory as the device buffer (no copy), so a population
  built in it exists once, not on the host and again on the device."""
  dtype = np.dtype(dtype)
  if dtype.hasobject:   # references cannot live in raw bytes (nor on a device); the feature
    return np.empty(shape, dtype)   # check rejects them with a clear message afterwards
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + _ALIGN, np.uint8)
  start = (-raw.ctypes.data) % _ALIGN
  return raw[start:start + n].view(dtype).reshape(shape)


def _is_consecutive(parts: Sequence[np.ndarray], block: int = 1 << 20) -> bool:
  """Whether the 1-D index arrays ``parts``, one after another, read ``0, 1, 2, ...`` (checked
  about ``block`` indices at a time: no temporaries of the whole length)."""
  start, group, size = 0, [], 0
  for i, p in enumerate(parts):
    group.append(p)
    size += p.size
    if size >= block or i == len(parts) - 1:
      if not np.array_equal(np.concatenate(group), np.arange(start, start + size)):
        return False
      start, group, size = start + size, [], 0
  return True


def aligned_copy(a: np.ndarray, dtype=None) -> np.ndarray:
  """``a.astype(dtype)`` (default: ``a``'s dtype) in a new 64-byte aligned array."""
  out = aligned_empty(a.shape, a.dtype if dtype is None else dtype)
  out[...] = a
  return out


# Rows copied at a time by _move_to_aligned: the most it holds twice.
_MOVE_BLOCK_BYTES = 1 << 26


def _move_to_aligned(box: list) -> np.ndarray:
  """The array in the one-element list ``box`` (which this empties), in 64-byte aligned memory.

  The caller passes the array in a list and keeps no reference of its own, so that numpy's
  ``resize(refcheck=True)`` can tell whether anything else still refers to it. If nothing does
  (and the array owns its C-contiguous data), it is copied block by block from its last row
  and shrunk after each block (a ``realloc`` that returns the tail to the system), so old and
  new together never hold more than one block beyond the data's size. Otherwise numpy refuses
  the first shrink, nothing has changed, and the rest is copied as a whole (one full copy: the
  holder keeps the original).
  """
  a = box.pop()
  out = aligned_empty(a.shape, a.dtype)
  n = a.shape[0]
  if a.flags.owndata and a.flags.c_contiguous and a.base is None and a.size:
    rows = max(1, _MOVE_BLOCK_BYTES // (a.nbytes // n))
    try:
      while n > rows:
        out[n - rows:n] = a[n - rows:n]
        a.resize((n - rows,) + a.shape[1:], refcheck=True)
        n -= rows
    except ValueError:   # another reference: numpy left the array as it was
      pass
  out[:n] = a[:n]
  return out


def take_rows(a: np.ndarray, order: np.ndarray) -> np.ndarray:
  """``a[order]`` into a new 64-byte aligned array (one copy, usable in place by the device)."""
  out = aligned_empty((order.size,) + a.shape[1:], a.dtype)
  # mode="clip": with the default "raise" NumPy fills a temporary of the output's size and then
  # copies it into `out` (2x the data at the peak). Callers pass indices already in range.
  np.take(a, order, axis=0, out=out, mode="clip")
  return out


def _check_features(arrays, num_classes, client_of_row, task="classification"):
  """Raises a ValueError naming the feature, row and client of the first bad value."""
  for name, a in arrays.items():
    check_numeric(name, a.dtype)
    if is_inexact(a.dtype):
      flat = a.reshape(a.shape[0], -1)
      # In blocks of rows: a whole-array isfinite of a 4.8 GB population would allocate 1.2 GB.
      step = max(1, (1 << 24) // max(1, flat.shape[1]))
      for start in range(0, flat.shape[0], step):
        if np.isfinite(flat[start:start + step]).all():
          continue
        bad = ~np.isfinite(flat).all(axis=1)
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"feature {name!r} has non-finite values (NaN/inf) in {int(bad.sum())} "
                         f"example(s), first at row {r} (client {client_of_row(r)!r})")
  if "y" in arrays and task == "regression":
    if arrays["y"].ndim != 1:
      raise ValueError(f"regression targets 'y' must have shape [N], got {arrays['y'].shape}")
  elif "y" in arrays:
    y = arrays["y"]
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"labels 'y' must be integers, got dtype {y.dtype} (real-valued targets: "
                       "pass task='regression' and train a regression model)")
    if y.ndim != 1:
      raise ValueError(f"labels 'y' must have shape [N], got {y.shape}")
    hi = num_classes if num_classes is not None else np.iinfo(np.int32).max
    bad = (y < 0) | (y >= hi)
    if bad.any():
      r = int(np.flatnonzero(bad)[0])
      where = "negative" if num_classes is None and y[r] < 0 else f"outside [0, {hi})"
      raise ValueError(f"label {int(y[r])} at row {r} (client {client_of_row(r)!r}) is {where}; "
                       f"{int(bad.sum())} bad label(s) in all")
