"""Transfer learning: a frozen pretrained encoder plus a trainable head.

Freeze by splitting, not by zeroing: the encoder's params are closed over (shared by every client,
never stacked per client, never in the client delta or the server state); only the head's params
are the federated model. Because the encoder is frozen, its features can be computed once for
every client's examples (:func:`feature_cache`) and head training then runs on the cached
features with the plain engine; :func:`frozen_encoder_model` runs the encoder inside every local
step instead, which gives the same head (tested) at a much higher cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from fedjax_sim import evaluation
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
  feats = _checked_feature_shape(encoder_apply, encoder_params, input_shape)
  head_model = _head_model(head, feats, num_classes, "head")
  frozen = jax.tree.map(jnp.asarray, encoder_params)

  def apply(head_params, x):
    f = jax.lax.stop_gradient(encoder_apply(frozen, x))
    return head_model.apply(head_params, f)

  return Model(head_model.init, apply, tuple(input_shape), num_classes, softmax_cross_entropy, name)


def head_model(encoder_apply: EncoderApply, encoder_params: Any, head, input_shape, num_classes,
               name: str = "head") -> Model:
  """The head alone as a :class:`Model` on the encoder's features (for cached features)."""
  return _head_model(head, _checked_feature_shape(encoder_apply, encoder_params, input_shape),
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


# --- encoders cut from a trained classifier ---------------------------------------------------

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


def _head_model(head, feats: tuple[int, ...], num_classes: int, name: str) -> Model:
  """A head given as a Flax module (built on ``feats``) or as a :class:`Model` (checked)."""
  if isinstance(head, Model):
    if tuple(head.input_shape) != tuple(feats):
      raise ValueError(f"the encoder outputs features of shape {tuple(feats)} per example but the "
                       f"head {head.name!r} expects inputs of shape {tuple(head.input_shape)}")
    if head.num_classes != num_classes:
      raise ValueError(f"the head has {head.num_classes} classes, expected {num_classes}")
    return head
  return from_flax(head, feats, num_classes, name=name)


def _checked_feature_shape(encoder_apply, encoder_params, input_shape):
  try:
    return feature_shape(encoder_apply, encoder_params, input_shape)
  except Exception as e:   # shape errors inside a Flax module are long and far from the cause
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), encoder_params)
    raise ValueError(f"the encoder cannot run on examples of shape {tuple(input_shape)} with the "
                     f"given params ({type(e).__name__}: {e}). Param shapes: "
                     f"{str(shapes)[:400]}") from e


# --- partial unfreezing -----------------------------------------------------------------------

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
  feats = _checked_feature_shape(encoder_apply, encoder_params, input_shape)
  hm = _head_model(head, feats, num_classes, "head")
  frozen = jax.tree.map(jnp.asarray, encoder_params)
  start = split_encoder(frozen, trainable)

  def init(key):
    return {"head": hm.init(key), "encoder_trainable": dict(start)}

  def apply(params, x):
    enc = merge_encoder(frozen, params["encoder_trainable"])
    return hm.apply(params["head"], encoder_apply(enc, x))

  return Model(init, apply, tuple(input_shape), num_classes, hm.loss, name)


# --- communication accounting -----------------------------------------------------------------

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


# --- centralized pretraining and encoder checkpoints --------------------------------------------

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


# --- joint objective a * f_source + b * g_target ----------------------------------------------

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
      features and the source feature statistics (see :mod:`fedjax_sim.models.alignment`).
    c: its weight.
  """
  source_term: Callable[..., jax.Array] | None = None
  source_apply: Callable[..., jax.Array] | None = None
  a: float = 0.0
  b: float = 1.0
  align_term: Callable[..., jax.Array] | None = None
  c: float = 0.0

  def batch_loss(self, params, x, y, mask):
    loss, aux = super().batch_loss(params, x, y, mask)
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
      :func:`fedjax_sim.models.alignment.make_align`: CORAL or MMD against source feature
      moments); like ``a``, it only changes the target model through trainable encoder leaves.
  """
  if a < 0 or b < 0 or c < 0:
    raise ValueError(f"the loss weights must be >= 0, got a={a}, b={b}, c={c}")
  if c > 0 and align is None:
    raise ValueError("c > 0 needs an align function (see fedjax_sim.models.alignment.make_align)")
  sx, sy = np.asarray(source_data["x"]), np.asarray(source_data["y"])
  if sx.shape[1:] != tuple(input_shape) or sx.shape[0] != sy.shape[0] or sx.shape[0] == 0:
    raise ValueError(f"source_data: x has shape {sx.shape} and y {sy.shape}; expected "
                     f"[M, {', '.join(map(str, input_shape))}] and [M] with M > 0")
  if not np.issubdtype(sy.dtype, np.integer) or sy.min() < 0 or sy.max() >= num_source_classes:
    raise ValueError(f"source_data labels must be integers in [0, {num_source_classes})")
  feats = _checked_feature_shape(encoder_apply, encoder_params, input_shape)
  hm = _head_model(head, feats, num_classes, "head")
  sm = _head_model(source_head, feats, num_source_classes, "source_head")
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


# --- text features --------------------------------------------------------------------------------

def text_features(encoder, texts, max_tokens: int = 64, batch_size: int = 64,
                  buckets: tuple[int, ...] = (16, 32, 64)) -> np.ndarray:
  """Sentence embeddings ``[N, hidden]`` of ``texts`` with a :class:`~fedjax_sim.models.minilm.
  MiniLMEncoder` (pretrained, or with randomly initialised params), for caching.

  Texts are truncated to ``max_tokens`` tokens, sorted by length and run in batches of
  ``batch_size`` padded to the smallest bucket length that fits (so the compiled encoder is
  built at most ``len(buckets)`` times and short texts do not pay for long ones). Results are in
  the original order; padding never changes an embedding (masked mean pooling).
  """
  texts = list(texts)
  if not texts:
    return np.zeros((0, encoder.module.cfg.hidden), np.float32)
  ids, mask = encoder.tokenize(texts, truncate=True)
  if ids.shape[1] > max_tokens:   # keep [SEP] last, as tokenize does
    lengths = mask.sum(1)
    cut = lengths > max_tokens
    last = ids[np.arange(len(ids)), lengths - 1]
    ids, mask = ids[:, :max_tokens].copy(), mask[:, :max_tokens].copy()
    ids[cut, max_tokens - 1] = last[cut]
  lengths = mask.sum(1)
  bks = sorted(set(min(b, ids.shape[1]) for b in buckets) | {ids.shape[1]})
  order = np.argsort(lengths, kind="stable")
  apply = jax.jit(encoder.module.apply)
  out = np.zeros((len(texts), encoder.module.cfg.hidden), np.float32)
  for s in range(0, len(texts), batch_size):
    rows = order[s:s + batch_size]
    t = next(b for b in bks if b >= lengths[rows].max())
    bi = np.zeros((batch_size, t), np.int32)
    bm = np.zeros((batch_size, t), bool)
    bm[:, 0] = True   # padding rows: one token, discarded below
    bi[:len(rows)], bm[:len(rows)] = ids[rows, :t], mask[rows, :t]
    out[rows] = np.asarray(apply({"params": encoder.params}, bi, bm))[:len(rows)]
  return out
