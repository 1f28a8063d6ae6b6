"""Mixed-precision compute for weak clients: bfloat16 forward/backward, float32 master params."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sim.models.core import Model

PyTree = Any


def _cast_floats(tree: PyTree, dtype) -> PyTree:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def bfloat16_compute(model: Model) -> Model:
  """``model`` computing in bfloat16: ``apply`` casts the float params and float inputs to
  bfloat16, runs the original ``apply`` and returns float32 logits (so the loss and its
  reductions are float32).

  ``init`` is unchanged: the master params stay float32, gradients flow back through the casts
  as float32, and the optimizer, the clients' updates and the server's average are all float32
  (mixed precision, as in Micikevicius et al. 2018, without loss scaling, which bfloat16's
  float32-sized exponent range makes unnecessary). Integer inputs (token ids) pass through.
  """
  inner = model.apply

  def apply(params, x):
    return inner(_cast_floats(params, jnp.bfloat16), _cast_floats(x, jnp.bfloat16)).astype(
        jnp.float32)

  apply_train = None
  if model.apply_train is not None:   # a stochastic model (Dropout) computes in bfloat16 too
    inner_train = model.apply_train

    def apply_train(params, x, key):
      return inner_train(_cast_floats(params, jnp.bfloat16), _cast_floats(x, jnp.bfloat16),
                         key).astype(jnp.float32)

  return dataclasses.replace(model, apply=apply, apply_train=apply_train,
                             name=f"{model.name}_bf16")
