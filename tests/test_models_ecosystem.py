"""Models a researcher brings: stochastic layers (Dropout), mutable state (rejected), regression."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import testing


class DropoutMLP(nn.Module):
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(4)(x)


def dropout_model(**kw):
  return fs.models.from_flax(DropoutMLP(), (8,), 4, **kw)


def test_dropout_trains_and_equals_sequential_reference(ragged_data):
  model = dropout_model()
  assert model.apply_train is not None
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=6, seed=1, chunk_size=4,
               progress=False)
  ref, hist = testing.sequential_run(algo, model, ragged_data, rounds=3, cohort_size=6, seed=1)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)
  np.testing.assert_allclose(res.history["train_loss"], [h["train_loss"] for h in hist],
                             rtol=1e-5)
  # dropout is really on in training: the same module with dropout switched off trains otherwise
  plain = dropout_model(train_kwargs={}, eval_kwargs={})
  assert plain.apply_train is None
  res_plain = fs.run(algo, plain, ragged_data, rounds=3, cohort_size=6, seed=1, chunk_size=4,
                     progress=False)
  assert fs.tree.max_abs_diff(res.params, res_plain.params) > 1e-4


def test_dropout_masks_follow_the_step_key():
  model = dropout_model()
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (32, 8))
  a = model.apply_train(params, x, jax.random.key(2))
  b = model.apply_train(params, x, jax.random.key(3))
  assert not np.allclose(a, b)                                     # two keys, two masks
  np.testing.assert_array_equal(a, model.apply_train(params, x, jax.random.key(2)))
  # evaluation is deterministic: the eval pass, with no RNG, is Dropout off
  np.testing.assert_array_equal(model.apply(params, x), DropoutMLP().apply({"params": params}, x))
  ev = fs.evaluation.make_evaluate(model, batch_size=10)
  y = jnp.zeros(32, jnp.int32)
  assert ev(params, x, y)["loss"] == ev(params, x, y)["loss"]


def test_dropout_two_seeds_differ(ragged_data):
  model = dropout_model()
  init = model.init(jax.random.key(0))
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  kw = dict(rounds=1, cohort_size=12, init_params=init, progress=False)
  a = fs.run(algo, model, ragged_data, seed=1, **kw).params
  b = fs.run(algo, model, ragged_data, seed=2, **kw).params
  assert fs.tree.max_abs_diff(a, b) > 1e-5


class AlwaysDropout(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.Dropout(0.5, deterministic=False)(x))


def test_module_needing_rng_at_evaluation_is_rejected():
  with pytest.raises(ValueError, match="evaluation pass needs an RNG"):
    fs.models.from_flax(AlwaysDropout(), (8,), 4)


class BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
    return nn.Dense(4)(x)


def test_batchnorm_is_rejected_naming_groupnorm():
  with pytest.raises(ValueError, match=r"batch_stats.*GroupNorm or nn.LayerNorm"):
    fs.models.from_flax(BatchNormMLP(), (8,), 4)


def test_nnx_batchnorm_is_rejected():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(8, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.dense(x))

  with pytest.raises(ValueError, match="GroupNorm"):
    fs.models.from_nnx(Net, (8,), 4)
