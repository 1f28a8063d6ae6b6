"""Asynchronous buffered aggregation (FedBuff) as a vectorized discrete-event simulation.

M clients are in flight at any time, each in a *slot* that records who it is, which model
version it downloaded and when it will finish (simulated seconds). One compiled
:func:`make_server_step` call advances the simulation to the next server update::

  slots [M]: client, start_version, start_time, finish_time        versions ring [H, ...params]
     │
     ├─ K events (lax.fori_loop, O(K·P) integer work, no training):
     │    j = argmin finish_time            (ties: lowest slot)   -> arrival k = (client, version)
     │    restart="arrival": a new client (uniform over the clients not in flight) takes slot j at
     │    the arrival time with the current version t, so concurrency stays M, and may itself
     │    arrive before the buffer is full
     │
     ├─ train the K arrivals vectorized: chunks of the K -> gather start params
     │    versions[start_version % H] ([k, ...], params in_axes=0) -> vmap(client train)
     │    staleness s = t - start_version;  s >= H: dropped (its version left the ring)
     │    w_k = p_k * g(s_k),  g = 1/sqrt(1+s) ("sqrt"), 1 ("constant"), (1+s)^-a ("poly")
     │
     └─ update = sum_k w_k delta_k / sum_k p_k  ("mean", the paper's (1/K) sum_k g(s_k) delta_k
        for uniform p) or / sum_k w_k ("normalized") -> server optimizer -> version t+1 -> ring;
        now = time of the K-th arrival

Client durations (:class:`DurationModel`) are ``step_time * steps_i * speed_i * noise``: a
persistent per-client lognormal speed factor from ``fold_in(speed_key, client_id)`` (some clients
are always slow) and per-job lognormal noise. ``steps_i`` is the client's number of local steps.

Only simulated time is modelled: arrival order and staleness depend on the durations, never on
how long the host takes to compute a step. Training happens in the step whose buffer receives
the update (from the params of the client's start version, kept in the ring), which gives the
same result as training at the simulated time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import engine, evaluation, validation
from fedjax_sim._progress import tqdm
from fedjax_sim.algorithms.base import Algorithm, no_state, pass_through
from fedjax_sim.data.federated import FederatedData, local_steps
from fedjax_sim.experiment import (CompiledBlocks, Experiment, communication_cost, drive,
                                   scan_block, seed_keys, warn_divergence)
from fedjax_sim.history import History
from fedjax_sim.server import ServerState
from fedjax_sim.validation import positive_int
from fedjax_sim.models.core import Model, label_dtype

PyTree = Any

STALENESS = ("sqrt", "constant", "poly")
AGGREGATIONS = ("mean", "normalized")
RESTARTS = ("arrival", "update")


@dataclasses.dataclass(frozen=True)
class DurationModel:
  """Simulated wall-clock seconds a client needs for one job (download, train, upload).

  ``duration = step_time * steps_i * exp(speed_sigma * z_i) * exp(noise_sigma * e)`` with
  ``z_i ~ N(0, 1)`` fixed per client (from ``fold_in(speed_key, client_id)``: a persistently
  slow or fast device) and ``e ~ N(0, 1)`` drawn per job. ``speed_sigma = noise_sigma = 0``
  gives every client the same speed (equal durations for equal work).

  Attributes:
    step_time: seconds per local step of a median-speed client.
    speed_sigma: std of the per-client log speed factor (>= 0).
    noise_sigma: std of the per-job log noise (>= 0).
  """
  step_time: float = 1.0
  speed_sigma: float = 0.5
  noise_sigma: float = 0.25

  def __post_init__(self):
    if not (isinstance(self.step_time, (int, float)) and math.isfinite(self.step_time)
            and self.step_time > 0):
      raise ValueError(f"duration.step_time must be a number > 0, got {self.step_time!r}")
    for name in ("speed_sigma", "noise_sigma"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"duration.{name} must be a number >= 0, got {v!r}")


def client_speed(duration: DurationModel, speed_key: jax.Array, client_ids: jax.Array) -> jax.Array:
  """``[C]`` persistent slowness factors (``> 0``; > 1 is slower than the median client)."""
  z = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(speed_key, c)))(client_ids)
  return jnp.exp(duration.speed_sigma * z)


def client_durations(duration: DurationModel, speed_key: jax.Array, job_key: jax.Array,
                     client_ids: jax.Array, steps: jax.Array) -> jax.Array:
  """``[C]`` float32 seconds of one job of each client ``client_ids [C]`` with ``steps [C]``
  local steps; the job noise of client c comes from ``fold_in(job_key, c)``."""
  e = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(job_key, c)))(client_ids)
  d = (duration.step_time * steps.astype(jnp.float32) *
       client_speed(duration, speed_key, client_ids) * jnp.exp(duration.noise_sigma * e))
  return d.astype(jnp.float32)


def staleness_weight(kind: str, staleness: jax.Array, exponent: float = 0.5) -> jax.Array:
  """``g(s)``: ``1/sqrt(1+s)`` ("sqrt", FedBuff), ``1`` ("constant") or ``(1+s)^-exponent``
  ("poly", FedAsync's polynomial staleness function)."""
  s = jnp.asarray(staleness, jnp.float32)
  if kind == "sqrt":
    return jax.lax.rsqrt(1.0 + s)
  if kind == "constant":
    return jnp.ones_like(s)
  if kind == "poly":
    return (1.0 + s) ** (-exponent)
  raise ValueError(f"staleness must be one of {STALENESS}, got {kind!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class AsyncConfig:
  """Static description of an asynchronous buffered algorithm (see
  :func:`fedjax_sim.algorithms.fedbuff.fedbuff`).

  Attributes:
    name: display name.
    algorithm: client program and optimizers, local work, weighting p_i, update transform and
      aggregator (the updates are reduced with weights ``p_i g(s_i)``). Per-client state and
      server-side state (SCAFFOLD, DP-FedAvg's server step) are not supported: their papers
      define them for synchronous rounds only.
    buffer_size: K, arrivals per server update.
    concurrency: M, clients in flight (``K <= M <= population``).
    max_staleness: H, versions kept in the ring; arrivals with staleness ``>= H`` are dropped.
    staleness: ``"sqrt"``, ``"constant"`` or ``"poly"`` (see :func:`staleness_weight`).
    staleness_exponent: the exponent a of ``"poly"``.
    aggregation: ``"mean"`` (divide by the counted arrivals' ``sum p``) or ``"normalized"``
      (divide by their ``sum p g(s)``).
    restart: ``"arrival"`` (a new client starts when one arrives, with the model current then)
      or ``"update"`` (the K freed slots are refilled at the server update, with the new model).
    duration: the :class:`DurationModel`.
  """
  name: str
  algorithm: Algorithm
  buffer_size: int
  concurrency: int
  max_staleness: int
  staleness: str = "sqrt"
  staleness_exponent: float = 0.5
  aggregation: str = "mean"
  restart: str = "arrival"
  duration: DurationModel = dataclasses.field(default_factory=DurationModel)

  def __post_init__(self):
    if not isinstance(self.algorithm, Algorithm):
      raise ValueError(f"algorithm must be an Algorithm, got {type(self.algorithm).__name__}")
    positive_int("buffer_size", self.buffer_size)
    positive_int("concurrency", self.concurrency)
    positive_int("max_staleness", self.max_staleness)
    if self.buffer_size > self.concurrency:
      raise ValueError(f"buffer_size K={self.buffer_size} is larger than concurrency "
                       f"M={self.concurrency}: the buffer could never fill")
    if self.staleness not in STALENESS:
      raise ValueError(f"staleness must be one of {STALENESS}, got {self.staleness!r}")
    if not (isinstance(self.staleness_exponent, (int, float)) and self.staleness_exponent >= 0):
      raise ValueError(f"staleness_exponent must be >= 0, got {self.staleness_exponent!r}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
    if self.restart not in RESTARTS:
      raise ValueError(f"restart must be one of {RESTARTS}, got {self.restart!r}")
    if not isinstance(self.duration, DurationModel):
      raise ValueError(f"duration must be a DurationModel, got {type(self.duration).__name__}")
    a = self.algorithm
    for hook, default in (("client_state_init", no_state), ("server_state_init", no_state),
                          ("server_finish", pass_through)):
      if getattr(a, hook) is not default:
        raise ValueError(f"asynchronous simulation does not support algorithms with {hook} "
                         f"(algorithm {a.name!r})")


@flax.struct.dataclass
class AsyncState:
  """The whole simulation between server steps.

  Attributes:
    server: params, server optimizer state and ``round`` = the model version t.
    versions: ring of the last H models, every leaf ``[H, ...]``; version v sits at ``v % H``.
    client: ``[M]`` int32 client in each slot.
    start_version: ``[M]`` int32 version the slot's client downloaded.
    start_time: ``[M]`` float32 simulated time it started.
    finish_time: ``[M]`` float32 simulated time it will arrive.
    now: float32 simulated time of the last server update.
    speed_key: key of the per-client speed factors (:func:`client_speed`).
  """
  server: ServerState
  versions: PyTree
  client: jax.Array
  start_version: jax.Array
  start_time: jax.Array
  finish_time: jax.Array
  now: jax.Array
  speed_key: jax.Array


class StepOutput(NamedTuple):
  """One server step: scalar ``metrics``; ``arrivals`` (the K arrivals, in arrival order) and
  ``starts`` (the K clients started, in start order), dicts of ``[K]`` arrays."""
  metrics: dict[str, jax.Array]
  arrivals: dict[str, jax.Array]
  starts: dict[str, jax.Array]


def init_state(config: AsyncConfig, params: PyTree, data: engine.DeviceData,
               key: jax.Array) -> AsyncState:
  """Version 0 everywhere; M distinct clients (uniform without replacement) start at time 0."""
  population = int(data.sizes.shape[0])
  m, h = config.concurrency, config.max_staleness
  if m > population:
    raise ValueError(f"concurrency M={m} is larger than the population of {population} clients")
  k_fill, k_job, speed_key = jax.random.split(key, 3)
  ids = engine.sample_cohort(k_fill, population, m)
  if isinstance(ids, tuple):   # (ids, valid); every slot is valid without availability
    ids = ids[0]
  steps = local_steps(config.algorithm.work, data.sizes[ids])
  finish = client_durations(config.duration, speed_key, k_job, ids, steps)
  versions = jax.tree.map(lambda p: jnp.broadcast_to(p, (h,) + jnp.shape(p)), params)
  return AsyncState(server=engine.init_state(config.algorithm, params, population),
                    versions=versions, client=ids, start_version=jnp.zeros(m, jnp.int32),
                    start_time=jnp.zeros(m, jnp.float32), finish_time=finish,
                    now=jnp.zeros((), jnp.float32), speed_key=speed_key)


def make_server_step(config: AsyncConfig, model: Model, *, population: int, max_client_size: int,
                     chunk_size: int | None = None, min_client_size: int = 0):
  """Builds ``step(state: AsyncState, data: DeviceData, key) -> (AsyncState, StepOutput)``
  (not jitted): wait for the next K arrivals, train them, apply one server update.

  Args:
    config: the :class:`AsyncConfig`.
    model: the model.
    population: number of clients P in ``data`` (``>= concurrency``).
    max_client_size: largest client (fixes the static number of local steps S).
    min_client_size: smallest client (0: unknown); prunes compiled code no step can use
      (:func:`fedjax_sim.engine.step_widths`).
    chunk_size: arrivals trained per vmapped chunk (default
      :func:`fedjax_sim.engine.default_chunk_size`); peak memory follows it.
  """
  a = config.algorithm
  work = a.work
  kk, m, h = config.buffer_size, config.concurrency, config.max_staleness
  if m > population:
    raise ValueError(f"concurrency M={m} is larger than the population of {population} clients")
  num_chunks = math.ceil(kk / min(kk, chunk_size or engine.default_chunk_size()))
  k = math.ceil(kk / num_chunks)
  padded = num_chunks * k
  fold = engine.make_cohort_fold(a, model, max_client_size=max_client_size, chunk_size=k,
                                 shared_params=False, min_client_size=min_client_size)
  agg = a.aggregator
  agg.validate(kk)

  def start_client(carry, slot, start_time, version, key, data, speed_key):
    """Puts a new client (uniform over those not in flight) into ``slot``."""
    client, sv, st, ft, busy = carry
    k_pick, k_job = jax.random.split(key)
    scores = jnp.where(busy, -1.0, jax.random.uniform(k_pick, (population,)))
    new = jnp.argmax(scores).astype(jnp.int32)
    dur = client_durations(config.duration, speed_key, k_job, new[None],
                           local_steps(work, data.sizes[new][None]))[0]
    finish = start_time + dur
    carry = (client.at[slot].set(new), sv.at[slot].set(version), st.at[slot].set(start_time),
             ft.at[slot].set(finish), busy.at[new].set(True))
    return carry, (new, dur, finish)

  def step(state: AsyncState, data: engine.DeviceData, key: jax.Array):
    keys = engine.round_keys(key)
    t = state.server.round
    busy = jnp.zeros(population, bool).at[state.client].set(True)
    carry = (state.client, state.start_version, state.start_time, state.finish_time, busy)

    # --- K arrival events (integer/time bookkeeping only) ---------------------------------
    def event(i, c):
      carry, arr, starts = c
      client, sv, st, ft, busy = carry
      j = jnp.argmin(ft).astype(jnp.int32)
      arr = jax.tree.map(lambda buf, v: buf.at[i].set(v), arr,
                         (j, client[j], sv[j], st[j], ft[j]))
      busy = busy.at[client[j]].set(False)
      carry = (client, sv, st, ft, busy)
      if config.restart == "arrival":
        carry, (new, dur, fin) = start_client(carry, j, ft[j], t,
                                              jax.random.fold_in(keys.sample, i), data,
                                              state.speed_key)
        starts = jax.tree.map(lambda buf, v: buf.at[i].set(v), starts,
                              (j, new, dur, ft[j], fin))
      else:
        carry = (client, sv, st, ft.at[j].set(jnp.inf), busy)
      return carry, arr, starts

    zi, zf = jnp.zeros(kk, jnp.int32), jnp.zeros(kk, jnp.float32)
    arr0 = (zi, zi, zi, zf, zf)
    starts0 = (zi, zi, zf, zf, zf)
    carry, arr, starts = jax.lax.fori_loop(0, kk, event, (carry, arr0, starts0))
    a_slot, a_client, a_version, a_start, a_finish = arr
    now = a_finish[kk - 1]
    client, sv, st, ft, busy = carry
    if config.restart == "update":
      def refill(i, c):
        carry, starts = c
        carry, (new, dur, fin) = start_client(carry, a_slot[i], now, t + 1,
                                              jax.random.fold_in(keys.sample, i), data,
                                              state.speed_key)
        starts = jax.tree.map(lambda buf, v: buf.at[i].set(v), starts,
                              (a_slot[i], new, dur, now, fin))
        return carry, starts
      carry, starts = jax.lax.fori_loop(0, kk, refill, (carry, starts0))
      client, sv, st, ft, busy = carry
    else:
      # A client that starts at the instant of this update downloads the updated model.
      started = jnp.zeros(m, bool).at[starts[0]].set(True)
      sv = jnp.where(started & (st == now), t + 1, sv)
    s_slot, s_client, s_duration, s_time, s_finish = starts
    s_version = jnp.where(s_time == now, t + 1, t)

    # --- train the K arrivals from their start versions -------------------------------------
    staleness = t - a_version
    fresh = staleness < h
    g = staleness_weight(config.staleness, staleness, config.staleness_exponent)

    def pad(v, fill=0):
      return jnp.concatenate([v, jnp.full((padded - kk,), fill, v.dtype)]).reshape(num_chunks, k)

    valid = jnp.arange(padded) < kk
    srv = state.server
    out = fold(state.versions, srv.aux, srv.clients, srv.hparams, data, keys, pad(a_client),
               valid.reshape(num_chunks, k) & pad(fresh, False), weight_scale=pad(g, 0.0),
               version=pad(a_version, t))
    ys = jax.tree.map(lambda v: v.reshape((padded,) + v.shape[2:])[:kk], out.clients)
    slot_ids = jnp.where(valid, pad(a_client).reshape(-1), population + jnp.arange(padded))
    update, wtot = agg.finalize(out.aggregate, keys.aggregate, slot_ids)
    if config.aggregation == "mean":
      # sum_k p_k g(s_k) delta_k / sum_k p_k: the aggregate divided by sum p, not sum p g
      psum = jnp.sum(jnp.where(ys["counted"], data.weights[a_client], 0.0))
      update = jax.tree.map(
          lambda u: (u * (wtot / jnp.maximum(psum, 1e-30)).astype(u.dtype)), update)
    # Not applied if no arrival counted, or if the aggregate or the new model is non-finite.
    new_server, applied, update = engine.apply_server_step(
        a, srv, update, wtot, engine.upload_mean(out.upload),
        jnp.sum(ys["counted"]).astype(jnp.int32), cohort_size=kk, population=population,
        key=keys.server)
    new_server = new_server.replace(clients=engine.scatter_stores(
        srv.clients, a_client, ys["counted"] & applied, ys, population))
    versions = jax.tree.map(lambda r, p: r.at[(t + 1) % h].set(p), state.versions,
                            new_server.params)
    new_state = state.replace(server=new_server, versions=versions, client=client,
                              start_version=sv, start_time=st, finish_time=ft, now=now)

    counted, finite = ys["counted"], ys["finite"]
    ok = finite & fresh
    count = jnp.sum(jnp.where(ok, ys["count"], 0.0))
    sf = staleness.astype(jnp.float32)
    metrics = {
        "version": new_server.round,
        "sim_time": now,
        "train_loss": engine.mean_or_nan(jnp.sum(jnp.where(ok, ys["loss_sum"], 0.0)), count),
        "train_accuracy": engine.mean_or_nan(jnp.sum(jnp.where(ok, ys["correct"], 0.0)), count),
        "aggregate_nonfinite": ((wtot > 0) & ~applied).astype(jnp.int32),
        "mean_staleness": jnp.mean(sf),
        "max_staleness": jnp.max(sf),
        "num_stale_dropped": jnp.sum(~fresh).astype(jnp.int32),
        "num_nonfinite": jnp.sum(~finite & fresh).astype(jnp.int32),
        "num_counted": jnp.sum(counted).astype(jnp.int32),
        "mean_weight": jnp.sum(jnp.where(counted, g, 0.0)) / jnp.maximum(jnp.sum(counted), 1),
        "steps_done": jnp.sum(jnp.where(counted, ys["steps"], 0)).astype(jnp.int32),
        "update_norm": engine.update_norm(update),
    }
    arrivals = {"slot": a_slot, "client": a_client, "start_version": a_version,
                "start_time": a_start, "arrival_time": a_finish, "staleness": staleness,
                "staleness_weight": g, "weight": ys["weight"], "counted": counted,
                "loss": ys["loss_sum"] / jnp.maximum(ys["count"], 1), "steps": ys["steps"]}
    starts = {"slot": s_slot, "client": s_client, "duration": s_duration, "start_time": s_time,
              "finish_time": s_finish,
              "start_version": s_version}
    return new_state, StepOutput(metrics, arrivals, starts)

  return step


class RunKeys(NamedTuple):
  """The keys :func:`run_async` derives from its seed: initial params, the simulation's initial
  fill (:func:`init_state`) and the server steps (step r uses ``fold_in(steps, r)``)."""
  params: jax.Array
  simulation: jax.Array
  steps: jax.Array


def run_keys(seed: int) -> RunKeys:
  key_init, key_steps = jax.random.split(jax.random.key(seed))
  key_params, key_sim = jax.random.split(key_init)
  return RunKeys(key_params, key_sim, key_steps)


def speed_key(seed: int) -> jax.Array:
  """The per-client speed key of ``run_async(..., seed=seed)``: to simulate a synchronous
  algorithm on the same devices (:func:`client_durations`)."""
  return jax.random.split(run_keys(seed).simulation, 3)[2]


@dataclasses.dataclass
class AsyncRunResult:
  """Outcome of :func:`run_async`: final ``params``, ``state`` (:class:`AsyncState`), per-step
  ``history`` and the seconds spent compiling."""
  params: Any
  state: AsyncState
  history: History
  compile_seconds: float


def validate(config: AsyncConfig, model: Model, train_data: FederatedData, *, rounds: int,
             eval_every: int, chunk_size: int | None, seed: int = 0, init_params: Any = None,
             client_weights: Sequence[float] | None = None):
  """All the checks :func:`run_async` makes before compiling anything."""
  if not isinstance(config, AsyncConfig):
    raise ValueError(f"config must be an AsyncConfig (e.g. fedjax_sim.algorithms.fedbuff()), got "
                     f"{type(config).__name__}")
  positive_int("server_steps (rounds)", rounds)
  if not isinstance(train_data, FederatedData):
    raise ValueError(f"train_data must be a FederatedData, got {type(train_data).__name__}")
  if config.concurrency > train_data.num_clients:
    raise ValueError(f"concurrency M={config.concurrency} is larger than the population of "
                     f"{train_data.num_clients} clients")
  validation.validate(config.algorithm, model, train_data, rounds=rounds,
                      cohort_size=config.concurrency, eval_every=eval_every,
                      chunk_size=chunk_size, seed=seed, init_params=init_params,
                      client_weights=client_weights)


def build(config: AsyncConfig, model: Model, train_data: FederatedData, *,
          chunk_size: int | None = None, client_weights: Sequence[float] | None = None,
          init_params: Any = None) -> Experiment:
  """The asynchronous :class:`~fedjax_sim.experiment.Experiment`: one step is one server update
  (:func:`make_server_step`); ``init(key_init)`` draws the initial params (unless given) and the
  initial fill of the M slots (:func:`run_keys`)."""
  weights = validation.resolve_client_weights(train_data, config.algorithm.weighting,
                                              client_weights, algorithm=config.algorithm)
  data = engine.to_device(train_data, weights)
  step = make_server_step(config, model, population=train_data.num_clients,
                          max_client_size=train_data.max_client_size, chunk_size=chunk_size,
                          min_client_size=train_data.min_client_size)

  def init(key_init):
    key_params, key_sim = jax.random.split(key_init)
    params = init_params if init_params is not None else model.init(key_params)
    return init_state(config, params, data, key_sim)

  like = init_params if init_params is not None else jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(model.init, jax.random.key(0)))
  return Experiment(config.name, data, init, scan_block(step), lambda s: s.server.params,
                    train_data.num_clients, communication_cost(config.algorithm, like))


def run_async(config: AsyncConfig, model: Model, train_data: FederatedData, *,
              rounds: int | None = None, eval_data: Any = None, eval_every: int = 10,
              seed: int = 0, progress: bool = True, chunk_size: int | None = None,
              init_params: Any = None, client_weights: Sequence[float] | None = None,
              rounds_per_call: int = 1, eval_batch_size: int = 1000,
              until_time: float | None = None,
              callback: Callable[[int, AsyncState, StepOutput], Any] | None = None,
              server_steps: int | None = None, steps_per_call: int | None = None
              ) -> AsyncRunResult:
  """Runs an asynchronous buffered simulation for ``rounds`` server updates.

  Args:
    config: e.g. ``fedjax_sim.algorithms.fedbuff(...)`` (:func:`fedjax_sim.run` accepts it too).
    model: the model.
    train_data: the client population (P >= concurrency).
    rounds: number of server updates T (a "round" of the history is one server update).
    eval_data: optional test set (dict with ``x``, ``y`` or FederatedData), evaluated every
      ``eval_every`` steps and after the last.
    seed: all randomness (init, client sampling, durations, shuffles) derives from it.
    chunk_size: arrivals per vmapped training chunk.
    init_params: start from these params instead of ``model.init``.
    client_weights: optional ``[P]`` weights p_i (default: the algorithm's weighting).
    rounds_per_call: run up to this many server steps as one compiled ``lax.scan``; blocks end
      at evaluation steps; results equal ``rounds_per_call=1`` exactly.
    eval_batch_size: evaluation batch size.
    until_time: stop (and evaluate) at the end of the first block of steps whose simulated time
      reaches ``until_time``; ``rounds`` is then an upper bound.
    callback: called after every step with ``(step, state, StepOutput)`` (the block's final
      state when ``rounds_per_call > 1``); a returned dict's numeric entries join the record.
    server_steps, steps_per_call: the former names of ``rounds`` and ``rounds_per_call``.

  History keys (one row per server step): ``round`` (server step = model version),
  ``sim_time`` (simulated seconds at the update), ``train_loss`` / ``train_accuracy`` (of the
  arrivals that were not too stale), ``mean_staleness`` / ``max_staleness`` (over the K
  arrivals), ``num_stale_dropped``, ``num_nonfinite``, ``num_counted``, ``mean_weight`` (mean
  g(s) of counted arrivals), ``steps_done``, ``update_norm``, ``seconds`` (host wall-clock),
  ``test_loss`` / ``test_accuracy`` (NaN on steps without evaluation), communication per step.
  """
  if server_steps is not None:
    if rounds is not None:
      raise ValueError("give rounds or its former name server_steps, not both")
    rounds = server_steps
  if steps_per_call is not None:
    rounds_per_call = steps_per_call
  if rounds is None:
    raise ValueError("run_async needs rounds (the number of server updates)")
  validate(config, model, train_data, rounds=rounds, eval_every=eval_every,
           chunk_size=chunk_size, seed=seed, init_params=init_params,
           client_weights=client_weights)
  if callback is not None and callable(getattr(callback, "check_run", None)):
    # e.g. a privacy accountant: its sampling model must be this run's (it is not a cohort).
    callback.check_run(population=train_data.num_clients, cohort_size=config.concurrency,
                       cohort_sampling="asynchronous")
  positive_int("rounds_per_call", rounds_per_call)
  if until_time is not None and not (isinstance(until_time, (int, float)) and until_time > 0):
    raise ValueError(f"until_time must be a number > 0, got {until_time!r}")
  eval_arrays = None
  if eval_data is not None:
    eval_arrays = evaluation.as_arrays(eval_data)
    validation.check_eval_data(model, eval_arrays)
  exp = build(config, model, train_data, chunk_size=chunk_size, client_weights=client_weights,
              init_params=init_params)
  key_init, key_steps = seed_keys(seed)
  state, data = exp.init(key_init), exp.data
  blocks = CompiledBlocks(jax.jit(exp.block))
  evaluate = eval_xy = None
  if eval_arrays is not None:
    evaluate = evaluation.run_evaluate(model, eval_batch_size)
    eval_xy = (jnp.asarray(eval_arrays["x"]),
               jnp.asarray(eval_arrays["y"], label_dtype(model)))
  blocks(min(rounds_per_call, rounds), state, data, key_steps)

  def on_round(rec, state, outs, i):
    extra = callback(rec["round"], state, jax.tree.map(lambda a: a[i], outs))
    if isinstance(extra, dict):   # numbers join the record (a "stop" entry does not stop)
      rec.update({k: float(v) for k, v in extra.items()})
    return False

  records = []
  bar = tqdm(total=rounds, desc=config.name, disable=not progress, leave=True)
  try:
    state = drive(exp, blocks, state, data, key_steps, records, first=1, last=rounds,
                  per_call=rounds_per_call, communication=exp.communication, bar=bar,
                  on_round=on_round if callback is not None else None,
                  until=(None if until_time is None else
                         lambda rec: rec["sim_time"] >= until_time),
                  evaluate=evaluate, eval_xy=eval_xy, eval_every=eval_every,
                  post=lambda rec: {"stale": f"{rec['mean_staleness']:.1f}"})
  finally:
    bar.close()
  warn_divergence(records, "server step")
  return AsyncRunResult(exp.params(state), state, History.from_records(records), blocks.seconds)
