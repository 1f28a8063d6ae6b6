"""Partial unfreezing: chosen encoder leaves (by ``/``-joined path) become federated params."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_sim.models.core import Model
from fedjax_sim.transfer.encoders import EncoderApply, as_head_model, checked_feature_shape


def param_paths(params: Any) -> list[str]:
  """The ``/``-joined paths of a pytree's leaves, e.g. ``"layer_5/query/kernel"``."""
  return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts)


def split_encoder(encoder_params: Any, trainable: Callable[[str], bool]) -> dict[str, Any]:
  """The leaves whose path satisfies ``trainable``, as a flat dict ``{path: array}``.

  Raises ValueError (listing some of the available paths) if the predicate selects nothing.
  """
  leaves = jax.tree_util.tree_flatten_with_path(encoder_params)[0]
  picked = {_path_str(p): jnp.asarray(v) for p, v in leaves if trainable(_path_str(p))}
  if not picked:
    paths = [_path_str(p) for p, _ in leaves]
    shown = ", ".join(repr(p) for p in paths[:12])
    raise ValueError(f"the trainable predicate matches none of the encoder's {len(paths)} "
                     f"parameter paths; some available paths: {shown}"
                     + (", ..." if len(paths) > 12 else ""))
  return picked


def merge_encoder(encoder_params: Any, trainable_params: dict[str, Any]) -> Any:
  """The full encoder params with the leaves named in ``trainable_params`` (``{path: array}``,
  e.g. a trained ``params["encoder_trainable"]``) replaced. Unknown paths raise ValueError."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(encoder_params)
  paths = [_path_str(p) for p, _ in leaves]
  unknown = sorted(set(trainable_params) - set(paths))
  if unknown:
    raise ValueError(f"trainable params name paths the encoder does not have: {unknown[:5]}")
  return treedef.unflatten([trainable_params.get(k, v) for k, (_, v) in zip(paths, leaves)])


def partially_frozen_model(encoder_apply: EncoderApply, encoder_params: Any, head,
                           input_shape: tuple[int, ...], num_classes: int,
                           trainable: Callable[[str], bool],
                           name: str = "partially_frozen_encoder+head") -> Model:
  """Encoder + head where the encoder leaves selected by ``trainable`` are federated too.

  The model's params are ``{"head": head_params, "encoder_trainable": {path: array}}``: the
  selected encoder leaves (e.g. ``trainable=lambda path: "layer_5" in path`` for MiniLM's last
  block) start from their pretrained values and are trained, averaged and sent like the head;
  every other encoder leaf stays frozen, closed over and shared (not per client, not in the
  delta). ``apply`` merges the two before running the encoder, so gradients reach exactly the
  selected leaves. Recover the fine-tuned encoder with
  ``merge_encoder(encoder_params, params["encoder_trainable"])``.

  Args:
    encoder_apply: ``(encoder_params, x [B, *input_shape]) -> features [B, ...]``.
    encoder_params: pretrained encoder params.
    head: a Flax module (features -> logits ``[B, num_classes]``) or a :class:`Model` on the
      encoder's feature shape.
    trainable: predicate over the ``/``-joined leaf paths (see :func:`param_paths`).

  Raises:
    ValueError: the predicate selects nothing, or the head does not fit the encoder's output.
  """
  feats = checked_feature_shape(encoder_apply, encoder_params, input_shape)
  hm = as_head_model(head, feats, num_classes, "head")
  frozen = jax.tree.map(jnp.asarray, encoder_params)
  start = split_encoder(frozen, trainable)

  def init(key):
    return {"head": hm.init(key), "encoder_trainable": dict(start)}

  def apply(params, x):
    enc = merge_encoder(frozen, params["encoder_trainable"])
    return hm.apply(params["head"], encoder_apply(enc, x))

  return Model(init, apply, tuple(input_shape), num_classes, hm.loss, name)
