"""``run()``: the synchronous driver (validation, the experiment, blocks of rounds, evaluation,
callbacks, checkpoints, progress, history). The round itself is :mod:`fedjax_sim.engine`'s; what
every driver shares is :mod:`fedjax_sim.experiment`'s."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim import checkpoint, distributed, engine, evaluation, server
from fedjax_sim._progress import tqdm
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.asynchronous import AsyncConfig, run_async
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.procedural import ProceduralPopulation
from fedjax_sim.experiment import (CompiledBlocks, build as build_experiment, drive, seed_keys,
                                   shared_programs, warn_divergence)
from fedjax_sim.heterogeneity import Heterogeneity
from fedjax_sim.history import History
from fedjax_sim.models.core import Model, label_dtype
from fedjax_sim.validation import check_eval_data, positive_int, validate


@dataclasses.dataclass
class RunResult:
  """Outcome of :func:`run`.

  Attributes:
    params: final global model.
    state: final :class:`~fedjax_sim.server.ServerState`.
    history: per-round metrics (:class:`~fedjax_sim.history.History`).
    compile_seconds: time to compile the round (not included in ``seconds`` of the history).
      0 when an earlier run compiled the same program: runs with the same ``algorithm``,
      ``model`` and ``heterogeneity`` objects, cohort and chunk sizes, on a population of the
      same sizes, share their compiled rounds (seeds, init params, client weights and hparams
      are arguments of the program; :func:`fedjax_sim.experiment.clear_block_cache` forgets
      them). Like ``jax.jit``, the cache assumes those objects do not change.
    overrides: deliberate changes of the experiment accepted on resume (``resume="override"``):
      ``[{"round": r, "changes": [...]}]`` (``r``: the checkpoint's round), kept in the
      checkpoints; ``[]`` for none.
  """
  params: Any
  state: server.ServerState
  history: History
  compile_seconds: float
  overrides: list = dataclasses.field(default_factory=list)


def _round_cap(callback, rounds: int) -> tuple[int, int | None]:
  """``(rounds to run, rounds requested if a callback's max_rounds() caps them else None)``; a
  callback's ``check_run`` must have accepted the run first."""
  if callback is None or not callable(getattr(callback, "max_rounds", None)):
    return rounds, None
  # A callback that knows its last allowed round (a privacy budget) caps the run up front, so
  # blocks of rounds (rounds_per_call > 1) never run past it.
  capped = max(1, min(rounds, int(callback.max_rounds())))
  return capped, (rounds if capped < rounds else None)


def _say_cap(name, callback, rounds, requested, bar, progress) -> None:
  """Says once, up front, that a callback caps the run (recorded in the history at the end)."""
  if requested is None or jax.process_index() != 0:
    return
  why = getattr(callback, "max_rounds_reason", None)
  msg = (f"{name}: stopping after round {rounds} of the {requested} requested: "
         f"{why(rounds) if callable(why) else f'the callback allows {rounds} rounds'}")
  if progress:
    bar.write(msg)
  else:
    warnings.warn(msg, stacklevel=3)


def _apply_callback(callback, rec: dict, state, out) -> bool:
  """Calls ``callback(round, state, out)``; adds the numbers it returns to ``rec``; returns True
  if it asks to stop."""
  extra = callback(rec["round"], state, out)
  if not isinstance(extra, dict):
    return False
  stop = bool(extra.pop("stop", False))
  rec.update({k: float(v) for k, v in extra.items()})
  return stop


def run(algorithm: Algorithm | AsyncConfig, model: Model, train_data: FederatedData, *, rounds: int,
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
    algorithm: e.g. ``fedjax_sim.algorithms.fedavg(...)``. An asynchronous configuration
      (``fedjax_sim.algorithms.fedbuff(...)``) runs :func:`fedjax_sim.asynchronous.run_async`
      with ``rounds`` server updates instead (the options that only synchronous rounds have,
      e.g. ``cohort_size`` or checkpoints, are then refused).
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
  if isinstance(algorithm, AsyncConfig):
    return _run_asynchronous(algorithm, model, train_data, rounds=rounds, eval_data=eval_data,
                             eval_every=eval_every, seed=seed, chunk_size=chunk_size,
                             init_params=init_params, client_weights=client_weights,
                             progress=progress, eval_batch_size=eval_batch_size,
                             callback=callback, rounds_per_call=rounds_per_call,
                             unsupported=dict(cohort_size=cohort_size, num_devices=num_devices,
                                              checkpoint_dir=checkpoint_dir,
                                              heterogeneity=heterogeneity, hparams=hparams,
                                              cohort_sampling=cohort_sampling))
  # --- checks, before anything is compiled -----------------------------------------------------
  if callback is not None and callable(getattr(callback, "check_run", None)):
    # A callback whose numbers depend on how cohorts are drawn (a privacy accountant) checks
    # that they describe this run.
    callback.check_run(population=train_data.num_clients, cohort_size=cohort_size,
                       cohort_sampling=cohort_sampling, heterogeneity=heterogeneity)
  rounds, requested = _round_cap(callback, rounds)
  validate(algorithm, model, train_data, rounds=rounds, cohort_size=cohort_size,
           eval_every=eval_every, chunk_size=chunk_size, num_devices=num_devices, seed=seed,
           init_params=init_params, client_weights=client_weights, heterogeneity=heterogeneity,
           cohort_sampling=cohort_sampling, hparams=hparams)
  positive_int("checkpoint_every", checkpoint_every)
  positive_int("rounds_per_call", rounds_per_call)
  eval_arrays = None
  if eval_data is not None:
    eval_arrays = evaluation.as_arrays(eval_data)
    check_eval_data(model, eval_arrays)
  multi = distributed.is_multiprocess()
  if multi and checkpoint_dir is not None:
    raise ValueError("checkpoint_dir is not supported in multi-process runs")

  # --- the experiment: initial state, data on the device, the compiled block -------------------
  n_dev = num_devices or jax.device_count()
  mesh = engine.client_mesh(n_dev) if n_dev > 1 else None
  if multi:   # every process runs this same code; the cohort is split over all their devices
    mesh = distributed.global_mesh(n_dev)
  exp = build_experiment(algorithm, model, train_data, cohort_size=cohort_size,
                         chunk_size=chunk_size, mesh=mesh, heterogeneity=heterogeneity,
                         cohort_sampling=cohort_sampling, client_weights=client_weights,
                         hparams=hparams, init_params=init_params)
  key_init, key_rounds = seed_keys(seed)
  state, data = exp.init(key_init), exp.data
  comm = dict(exp.communication)
  # Memory of the per-client state stores (SCAFFOLD's c_i, error-feedback residuals) for the
  # whole population: recorded so population-scale state is visible next to the results.
  comm["client_state_bytes"] = float(sum(a.size * a.dtype.itemsize
                                         for a in jax.tree.leaves(state.clients)))

  # --- checkpoints: resume or start fresh ------------------------------------------------------
  records, ckpt, changes = [], None, []
  if checkpoint_dir is not None:
    fingerprint = checkpoint.fingerprint(
        state, algorithm=algorithm, population=train_data.num_clients,
        num_examples=(-1 if isinstance(train_data, ProceduralPopulation)
                      else int(train_data.sizes.sum())), cohort_size=cohort_size,
        seed=seed, data=train_data, model=model, eval_data=eval_arrays,
        heterogeneity=heterogeneity, hparams=hparams, client_weights=client_weights,
        cohort_sampling=cohort_sampling, init_params=init_params, experiment=experiment)
    ckpt, state, records, changes = checkpoint.open_for_run(checkpoint_dir, state, fingerprint,
                                                            resume=resume, rounds=rounds)
  if multi:
    state, data, key_rounds = distributed.replicate((state, data, key_rounds), mesh)
  put = (lambda t: distributed.replicate(t, mesh)) if multi else (lambda t: t)  # noqa: E731
  # Multi-process: replicated outputs, so every process can read the state and metrics.
  jit_kw = {"out_shardings": distributed.replicated(mesh)} if multi else {}
  # Everything the block program closes over (see engine.make_round), so that a later run with
  # the same objects and sizes reuses its compiled programs (experiment.shared_programs).
  cache_key = ("sync", id(algorithm), id(model), id(heterogeneity), mesh, multi,
               train_data.num_clients, train_data.max_client_size,
               train_data.min_client_size, cohort_size, chunk_size,
               cohort_sampling, jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
               jax.config.jax_threefry_partitionable)
  blocks = CompiledBlocks(jax.jit(exp.block, **jit_kw), put, shared_programs(
      cache_key, (algorithm, model, heterogeneity)))
  start = len(records) + 1
  blocks(min(rounds_per_call, max(rounds - start + 1, 1)), state, data, key_rounds)
  evaluate = eval_xy = None
  if eval_arrays is not None:
    evaluate = evaluation.run_evaluate(model, eval_batch_size)
    eval_xy = put((jnp.asarray(eval_arrays["x"]),
                   jnp.asarray(eval_arrays["y"], label_dtype(model))))

  # --- blocks of rounds; the host works between them (evaluation, callbacks, checkpoints) -------
  stop_at = None

  def on_round(rec, state, outs, i):
    nonlocal stop_at
    if ckpt is not None and changes and rec["round"] == start:
      rec["resumed_with_changes"] = 1.0
    if callback is not None and stop_at is None and _apply_callback(
        callback, rec, state, jax.tree.map(lambda a: a[i], outs)) and rec["round"] < rounds:
      stop_at = rec["round"]   # the block's remaining rounds already ran: they stay
      return True
    return False

  def on_block(end, state, last):
    if ckpt is not None and (end % checkpoint_every == 0 or last):
      ckpt.save(end, state, records, {"fingerprint": fingerprint})

  def post(rec):
    shown = {"nonfinite": str(int(rec["num_nonfinite"]))} if rec["num_nonfinite"] else {}
    if rec.get("aggregate_nonfinite"):
      shown["aggregate"] = "non-finite, not applied"
    return shown

  bar = tqdm(total=rounds, initial=start - 1, desc=f"{algorithm.name}",
             disable=not progress or jax.process_index() != 0, leave=True)
  _say_cap(algorithm.name, callback, rounds, requested, bar, progress)
  try:
    state = drive(exp, blocks, state, data, key_rounds, records, first=start, last=rounds,
                  per_call=rounds_per_call, communication=comm, bar=bar, on_round=on_round,
                  evaluate=evaluate, eval_xy=eval_xy, eval_every=eval_every,
                  host_work=lambda r: ckpt is not None and r % checkpoint_every == 0,
                  on_block=on_block, post=post)
  finally:
    bar.close()
    if ckpt is not None:
      ckpt.close()

  # --- the result ---------------------------------------------------------------------------------
  if requested is not None and records and records[-1]["round"] == rounds:
    records[-1].update(stopped_early=1.0, rounds_requested=float(requested))
  warn_divergence(records)
  return RunResult(exp.params(state), state, History.from_records(records), blocks.seconds,
                   list(ckpt.overrides) if ckpt is not None else [])


def _run_asynchronous(config: AsyncConfig, model, train_data, *, rounds, unsupported, **kwargs):
  """``run`` of an asynchronous configuration: :func:`fedjax_sim.asynchronous.run_async`."""
  defaults = dict(num_devices=None, checkpoint_dir=None, heterogeneity=None, hparams=None,
                  cohort_sampling="uniform")
  bad = [k for k, v in unsupported.items() if k != "cohort_size" and v != defaults[k]]
  if bad:
    raise ValueError(f"{config.name} is asynchronous: run() passes it to "
                     f"fedjax_sim.asynchronous.run_async, which does not take {bad}")
  res = run_async(config, model, train_data, rounds=rounds, **kwargs)
  return RunResult(res.params, res.state, res.history, res.compile_seconds)
