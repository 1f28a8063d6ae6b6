"""Centralized pretraining on a source task, and encoder checkpoints (Flax msgpack files)."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from fedjax_sim import evaluation
from fedjax_sim.models.core import Model
from fedjax_sim.transfer.unfreeze import param_paths


class PretrainResult(NamedTuple):
  """Outcome of :func:`pretrain`: ``params`` and the mean training loss of every epoch."""
  params: Any
  epoch_losses: np.ndarray


def pretrain(model: Model, data, optimizer: optax.GradientTransformation, *,
             epochs: int | None = None, steps: int | None = None, batch_size: int = 64,
             key: jax.Array | None = None, init_params: Any = None) -> PretrainResult:
  """Centralized training on a source task (the usual way to get an encoder to transfer).

  Each epoch is one jitted call: a fresh permutation of the examples (from ``key``), cut into
  ``ceil(N / batch_size)`` batches (the last partial one masked), ``lax.scan`` over them. With
  ``steps`` instead of ``epochs``, training stops after that many batches (the last epoch cut
  short). Data is passed to the compiled function as an argument, never baked in.

  Args:
    model: the :class:`Model` to train (its ``batch_loss`` is the objective).
    data: a dict with ``x [N, ...]`` and integer ``y [N]``, or a FederatedData (pooled).
    optimizer: any optax transformation.
    epochs / steps: exactly one of them.
    batch_size: examples per step.
    key: PRNG key for the init and the shuffles (default ``jax.random.key(0)``).
    init_params: start from these instead of ``model.init``.
  """
  arrays = evaluation.as_arrays(data)
  x, y = np.asarray(arrays["x"]), np.asarray(arrays["y"])
  model.check_input(x.shape[1:], "pretrain data")
  if (epochs is None) == (steps is None):
    raise ValueError(f"give exactly one of epochs and steps (got epochs={epochs!r}, "
                     f"steps={steps!r})")
  total = epochs if epochs is not None else steps
  if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total <= 0:
    raise ValueError(f"epochs/steps must be a positive integer, got {total!r}")
  if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
    raise ValueError(f"pretrain data: x has {x.shape[0]} examples and y {y.shape[0]}")
  key = jax.random.key(0) if key is None else key
  k_init, k_data = jax.random.split(key)
  params = model.init(k_init) if init_params is None else init_params
  opt_state = optimizer.init(params)
  n = x.shape[0]
  b = max(1, min(batch_size, n))
  nb = math.ceil(n / b)
  grad_fn = jax.value_and_grad(model.batch_loss, has_aux=True)

  @functools.partial(jax.jit, static_argnums=(5,))
  def epoch(params, opt_state, xs, ys, k, num_batches):
    perm = jnp.concatenate([jax.random.permutation(k, n), jnp.zeros(nb * b - n, jnp.int32)])
    rows = perm.reshape(nb, b)[:num_batches]
    mask = (jnp.arange(nb * b) < n).reshape(nb, b)[:num_batches]

    def step(carry, inp):
      p, s = carry
      r, m = inp
      (_, (loss_sum, _, count)), g = grad_fn(p, xs[r], ys[r], m)
      u, s = optimizer.update(g, s, p)
      return (optax.apply_updates(p, u), s), (loss_sum, count)

    (params, opt_state), (ls, cs) = jax.lax.scan(step, (params, opt_state), (rows, mask))
    return params, opt_state, jnp.sum(ls) / jnp.maximum(jnp.sum(cs), 1.0)

  xs, ys = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  plan = [nb] * epochs if epochs is not None else [nb] * (steps // nb) + (
      [steps % nb] if steps % nb else [])
  losses = []
  for e, num_batches in enumerate(plan):
    params, opt_state, loss = epoch(params, opt_state, xs, ys, jax.random.fold_in(k_data, e),
                                    num_batches)
    losses.append(float(loss))
  return PretrainResult(params, np.asarray(losses))


def save_encoder(path, params: Any) -> Path:
  """Writes ``params`` as one Flax msgpack file (``flax.serialization``; readable with
  ``flax.serialization.msgpack_restore(open(path, "rb").read())``). Written to a temporary file
  and renamed, so an interrupted save never leaves a truncated checkpoint at ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  state = serialization.to_state_dict(jax.device_get(params))
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(serialization.msgpack_serialize(state))
  os.replace(tmp, path)
  return path


def load_encoder(path, like: Any = None) -> Any:
  """Reads params written by :func:`save_encoder`.

  Args:
    path: the checkpoint file.
    like: optional params of the expected structure (e.g. a fresh ``init``); the checkpoint must
      then have the same tree and leaf shapes, and is returned with ``like``'s structure.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not a valid checkpoint, or does not match ``like`` (the message names
      ``path`` and the first mismatching leaf).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no encoder checkpoint at {path}")
  try:
    state = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:
    raise ValueError(f"{path} is not a valid encoder checkpoint (corrupt or truncated msgpack: "
                     f"{type(e).__name__}: {e})") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path} is not an encoder checkpoint (top level is "
                     f"{type(state).__name__}, expected a dict of params)")
  if like is None:
    return jax.tree.map(jnp.asarray, state)
  want = dict(zip(param_paths(serialization.to_state_dict(like)),
                  jax.tree.leaves(serialization.to_state_dict(like))))
  got = dict(zip(param_paths(state), jax.tree.leaves(state)))
  if set(want) != set(got):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    raise ValueError(f"{path} does not match the expected params: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for k, v in want.items():
    if tuple(np.shape(got[k])) != tuple(np.shape(v)):
      raise ValueError(f"{path}: param {k!r} has shape {tuple(np.shape(got[k]))}, expected "
                       f"{tuple(np.shape(v))}")
  return jax.tree.map(jnp.asarray, serialization.from_state_dict(like, state))
