"""What a model costs: FLOPs and bytes of one forward pass (XLA's cost analysis).

XLA executes pruned matrices as dense ones, so :func:`count_flops` of a pruned model
(:mod:`fedjax_sim.models.pruning`) equals the dense count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sim.models.core import Model

PyTree = Any


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
