"""What a model costs: its parameters and bytes on the wire per round (:func:`communication`),
and the FLOPs and bytes of one forward pass (:func:`cost`, XLA's cost analysis).

XLA executes pruned matrices as dense ones, so :func:`count_flops` of a pruned model
(:mod:`fedjax_sim.models.pruning`) equals the dense count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.models.core import Model

PyTree = Any


def num_params(params: Any) -> int:
  """Number of scalars in ``params`` (what one client downloads and uploads per round)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def num_bytes(params: Any) -> int:
  """Bytes of ``params`` at their own dtypes."""
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def communication(params: Any, cohort_size: int = 1, rounds: int = 1) -> dict[str, int]:
  """What the federated params cost on the wire (FedAvg without compression).

  Every sampled client downloads the global params and uploads a delta of the same shape, so per
  client per round it sends ``num_params(params)`` scalars (``bytes_up``) and receives as many.
  For a frozen-encoder model ``params`` is the head alone; pass the full model's params for the
  from-scratch comparison.

  Returns:
    ``params_per_client_round``, ``bytes_up_per_client_round``,
    ``bytes_down_per_client_round``, and ``bytes_total`` over ``cohort_size`` clients and
    ``rounds`` rounds (up + down).
  """
  n, b = num_params(params), num_bytes(params)
  return {"params_per_client_round": n, "bytes_up_per_client_round": b,
          "bytes_down_per_client_round": b, "bytes_total": 2 * b * int(cohort_size) * int(rounds)}


def cost(model: Model, batch: Any, params: PyTree = None) -> dict[str, float]:
  """XLA's cost analysis of one compiled forward pass ``model.apply(params, x)``.

  Args:
    model: the model.
    batch: ``x [B, *input_shape]`` (an array, a ``{"x": ...}`` dict, or a
      ``jax.ShapeDtypeStruct``); only its shape and dtype matter.
    params: params to analyse (default: the shapes of ``model.init``); only shapes and dtypes
      matter, so pruning does not change the count.

  Returns:
    ``{"flops": ..., "bytes_accessed": ...}`` as floats (NaN if the backend reports nothing).
  """
  x = batch["x"] if isinstance(batch, dict) else batch
  x = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x.dtype))
  if params is None:
    params = jax.eval_shape(model.init, jax.random.key(0))
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p.dtype)),
                        params)
  analysis = jax.jit(model.apply).lower(params, x).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):   # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", float("nan"))),
          "bytes_accessed": float(analysis.get("bytes accessed", float("nan")))}


def count_flops(model: Model, batch: Any, params: PyTree = None) -> float:
  """FLOPs of one forward pass on ``batch`` (XLA cost analysis; see :func:`cost`)."""
  return cost(model, batch, params)["flops"]
