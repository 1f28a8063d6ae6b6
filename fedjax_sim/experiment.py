"""One experiment builder and the block driver, shared by every way of running a simulation.

An :class:`Experiment` is what the drivers (:func:`fedjax_sim.run`, :func:`fedjax_sim.sweep.sweep`,
:func:`fedjax_sim.asynchronous.run_async`, :func:`run_rounds` for multi-process runs) need from
an algorithm, a model and a population: ``init(key) -> state`` and a compiled-once
``block(state, data, key, rs) -> (state, outputs [len(rs), ...])``, a ``lax.scan`` of one step
(a synchronous round, or an asynchronous server update) over the rounds ``rs``, with round r's
key ``fold_in(key, r)``. The population lives on the device as ``data``, an argument of the
block (never closed over, so it is not baked into the program). The drivers differ only in what
they do between blocks (evaluation, checkpoints, vmapping experiments, replicating over
processes).

Keys: every driver derives ``key_init, key_rounds = split(key(seed))`` (:func:`seed_keys`);
``init(key_init)`` makes the initial state.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import distributed, engine, tree
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.data.procedural import ProceduralPopulation
from fedjax_sim.models.core import Model
from fedjax_sim.validation import resolve_client_weights, validate


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A simulation ready to run (see the module docstring).

  Attributes:
    name: display name (the algorithm's).
    data: the population as the step reads it (on the device).
    init: ``(key, hparams=None) -> state``: the state before round 1 (``hparams`` replaces the
      in-state hyperparameters the experiment was built with: one state per swept value).
    block: ``(state, data, key, rs [n] int32) -> (state, outputs stacked over n)`` (not jitted).
    params: ``state -> global params``.
    population: number of clients P.
    communication: per-client communication of one round (:func:`communication_cost`).
  """
  name: str
  data: Any
  init: Callable[[jax.Array], Any]
  block: Callable
  params: Callable[[Any], Any]
  population: int
  communication: dict


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(key_init, key_rounds)`` of a run with ``seed`` (every driver derives them so)."""
  key_init, key_rounds = jax.random.split(jax.random.key(seed))
  return key_init, key_rounds


def scan_block(step: Callable) -> Callable:
  """``step(state, data, key) -> (state, out)`` -> the block ``(state, data, key, rs) ->
  (state, outs)``: a ``lax.scan`` over rounds ``rs``, round r with ``fold_in(key, r)``."""

  def block(state, data, key, rs):
    return jax.lax.scan(lambda s, r: step(s, data, jax.random.fold_in(key, r)), state, rs)

  return block


def communication_cost(algorithm: Algorithm, params) -> dict[str, float]:
  """Per-client communication of one round: parameters and bytes sent up (the client's update,
  as encoded by the algorithm's update transform if it declares ``wire_bytes``) and down (the
  global model)."""
  n = tree.num_params(params)
  down = float(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))
  wire = algorithm.update_transform.wire_bytes(params)
  up = down if wire is None else float(wire)
  return {"params_up_per_client": float(n), "bytes_up_per_client": up,
          "bytes_down_per_client": down}


def with_communication(comm: dict[str, float], rec: dict[str, float]) -> dict[str, float]:
  """The per-client figures plus the round's totals (``bytes_up`` over counted clients,
  ``bytes_down`` over the cohort)."""
  return dict(comm, bytes_up=comm["bytes_up_per_client"] * rec.get("num_counted", 0.0),
              bytes_down=comm["bytes_down_per_client"] * rec.get("num_clients", 0.0))


def build(algorithm: Algorithm, model: Model, train_data, *, cohort_size: int,
          chunk_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
          heterogeneity=None, cohort_sampling: str = "uniform",
          client_weights: Sequence[float] | None = None, hparams: dict | None = None,
          init_params: Any = None) -> Experiment:
  """The synchronous :class:`Experiment`: rounds of :func:`fedjax_sim.engine.make_round` over
  the population (moved to the device with its aggregation weights). Arguments as
  :func:`fedjax_sim.run`; the caller has validated them (:func:`fedjax_sim.validation.validate`)."""
  population = train_data.num_clients
  if isinstance(train_data, ProceduralPopulation):
    data = train_data
  else:
    weights = resolve_client_weights(train_data, algorithm.weighting, client_weights,
                                     algorithm=algorithm)
    data = engine.to_device(train_data, weights, heterogeneity, algorithm.work)
  round_fn = engine.make_round(algorithm, model, population=population, cohort_size=cohort_size,
                               max_client_size=train_data.max_client_size, chunk_size=chunk_size,
                               mesh=mesh, heterogeneity=heterogeneity,
                               cohort_sampling=cohort_sampling,
                               min_client_size=train_data.min_client_size)

  def init(key, run_hparams=None):
    params = init_params if init_params is not None else model.init(key)
    return engine.init_state(algorithm, params, population,
                             hparams if run_hparams is None else run_hparams)

  like = init_params if init_params is not None else jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(model.init, jax.random.key(0)))
  return Experiment(algorithm.name, data, init, scan_block(round_fn), lambda s: s.params,
                    population, communication_cost(algorithm, like))


# --- driving an experiment: blocks of rounds, records, evaluation, progress ---------------------

def arg_signature(tree) -> tuple:
  """What a compiled block is specialised to in its arguments: the pytree structure and each
  leaf's shape and dtype. Not weak types or shardings: the state a block returns differs from
  the initial state in both (on a mesh it comes back replicated), and the program compiled for
  the first takes both, as it always has within a run (runs on one mesh share the mesh: it is
  in their key). Keying on them compiled every multi-device run twice."""
  leaves, treedef = jax.tree.flatten(tree)
  avals = [jax.typeof(a) for a in leaves]
  return treedef, tuple((v.shape, v.dtype) for v in avals)


# Compiled block programs of recent runs, shared by runs whose block is the same program: the
# key (from :func:`fedjax_sim.run`) names every object and static number ``make_round`` closes
# over, and holds those objects so their ids stay theirs. A loop of ``fs.run`` over seeds,
# client weights, init params or hparams (all arguments of the program, not constants in it), or
# a resumed run, then compiles once. Entries are dropped least recently used first.
BLOCK_CACHE_SIZE = 8
_BLOCK_PROGRAMS: dict = {}


def shared_programs(key: tuple, pinned: tuple) -> dict:
  """The program cache of runs with ``key`` (created empty on first use); ``pinned`` are the
  objects whose ids ``key`` holds."""
  entry = _BLOCK_PROGRAMS.pop(key, None) or (pinned, {})
  _BLOCK_PROGRAMS[key] = entry   # most recently used last
  while len(_BLOCK_PROGRAMS) > BLOCK_CACHE_SIZE:
    del _BLOCK_PROGRAMS[next(iter(_BLOCK_PROGRAMS))]
  return entry[1]


def clear_block_cache() -> None:
  """Forgets the compiled programs :func:`fedjax_sim.run` keeps for later runs."""
  _BLOCK_PROGRAMS.clear()


class CompiledBlocks:
  """One compiled program per distinct block length (and argument signature) of a jitted
  ``block_fn(state, data, key, rs)`` (a ``lax.scan`` over the rounds ``rs``); ``seconds`` is the
  compile time this object spent. ``programs`` (default a fresh dict) holds the programs: a
  dict from :func:`shared_programs` shares them with earlier runs of the same block."""

  def __init__(self, block_jit, put: Callable[[Any], Any] = lambda t: t,
               programs: dict | None = None):
    self._jit, self._put = block_jit, put
    self._cache = {} if programs is None else programs
    self.seconds = 0.0

  def __call__(self, length: int, state, data, key):
    """The compiled program for blocks of ``length`` rounds (compiled on first use)."""
    sig = (length, arg_signature((state, data, key)))
    if sig not in self._cache:
      t0 = time.perf_counter()
      self._cache[sig] = self._jit.lower(
          state, data, key, self._put(jnp.zeros(length, jnp.int32))).compile()
      self.seconds += time.perf_counter() - t0
    return self._cache[sig]

  def run(self, state, data, key, first: int, last: int):
    """Runs rounds ``first..last`` as one block: ``(state, outputs [last - first + 1, ...],
    seconds per round)``; compiling a new block length is not counted in the seconds."""
    prog = self(last - first + 1, state, data, key)
    t0 = time.perf_counter()
    state, outs = prog(state, data, key, self._put(jnp.arange(first, last + 1, dtype=jnp.int32)))
    jax.block_until_ready(outs.metrics)
    return state, outs, (time.perf_counter() - t0) / (last - first + 1)


def block_end(first: int, last: int, per_call: int, host_work: Callable[[int], bool]) -> int:
  """Last round of the block that starts at ``first``: at most ``per_call`` rounds, not past
  ``last``, and ending at the first round where the host has work (evaluation, checkpoint)."""
  end = first
  while end < last and end - first + 1 < per_call and not host_work(end):
    end += 1
  return end


def block_records(metrics: dict[str, np.ndarray], first: int, seconds: float) -> list[dict]:
  """One history record per round of a block from its stacked (host) metrics."""
  n = len(next(iter(metrics.values())))
  return [{"round": first + i, **{k: float(v[i]) for k, v in metrics.items()},
           "seconds": seconds} for i in range(n)]


def add_evaluation(record: dict, evaluate, params, eval_xy) -> None:
  """Adds ``test_loss`` / ``test_accuracy`` of ``params`` on ``eval_xy = (x, y)`` to ``record``."""
  ev = jax.device_get(evaluate(params, *eval_xy))
  for k, v in ev.items():   # loss, accuracy, and a regression model's mse, r2
    record[f"test_{k}"] = float(v)


def warn_divergence(records: Sequence[Mapping[str, float]], unit: str = "round") -> str | None:
  """Warns once per run (``RuntimeWarning``) if some rounds had no finite client training
  (``train_loss`` NaN), a non-finite aggregate that was not applied (``aggregate_nonfinite``) or
  a non-finite ``test_loss``; returns the message (``None`` when all was finite)."""
  n = len(records)
  no_loss = [int(r["round"]) for r in records if math.isnan(r.get("train_loss", 0.0))]
  rejected = [int(r["round"]) for r in records if r.get("aggregate_nonfinite", 0.0)]
  parts = []
  if no_loss:
    parts.append(f"{len(no_loss)} of {n} {unit}s had no client with finite local training "
                 f"(train_loss is NaN there; first at {unit} {no_loss[0]})")
  if rejected:
    parts.append(f"{len(rejected)} of {n} {unit}s produced a non-finite aggregate, not applied: "
                 f"the global model was kept (aggregate_nonfinite; first at {unit} "
                 f"{rejected[0]})")
  bad_eval = [int(r["round"]) for r in records
              if "test_loss" in r and not math.isfinite(r["test_loss"])]
  if bad_eval:
    # a finite model can still be useless: logits that overflow give a NaN/inf loss
    parts.append(f"the test loss was non-finite at {len(bad_eval)} evaluation(s) (first at "
                 f"{unit} {bad_eval[0]})")
  if not parts:
    return None
  msg = "training diverged: " + "; ".join(parts) + ". Lower the learning rate(s)."
  warnings.warn(msg, RuntimeWarning, stacklevel=3)
  return msg


def show_progress(bar, record: dict, rounds_done: int, **extra: str) -> None:
  """Advances the progress bar by ``rounds_done`` with the latest loss / test accuracy."""
  post = {"loss": f"{record['train_loss']:.4f}", **extra}
  if "test_accuracy" in record:
    post["test_acc"] = f"{record['test_accuracy']:.4f}"
  bar.set_postfix(post, refresh=False)
  bar.update(rounds_done)


def drive(exp: Experiment, blocks: CompiledBlocks, state, data, key, records: list[dict], *,
          first: int, last: int, per_call: int, communication: Mapping[str, float], bar,
          on_round: Callable[[dict, Any, Any, int], bool] | None = None,
          until: Callable[[dict], bool] | None = None,
          evaluate: Callable | None = None, eval_xy: Any = None, eval_every: int = 1,
          host_work: Callable[[int], bool] = lambda r: False,
          on_block: Callable[[int, Any, bool], None] | None = None,
          post: Callable[[dict], dict[str, str]] = lambda rec: {}) -> Any:
  """Runs rounds ``first..last`` of ``exp`` in compiled blocks, working on the host between them;
  returns the final state. The one block loop of :func:`fedjax_sim.run` and
  :func:`fedjax_sim.asynchronous.run_async`.

  A block runs up to ``per_call`` rounds (:func:`block_end`) and ends early at every evaluation
  round (``r % eval_every == 0`` when ``evaluate`` is given) and where ``host_work(r)``. After
  each block, in this order:

  1. one record per round (:func:`block_records`, with ``communication``:
     :func:`with_communication`) is appended to ``records`` (in place) and passed to
     ``on_round(record, state, outs, i)`` (``state``: the block's final state; ``outs``: its
     outputs stacked over rounds, this round's at index ``i``), which may add entries; if it
     returns True, the run stops after this block and the block's last record gets
     ``stopped_early = 1`` (the block's remaining rounds have run and are kept);
  2. the run also stops after this block if ``until(last record)`` (without ``stopped_early``);
  3. ``evaluate(params, *eval_xy)`` is added to the last record (:func:`add_evaluation`) at
     evaluation rounds and after the last block;
  4. ``on_block(end, state, is_last_block)`` (e.g. a checkpoint of ``records``);
  5. ``bar`` advances (:func:`show_progress`, with ``post(last record)`` in its postfix).
  """
  r = first
  while r <= last:
    end = block_end(r, last, per_call,
                    lambda t: (evaluate is not None and t % eval_every == 0) or host_work(t))
    state, outs, seconds = blocks.run(state, data, key, r, end)
    stop = False
    for i, rec in enumerate(block_records(jax.device_get(outs.metrics), r, seconds)):
      rec.update(with_communication(communication, rec))
      records.append(rec)
      if on_round is not None and on_round(rec, state, outs, i):
        stop = True
    if stop:
      records[-1]["stopped_early"] = 1.0
    stop = stop or (until is not None and until(records[-1]))
    final = end == last or stop
    if evaluate is not None and (end % eval_every == 0 or final):
      add_evaluation(records[-1], evaluate, exp.params(state), eval_xy)
    if on_block is not None:
      on_block(end, state, final)
    show_progress(bar, records[-1], end - r + 1, **post(records[-1]))
    r = end + 1
    if stop:
      break
  return state


# --- the minimal multi-process driver ------------------------------------------------------------

def run_rounds(algorithm, model, train_data, *, rounds: int, cohort_size: int, seed: int = 0,
               chunk_size: int | None = None, client_weights: Sequence[float] | None = None,
               heterogeneity=None, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[Any, dict[str, np.ndarray]]:
  """The training loop of :func:`fedjax_sim.run` (same keys, same rounds) over ``mesh``.

  A minimal multi-process driver (no evaluation, checkpoints or callbacks) that makes the same
  calls ``run()`` makes in a multi-process run: the initial state, the population and the keys
  are replicated (:func:`fedjax_sim.distributed.replicate`), the block is compiled with
  replicated outputs, and results are fetched. Every process calls it with the same arguments.

  Returns:
    ``(params, metrics)``: the final global params and ``[rounds]`` per-round metrics, as host
    numpy on every process.
  """
  mesh = distributed.global_mesh() if mesh is None else mesh
  validate(algorithm, model, train_data, rounds=rounds, cohort_size=cohort_size, eval_every=1,
           chunk_size=chunk_size)
  exp = build(algorithm, model, train_data, cohort_size=cohort_size, chunk_size=chunk_size,
              mesh=mesh if mesh.devices.size > 1 else None, heterogeneity=heterogeneity,
              client_weights=client_weights)
  key_init, key_rounds = seed_keys(seed)
  state, data, key_rounds = distributed.replicate((exp.init(key_init), exp.data, key_rounds), mesh)
  rs = distributed.replicate(jnp.arange(1, rounds + 1, dtype=jnp.int32), mesh)
  step = jax.jit(exp.block, out_shardings=distributed.replicated(mesh)).lower(
      state, data, key_rounds, rs).compile()
  t0 = time.perf_counter()
  state, outs = step(state, data, key_rounds, rs)
  metrics = distributed.fetch(outs.metrics)
  metrics["seconds"] = np.full(rounds, (time.perf_counter() - t0) / rounds)
  return distributed.fetch(exp.params(state)), metrics
