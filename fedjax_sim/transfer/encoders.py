"""Frozen pretrained encoders and trainable heads; features cached once per example.

Freeze by splitting, not by zeroing: the encoder's params are closed over (shared by every client,
never stacked per client, never in the client delta or the server state); only the head's params
are the federated model. Because the encoder is frozen, its features can be computed once for
every client's examples (:func:`feature_cache`) and head training then runs on the cached
features with the plain engine; :func:`frozen_encoder_model` runs the encoder inside every local
step instead, which gives the same head (tested) at a much higher cost. :func:`flax_encoder` cuts
the encoder out of a trained Flax classifier.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
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
    head: a Flax linen module mapping features ``[B, ...]`` to logits ``[B, num_classes]``, or a
      :class:`Model` on the encoder's feature shape (a mismatch raises ValueError).
  """
  feats = checked_feature_shape(encoder_apply, encoder_params, input_shape)
  hm = as_head_model(head, feats, num_classes, "head")
  frozen = jax.tree.map(jnp.asarray, encoder_params)

  def apply(head_params, x):
    f = jax.lax.stop_gradient(encoder_apply(frozen, x))
    return hm.apply(head_params, f)

  return Model(hm.init, apply, tuple(input_shape), num_classes, softmax_cross_entropy, name)


def head_model(encoder_apply: EncoderApply, encoder_params: Any, head, input_shape, num_classes,
               name: str = "head") -> Model:
  """The head alone as a :class:`Model` on the encoder's features (for cached features)."""
  return as_head_model(head, checked_feature_shape(encoder_apply, encoder_params, input_shape),
                     num_classes, name)


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


def flax_encoder(module, params: Any, head_layer: str) -> tuple[EncoderApply, Any]:
  """The feature extractor of a trained Flax classifier: everything before its last layer.

  ``module`` must call the submodule named ``head_layer`` last (e.g. ``"Dense_1"``, the output
  layer of :class:`fedjax_sim.models.zoo.CNNModule`); the encoder returns that layer's input (the
  ReLU features of the 512-unit layer for the CNN). The call of ``head_layer`` is intercepted, so
  no copy of the architecture is needed and the encoder's params are the classifier's minus the
  head's.

  Returns:
    ``(encoder_apply, encoder_params)`` with ``encoder_apply(params, x [B, ...]) -> [B, ...]``.
  """
  if head_layer not in params:
    raise ValueError(f"no layer {head_layer!r} in the params (top-level layers: {sorted(params)})")

  def intercept(next_fun, args, kwargs, context):
    if context.module.name == head_layer and context.method_name == "__call__":
      return args[0]
    return next_fun(*args, **kwargs)

  def encoder_apply(p, x):
    with nn.intercept_methods(intercept):
      return module.apply({"params": p}, x)

  return encoder_apply, {k: v for k, v in params.items() if k != head_layer}


def as_head_model(head, feats: tuple[int, ...], num_classes: int, name: str) -> Model:
  """A head given as a Flax module (built on ``feats``) or as a :class:`Model` (checked)."""
  if isinstance(head, Model):
    if tuple(head.input_shape) != tuple(feats):
      raise ValueError(f"the encoder outputs features of shape {tuple(feats)} per example but the "
                       f"head {head.name!r} expects inputs of shape {tuple(head.input_shape)}")
    if head.num_classes != num_classes:
      raise ValueError(f"the head has {head.num_classes} classes, expected {num_classes}")
    return head
  return from_flax(head, feats, num_classes, name=name)


def checked_feature_shape(encoder_apply: EncoderApply, encoder_params: Any,
                          input_shape: tuple[int, ...]) -> tuple[int, ...]:
  """:func:`feature_shape`, with a ValueError naming the input shape and the param shapes when
  the encoder cannot run on such examples."""
  try:
    return feature_shape(encoder_apply, encoder_params, input_shape)
  except Exception as e:   # shape errors inside a Flax module are long and far from the cause
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), encoder_params)
    raise ValueError(f"the encoder cannot run on examples of shape {tuple(input_shape)} with the "
                     f"given params ({type(e).__name__}: {e}). Param shapes: "
                     f"{str(shapes)[:400]}") from e
