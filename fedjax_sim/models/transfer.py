"""Transfer learning: a frozen pretrained encoder plus a trainable head.

Freeze by splitting, not by zeroing: the encoder's params are closed over (shared by every client,
never stacked per client, never in the client delta or the server state); only the head's params
are the federated model. Because the encoder is frozen, its features can be computed once for
every client's examples (:func:`feature_cache`) and head training then runs on the cached
features with the plain engine; :func:`frozen_encoder_model` runs the encoder inside every local
step instead, which gives the same head (tested) at a much higher cost.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.data.federated import FederatedData
from fedjax_sim.evaluation import pad_batches
from fedjax_sim.models.core import Model, from_flax, softmax_cross_entropy

EncoderApply = Callable[[Any, jax.Array], jax.Array]


def feature_shape(encoder_apply: EncoderApply, encoder_params: Any,
                  input_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of one example's features (``encoder_apply(params, x [B, ...]) -> [B, ...]``)."""
  out = jax.eval_shape(encoder_apply, encoder_params,
                       jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
  return tuple(out.shape[1:])


def frozen_encoder_model(encoder_apply: EncoderApply, encoder_params: Any, head,
                         input_shape: tuple[int, ...], num_classes: int,
                         name: str = "frozen_encoder+head") -> Model:
  """A :class:`Model` whose params are the head's only; the encoder runs frozen inside ``apply``.

  Args:
    encoder_apply: ``(encoder_params, x [B, *input_shape]) -> features [B, ...]``.
    encoder_params: pretrained encoder params (frozen: no gradient flows into them).
    head: a Flax linen module mapping features ``[B, ...]`` to logits ``[B, num_classes]``.
  """
  feats = feature_shape(encoder_apply, encoder_params, input_shape)
  head_model = from_flax(head, feats, num_classes)
  frozen = jax.tree.map(jnp.asarray, encoder_params)

  def apply(head_params, x):
    f = jax.lax.stop_gradient(encoder_apply(frozen, x))
    return head_model.apply(head_params, f)

  return Model(head_model.init, apply, tuple(input_shape), num_classes, softmax_cross_entropy, name)


def head_model(encoder_apply: EncoderApply, encoder_params: Any, head, input_shape, num_classes,
               name: str = "head") -> Model:
  """The head alone as a :class:`Model` on the encoder's features (for cached features)."""
  return from_flax(head, feature_shape(encoder_apply, encoder_params, input_shape), num_classes,
                   name=name)


def encode(encoder_apply: EncoderApply, encoder_params: Any, x: np.ndarray,
           batch_size: int = 512) -> np.ndarray:
  """Features of every row of ``x [N, ...]``: one jitted pass in batches (``lax.map``)."""
  f = jax.jit(lambda p, xs: jax.lax.map(lambda xb: encoder_apply(p, xb),
                                        pad_batches(xs, batch_size)[0]))
  out = np.asarray(f(encoder_params, jnp.asarray(x)))
  return out.reshape((-1,) + out.shape[2:])[:x.shape[0]]


def feature_cache(encoder_apply: EncoderApply, encoder_params: Any, data, batch_size: int = 512):
  """The same clients (or the same centralized arrays) with ``x`` replaced by frozen-encoder
  features, computed once. Accepts a FederatedData or a dict with ``x`` and ``y``."""
  if isinstance(data, FederatedData):
    arrays = dict(data.arrays)
    arrays["x"] = encode(encoder_apply, encoder_params, arrays["x"], batch_size)
    return FederatedData(arrays, data.offsets, data.client_ids, data.num_classes)
  out = dict(data)
  out["x"] = encode(encoder_apply, encoder_params, np.asarray(data["x"]), batch_size)
  return out
