"""Reference models of the FL literature, as Flax linen modules wrapped into :class:`Model`."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.models.core import Model, from_flax, huber, mae, mse


class LogisticRegressionModule(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLPModule(nn.Module):
  hidden: tuple[int, ...]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class CNNModule(nn.Module):
  """McMahan et al. 2017 CNN: conv5x5(32)-pool-conv5x5(64)-pool-dense(512)-dense(K)."""
  image_shape: tuple[int, int, int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0],) + tuple(self.image_shape))
    for ch in (32, 64):
      x = nn.relu(nn.Conv(ch, (5, 5), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(512)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class CharLSTMModule(nn.Module):
  """LEAF's Shakespeare model: embedding, stacked LSTMs, dense logits from the last time step.

  ``x [B, T]`` character indices (any numeric dtype; cast to int32) -> logits ``[B, vocab_size]``.
  """
  vocab_size: int
  embed: int = 8
  hidden: int = 256
  layers: int = 2

  @nn.compact
  def __call__(self, x):
    h = nn.Embed(self.vocab_size, self.embed)(x.astype(jnp.int32))   # [B, T, embed]
    for _ in range(self.layers):
      h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)   # [B, T, hidden], a lax.scan over T
    return nn.Dense(self.vocab_size)(h[:, -1])


def logistic_regression(input_dim: int = 784, num_classes: int = 10) -> Model:
  """Multinomial logistic regression ``input_dim -> num_classes``."""
  return from_flax(LogisticRegressionModule(num_classes), (input_dim,), num_classes,
                   name="logistic_regression")


def mlp(input_dim: int = 784, hidden: tuple[int, ...] = (200, 200), num_classes: int = 10) -> Model:
  """MLP with ReLU; the defaults are the "2NN" of McMahan et al. 2017 (199,210 parameters)."""
  return from_flax(MLPModule(tuple(hidden), num_classes), (input_dim,), num_classes,
                   name="mlp_" + "_".join(map(str, hidden)))


def mlp_2nn(input_dim: int = 784, num_classes: int = 10) -> Model:
  """The 2NN of McMahan et al. 2017: 784-200-200-10."""
  return mlp(input_dim, (200, 200), num_classes)


def cnn(input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10) -> Model:
  """The CNN of McMahan et al. 2017. Accepts images ``[H, W, C]`` or flat vectors of H*W*C
  (given as ``input_shape=(784,)`` with ``image_shape`` inferred as square, one channel)."""
  if len(input_shape) == 1:
    side = int(round(math.sqrt(input_shape[0])))
    if side * side != input_shape[0]:
      raise ValueError(f"cannot view flat input of size {input_shape[0]} as a square image")
    image_shape = (side, side, 1)
  elif len(input_shape) == 3:
    image_shape = tuple(input_shape)
  else:
    raise ValueError(f"cnn input_shape must be (H, W, C) or (H*W,), got {input_shape}")
  return from_flax(CNNModule(image_shape, num_classes), tuple(input_shape), num_classes, name="cnn")


def char_lstm(vocab_size: int = 81, seq_len: int = 80, embed: int = 8, hidden: int = 256,
              layers: int = 2) -> Model:
  """LEAF's Shakespeare next-character model (``models/shakespeare/stacked_lstm.py``).

  Embedding of ``embed`` (8) dimensions, ``layers`` (2) LSTMs of ``hidden`` (256) units, a dense
  layer to ``vocab_size`` logits from the last time step; inputs are ``[seq_len]`` character
  indices per example. The defaults have 818,137 parameters (81 classes: LEAF's 80 characters
  plus :mod:`fedjax_sim.data.shakespeare`'s out-of-vocabulary index).
  """
  return from_flax(CharLSTMModule(int(vocab_size), int(embed), int(hidden), int(layers)),
                   (int(seq_len),), int(vocab_size), name="char_lstm")


def regression_mlp(input_dim: int = 10, hidden: tuple[int, ...] = (10,),
                   loss: str = "mse") -> Model:
  """A regression MLP ``input_dim -> hidden (ReLU) -> 1``; the default Dense(10, relu) ->
  Dense(1) with mean squared error is the FL illustration of the product's brief. ``loss``:
  ``"mse"``, ``"mae"`` or ``"huber"``. Targets ``y [B]`` are floats (``task="regression"``)."""
  losses = {"mse": mse, "mae": mae, "huber": huber}
  if loss not in losses:
    raise ValueError(f"regression_mlp loss must be one of {sorted(losses)}, got {loss!r}")
  return from_flax(MLPModule(tuple(hidden), 1), (input_dim,), 1, loss=losses[loss],
                   task="regression", name="regression_mlp_" + "_".join(map(str, hidden)))


MODELS = {"logistic_regression": logistic_regression, "mlp_2nn": mlp_2nn, "cnn": cnn,
          "char_lstm": char_lstm, "regression_mlp": regression_mlp}


def make(name: str, input_shape: tuple[int, ...], num_classes: int) -> Model:
  """Model by name for the CLI: ``logistic_regression``, ``mlp_2nn``, ``cnn``, ``char_lstm`` or
  ``regression_mlp`` (one output; ``num_classes`` is ignored)
  (``input_shape = (seq_len,)`` of character indices, ``num_classes`` = vocabulary size)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  if name == "cnn":
    return cnn(input_shape, num_classes)
  if name == "char_lstm":
    if len(input_shape) != 1:
      raise ValueError(f"char_lstm takes sequences of character indices [seq_len], got examples "
                       f"of shape {tuple(input_shape)}")
    return char_lstm(vocab_size=num_classes, seq_len=input_shape[0])
  if name == "regression_mlp":   # one output per example, whatever num_classes says
    if len(input_shape) != 1:
      raise ValueError(f"regression_mlp takes flat feature vectors, got examples of shape "
                       f"{tuple(input_shape)}")
    return regression_mlp(input_shape[0])
  if len(input_shape) != 1:
    raise ValueError(f"model {name!r} takes flat feature vectors, got examples of shape "
                     f"{tuple(input_shape)}; flatten them or use 'cnn'")
  return MODELS[name](input_shape[0], num_classes=num_classes)
