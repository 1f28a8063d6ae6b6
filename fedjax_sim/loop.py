"""``run()``: the experiment driver (rounds, evaluation, progress, history, timing)."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import checkpoint, distributed, engine, evaluation, server, tree
from fedjax_sim._progress import tqdm
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.data.federated import FederatedData, check_numeric, is_inexact
from fedjax_sim.data.procedural import ProceduralPopulation
from fedjax_sim.heterogeneity import Heterogeneity
from fedjax_sim.history import History
from fedjax_sim.models.core import Model


@dataclasses.dataclass
class RunResult:
  """Outcome of :func:`run`.

  Attributes:
    params: final global model.
    state: final :class:`~fedjax_sim.server.ServerState`.
    history: per-round metrics (:class:`~fedjax_sim.history.History`).
    compile_seconds: time to compile the round (not included in ``seconds`` of the history).
    overrides: deliberate changes of the experiment accepted on resume (``resume="override"``):
      ``[{"round": r, "changes": [...]}]`` (``r``: the checkpoint's round), kept in the
      checkpoints; ``[]`` for none.
  """
  params: Any
  state: server.ServerState
  history: History
  compile_seconds: float
  overrides: list = dataclasses.field(default_factory=list)


def _positive_int(name: str, v):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
    raise ValueError(f"{name} must be a positive integer, got {v!r}")


MAX_SEED = 2**63 - 1   # jax.random.key takes a signed 64-bit seed


def check_seed(seed) -> int:
  """``seed`` as an int, or a ValueError naming it: an integer (not bool) in [0, 2**63 - 1]
  (negative seeds are rejected too: numpy's generators, used by the partitions, refuse them)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r} "
                     f"({type(seed).__name__})")
  if not 0 <= int(seed) <= MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
  return int(seed)


def check_init_params(model: Model, params) -> None:
  """``params`` must have the structure, shapes and dtypes ``model.init`` gives, and be finite."""
  expected = jax.eval_shape(model.init, jax.random.key(0))
  want, want_def = jax.tree.flatten(expected)
  got, got_def = jax.tree.flatten(params)
  if got_def != want_def:
    raise ValueError(f"init_params has the tree structure {got_def}, but model {model.name!r} "
                     f"has {want_def}")
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
  for path, g, w in zip(paths, got, want):
    try:
      a = g if isinstance(g, jax.Array) else np.asarray(g)
    except Exception:   # noqa: BLE001 -- ragged lists and the like
      a = np.asarray(None)
    shape, dtype = a.shape, a.dtype
    if (dtype.kind in "OUSV" and not is_inexact(dtype)) or tuple(shape) != tuple(w.shape) or (
        jax.dtypes.canonicalize_dtype(dtype) != jax.dtypes.canonicalize_dtype(w.dtype)):
      raise ValueError(f"init_params{path} has shape {tuple(shape)} and dtype {dtype}; model "
                       f"{model.name!r} expects {tuple(w.shape)} {w.dtype}")
    if is_inexact(dtype) and not np.all(np.isfinite(np.asarray(a))):
      raise ValueError(f"init_params{path} has non-finite values (NaN/inf)")


def resolve_client_weights(data: FederatedData, weighting: str,
                   custom: Sequence[float] | None = None, *,
                   algorithm: Algorithm | None = None) -> np.ndarray:
  """``[P]`` aggregation weights p_i: example counts, uniform, or user-given (checked).

  Raises ValueError for custom weights when ``algorithm.fixed_weighting`` (e.g. DP-FedAvg).
  """
  if custom is not None and algorithm is not None and algorithm.fixed_weighting:
    raise ValueError(f"{algorithm.name} does not take client_weights: its guarantee assumes its "
                     f"own {algorithm.weighting!r} weighting (DP-FedAvg's sensitivity bound and "
                     "accounting hold for equally weighted, clipped updates only)")
  if custom is not None:
    w = np.asarray(custom, dtype=np.float64)
    if w.shape != (data.num_clients,):
      raise ValueError(f"client_weights has shape {w.shape}, expected ({data.num_clients},), "
                       "one weight per client")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
      bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
      raise ValueError(f"client_weights must be finite and >= 0; client {data._client_name(bad)!r} "
                       f"has {w[bad]}")
    if w.sum() <= 0:
      raise ValueError("client_weights sum to zero: no client would count in the average")
    if w.sum() > 1e30:
      # the round sums weights (and weighted updates) in float32, whose range ends at 3.4e38
      raise ValueError(f"client_weights sum to {w.sum():.3g}; the round sums them in float32: "
                       "scale them down (only their ratios matter), e.g. to sum to 1")
    return w.astype(np.float32)
  if weighting == "examples":
    return data.sizes.astype(np.float32)
  return np.ones(data.num_clients, np.float32)


def check_eval_data(model: Model, arrays: dict[str, np.ndarray], where: str = "eval_data"):
  """Checks a test set ``{"x": [N, *input_shape] real numbers, "y": [N] int labels}``."""
  x, y = arrays["x"], arrays["y"]
  if x.ndim == 0 or y.ndim == 0:
    raise ValueError(f"{where}: x has shape {x.shape} and y {y.shape}; need arrays [N, ...] "
                     "and [N]")
  if x.shape[0] != y.shape[0] or x.shape[0] == 0:
    raise ValueError(f"{where}: x has {x.shape[0]} examples and y has {y.shape[0]}; need the "
                     "same non-zero number")
  if y.ndim != 1:
    raise ValueError(f"{where}: labels y must have shape [N], got {y.shape}")
  check_numeric("x", x.dtype, where)
  model.check_input(x.shape[1:], where)
  if is_inexact(x.dtype) and not np.all(np.isfinite(x)):
    raise ValueError(f"{where}: x has non-finite values (NaN/inf)")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= model.num_classes:
    raise ValueError(f"{where}: labels must be integers in [0, {model.num_classes}), found "
                     f"range [{y.min()}, {y.max()}] ({y.dtype})")


def validate(algorithm: Algorithm, model: Model, train_data: FederatedData, *, rounds: int,
             cohort_size: int, eval_every: int, chunk_size: int | None,
             num_devices: int | None = None, seed: int = 0, init_params: Any = None):
  """All the checks :func:`run` makes before any compilation or training."""
  if not isinstance(algorithm, Algorithm):
    raise ValueError(f"algorithm must be an Algorithm (e.g. fedjax_sim.algorithms.fedavg()), "
                     f"got {type(algorithm).__name__}")
  if not isinstance(train_data, (FederatedData, ProceduralPopulation)):
    raise ValueError("train_data must be a FederatedData or a ProceduralPopulation, got "
                     f"{type(train_data).__name__}")
  _positive_int("rounds", rounds)
  _positive_int("cohort_size", cohort_size)
  check_seed(seed)
  if init_params is not None:
    check_init_params(model, init_params)
  _positive_int("eval_every", eval_every)
  if chunk_size is not None:
    _positive_int("chunk_size", chunk_size)
  if num_devices is not None:
    _positive_int("num_devices", num_devices)
    if num_devices > jax.device_count():
      raise ValueError(f"num_devices={num_devices} but only {jax.device_count()} device(s) exist")
  if cohort_size > train_data.num_clients:
    raise ValueError(f"cohort_size {cohort_size} is larger than the population of "
                     f"{train_data.num_clients} clients")
  if isinstance(train_data, ProceduralPopulation):
    model.check_input(train_data.input_shape, "train_data")
    if train_data.num_classes > model.num_classes:
      raise ValueError(f"the population has {train_data.num_classes} classes but model "
                       f"{model.name!r} only {model.num_classes}")
    return
  for name in ("x", "y"):
    if name not in train_data.arrays:
      raise ValueError(f"train_data has no feature {name!r} (has {sorted(train_data.arrays)})")
  model.check_input(train_data.arrays["x"].shape[1:], "train_data")
  out = jax.eval_shape(lambda p, x: model.apply(p, x), jax.eval_shape(model.init, jax.random.key(0)),
                       jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32))
  if out.shape != (1, model.num_classes):
    raise ValueError(f"model {model.name!r} returns logits of shape {out.shape[1:]} per example, "
                     f"expected ({model.num_classes},)")
  y = train_data.arrays["y"]
  if y.max() >= model.num_classes:
    r = int(np.argmax(y >= model.num_classes))
    raise ValueError(f"train_data label {int(y[r])} (client {train_data._client_of_row(r)!r}) is "
                     f"outside the model's {model.num_classes} classes")


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


def _communication(comm: dict[str, float], rec: dict[str, float]) -> dict[str, float]:
  return dict(comm, bytes_up=comm["bytes_up_per_client"] * rec.get("num_counted", 0.0),
              bytes_down=comm["bytes_down_per_client"] * rec.get("num_clients", 0.0))


# --- block driver shared by run() and asynchronous.run_async() ---------------------------------

class CompiledBlocks:
  """One compiled program per distinct block length of a jitted ``block_fn(state, data, key, rs)``
  (a ``lax.scan`` over the rounds ``rs``); ``seconds`` is the total compile time so far."""

  def __init__(self, block_jit, put: Callable[[Any], Any] = lambda t: t):
    self._jit, self._put, self._cache = block_jit, put, {}
    self.seconds = 0.0

  def __call__(self, length: int, state, data, key):
    """The compiled program for blocks of ``length`` rounds (compiled on first use)."""
    if length not in self._cache:
      t0 = time.perf_counter()
      self._cache[length] = self._jit.lower(
          state, data, key, self._put(jnp.zeros(length, jnp.int32))).compile()
      self.seconds += time.perf_counter() - t0
    return self._cache[length]

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
  record["test_loss"] = float(ev["loss"])
  record["test_accuracy"] = float(ev["accuracy"])


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


def run(algorithm: Algorithm, model: Model, train_data: FederatedData, *, rounds: int,
        cohort_size: int, eval_data: Any = None, eval_every: int = 10, seed: int = 0,
        chunk_size: int | None = None, num_devices: int | None = None, init_params: Any = None,
        client_weights: Sequence[float] | None = None, progress: bool = True,
        eval_batch_size: int = 1000,
        callback: Callable[[int, server.ServerState, engine.RoundOutput], None] | None = None,
        checkpoint_dir: str | None = None, checkpoint_every: int = 10,
        resume: bool | str = False, experiment: dict[str, Any] | None = None,
        rounds_per_call: int = 1,
        heterogeneity: Heterogeneity | None = None,
        hparams: dict[str, float] | None = None,
        cohort_sampling: str = "uniform") -> RunResult:
  """Runs federated training and returns the final model with a per-round history.

  Args:
    algorithm: e.g. ``fedjax_sim.algorithms.fedavg(...)``.
    model: a :class:`~fedjax_sim.models.Model`.
    train_data: the client population: stored (:class:`FederatedData`) or generated on demand
      (:class:`~fedjax_sim.data.procedural.ProceduralPopulation`).
    rounds: number of rounds R.
    cohort_size: clients sampled (without replacement) each round C.
    eval_data: optional test set (dict with ``x``, ``y`` or FederatedData), evaluated every
      ``eval_every`` rounds and after the last round.
    seed: all randomness (init, cohorts, shuffles) derives from it: same seed, same numbers.
    chunk_size: clients per vmapped chunk (bounded memory); default
      :func:`fedjax_sim.engine.default_chunk_size` (per backend).
    num_devices: split each cohort's client axis over this many devices (default: all of
      them; on a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` makes N devices, one
      per core). Results equal the single-device run to float summation order (~1e-6).
    init_params: start from these global params instead of ``model.init``.
    client_weights: optional ``[P]`` weights p_i of the objective ``sum_i p_i f_i`` (default:
      example counts, or uniform if the algorithm says so). Refused (ValueError) by algorithms
      whose weighting is fixed (``Algorithm.fixed_weighting``: DP-FedAvg).
    progress: show a progress bar.
    callback: called after every round with ``(round, state, RoundOutput)``; with
      ``rounds_per_call > 1`` it runs when the round's block has finished and sees the block's
      final state. It may return a dict: its numeric entries are added to the round's history
      record (e.g. a privacy accountant's ``epsilon``), and ``"stop": True`` ends the run after
      this round (the history then records ``stopped_early``). A callback with a
      ``max_rounds()`` method (e.g. :func:`fedjax_sim.privacy.privacy_callback`) caps ``rounds``
      up front, so a block of rounds never runs past it; one with a ``check_run(population=,
      cohort_size=, cohort_sampling=, heterogeneity=)`` method is called first and may refuse
      the run with a ValueError (a privacy accountant whose sampling model is not the run's);
      a cap is said once (with the reason from the callback's ``max_rounds_reason(rounds)``
      if it has one) in the progress output, or as a warning with ``progress=False``, and the
      last round's record gets ``stopped_early`` and ``rounds_requested``.
    rounds_per_call: run up to this many rounds as one compiled ``lax.scan`` (sampling included),
      so small models are not bound by Python overhead between rounds. Blocks end at evaluation
      and checkpoint rounds; results equal ``rounds_per_call=1`` exactly. ``seconds`` is then the
      block's time divided by its rounds.
    checkpoint_dir: if given, the server state and the history so far are saved (orbax) to
      ``checkpoint_dir/<round>/`` every ``checkpoint_every`` rounds and after the last round;
      the 2 most recent are kept. A step is written to a temporary directory and renamed when
      complete, so a run killed mid-save never leaves a checkpoint that reads as valid.
    checkpoint_every: rounds between checkpoints.
    heterogeneity: simulated systems heterogeneity (stragglers, drop-outs, per-client local work,
      learning rates and batch sizes, availability): see :mod:`fedjax_sim.heterogeneity`.
    hparams: hyperparameters held in the state as arrays (``client_lr_scale``,
      ``server_lr_scale``, ``mu``: :data:`fedjax_sim.server.HPARAMS`); what
      :func:`fedjax_sim.sweep.sweep` vmaps over.
    cohort_sampling: ``"uniform"`` (default) or ``"size"`` (clients drawn proportionally to their
      example counts, without replacement; see :func:`fedjax_sim.engine.make_round`).
    resume: continue from the newest intact checkpoint in ``checkpoint_dir`` if there is one,
      else start from scratch ("continue if possible"). The resumed run uses the same per-round
      keys, so its params and history (but ``seconds``) equal an uninterrupted run's exactly;
      the restored state replaces ``init_params``, and ``callback`` sees only the new rounds.
      A step that is unreadable or fails its integrity digest is skipped with a warning (see
      :mod:`fedjax_sim.checkpoint`). Raises ``ValueError`` if the checkpoint was written for a
      different experiment (the :func:`fedjax_sim.checkpoint.fingerprint` differs: model,
      algorithm and optimizer hyperparameters, local work, data, evaluation set, population,
      cohort size, seed, heterogeneity, hparams, client weights, cohort sampling, init params,
      ``experiment``), naming what differs; if no step is intact, or if it is past ``rounds``.
      ``resume="override"`` resumes a changed experiment deliberately: the changes are warned
      about, kept in the checkpoints and returned in :attr:`RunResult.overrides`, and the first
      round trained after them has ``resumed_with_changes = 1`` in the history (the model and
      server optimizer structure must still match). Without ``resume``, ``checkpoint_dir`` must
      hold no checkpoint. ``rounds`` is not part of the experiment: a finished run can be
      resumed with more rounds.
    experiment: extra JSON-able description of the experiment included in the checkpoint
      fingerprint (the CLI passes its resolved configuration).
  History keys: ``round``, ``train_loss``, ``train_accuracy`` (during local training),
  ``num_nonfinite`` (clients dropped for NaN/inf updates), ``aggregate_nonfinite`` (1 when the
  round's aggregate or the stepped model was non-finite and was therefore not applied; a
  ``RuntimeWarning`` at the end of the run counts such rounds, and rounds whose ``train_loss`` is
  NaN because no client trained finitely), ``num_counted`` (clients whose update
  was aggregated), ``num_stragglers``, ``num_dropped`` (drop-outs), ``num_online``,
  ``steps_done`` / ``steps_wasted`` (local steps of counted / discarded clients),
  ``update_norm``, ``seconds``, communication per round: ``params_up_per_client`` /
  ``bytes_up_per_client`` (what one client sends, after the update transform's encoding),
  ``bytes_down_per_client`` (the global model), ``bytes_up`` / ``bytes_down`` (all clients),
  ``client_state_bytes`` (the per-client state stores of the whole population),
  ``test_loss``/``test_accuracy`` (NaN on rounds without evaluation).
  """
  if callback is not None and callable(getattr(callback, "check_run", None)):
    # A callback whose numbers depend on how cohorts are drawn (a privacy accountant) checks
    # that they describe this run before anything is compiled.
    callback.check_run(population=train_data.num_clients, cohort_size=cohort_size,
                       cohort_sampling=cohort_sampling, heterogeneity=heterogeneity)
  if callback is not None and callable(getattr(callback, "max_rounds", None)):
    # A callback that knows its last allowed round (a privacy budget) caps the run up front, so
    # blocks of rounds (rounds_per_call > 1) never run past it.
    capped = max(1, min(rounds, int(callback.max_rounds())))
    stops_early, requested, rounds = capped < rounds, rounds, capped
  else:
    stops_early = False
  validate(algorithm, model, train_data, rounds=rounds, cohort_size=cohort_size,
           eval_every=eval_every, chunk_size=chunk_size, num_devices=num_devices, seed=seed,
           init_params=init_params)
  _positive_int("checkpoint_every", checkpoint_every)
  _positive_int("rounds_per_call", rounds_per_call)
  eval_arrays = None
  if eval_data is not None:
    eval_arrays = evaluation.as_arrays(eval_data)
    check_eval_data(model, eval_arrays)
  procedural = isinstance(train_data, ProceduralPopulation)
  if cohort_sampling not in engine.COHORT_SAMPLING:
    raise ValueError(f"cohort_sampling must be one of {engine.COHORT_SAMPLING}, got "
                     f"{cohort_sampling!r}")
  if procedural and cohort_sampling != "uniform":
    raise ValueError("a ProceduralPopulation samples cohorts uniformly (size-weighted sampling "
                     "needs every client's size: O(P))")
  if procedural:
    if client_weights is not None:
      raise ValueError("client_weights cannot be given for a ProceduralPopulation: its "
                       "`weighting` decides them")
    if heterogeneity is not None and any(
        getattr(heterogeneity, f) is not None for f in
        ("local_steps", "local_epochs", "learning_rate_scale", "batch_size", "availability")):
      raise ValueError("per-client heterogeneity arrays need a stored population; a "
                       "ProceduralPopulation supports straggler_fraction and dropout_fraction")
  else:
    weights = resolve_client_weights(train_data, algorithm.weighting, client_weights,
                                     algorithm=algorithm)
  multi = distributed.is_multiprocess()
  if multi and checkpoint_dir is not None:
    raise ValueError("checkpoint_dir is not supported in multi-process runs")

  key_init, key_rounds = jax.random.split(jax.random.key(seed))
  params = init_params if init_params is not None else model.init(key_init)
  if heterogeneity is not None:
    heterogeneity.validate(train_data.num_clients, algorithm.work)
  state = engine.init_state(algorithm, params, train_data.num_clients, hparams)
  records, ckpt, changes = [], None, []
  if checkpoint_dir is not None:
    fingerprint = checkpoint.fingerprint(
        state, algorithm=algorithm, population=train_data.num_clients,
        num_examples=-1 if procedural else int(train_data.sizes.sum()), cohort_size=cohort_size,
        seed=seed, data=train_data, model=model, eval_data=eval_arrays,
        heterogeneity=heterogeneity, hparams=hparams, client_weights=client_weights,
        cohort_sampling=cohort_sampling, init_params=init_params, experiment=experiment)
    ckpt, state, records, changes = checkpoint.open_for_run(checkpoint_dir, state, fingerprint,
                                                            resume=resume, rounds=rounds)
  if procedural:
    data = train_data
  else:
    data = engine.to_device(train_data, weights, heterogeneity, algorithm.work)
  n_dev = num_devices or jax.device_count()
  mesh = engine.client_mesh(n_dev) if n_dev > 1 else None
  if multi:   # every process runs this same code; the cohort is split over all their devices
    mesh = distributed.global_mesh(n_dev)
    state, data, key_rounds = distributed.replicate((state, data, key_rounds), mesh)
  put = (lambda t: distributed.replicate(t, mesh)) if multi else (lambda t: t)  # noqa: E731
  round_fn = engine.make_round(algorithm, model, population=train_data.num_clients,
                               cohort_size=cohort_size, max_client_size=train_data.max_client_size,
                               chunk_size=chunk_size, mesh=mesh, heterogeneity=heterogeneity,
                               cohort_sampling=cohort_sampling)
  # Blocks of rounds run as one compiled lax.scan (one program per distinct block length, at
  # most a few); a block ends where the host has work to do: evaluation or a checkpoint.
  def block_fn(state, data, key, rs):
    return jax.lax.scan(lambda s, r: round_fn(s, data, jax.random.fold_in(key, r)), state, rs)

  # Multi-process: replicated outputs, so every process can read the state and metrics.
  jit_kw = {"out_shardings": distributed.replicated(mesh)} if multi else {}
  blocks = CompiledBlocks(jax.jit(block_fn, **jit_kw), put)

  def host_work(r):
    return ((eval_arrays is not None and r % eval_every == 0) or
            (ckpt is not None and r % checkpoint_every == 0) or r == rounds)

  comm = communication_cost(algorithm, params)
  # Memory of the per-client state stores (SCAFFOLD's c_i, error-feedback residuals) for the
  # whole population: recorded so population-scale state is visible next to the results.
  comm["client_state_bytes"] = float(sum(np.size(a) * np.dtype(a.dtype).itemsize
                                         for a in jax.tree.leaves(state.clients)))
  stop_at = None
  start = len(records) + 1
  blocks(min(rounds_per_call, max(rounds - start + 1, 1)), state, data, key_rounds)
  evaluate = None
  if eval_arrays is not None:
    evaluate = evaluation.make_evaluate(model, eval_batch_size)
    eval_xy = put((jnp.asarray(eval_arrays["x"]), jnp.asarray(eval_arrays["y"], jnp.int32)))

  bar = tqdm(total=rounds, initial=start - 1, desc=f"{algorithm.name}",
             disable=not progress or jax.process_index() != 0, leave=True)
  if stops_early and jax.process_index() == 0:   # said once, up front; recorded in the history
    why = getattr(callback, "max_rounds_reason", None)
    msg = (f"{algorithm.name}: stopping after round {rounds} of the {requested} requested: "
           f"{why(rounds) if callable(why) else f'the callback allows {rounds} rounds'}")
    if progress:
      bar.write(msg)
    else:
      warnings.warn(msg, stacklevel=2)
  try:
    r = start
    while r <= rounds:
      end = block_end(r, rounds, rounds_per_call, host_work)
      state, outs, seconds = blocks.run(state, data, key_rounds, r, end)
      block = block_records(jax.device_get(outs.metrics), r, seconds)
      for i, rec in enumerate(block):
        rec.update(_communication(comm, rec))
        if ckpt is not None and changes and rec["round"] == start:
          rec["resumed_with_changes"] = 1.0
        records.append(rec)
        if callback is not None and stop_at is None:
          extra = callback(rec["round"], state, jax.tree.map(lambda a: a[i], outs))
          if isinstance(extra, dict):
            stop = bool(extra.pop("stop", False))
            rec.update({k: float(v) for k, v in extra.items()})
            if stop and rec["round"] < rounds:
              stop_at = rec["round"]   # the block's remaining rounds already ran: they stay
      if stop_at is not None:
        records[-1]["stopped_early"] = 1.0
      if evaluate is not None and (end % eval_every == 0 or end == rounds or stop_at is not None):
        add_evaluation(records[-1], evaluate, state.params, eval_xy)
      if ckpt is not None and (end % checkpoint_every == 0 or end == rounds or
                               stop_at is not None):
        ckpt.save(end, state, records, {"fingerprint": fingerprint})
      rec = records[-1]
      post = {"nonfinite": str(int(rec["num_nonfinite"]))} if rec["num_nonfinite"] else {}
      if rec.get("aggregate_nonfinite"):
        post["aggregate"] = "non-finite, not applied"
      show_progress(bar, rec, end - r + 1, **post)
      r = end + 1
      if stop_at is not None:
        break
  finally:
    bar.close()
    if ckpt is not None:
      ckpt.close()
  if stops_early and records and records[-1]["round"] == rounds:
    records[-1].update(stopped_early=1.0, rounds_requested=float(requested))
  warn_divergence(records)
  history = History.from_records(records)
  return RunResult(state.params, state, history, blocks.seconds,
                   list(ckpt.overrides) if ckpt is not None else [])
