"""Vectorized experiment sweeps: E experiments as ONE compiled program.

Experiments that differ only in their seed and in-state hyperparameters
(:data:`fedjax_sim.server.HPARAMS`: client / server learning-rate scales, FedProx's mu) share
the round's program; :func:`sweep` stacks their :class:`~fedjax_sim.server.ServerState` on a
leading experiment axis E and runs ``vmap`` over it, blocks of rounds as one ``lax.scan``. A new
hyperparameter value is a new array, never a recompilation, and each experiment's numbers equal
``fedjax_sim.run`` with the same seed and ``hparams`` (tested).

>>> import optax, fedjax_sim as fs
>>> train, _ = fs.datasets.digits()
>>> data = fs.FederatedData.from_partition(train, fs.partition.iid(train["y"], 10), num_classes=10)
>>> algo, model = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16), fs.models.logistic_regression(64, 10)
>>> runs = sweep(algo, model, data, rounds=2, cohort_size=5, progress=False,
...              **grid(seed=[0, 1], client_lr_scale=[0.5, 1.0, 2.0]))   # 6 experiments
>>> len(runs), {leaf.shape[0] for leaf in jax.tree.leaves(runs.params)}
(6, {6})
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import evaluation, server
from fedjax_sim._progress import tqdm
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.experiment import build, seed_keys, with_communication
from fedjax_sim.history import History
from fedjax_sim.models.core import Model, label_dtype
from fedjax_sim.validation import check_eval_data, check_seed, positive_int, validate


class SweepResult(list):
  """The histories of a sweep, one per experiment (a list), with the experiments' final global
  models ``params`` (every leaf ``[E, ...]``) and ``state`` (the stacked server states)."""

  def __init__(self, histories, params, state):
    super().__init__(histories)
    self.params, self.state = params, state


def grid(**axes: Sequence[Any]) -> dict[str, list]:
  """The Cartesian product of the given axes as aligned per-experiment lists, e.g.
  ``grid(seed=[0, 1], mu=[0.0, 0.1])`` -> ``{"seed": [0, 0, 1, 1], "mu": [0.0, 0.1, 0.0, 0.1]}``."""
  names = list(axes)
  rows = list(itertools.product(*(list(axes[n]) for n in names)))
  return {n: [r[i] for r in rows] for i, n in enumerate(names)}


def _experiments(seed, hparams: dict[str, Any]) -> tuple[list[int], list[dict[str, float]]]:
  lengths = {len(v) for v in hparams.values() if np.ndim(v) == 1}
  if np.ndim(seed) == 1:
    lengths.add(len(seed))
  if len(lengths) > 1:
    raise ValueError(f"swept lists have different lengths {sorted(lengths)}; give aligned lists "
                     "(one entry per experiment) or use fedjax_sim.sweep.grid")
  e = lengths.pop() if lengths else 1
  if e == 0:
    raise ValueError("a sweep needs at least one experiment")
  seeds = [check_seed(s.item() if isinstance(s, np.generic) else s)
           for s in (list(seed) if np.ndim(seed) == 1 else [seed] * e)]
  hps = [{k: float(v[i] if np.ndim(v) == 1 else v) for k, v in hparams.items()} for i in range(e)]
  return seeds, hps


def sweep(algorithm: Algorithm, model: Model, train_data, *, rounds: int, cohort_size: int,
          seed: int | Sequence[int] = 0, eval_data: Any = None, eval_every: int = 10,
          chunk_size: int | None = None, rounds_per_call: int = 10, eval_batch_size: int = 1000,
          progress: bool = True, **hparams) -> SweepResult:
  """Runs E experiments vmapped as one program; returns one History per experiment.

  Args:
    algorithm, model, train_data, rounds, cohort_size, eval_data, eval_every, chunk_size,
      eval_batch_size, progress: as :func:`fedjax_sim.run` (shared by all experiments).
    seed: one seed, or one per experiment.
    rounds_per_call: rounds per compiled ``lax.scan`` block (blocks end at evaluation rounds).
    **hparams: in-state hyperparameters (:data:`fedjax_sim.server.HPARAMS` and those the
      algorithm declares, e.g. FedProx's ``mu``), each a scalar (shared) or a list with one
      value per experiment.

  Returns a :class:`SweepResult`: the list of histories, with ``.params`` (the E final models,
  stacked) and ``.state``. Each history has the keys of ``run``'s (per-round metrics, ``test_*`` at evaluation rounds,
  communication) plus the experiment's ``seed`` and hyperparameters as constant columns;
  ``seconds`` is the sweep's time per round divided by E.
  """
  seeds, hps = _experiments(seed, hparams)
  e = len(seeds)
  validate(algorithm, model, train_data, rounds=rounds, cohort_size=cohort_size,
           eval_every=eval_every, chunk_size=chunk_size, num_devices=1)
  positive_int("rounds_per_call", rounds_per_call)
  for hp in hps:
    server.check_hparams(hp, algorithm.hparams)
  eval_arrays = None
  if eval_data is not None:
    eval_arrays = evaluation.as_arrays(eval_data)
    check_eval_data(model, eval_arrays)
  exp = build(algorithm, model, train_data, cohort_size=cohort_size, chunk_size=chunk_size)
  keys = [seed_keys(s) for s in seeds]
  state = jax.tree.map(lambda *a: jnp.stack(a),
                       *[exp.init(k[0], hp) for k, hp in zip(keys, hps)])
  # One seed for all experiments (a hyperparameter sweep with common random numbers): the round
  # key is not batched, so cohort sampling, shuffles and the gather of the clients' examples
  # happen once per round for all E experiments instead of E times.
  shared_key = len(set(seeds)) == 1
  key_rounds = keys[0][1] if shared_key else jnp.stack([k[1] for k in keys])
  block = jax.jit(jax.vmap(exp.block, in_axes=(0, None, None if shared_key else 0, None)))
  evaluate = None
  if eval_arrays is not None:
    ev1 = evaluation.make_evaluate(model, eval_batch_size)
    evaluate = jax.jit(jax.vmap(ev1, in_axes=(0, None, None)))
    ex, ey = jnp.asarray(eval_arrays["x"]), jnp.asarray(eval_arrays["y"], label_dtype(model))

  records: list[list[dict]] = [[] for _ in range(e)]
  bar = tqdm(total=rounds, desc=f"sweep[{e}] {algorithm.name}", disable=not progress)
  r = 1
  try:
    while r <= rounds:
      end = r
      while end < rounds and end - r + 1 < rounds_per_call and not (
          eval_arrays is not None and end % eval_every == 0):
        end += 1
      t = time.perf_counter()
      state, outs = block(state, exp.data, key_rounds, jnp.arange(r, end + 1, dtype=jnp.int32))
      metrics = jax.device_get(outs.metrics)            # each [E, rounds in block]
      seconds = (time.perf_counter() - t) / (end - r + 1) / e
      ev = None
      if evaluate is not None and (end % eval_every == 0 or end == rounds):
        ev = jax.device_get(evaluate(exp.params(state), ex, ey))
      for x in range(e):
        for i, rr in enumerate(range(r, end + 1)):
          rec = {"round": rr, **{k: float(v[x, i]) for k, v in metrics.items()},
                 "seconds": seconds, "seed": float(seeds[x]), **hps[x]}
          rec.update(with_communication(exp.communication, rec))
          records[x].append(rec)
        if ev is not None:
          records[x][-1]["test_loss"] = float(ev["loss"][x])
          records[x][-1]["test_accuracy"] = float(ev["accuracy"][x])
      bar.update(end - r + 1)
      r = end + 1
  finally:
    bar.close()
  return SweepResult([History.from_records(recs) for recs in records], exp.params(state), state)
