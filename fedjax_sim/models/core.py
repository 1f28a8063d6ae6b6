"""The model interface the simulator trains: pure ``init`` / ``apply`` functions over a params pytree.

Any Flax linen module becomes a :class:`Model` with :func:`from_flax`; an NNX module with
:func:`from_nnx` (split once at the boundary, merged inside the compiled function, so no Python
graph traversal runs per step). Models see a batch ``x: [B, ...]`` of one client; the library
vmaps over clients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Params = Any


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy: ``logits [B, K]``, integer ``labels [B]`` -> ``[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A classifier as pure functions.

  Attributes:
    init: ``key -> params``.
    apply: ``(params, x [B, *input_shape]) -> logits [B, num_classes]``.
    input_shape: shape of one example (without the batch axis).
    num_classes: number of output classes.
    loss: per-example loss ``(logits [B, K], y [B]) -> [B]``; softmax cross-entropy by default.
    name: for reports.
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  num_classes: int
  loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy
  name: str = "model"

  def batch_loss(self, params, x, y, mask):
    """Masked mean loss over a batch, plus ``(loss_sum, correct, count)`` for metrics.

    ``x [B, ...]``, ``y [B]``, ``mask [B]`` bool. An all-masked batch has loss 0 (and zero grads).
    """
    logits = self.apply(params, x)
    m = mask.astype(logits.dtype)
    per_ex = self.loss(logits, y) * m
    count = jnp.sum(m)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * m)
    return jnp.sum(per_ex) / jnp.maximum(count, 1.0), (jnp.sum(per_ex), correct, count)

  def check_input(self, feature_shape: tuple[int, ...], where: str = "data"):
    if tuple(feature_shape) != tuple(self.input_shape):
      raise ValueError(f"{where}: examples have shape {tuple(feature_shape)} but model "
                       f"{self.name!r} expects {tuple(self.input_shape)}")


def from_flax(module, input_shape: tuple[int, ...], num_classes: int, name: str | None = None,
              loss=softmax_cross_entropy) -> Model:
  """Wraps a Flax linen module whose ``__call__(x [B, ...])`` returns logits ``[B, K]``.

  The module must be pure (no mutable collections such as batch statistics).
  """
  input_shape = tuple(int(d) for d in input_shape)

  def init(key):
    return module.init(key, jnp.zeros((1,) + input_shape, jnp.float32))["params"]

  def apply(params, x):
    return module.apply({"params": params}, x)

  return Model(init, apply, input_shape, int(num_classes), loss,
               name or type(module).__name__)


def from_nnx(make_module: Callable[[Any], Any], input_shape: tuple[int, ...], num_classes: int,
             name: str | None = None, loss=softmax_cross_entropy) -> Model:
  """Wraps a Flax NNX module. ``make_module(rngs: nnx.Rngs)`` builds it.

  The module is split into ``(graphdef, state)`` once; ``params`` is the state pytree and
  ``apply`` merges it back inside the traced function.
  """
  from flax import nnx

  graphdef, _ = nnx.split(make_module(nnx.Rngs(0)))

  def init(key):
    return nnx.split(make_module(nnx.Rngs(key)))[1]

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return Model(init, apply, tuple(input_shape), int(num_classes), loss,
               name or "nnx_model")
