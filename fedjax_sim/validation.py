"""Checks made before anything is compiled: seeds, sizes, initial params, client weights,
evaluation sets, and the run-level checks of :func:`validate` (shared by every driver)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.data.federated import FederatedData, check_numeric, is_inexact
from fedjax_sim.data.procedural import ProceduralPopulation
from fedjax_sim.engine import COHORT_SAMPLING
from fedjax_sim.server import check_hparams
from fedjax_sim.models.core import Model


def positive_int(name: str, v):
  """Raises ValueError unless ``v`` is a positive integer (not bool)."""
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
      raise ValueError(f"client_weights must be finite and >= 0; client {data.client_name(bad)!r} "
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
  """Checks a test set ``{"x": [N, *input_shape] real numbers, "y": [N] int labels}`` (for a
  regression model, ``y [N]`` finite real targets)."""
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
  if model.is_regression:
    check_numeric("y", y.dtype, where)
    if is_inexact(y.dtype) and not np.all(np.isfinite(y)):
      raise ValueError(f"{where}: regression targets y have non-finite values (NaN/inf)")
    return
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= model.num_classes:
    raise ValueError(f"{where}: labels must be integers in [0, {model.num_classes}), found "
                     f"range [{y.min()}, {y.max()}] ({y.dtype})")


def check_task(model: Model, data: FederatedData) -> None:
  """A classifier needs classification data (integer labels); a regression model takes real or
  integer targets."""
  task = getattr(data, "task", "classification")
  if task == "regression" and not model.is_regression:
    raise ValueError(f"train_data holds regression targets (task='regression') but model "
                     f"{model.name!r} is a classifier: build it with task='regression' (e.g. "
                     "fedjax_sim.models.from_flax(module, input_shape, 1, task='regression'))")


def validate(algorithm: Algorithm, model: Model, train_data: FederatedData, *, rounds: int,
             cohort_size: int, eval_every: int, chunk_size: int | None,
             num_devices: int | None = None, seed: int = 0, init_params: Any = None,
             client_weights: Sequence[float] | None = None, heterogeneity=None,
             cohort_sampling: str = "uniform", hparams: dict | None = None):
  """All the checks :func:`fedjax_sim.run` makes before any compilation or training."""
  if not isinstance(algorithm, Algorithm):
    raise ValueError(f"algorithm must be an Algorithm (e.g. fedjax_sim.algorithms.fedavg()), "
                     f"got {type(algorithm).__name__}")
  if not isinstance(train_data, (FederatedData, ProceduralPopulation)):
    raise ValueError("train_data must be a FederatedData or a ProceduralPopulation, got "
                     f"{type(train_data).__name__}")
  positive_int("rounds", rounds)
  positive_int("cohort_size", cohort_size)
  check_seed(seed)
  if init_params is not None:
    check_init_params(model, init_params)
  positive_int("eval_every", eval_every)
  if chunk_size is not None:
    positive_int("chunk_size", chunk_size)
  if num_devices is not None:
    positive_int("num_devices", num_devices)
    if num_devices > jax.device_count():
      raise ValueError(f"num_devices={num_devices} but only {jax.device_count()} device(s) exist")
  if cohort_size > train_data.num_clients:
    raise ValueError(f"cohort_size {cohort_size} is larger than the population of "
                     f"{train_data.num_clients} clients")
  check_hparams(hparams, algorithm.hparams)
  if cohort_sampling not in COHORT_SAMPLING:
    raise ValueError(f"cohort_sampling must be one of {COHORT_SAMPLING}, got "
                     f"{cohort_sampling!r}")
  if heterogeneity is not None:
    heterogeneity.validate(train_data.num_clients, algorithm.work)
  if isinstance(train_data, ProceduralPopulation):
    if cohort_sampling != "uniform":
      raise ValueError("a ProceduralPopulation samples cohorts uniformly (size-weighted sampling "
                       "needs every client's size: O(P))")
    if client_weights is not None:
      raise ValueError("client_weights cannot be given for a ProceduralPopulation: its "
                       "`weighting` decides them")
    if heterogeneity is not None and any(
        getattr(heterogeneity, f) is not None for f in
        ("local_steps", "local_epochs", "learning_rate_scale", "batch_size", "availability")):
      raise ValueError("per-client heterogeneity arrays need a stored population; a "
                       "ProceduralPopulation supports straggler_fraction and dropout_fraction")
    model.check_input(train_data.input_shape, "train_data")
    if model.is_regression:
      raise ValueError(f"model {model.name!r} is a regression model, but a ProceduralPopulation "
                       "generates class labels")
    if train_data.num_classes > model.num_classes:
      raise ValueError(f"the population has {train_data.num_classes} classes but model "
                       f"{model.name!r} only {model.num_classes}")
    return
  for name in ("x", "y"):
    if name not in train_data.arrays:
      raise ValueError(f"train_data has no feature {name!r} (has {sorted(train_data.arrays)})")
  model.check_input(train_data.arrays["x"].shape[1:], "train_data")
  check_task(model, train_data)
  out = jax.eval_shape(lambda p, x: model.apply(p, x), jax.eval_shape(model.init, jax.random.key(0)),
                       jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32))
  if out.shape != (1, model.num_classes):
    raise ValueError(f"model {model.name!r} returns logits of shape {out.shape[1:]} per example, "
                     f"expected ({model.num_classes},)")
  y = train_data.arrays["y"]
  if not model.is_regression and y.max() >= model.num_classes:
    r = int(np.argmax(y >= model.num_classes))
    raise ValueError(f"train_data label {int(y[r])} (client {train_data.client_of_row(r)!r}) is "
                     f"outside the model's {model.num_classes} classes")
  resolve_client_weights(train_data, algorithm.weighting, client_weights, algorithm=algorithm)
