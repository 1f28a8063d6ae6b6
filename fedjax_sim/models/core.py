"""The model interface the simulator trains: pure ``init`` / ``apply`` functions over a params pytree.

Any Flax linen module becomes a :class:`Model` with :func:`from_flax`; an NNX module with
:func:`from_nnx` (split once at the boundary, merged inside the compiled function, so no Python
graph traversal runs per step). Models see a batch ``x: [B, ...]`` of one client; the library
vmaps over clients.

A model is a classifier (integer labels ``y [B]``, ``num_classes`` logits) or a regression
model (``task="regression"``: float targets ``y [B]``, ``num_classes`` is then the number of
outputs per example, 1; losses :func:`mse`, :func:`mae`, :func:`huber`). A stochastic model
(Dropout) has an ``apply_train(params, x, key)`` used in local training with the per-step key
the client program receives; evaluation always uses the deterministic ``apply``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Params = Any

TASKS = ("classification", "regression")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy: ``logits [B, K]``, integer ``labels [B]`` -> ``[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _residual(pred: jax.Array, y: jax.Array) -> jax.Array:
  """``pred [B, 1]`` or ``[B]`` minus targets ``y [B]`` -> ``[B]`` (float32)."""
  return pred.reshape(pred.shape[0]).astype(jnp.float32) - y.astype(jnp.float32)


def mse(pred: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example squared error: ``pred [B, 1]`` (or ``[B]``), float ``y [B]`` -> ``[B]``."""
  return jnp.square(_residual(pred, y))


def mae(pred: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example absolute error ``|pred - y|`` -> ``[B]``."""
  return jnp.abs(_residual(pred, y))


def huber(pred: jax.Array, y: jax.Array, delta: float = 1.0) -> jax.Array:
  """Per-example Huber loss (``optax.huber_loss``: ``r^2 / 2`` for ``|r| <= delta``, else
  ``delta (|r| - delta / 2)``) -> ``[B]``."""
  return optax.huber_loss(_residual(pred, y), delta=delta)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A classifier or a regression model as pure functions.

  Attributes:
    init: ``key -> params``.
    apply: ``(params, x [B, *input_shape]) -> outputs [B, num_classes]`` (deterministic: used
      for evaluation, and for training when ``apply_train`` is None).
    input_shape: shape of one example (without the batch axis).
    num_classes: number of output classes; for a regression model, outputs per example (1).
    loss: per-example loss ``(outputs [B, K], y [B]) -> [B]``; softmax cross-entropy by default
      (:func:`mse` for regression models built by :func:`from_flax`).
    name: for reports.
    apply_train: optional stochastic forward pass ``(params, x, key) -> outputs`` used in local
      training (Dropout on); ``key`` is the per-step key of the client program.
    task: ``"classification"`` (integer labels) or ``"regression"`` (float targets).
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  num_classes: int
  loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy
  name: str = "model"
  apply_train: Callable[[Params, jax.Array, jax.Array], jax.Array] | None = None
  task: str = "classification"

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"Model {self.name!r}: task must be one of {TASKS}, got {self.task!r}")

  @property
  def is_regression(self) -> bool:
    return self.task == "regression"

  def forward(self, params, x, key=None):
    """``apply_train(params, x, key)`` when a key is given and the model is stochastic, else the
    deterministic ``apply(params, x)``."""
    if key is not None and self.apply_train is not None:
      return self.apply_train(params, x, key)
    return self.apply(params, x)

  def batch_loss(self, params, x, y, mask, key=None):
    """Masked mean loss over a batch, plus ``(loss_sum, correct, count)`` for metrics.

    ``x [B, ...]``, ``y [B]``, ``mask [B]`` bool; ``key``: the training step's key (a stochastic
    model's ``apply_train`` uses it; None, e.g. in evaluation, is deterministic). An all-masked
    batch has loss 0 (and zero grads). A regression model has no correct predictions: its
    ``correct`` is the masked sum of squared errors (so ``correct / count`` is the MSE whatever
    the training loss).
    """
    logits = self.forward(params, x, key)
    m = mask.astype(jnp.float32)
    per_ex = self.loss(logits, y).astype(jnp.float32) * m
    count = jnp.sum(m)
    if self.is_regression:
      correct = jnp.sum(mse(logits, y) * m)
    else:
      correct = jnp.sum((jnp.argmax(logits, -1) == y) * m)
    return jnp.sum(per_ex) / jnp.maximum(count, 1.0), (jnp.sum(per_ex), correct, count)

  def check_input(self, feature_shape: tuple[int, ...], where: str = "data"):
    if tuple(feature_shape) != tuple(self.input_shape):
      raise ValueError(f"{where}: examples have shape {tuple(feature_shape)} but model "
                       f"{self.name!r} expects {tuple(self.input_shape)}")


def label_dtype(model: Model):
  """The dtype labels are fed to ``model`` in: int32 class labels, or float32 regression
  targets."""
  return jnp.float32 if model.is_regression else jnp.int32


# Keyword arguments of a module's __call__ that switch training mode, with their (train, eval)
# values: the conventions of the Flax examples (`train`), of nn.Dropout (`deterministic`) and of
# Haiku/Keras users (`is_training`, `training`).
TRAIN_FLAGS = {"train": (True, False), "training": (True, False),
               "is_training": (True, False), "deterministic": (False, True)}

NORMALIZATION_HINT = ("fedjax_sim trains pure functions of the params: replace BatchNorm by "
                      "nn.GroupNorm or nn.LayerNorm (no running statistics), as FL papers do "
                      "for non-IID clients (Hsieh et al. 2020)")


def _train_flag(module) -> str | None:
  try:
    names = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return None
  return next((n for n in TRAIN_FLAGS if n in names), None)


def from_flax(module, input_shape: tuple[int, ...], num_classes: int, name: str | None = None,
              loss=None, *, task: str = "classification", train_kwargs: dict | None = None,
              eval_kwargs: dict | None = None,
              rng_collections: tuple[str, ...] = ("dropout",)) -> Model:
  """Wraps a Flax linen module whose ``__call__(x [B, ...])`` returns logits ``[B, K]`` (or, for
  ``task="regression"``, predictions ``[B, 1]``; ``loss`` then defaults to :func:`mse`).

  Stochastic layers (Dropout): training runs ``module.apply(..., **train_kwargs,
  rngs={collection: key})`` with each local step's key (one key per collection in
  ``rng_collections``, folded from it); evaluation runs ``**eval_kwargs`` with no RNG. As FedJAX's
  ``train_kwargs``/``eval_kwargs``; when neither is given they are found from ``__call__``'s
  signature: a ``train`` / ``training`` / ``is_training`` argument (True in training) or a
  ``deterministic`` one (False in training). A module with no such argument is deterministic.

  Raises ValueError if the module has mutable collections (BatchNorm's ``batch_stats``): use
  GroupNorm or LayerNorm; or if its evaluation pass needs an RNG.
  """
  input_shape = tuple(int(d) for d in input_shape)
  name = name or type(module).__name__
  if loss is None:
    loss = mse if task == "regression" else softmax_cross_entropy
  if train_kwargs is None and eval_kwargs is None:
    flag = _train_flag(module)
    train_kwargs, eval_kwargs = ({}, {}) if flag is None else (
        {flag: TRAIN_FLAGS[flag][0]}, {flag: TRAIN_FLAGS[flag][1]})
  train_kwargs, eval_kwargs = dict(train_kwargs or {}), dict(eval_kwargs or {})
  rng_collections = tuple(rng_collections)
  dummy = jnp.zeros((1,) + input_shape, jnp.float32)

  def init(key):
    return module.init(key, dummy, **eval_kwargs)["params"]

  def apply(params, x):
    return module.apply({"params": params}, x, **eval_kwargs)

  def apply_train(params, x, key):
    rngs = {c: jax.random.fold_in(key, i) for i, c in enumerate(rng_collections)}
    return module.apply({"params": params}, x, **train_kwargs, rngs=rngs)

  variables = jax.eval_shape(lambda k: module.init(k, dummy, **eval_kwargs), jax.random.key(0))
  mutable = sorted(set(variables) - {"params"})
  if mutable:
    raise ValueError(f"from_flax({name}): the module has mutable state {mutable} (e.g. "
                     f"BatchNorm's running statistics), which the simulator does not carry; "
                     f"{NORMALIZATION_HINT}")
  try:   # the evaluation pass must be deterministic: no RNG is given to it
    jax.eval_shape(apply, variables.get("params", {}), dummy)
  except Exception as e:   # noqa: BLE001 -- Flax raises its own error types
    if "rng" in str(e).lower() or "PRNG" in str(e):
      raise ValueError(
          f"from_flax({name}): the module's evaluation pass needs an RNG ({type(e).__name__}: "
          f"{e}). Give its stochastic layers a train/deterministic switch (e.g. "
          "`def __call__(self, x, train: bool = False)` with "
          "`nn.Dropout(rate, deterministic=not train)`), or pass train_kwargs/eval_kwargs") from e
    raise
  stochastic = train_kwargs != eval_kwargs
  return Model(init, apply, input_shape, int(num_classes), loss, name,
               apply_train if stochastic else None, task)


def from_nnx(make_module: Callable[[Any], Any], input_shape: tuple[int, ...], num_classes: int,
             name: str | None = None, loss=softmax_cross_entropy,
             task: str = "classification") -> Model:
  """Wraps a Flax NNX module. ``make_module(rngs: nnx.Rngs)`` builds it.

  The module is split into ``(graphdef, state)`` once; ``params`` is the state pytree and
  ``apply`` merges it back inside the traced function. Raises ValueError for batch statistics
  (``nnx.BatchNorm``): use ``nnx.GroupNorm`` or ``nnx.LayerNorm``.
  """
  from flax import nnx

  graphdef, state = nnx.split(make_module(nnx.Rngs(0)))
  stats = nnx.split(make_module(nnx.Rngs(0)), nnx.BatchStat, ...)[1]
  if jax.tree.leaves(stats):
    raise ValueError(f"from_nnx({name or 'nnx_model'}): the module has batch statistics "
                     f"(nnx.BatchNorm), which the simulator does not carry; {NORMALIZATION_HINT}")
  del state

  def init(key):
    return nnx.split(make_module(nnx.Rngs(key)))[1]

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return Model(init, apply, tuple(input_shape), int(num_classes), loss,
               name or "nnx_model", task=task)
