"""The joint objective ``a * f_source + b * g_target + c * align`` as a :class:`Model`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.models.core import Model
from fedjax_sim.transfer.encoders import EncoderApply, as_head_model, checked_feature_shape
from fedjax_sim.transfer.unfreeze import merge_encoder, split_encoder


@dataclasses.dataclass(frozen=True, eq=False)
class JointModel(Model):
  """A :class:`Model` whose training objective is ``b * target_loss + a * source_loss
  + c * align``.

  ``apply`` gives the target logits; ``batch_loss`` (what local training differentiates) adds
  ``a`` times the source-task loss of a source batch drawn by ``source_term``. Its metrics
  (``loss_sum``, ``correct``, ``count``) stay those of the target task, so evaluation and the
  history report target loss and accuracy. See :func:`joint_objective_model`.

  Attributes:
    source_term: ``(params, x [B, ...], y [B], mask [B]) -> scalar`` mean source loss of a
      source batch chosen from the target batch.
    source_apply: ``(params, x_source [B, ...]) -> source logits`` (for evaluation).
    a, b: weights of the source and target losses.
    align_term: ``(params, x [B, ...], mask [B]) -> scalar`` distance between the target batch's
      features and the source feature statistics (see :mod:`fedjax_sim.transfer.alignment`).
    c: its weight.
  """
  source_term: Callable[..., jax.Array] | None = None
  source_apply: Callable[..., jax.Array] | None = None
  a: float = 0.0
  b: float = 1.0
  align_term: Callable[..., jax.Array] | None = None
  c: float = 0.0

  def batch_loss(self, params, x, y, mask, key=None):
    loss, aux = super().batch_loss(params, x, y, mask, key)
    obj = self.b * loss
    if self.a != 0 and self.source_term is not None:
      # An all-masked (padding) step keeps loss 0 and zero gradients, as for any Model.
      nonempty = (aux[2] > 0).astype(loss.dtype)
      obj = obj + self.a * nonempty * self.source_term(params, x, y, mask)
    if self.c != 0 and self.align_term is not None:
      nonempty = (aux[2] > 0).astype(loss.dtype)
      obj = obj + self.c * nonempty * self.align_term(params, x, mask)
    return obj, aux


def _batch_hash(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
  """A uint32 fingerprint of the unmasked examples of a batch (order-independent)."""
  flat = x.reshape(x.shape[0], -1)[:, :64]
  bits = jax.lax.bitcast_convert_type(flat.astype(jnp.float32), jnp.uint32)
  mult = (jnp.arange(bits.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761)
          + jnp.uint32(1))[None, :]
  row = jnp.sum(bits * mult, axis=1) + y.astype(jnp.uint32) * jnp.uint32(40503)
  return jnp.sum(jnp.where(mask, row, jnp.uint32(0)), dtype=jnp.uint32)


def joint_objective_model(encoder_apply: EncoderApply, encoder_params: Any, head, source_head,
                          input_shape: tuple[int, ...], num_classes: int, num_source_classes: int,
                          source_data: dict, *, a: float = 0.0, b: float = 1.0,
                          trainable: Callable[[str], bool] | None = None,
                          source_batch_size: int = 32, seed: int = 0,
                          c: float = 0.0, align: Callable[[jax.Array, jax.Array], jax.Array]
                          | None = None,
                          name: str = "joint_source+target") -> JointModel:
  """Encoder + target head + source head, trained on ``b * g_target + a * f_source + c * align``.

  Design (no change to the client loop): the local objective is the model's ``batch_loss``, so
  the source term lives in the model (:class:`JointModel`). Every client shares the same small
  *public* source set ``source_data`` (closed over, like the frozen encoder: keep it small, a few
  thousand examples at most). At each local step the source batch is drawn deterministically
  from the target batch itself: ``source_batch_size`` rows chosen with a PRNG key folded from
  ``seed`` and a hash of the target batch's unmasked examples. Different steps and clients
  therefore see different source batches, the draw needs no step counter or extra state, and the
  same target batch always gets the same source batch, so runs are reproducible and the
  vectorized engine equals the sequential reference.

  The params are ``{"head", "source_head"}`` plus ``"encoder_trainable"`` (see
  :func:`partially_frozen_model`) when ``trainable`` selects encoder leaves. With the encoder fully
  frozen the two heads do not interact and ``a`` only trains the source head; ``a`` shapes the
  target model through the shared trainable encoder leaves. ``a = 0, b = 1`` (the default) is
  plain training of the target task (the source term is then not even computed); the source
  head is still sent each round.

  Args:
    head / source_head: Flax modules (or :class:`Model`) from features to target / source logits.
    num_source_classes: classes of the source task.
    source_data: dict with ``x [M, *input_shape]`` and integer ``y [M]`` in
      ``[0, num_source_classes)``.
    a, b: non-negative weights of the source and target losses.
    trainable: optional predicate over encoder leaf paths that become federated params.
    source_batch_size: source examples per local step.
    c, align: weight and function ``(target features [B, D], mask [B]) -> scalar`` of a domain
      alignment term on the encoder's features of the target batch (e.g.
      :func:`fedjax_sim.transfer.alignment.make_align`: CORAL or MMD against source feature
      moments); like ``a``, it only changes the target model through trainable encoder leaves.
  """
  if a < 0 or b < 0 or c < 0:
    raise ValueError(f"the loss weights must be >= 0, got a={a}, b={b}, c={c}")
  if c > 0 and align is None:
    raise ValueError("c > 0 needs an align function (see fedjax_sim.transfer.alignment.make_align)")
  sx, sy = np.asarray(source_data["x"]), np.asarray(source_data["y"])
  if sx.shape[1:] != tuple(input_shape) or sx.shape[0] != sy.shape[0] or sx.shape[0] == 0:
    raise ValueError(f"source_data: x has shape {sx.shape} and y {sy.shape}; expected "
                     f"[M, {', '.join(map(str, input_shape))}] and [M] with M > 0")
  if not np.issubdtype(sy.dtype, np.integer) or sy.min() < 0 or sy.max() >= num_source_classes:
    raise ValueError(f"source_data labels must be integers in [0, {num_source_classes})")
  feats = checked_feature_shape(encoder_apply, encoder_params, input_shape)
  hm = as_head_model(head, feats, num_classes, "head")
  sm = as_head_model(source_head, feats, num_source_classes, "source_head")
  frozen = jax.tree.map(jnp.asarray, encoder_params)
  start = split_encoder(frozen, trainable) if trainable is not None else None
  src_x, src_y = jnp.asarray(sx), jnp.asarray(sy, jnp.int32)
  base_key = jax.random.key(seed)

  def encoder(params, x):
    if start is None:
      return jax.lax.stop_gradient(encoder_apply(frozen, x))
    return encoder_apply(merge_encoder(frozen, params["encoder_trainable"]), x)

  def init(key):
    k_head, k_src = jax.random.split(key)
    p = {"head": hm.init(k_head), "source_head": sm.init(k_src)}
    if start is not None:
      p["encoder_trainable"] = dict(start)
    return p

  def apply(params, x):
    return hm.apply(params["head"], encoder(params, x))

  def source_apply(params, x):
    return sm.apply(params["source_head"], encoder(params, x))

  def source_term(params, x, y, mask):
    k = jax.random.fold_in(base_key, _batch_hash(x, y, mask))
    idx = jax.random.randint(k, (source_batch_size,), 0, src_x.shape[0])
    return jnp.mean(sm.loss(source_apply(params, src_x[idx]), src_y[idx]))

  def align_term(params, x, mask):
    f = encoder(params, x)
    return align(f.reshape(f.shape[0], -1), mask)

  return JointModel(init, apply, tuple(input_shape), num_classes, hm.loss, name,
                    source_term=source_term, source_apply=source_apply, a=float(a), b=float(b),
                    align_term=align_term if align is not None else None, c=float(c))
