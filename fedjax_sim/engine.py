"""The compiled federated round: sample -> batch -> vmapped local training -> aggregate -> server.

One call of the function built by :func:`make_round` runs a whole round as one XLA program::

  cohort ids [C] ──sort by local steps, deal to devices──► chunks [C/K, K] ──scan──►
      per chunk: rows/masks [K,S,B] (non-empty steps first)
                 loop t < the chunk's own max steps: gather x,y [K,B] -> vmap_K(client step)
                 -> delta [K,...]; non-finite clients -> weight 0; aggregator.accumulate
  ──► aggregator.finalize -> pseudo-gradient ──► server optimizer -> ServerState

Cost follows the clients' real work: S (from the largest client) only sizes the index tables
(their shuffles are computed at the chunk's own bound: :func:`~fedjax_sim.data.federated.
batch_indices`); a chunk of similar clients runs its own busiest client's steps
(:func:`cohort_layout`), in phases of halving width so that one long client does not keep
finished slots stepping (:func:`phase_widths`). Peak
memory follows the chunk size K, not the cohort size C. Data lives on the device as flat
arrays (:class:`DeviceData`) and is passed as an argument (never closed over, so it is not
baked into the program as a constant).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import heterogeneity, server, tree
from fedjax_sim import heterogeneity as heterogeneity_mod
from fedjax_sim.algorithms.base import Algorithm, ServerContext
from fedjax_sim.client import Batch, ClientContext, keep_if
from fedjax_sim.data.federated import FederatedData, LocalWork, batch_indices, local_steps
from fedjax_sim.models.core import Model

# Clients per chunk of the vmapped client axis on CPU. Measured on the 2-core CPU with W1 at
# C=1000 (`python benchmarks/w1_w2.py --chunk-sweep W1:1000`): K=2..8 ran at 1.3-1.5 s/round,
# K=16 at 2.0 s, K=32..64 at 2.2-2.4 s. Per step, a chunk holds K copies of the parameters, their
# gradients and activations; at K=8 the 2NN's are ~13 MB and stay in cache, larger chunks spill
# to memory. Small batched matmuls (the weight gradient contracts over only B=20 examples) are
# bandwidth-bound, so cache residency matters more than batching more clients.
DEFAULT_CHUNK_SIZE = 8

# Clients per chunk on a GPU/TPU: A GUESS, NOT YET MEASURED (no accelerator was available when
# it was set; the "chunks" case of `benchmarks/device_check.sh` times K = 16, 64, 256). An accelerator is kept busy by large
# batched products, and K = 8 W1 clients are a [8, 20, 784] x [8, 784, 200] product per layer,
# far too small to fill one; K clients also cost K copies of parameters and activations, which
# device memory holds easily at K = 64 for models of this size.
ACCELERATOR_CHUNK_SIZE = 64


def default_chunk_size(platform: str | None = None) -> int:
  """The default clients per chunk K for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``; default:
  JAX's default backend): :data:`DEFAULT_CHUNK_SIZE` on a CPU, :data:`ACCELERATOR_CHUNK_SIZE`
  elsewhere."""
  platform = platform or jax.default_backend()
  return DEFAULT_CHUNK_SIZE if platform == "cpu" else ACCELERATOR_CHUNK_SIZE


class DeviceData(NamedTuple):
  """A population on the device: flat arrays plus per-client offsets and sizes.

  Attributes:
    x: ``[N, ...]`` features.  y: ``[N]`` labels.
    offsets: ``[P]`` int32 first row of each client.  sizes: ``[P]`` int32 examples per client.
    weights: ``[P]`` float32 aggregation weights p_i.
    het: per-client heterogeneity arrays (:class:`fedjax_sim.heterogeneity.HeterogeneityArrays`)
      or ``None``.
  """
  x: jax.Array
  y: jax.Array
  offsets: jax.Array
  sizes: jax.Array
  weights: jax.Array
  het: Any = None

  # The round gathers each local step's rows [K, B] from the flat arrays inside its step loop.
  gather_per_step = True

  # Per-client accessors the round uses; a procedural population
  # (:class:`fedjax_sim.data.procedural.ProceduralPopulation`) offers the same ones.
  def client_sizes(self, client_ids: jax.Array) -> jax.Array:
    return self.sizes[client_ids]

  def client_offsets(self, client_ids: jax.Array) -> jax.Array:
    return self.offsets[client_ids]

  def client_weights(self, client_ids: jax.Array) -> jax.Array:
    return self.weights[client_ids]

  def examples(self, client_ids: jax.Array, rows: jax.Array):
    """``rows [K, ...]`` (flat row numbers) -> ``x [K, ..., *features]``, ``y [K, ...]``."""
    del client_ids
    rows = jnp.clip(rows, 0, self.y.shape[0] - 1)
    return self.x[rows], self.y[rows]


def to_device(data: FederatedData, weights: np.ndarray | None = None,
              het: heterogeneity.Heterogeneity | None = None,
              work: LocalWork | None = None) -> DeviceData:
  """Moves a population to the device; ``weights [P]`` are the aggregation weights p_i
  (default: example counts); ``het`` (with the algorithm's ``work``) adds per-client
  heterogeneity arrays."""
  w = data.sizes if weights is None else weights
  het_arrays = None if het is None else heterogeneity.to_device(het, data.sizes, work)
  # FederatedData.device_array: made once and kept; on a CPU backend the population's features
  # then exist once (moved into aligned memory that the device uses in place).
  # float32 regression targets (FederatedData.task == "regression"), else int32 class labels
  y_dtype = np.float32 if getattr(data, "task", "classification") == "regression" else np.int32
  return DeviceData(data.device_array("x"), data.device_array("y", y_dtype),
                    jnp.asarray(data.offsets[:-1], jnp.int32), jnp.asarray(data.sizes, jnp.int32),
                    jnp.asarray(w, jnp.float32), het_arrays)


# Above this population size, and for cohorts below 1/8 of it, cohorts are drawn by rejection
# (O(C) work); below it jax.random.choice's O(P) permutation is cheap and exact.
SPARSE_SAMPLING_MIN_POPULATION = 100_000


def _sample_sparse(key: jax.Array, population: int, cohort_size: int):
  """The first ``cohort_size`` distinct values of an i.i.d. uniform sequence over
  ``[0, population)``: a uniformly random subset, in random order, in O(C log C) work.

  ``m = C + margin`` candidates are drawn, the margin covering the expected number of repeats
  (``~m^2 / 2P``) by 8 standard deviations plus 16, so running short is astronomically unlikely;
  if it happens anyway, the missing slots come back with ``valid = False`` (a smaller cohort),
  never a repeated client.
  """
  expected = cohort_size * cohort_size / (2.0 * population)
  m = cohort_size + int(math.ceil(2 * expected + 8 * math.sqrt(2 * expected) + 16))
  cand = jax.random.randint(key, (m,), 0, population, dtype=jnp.int32)
  order = jnp.argsort(cand, stable=True)
  s = cand[order]
  repeat_sorted = jnp.concatenate([jnp.zeros(1, bool), s[1:] == s[:-1]])
  first = ~jnp.zeros(m, bool).at[order].set(repeat_sorted)   # first occurrence of its value
  pos = jnp.cumsum(first) - 1
  slot = jnp.where(first & (pos < cohort_size), pos, cohort_size)
  ids = jnp.zeros(cohort_size, jnp.int32).at[slot].set(cand, mode="drop")
  return ids, jnp.arange(cohort_size) < jnp.sum(first)


def sample_cohort(key: jax.Array, population: int, cohort_size: int,
                  online: jax.Array | None = None, weights: jax.Array | None = None):
  """Draws a cohort of distinct clients without replacement.

  Returns ``(ids [cohort_size] int32, valid [cohort_size] bool)``: client positions in
  ``[0, population)``; ``valid`` is False for slots left empty (only when fewer than
  ``cohort_size`` clients are online or have positive weight).

  * Uniform (default): O(C) work for large populations (:func:`_sample_sparse`), so a million
    or 10^8 clients cost no more per round than a hundred.
  * ``weights [P]`` (e.g. client sizes): successive sampling proportional to the weights (each
    draw picks client i with probability ``w_i / sum of the remaining w``), by the Gumbel top-k
    trick; O(P).
  * ``online [P]`` (bool): only online clients are drawn; O(P).

  Privacy accounting: the uniform sampler draws fixed-size cohorts without replacement, whose
  analysis is :func:`fedjax_sim.privacy.epsilon` with ``population=P`` (not Poisson sampling's);
  size-weighted or availability-restricted cohorts are covered by neither.
  """
  if online is not None or weights is not None:
    if weights is None:
      scores = jax.random.uniform(key, (population,))
    else:
      scores = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)) +
                         jax.random.gumbel(key, (population,)), -jnp.inf)
    if online is not None:
      scores = jnp.where(online, scores, -jnp.inf)
    top, ids = jax.lax.top_k(scores, cohort_size)
    return ids.astype(jnp.int32), top > -jnp.inf
  if population >= SPARSE_SAMPLING_MIN_POPULATION and cohort_size * 8 <= population:
    return _sample_sparse(key, population, cohort_size)
  valid = jnp.ones(cohort_size, bool)
  if cohort_size == population:
    return jax.random.permutation(key, population).astype(jnp.int32), valid
  return jax.random.choice(key, population, (cohort_size,), replace=False).astype(jnp.int32), valid


COHORT_SAMPLING = ("uniform", "size")


class RoundKeys(NamedTuple):
  """Independent streams of one round's key (each used through ``fold_in(., client_id)`` where
  it is per client)."""
  sample: jax.Array
  batch: jax.Array
  transform: jax.Array
  heterogeneity: jax.Array
  server: jax.Array
  availability: jax.Array
  aggregate: jax.Array
  client: jax.Array


def round_keys(key: jax.Array) -> RoundKeys:
  """Derives the round's independent keys (cohort sampling, local batching, update transforms,
  heterogeneity draws, server-side noise, availability, keyed aggregators, client programs)."""
  k_sample, k_batch = jax.random.split(key)
  return RoundKeys(k_sample, k_batch, jax.random.fold_in(key, 0x7F), jax.random.fold_in(key, 0x4E),
                   jax.random.fold_in(key, 0x5E), jax.random.fold_in(key, 0xA7),
                   jax.random.fold_in(key, 0xC3), jax.random.fold_in(key, 0x2D))


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
  """``[K]`` keys ``fold_in(key, client_ids[i])``: a client's draws do not depend on its position
  in the cohort, the chunking or the devices."""
  return jax.vmap(lambda c: jax.random.fold_in(key, c))(client_ids)


def device_memory_bytes(device: jax.Device | None = None) -> tuple[int, str]:
  """``(bytes, description)`` of the memory that arrays on ``device`` (default: the first local
  device) live in: an accelerator's own memory (``memory_stats()["bytes_limit"]``, what its
  allocator may use), else the host's physical RAM (a CPU device's arrays are host memory)."""
  device = device or jax.local_devices()[0]
  stats = None
  if device.platform != "cpu":
    try:
      stats = device.memory_stats()
    except Exception:   # noqa: BLE001 - some backends do not implement it
      stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} device memory"
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def init_state(algorithm: Algorithm, params, population: int,
               hparams: dict | None = None) -> server.ServerState:
  """The round-0 :class:`~fedjax_sim.server.ServerState` of ``algorithm``: params, server optimizer
  state, the algorithm's server-side state, per-client state stores ``[P, ...]`` and in-state
  hyperparameters (:data:`fedjax_sim.server.HPARAMS` and ``algorithm.hparams``).

  Raises ValueError if the per-client state of the population would take more than half of the
  memory its arrays live in (:func:`device_memory_bytes`)."""
  hp = server.check_hparams(hparams, algorithm.hparams)
  one = server.ClientStores(algorithm.client_state_init(params),
                            algorithm.update_transform.init(params))
  per_client = sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(one))
  total = per_client * population
  memory, where = device_memory_bytes()
  if total > memory // 2:
    raise ValueError(
        f"{algorithm.name} keeps {per_client} bytes of state per client: {total / 1e9:.1f} GB for "
        f"{population} clients, more than half of the {memory / 1e9:.1f} GB of {where}. Use a "
        "smaller population or a stateless algorithm.")
  stores = jax.tree.map(
      lambda a: jnp.broadcast_to(jnp.asarray(a), (population,) + jnp.shape(a)), one)
  return server.init(params, algorithm.server_optimizer, aux=algorithm.server_state_init(params),
                     clients=stores, hparams=hp)


class RoundOutput(NamedTuple):
  """Per-round results: scalar ``metrics`` and ``[C]`` per-client arrays ``clients``."""
  metrics: dict[str, jax.Array]
  clients: dict[str, jax.Array]


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``"clients"`` over the first ``num_devices`` devices (default: all).

  On a CPU, several devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
  (set before JAX starts); each device then runs on its own core.
  """
  devices = jax.devices()[: num_devices or jax.device_count()]
  return jax.sharding.Mesh(np.array(devices), ("clients",))


def mask_rows(keep: jax.Array, t):
  """Zeros the rows ``t[k]`` (leaves ``[K, ...]``) where ``keep [K]`` is False (``0 * NaN`` would
  still be NaN in a weighted sum, so dropped clients' rows are zeroed, not just weighted 0)."""
  return jax.tree.map(lambda d: jnp.where(jnp.reshape(keep, (-1,) + (1,) * (d.ndim - 1)), d, 0), t)


def mean_or_nan(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, NaN where ``count`` is 0 (a mean over nothing is undefined, not 0)."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def _work_estimate(data, ids: jax.Array, valid: jax.Array, work: LocalWork) -> jax.Array:
  """``[C]`` int32 local steps each cohort client will roughly take (-1 for empty slots): its
  epochs' batches (or the fixed step count), capped by a per-client step cap if there is one.
  Only an ordering key: the trip counts themselves are exact (:func:`make_cohort_fold`)."""
  sizes = data.client_sizes(ids)
  est = local_steps(work, sizes)
  het = getattr(data, "het", None)
  if het is not None and het.step_cap is not None:
    est = jnp.minimum(est, het.step_cap[ids])
  return jnp.where(valid & (sizes > 0), est, -1).astype(jnp.int32)


# Cohort clients placed one by one on the least-loaded device (per device) before the rest are
# dealt evenly: the largest clients decide the balance; 64 per device levels a Zipf a=1 cohort
# of 1000 to within a few steps (plain round-robin dealing left ~12% more on one device).
BALANCE_HEAD_PER_DEVICE = 64


def cohort_layout(work: jax.Array, num_devices: int) -> jax.Array:
  """``work [C']`` (C' = D * chunks * K; -1 marks an empty slot) -> the permutation ``[C']``
  that lays the cohort out as ``[D, chunks, K]``.

  Each device's share is sorted by work, descending, so a chunk holds clients of similar work
  and runs about its own clients' steps (:func:`make_cohort_fold`). Shares are balanced in
  total work with the same number of slots each: the ``BALANCE_HEAD_PER_DEVICE * D`` largest
  clients go one by one to the device whose projected total (its load plus its free slots
  times the mean work of the rest) is smallest (greedy longest-processing-time first), then the
  rest are interleaved over the devices in proportion to their free slots. Ties keep cohort
  order. On one device this is a plain sort."""
  c = work.shape[0]
  order = jnp.argsort(-work, stable=True)
  if num_devices == 1:
    return order
  d, cap = num_devices, c // num_devices
  w = jnp.maximum(work[order], 0).astype(jnp.float32)
  head = min(c, BALANCE_HEAD_PER_DEVICE * d)
  tail_mean = jnp.mean(w[head:]) if head < c else jnp.float32(0)

  def place(carry, wi):
    load, count = carry
    projected = jnp.where(count < cap, load + (cap - count) * tail_mean, jnp.inf)
    dev = jnp.argmin(projected)
    return (load.at[dev].add(wi), count.at[dev].add(1)), dev

  (_, count), head_dev = jax.lax.scan(place, (jnp.zeros(d), jnp.zeros(d, jnp.int32)), w[:head])
  free = cap - count                                                  # [D] slots left
  slot = jnp.arange(c - head)
  keys = jnp.where(slot[None, :] < free[:, None], (slot[None, :] + 0.5) / jnp.maximum(
      free[:, None], 1), jnp.inf)                                     # [D, C' - H]
  tail_dev = (jnp.argsort(keys.reshape(-1), stable=True) // (c - head))[: c - head]
  dev = jnp.concatenate([head_dev, tail_dev.astype(head_dev.dtype)])
  # Group by device, keeping the descending order inside each group (exactly cap per device).
  return order[jnp.argsort(dev * c + jnp.arange(c), stable=True)]


def phase_widths(k: int) -> tuple[int, ...]:
  """The vmapped widths a chunk of ``k`` clients steps at, widest first: ``k``, then the powers
  of two below it down to 1 (``8 -> (8, 4, 2, 1)``, ``6 -> (6, 4, 2, 1)``). Each width is one
  more compiled copy of the client step; the log2(k) + 1 copies bound a chunk's padded work to
  about twice its real work however skewed its clients are."""
  below = (k - 1).bit_length()   # 2**(below - 1) is the largest power of two < k
  return (k,) + tuple(1 << j for j in reversed(range(below))) if k > 1 else (k,)


def step_widths(k: int, work: LocalWork, min_client_size: int, max_client_size: int,
                het: heterogeneity.Heterogeneity | None = None) -> tuple[int, ...]:
  """The widths a chunk of ``k`` clients is compiled to step at: :func:`phase_widths`, or only
  ``(k,)`` when every non-empty client provably takes the same number of local steps (fixed
  ``local_steps``, or epochs over clients of equal batch counts, with no heterogeneity to mask
  steps). Then the narrow phases could only ever serve a partly padded chunk, whose padding
  slots are no-op steps anyway, so compiling them buys nothing. ``min_client_size`` 0 means
  unknown (all widths)."""
  if het is None and min_client_size > 0 and (
      work.local_steps is not None
      or work.steps_per_epoch(min_client_size) == work.steps_per_epoch(max_client_size)):
    return (k,)
  return phase_widths(k)


class FoldOutput(NamedTuple):
  """What :func:`make_cohort_fold`'s fold returns for its share of a cohort.

  Attributes:
    aggregate: the aggregator's state after every chunk.
    upload: ``(weighted sum of the uploads, their total weight)``.
    clients: per-client results ``[chunks, K]``: the program's metrics, ``state_algorithm`` and
      ``state_transform`` (new per-client states), ``finite``, ``counted``, ``straggler``,
      ``dropped``, ``weight`` (the aggregation weight used, 0 if not counted).
  """
  aggregate: Any
  upload: Any
  clients: dict


def make_cohort_fold(algorithm: Algorithm, model: Model, *, max_client_size: int, chunk_size: int,
                     heterogeneity: heterogeneity.Heterogeneity | None = None,
                     shared_params: bool = True, min_client_size: int = 0):
  """THE cohort fold, shared by the synchronous round and the asynchronous simulation:
  chunks of K clients -> batches -> ``vmap`` of the client program over the chunk, stepped as
  many times as the chunk's busiest client needs -> update transform -> finite mask ->
  aggregator accumulate.

  Returns ``fold(params, aux, stores, hparams, data, keys, ids, valid, weight_scale=None,
  version=None) -> FoldOutput``: ``ids``/``valid [chunks, K]`` (slots with ``valid`` False are
  padding), ``aux`` the algorithm's server state, ``stores`` the population's
  :class:`~fedjax_sim.server.ClientStores`, ``keys`` the :class:`RoundKeys`. Clients start from
  ``params`` (``shared_params=True``), or, with ``shared_params=False``, from
  ``params[version[c] % H]`` of a ring of H models (leaves ``[H, ...]``: asynchronous clients
  start from the version they downloaded). ``weight_scale [chunks, K]`` multiplies the
  aggregation weights (asynchronous staleness). ``min_client_size`` (0: unknown) is the smallest
  client's size: when every non-empty client then takes the same number of steps (and no
  heterogeneity masks any), chunks step at width K only (:func:`step_widths`), which compiles
  one copy of the client step instead of log2(K) + 1. Not jitted.
  """
  work = algorithm.work
  het = heterogeneity
  k = chunk_size
  widths = step_widths(k, work, min_client_size, max_client_size, het)
  program = algorithm.client(model, algorithm.client_optimizer)
  agg, transform = algorithm.aggregator, algorithm.update_transform
  ctx_axes = ClientContext(client_id=0, global_params=None if shared_params else 0, state=0,
                           server=None, hparams=None, lr_scale=0, key=0, num_examples=0)

  def one_step(carry, batch, ctx, t):
    new = program.step(carry, batch, ctx, jax.random.fold_in(ctx.key, t))
    return keep_if(jnp.any(batch.mask), new, carry)   # an empty (padding) step is a no-op

  v_init = jax.vmap(program.init, in_axes=(ctx_axes,))
  v_step = jax.vmap(one_step, in_axes=(0, Batch(0, 0, 0), ctx_axes, None))
  v_final = jax.vmap(program.final, in_axes=(0, ctx_axes))
  v_transform = jax.vmap(transform.apply)

  def head(ctx: ClientContext, w: int) -> ClientContext:
    """The first ``w`` clients of a chunk's context (fields without a client axis are shared)."""
    return ClientContext(*(f if ax is None else jax.tree.map(lambda a: a[:w], f)
                           for f, ax in zip(ctx, ctx_axes)))

  def train_chunk(data, cids, rows, mask, ctx):
    """Local training of one chunk: ``rows``/``mask [k, S, B]`` -> stacked ClientResult ``[k]``.

    Cost follows the chunk's real work, not S: each client's non-empty steps are moved to the
    front (an empty step is a no-op, so the order of the non-empty ones, all that matters, is
    kept), and the chunk runs only as many steps as its busiest client has (a dynamic trip count,
    one scalar per chunk, computed outside the vmap over clients so it is not batched).

    The steps run in phases of halving width (:func:`phase_widths`: k, then powers of two down
    to 1): the phase of width w steps only the chunk's first w slots, and runs until every slot
    from the next width on has finished (a suffix maximum of the step counts). The layout puts a
    chunk's busiest clients first (:func:`cohort_layout`), so a heavy-tailed client's long tail
    of steps runs at width 1 instead of paying for k - 1 finished slots: on a Zipf population the
    largest client's chunk costs about its real work. Every client still takes exactly its own
    steps, in order, with the same keys (the width only changes how many clients a vmapped step
    carries), so results do not depend on the phases or on the slot order; an unsorted chunk is
    only slower, never wrong.

    A stored population's batch rows ``[k, B]`` are gathered inside the loop, step by step: the
    chunk never holds all its examples ``[k, S, B, ...]`` at once.
    """
    nonempty = jnp.any(mask, axis=2)                                   # [k, S]
    order = jnp.argsort(~nonempty, axis=1, stable=True)
    rows = jnp.take_along_axis(rows, order[:, :, None], axis=1)
    mask = jnp.take_along_axis(mask, order[:, :, None], axis=1)
    counts = jnp.sum(nonempty, axis=1).astype(jnp.int32)               # [k]
    # suffix[i] = max(counts[i:]): slots i.. are all done after suffix[i] steps.
    suffix = jax.lax.cummax(counts, axis=0, reverse=True)
    per_step = getattr(data, "gather_per_step", True)
    if not per_step:   # e.g. a procedural population, which generates a client's data at once
      xs, ys = data.examples(cids, rows)

    def phase_body(w: int):
      """Loop body stepping the first ``w`` slots; its carry holds only those ``w`` clients."""
      wctx, wcids, wrows, wmask = head(ctx, w), cids[:w], rows[:w], mask[:w]
      if not per_step:
        wxs, wys = xs[:w], ys[:w]

      def body(t, carry):
        m = jax.lax.dynamic_index_in_dim(wmask, t, axis=1, keepdims=False)
        if per_step:
          bx, by = data.examples(
              wcids, jax.lax.dynamic_index_in_dim(wrows, t, axis=1, keepdims=False))
        else:
          bx, by = (jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False)
                    for a in (wxs, wys))
        return v_step(carry, Batch(bx, by, m), wctx, t)
      return body

    def narrow_phase(carry, start, end, w: int):
      """Steps ``[start, end)`` of the first ``w`` slots: their carry is sliced out once, stepped
      at width w, and written back once (not per step)."""
      part = jax.lax.fori_loop(start, end, phase_body(w), jax.tree.map(lambda a: a[:w], carry))
      return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, 0, axis=0),
                          carry, part)

    ends = [suffix[w] for w in widths[1:]] + [suffix[0]]   # non-decreasing
    carry = jax.lax.fori_loop(0, ends[0], phase_body(k), v_init(ctx))

    def narrow_phases(carry):
      for i, w in enumerate(widths[1:], start=1):
        carry = jax.lax.cond(ends[i] > ends[i - 1],
                             lambda c, s=ends[i - 1], e=ends[i], w=w: narrow_phase(c, s, e, w),
                             lambda c: c, carry)
      return carry

    if len(widths) > 1:   # skipped outright when the chunk's clients end together (equal sizes)
      carry = jax.lax.cond(ends[-1] > ends[0], narrow_phases, lambda c: c, carry)
    return v_final(carry, ctx)

  def template(params, aux, stores, hparams):
    """Shapes of one client's upload (to start the running sum)."""
    one = jax.tree.map(lambda a: a[0], stores)
    start = params if shared_params else jax.tree.map(lambda r: r[0], params)
    ctx = ClientContext(jnp.int32(0), start, one.algorithm, aux, hparams, jnp.float32(1),
                        jax.random.key(0), jnp.int32(1))
    return jax.eval_shape(lambda: program.final(program.init(ctx), ctx).upload)

  def fold(params, aux, stores, hparams, data, keys, ids, valid, weight_scale=None,
           version=None) -> FoldOutput:
    num_chunks = ids.shape[0]

    def chunk(carry, chunk_in):
      acc, (up_sum, up_w) = carry
      cids, cvalid, cscale, cver = chunk_in
      sizes = jnp.where(cvalid, data.client_sizes(cids), 0)
      rows, mask = batch_indices(keys.batch, cids, data.client_offsets(cids), sizes, work,
                                 max_client_size, min_client_size)
      lr_scale, straggler, dropped = jnp.ones(k, jnp.float32), jnp.zeros_like(cvalid), \
          jnp.zeros_like(cvalid)
      if het is not None:
        mask, cond = heterogeneity_mod.apply(het, data.het, keys.heterogeneity, cids, mask, work)
        straggler, dropped = cond.straggler, cond.dropped
        if cond.lr_scale is not None:
          lr_scale = cond.lr_scale.astype(jnp.float32)
      if "client_lr_scale" in hparams:
        lr_scale = lr_scale * hparams["client_lr_scale"]
      mine = jax.tree.map(lambda s: s[cids], stores)
      start = params if shared_params else jax.tree.map(
          lambda r: r[cver % r.shape[0]], params)
      ctx = ClientContext(cids, start, mine.algorithm, aux, hparams, lr_scale,
                          client_keys(keys.client, cids), sizes)
      res = train_chunk(data, cids, rows, mask, ctx)
      delta, new_tr = v_transform(res.delta, client_keys(keys.transform, cids), cids,
                                  mine.transform)
      finite = jax.vmap(tree.sum_is_finite)(delta) & jnp.isfinite(res.metrics["loss_sum"])
      if jax.tree.leaves(res.upload):
        finite = finite & jax.vmap(tree.sum_is_finite)(res.upload)
      counted = finite & cvalid & ~dropped
      if algorithm.drop_stragglers:
        counted = counted & ~straggler
      w = jnp.where(counted, data.client_weights(cids), 0.0)
      if cscale is not None:
        w = w * cscale
      acc = agg.accumulate(acc, mask_rows(w > 0, delta), w)
      up_sum = jax.tree.map(jnp.add, up_sum, tree.weighted_sum(mask_rows(w > 0, res.upload), w))
      ys = dict(res.metrics, state_algorithm=res.state, state_transform=new_tr, finite=finite,
                counted=counted, straggler=straggler & cvalid, dropped=dropped & cvalid, weight=w)
      return (acc, (up_sum, up_w + jnp.sum(w))), ys

    up0 = (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        template(params, aux, stores, hparams)), jnp.zeros((), jnp.float32))
    (acc, up), clients = jax.lax.scan(chunk, (agg.init(params if shared_params else jax.tree.map(
        lambda r: r[0], params), num_chunks * k), up0), (ids, valid, weight_scale, version))
    return FoldOutput(acc, up, clients)

  return fold


def upload_mean(upload) -> Any:
  """``(weighted sum, total weight)`` -> the weighted mean of the clients' uploads."""
  up_sum, up_w = upload
  return jax.tree.map(lambda a: a / jnp.maximum(up_w, 1e-30).astype(a.dtype), up_sum)


def scatter_stores(stores: server.ClientStores, ids: jax.Array, keep: jax.Array, clients: dict,
                   population: int) -> server.ClientStores:
  """The population's stores with the rows of ``ids [C]`` where ``keep [C]`` replaced by the
  clients' new states (``clients["state_algorithm"]``, ``clients["state_transform"]``, ``[C,
  ...]``); other rows (clients whose update did not count) are left as they were."""
  target = jnp.where(keep, ids, population)   # index P is out of bounds: dropped by the scatter

  def put(store, new):
    return jax.tree.map(lambda s, n: s.at[target].set(n.astype(s.dtype), mode="drop"), store, new)
  return server.ClientStores(put(stores.algorithm, clients["state_algorithm"]),
                             put(stores.transform, clients["state_transform"]))


def apply_server_step(algorithm: Algorithm, state: server.ServerState, update, total_w, upload,
                      num_counted, *, cohort_size: int, population: int, key):
  """``server_finish`` then the server optimizer step; a non-finite aggregate, model, optimizer
  state or algorithm server state is not applied (the state stays as it was but ``round``).
  Returns ``(new_state, applied, update)``."""
  sctx = ServerContext(state.params, state.aux, upload, num_counted, total_w, cohort_size,
                       population, state.hparams, key)
  update, aux = algorithm.server_finish(sctx, update)
  new_state, applied = server.step(algorithm.server_optimizer, state, update,
                                   (total_w > 0) & jnp.isfinite(total_w))
  applied = applied & tree.all_finite(aux)
  new_state = new_state.replace(
      params=tree.where(applied, new_state.params, state.params),
      opt_state=tree.where(applied, new_state.opt_state, state.opt_state),
      aux=tree.where(applied, aux, state.aux))
  return new_state, applied, update


def update_norm(update) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(u.astype(jnp.float32) ** 2) for u in jax.tree.leaves(update)))


def make_round(algorithm: Algorithm, model: Model, *, population: int, cohort_size: int,
               max_client_size: int, chunk_size: int | None = None,
               mesh: jax.sharding.Mesh | None = None,
               heterogeneity: heterogeneity.Heterogeneity | None = None,
               cohort_sampling: str = "uniform", min_client_size: int = 0):
  """Builds ``round_fn(state, data: DeviceData, key) -> (ServerState, RoundOutput)`` (not jitted).

  Args:
    algorithm: the federated algorithm (client program, optimizers, local work, aggregation,
      per-client and server state; see :mod:`fedjax_sim.algorithms.base`).
    model: the model.
    population: number of clients P in ``data``.
    cohort_size: clients per round C.
    max_client_size: largest client (fixes S, the static length of the per-client step
      tables; each chunk runs only as many steps as its own clients need).
    chunk_size: clients per vmapped chunk K (default :func:`default_chunk_size` of the mesh's
      or the default backend's platform).
    mesh: optional 1-D mesh (axis ``"clients"``, see :func:`client_mesh`): the cohort's client
      axis is split over its D devices, each folding its share chunk by chunk; the D partial
      aggregator states are then combined (a cross-device reduction). Parameters and data are
      replicated. Results equal the single-device round up to float summation order.
    heterogeneity: optional simulated systems heterogeneity (stragglers, drop-outs, per-client
      work, availability; :mod:`fedjax_sim.heterogeneity`). Its per-client arrays travel in
      ``data.het`` (:func:`to_device`).
    cohort_sampling: ``"uniform"`` (default) or ``"size"``: clients drawn with probability
      proportional to their example counts (successive sampling without replacement; pair it
      with ``weighting="uniform"`` for an unbiased average, as the FedProx paper does).
    min_client_size: the smallest client's size (0: unknown). Only prunes compiled code that no
      round can use (:func:`step_widths`, :func:`~fedjax_sim.data.federated.batch_indices`):
      results are the same with 0.

  The state must come from :func:`init_state` (it holds the per-client state stores).
  """
  if cohort_sampling not in COHORT_SAMPLING:
    raise ValueError(f"cohort_sampling must be one of {COHORT_SAMPLING}, got {cohort_sampling!r}")
  num_dev = 1 if mesh is None else mesh.devices.size
  per_dev = math.ceil(cohort_size / num_dev)
  platform = None if mesh is None else mesh.devices.flat[0].platform
  num_chunks = math.ceil(per_dev / min(per_dev, chunk_size or default_chunk_size(platform)))
  k = math.ceil(per_dev / num_chunks)   # balanced: C=10, K=8 -> 2 chunks of 5, not 8 + 2
  padded = num_dev * num_chunks * k
  work = algorithm.work
  het = heterogeneity
  if het is not None:
    het.validate(population, work)
  agg = algorithm.aggregator
  agg.validate(cohort_size)
  fold = make_cohort_fold(algorithm, model, max_client_size=max_client_size, chunk_size=k,
                          heterogeneity=het, min_client_size=min_client_size)

  def fold_share(params, aux, stores, hparams, data, keys, ids, valid):
    """One device's share: ids/valid ``[1, num_chunks, k]`` -> FoldOutput with a leading [1]."""
    out = fold(params, aux, stores, hparams, data, keys, ids[0], valid[0])
    return jax.tree.map(lambda a: a[None], out)

  if mesh is not None:
    spec = jax.sharding.PartitionSpec("clients")
    rep = jax.sharding.PartitionSpec()
    # check_vma=False: the replicated global params seed per-device (varying) scan carries; the
    # varying-axis type check would demand a pcast on every carry for no behavioural difference.
    fold_share = jax.shard_map(fold_share, mesh=mesh,
                               in_specs=(rep, rep, rep, rep, rep, rep, spec, spec),
                               out_specs=spec, check_vma=False)

  def round_fn(state: server.ServerState, data: DeviceData, key: jax.Array):
    keys = round_keys(key)
    sampling_weights = None
    if cohort_sampling == "size":
      sampling_weights = data.sizes.astype(jnp.float32)
    if het is not None and het.availability is not None:
      on = heterogeneity_mod.online(data.het, keys.availability, state.round, population)
      ids, valid = sample_cohort(keys.sample, population, cohort_size, on, sampling_weights)
      num_online = jnp.sum(on).astype(jnp.int32)
    else:
      ids, valid = sample_cohort(keys.sample, population, cohort_size, None, sampling_weights)
      num_online = jnp.asarray(population, jnp.int32)
    valid = jnp.concatenate([valid, jnp.zeros(padded - cohort_size, bool)])
    ids = jnp.concatenate([ids, jnp.zeros(padded - cohort_size, jnp.int32)])
    # Lay the cohort out by work (see cohort_layout); every per-client draw is keyed by the client
    # id, so the layout changes float summation order only.
    layout = cohort_layout(_work_estimate(data, ids, valid, work), num_dev)
    lids, lvalid = ids[layout], valid[layout]
    shape = (num_dev, num_chunks, k)
    out = fold_share(state.params, state.aux, state.clients, state.hparams, data, keys,
                     lids.reshape(shape), lvalid.reshape(shape))
    back = jnp.zeros(padded, jnp.int32).at[layout].set(jnp.arange(padded, dtype=jnp.int32))
    clients = jax.tree.map(lambda a: a.reshape((padded,) + a.shape[3:])[back][:cohort_size],
                           out.clients)
    # Slots of the combined state follow the layout's (device, chunk, k) order; empty slots get
    # distinct ids outside the population so that every slot has its own (secure aggregation).
    slot_ids = jnp.where(lvalid, lids, population + jnp.arange(padded, dtype=jnp.int32))
    update, total_w = agg.finalize(agg.combine(out.aggregate), keys.aggregate, slot_ids)
    counted = clients["counted"]
    upload = upload_mean(jax.tree.map(lambda a: jnp.sum(a, axis=0), out.upload))
    new_state, applied, update = apply_server_step(
        algorithm, state, update, total_w, upload, jnp.sum(counted).astype(jnp.int32),
        cohort_size=cohort_size, population=population, key=keys.server)
    ids = ids[:cohort_size]
    # Rows of clients whose update did not count (dropped, non-finite), or of every client of a
    # round whose aggregate was not applied, are left as they were.
    new_state = new_state.replace(
        clients=scatter_stores(state.clients, ids, counted & applied, clients, population))

    ok = clients["finite"]
    count = jnp.sum(jnp.where(ok, clients["count"], 0.0))
    steps = clients["steps"]
    metrics = {
        # NaN (not 0) when no client's training was finite: there is no loss to report.
        "train_loss": mean_or_nan(jnp.sum(jnp.where(ok, clients["loss_sum"], 0.0)), count),
        "train_accuracy": mean_or_nan(jnp.sum(jnp.where(ok, clients["correct"], 0.0)), count),
        "num_clients": jnp.sum(valid).astype(jnp.int32),
        "num_nonfinite": jnp.sum(~ok & valid[:cohort_size]).astype(jnp.int32),
        "num_counted": jnp.sum(counted).astype(jnp.int32),
        "num_stragglers": jnp.sum(clients["straggler"]).astype(jnp.int32),
        "num_dropped": jnp.sum(clients["dropped"]).astype(jnp.int32),
        "num_online": num_online,
        "steps_done": jnp.sum(jnp.where(counted, steps, 0)).astype(jnp.int32),
        "steps_wasted": jnp.sum(jnp.where(counted, 0, steps)).astype(jnp.int32),
        "total_weight": total_w,
        "aggregate_nonfinite": ((total_w > 0) & ~applied).astype(jnp.int32),
        "update_norm": update_norm(update),
    }
    out_clients = {"id": ids, "loss": clients["loss_sum"] / jnp.maximum(clients["count"], 1),
                   "accuracy": clients["correct"] / jnp.maximum(clients["count"], 1)}
    out_clients.update({name: v for name, v in clients.items()
                        if name not in ("state_algorithm", "state_transform", "loss_sum",
                                        "correct", "weight")})
    return new_state, RoundOutput(metrics, out_clients)

  return round_fn
