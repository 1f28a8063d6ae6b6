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


# --- regression -----------------------------------------------------------------------------



def diabetes_population(num_clients=8):
  train, test = fs.datasets.diabetes()
  parts = fs.partition.iid(train["y"], num_clients, seed=0)
  return fs.FederatedData.from_partition(train, parts, task="regression"), test


def test_regression_losses_and_batch_loss():
  pred = jnp.array([[1.0], [2.0], [4.0]])
  y = jnp.array([1.0, 0.0, 0.0])
  np.testing.assert_allclose(fs.models.mse(pred, y), [0.0, 4.0, 16.0])
  np.testing.assert_allclose(fs.models.mae(pred, y), [0.0, 2.0, 4.0])
  np.testing.assert_allclose(fs.models.huber(pred, y), [0.0, 1.5, 3.5])
  model = fs.models.regression_mlp(3)
  assert model.is_regression and model.num_classes == 1
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  yy = jnp.arange(5.0)
  mask = jnp.array([True, True, True, False, False])
  loss, (loss_sum, sse, count) = model.batch_loss(params, x, yy, mask)
  ref = np.mean((np.asarray(model.apply(params, x))[:3, 0] - np.arange(3.0)) ** 2)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(sse / count, ref, rtol=1e-5)


def test_regression_evaluate_mse_and_r2():
  model = fs.models.regression_mlp(3)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (23, 3))
  y = jax.random.normal(jax.random.key(2), (23,))
  ev = fs.evaluation.make_evaluate(model, batch_size=5)(params, x, y)
  p = np.asarray(model.apply(params, x))[:, 0]
  mse = np.mean((p - np.asarray(y)) ** 2)
  np.testing.assert_allclose(ev["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(ev["loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(ev["r2"], 1 - mse / np.var(np.asarray(y)), rtol=1e-4)
  assert np.isnan(ev["accuracy"])


def test_float_targets_need_a_regression_task():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="task='regression'"):
    fs.FederatedData.from_clients([{"x": x, "y": np.ones(4, np.float32)}])
  with pytest.raises(ValueError, match="non-finite"):
    fs.FederatedData.from_clients([{"x": x, "y": np.array([0, np.nan, 0, 0], np.float32)}],
                                  task="regression")
  data = fs.FederatedData.from_clients([{"x": x, "y": np.ones(4, np.float32)}] * 2,
                                       task="regression")
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=2)
  with pytest.raises(ValueError, match="is a classifier"):
    fs.run(algo, fs.models.logistic_regression(3, 2), data, rounds=1, cohort_size=1,
           progress=False)
  with pytest.raises(ValueError, match="non-finite"):
    fs.validation.check_eval_data(fs.models.regression_mlp(3),
                                  {"x": x, "y": np.array([0, np.inf, 0, 0], np.float32)})


@pytest.mark.slow
def test_federated_regression_learns_and_equals_reference():
  data, test = diabetes_population()
  model = fs.models.regression_mlp(10)
  algo = fs.algorithms.fedavg(optax.sgd(0.05), batch_size=16, local_epochs=1)
  res = fs.run(algo, model, data, rounds=30, cohort_size=4, eval_data=test, eval_every=10,
               seed=0, progress=False)
  h = res.history
  # held-out targets are standardised with the training statistics: MSE ~ fraction of variance
  assert h.last("test_r2") > 0.3, h.last("test_r2")
  assert h.last("test_mse") < 0.7 * float(np.var(test["y"]))
  assert h["train_loss"][-1] < 0.8 * h["train_loss"][0]
  ref, hist = testing.sequential_run(algo, model, data, rounds=30, cohort_size=4, seed=0)
  testing.assert_trees_close(res.params, ref.params, atol=1e-4)
  np.testing.assert_allclose(h["train_loss"], [m["train_loss"] for m in hist], rtol=1e-4)
  res.history.plot()   # the plot takes a regression history (accuracy all NaN)


def test_cli_regression_config_checks(capsys):
  from fedjax_sim import cli
  assert cli.main(["run", "--dataset", "diabetes", "--model", "mlp_2nn", "--partition", "iid",
                   "--out", "/nonexistent/x", "--no-progress"]) != 0
  assert "regression task: model must be one of regression_mlp" in capsys.readouterr().err
  assert cli.main(["run", "--dataset", "diabetes", "--model", "regression_mlp", "--partition",
                   "dirichlet", "--out", "/nonexistent/x", "--no-progress"]) != 0
  assert "partition.name must be one of iid, quantity_skew" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_regression_run(tmp_path, capsys):
  import json
  from fedjax_sim import cli
  out = tmp_path / "run"
  rc = cli.main(["run", "--dataset", "diabetes", "--model", "regression_mlp", "--partition",
                 "iid", "--num-clients", "8", "--cohort-size", "4", "--rounds", "20",
                 "--eval-every", "10", "--client-lr", "0.05", "--batch-size", "16",
                 "--out", str(out), "--no-progress"])
  assert rc == 0
  h = json.loads((out / "history.json").read_text())
  assert h["test_r2"][-1] > 0.3
  assert "final test MSE" in capsys.readouterr().out


def test_bfloat16_keeps_the_stochastic_pass():
  model = fs.models.precision.bfloat16_compute(dropout_model())
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 8))
  a = model.apply_train(params, x, jax.random.key(2))
  assert a.dtype == jnp.float32
  assert not np.allclose(a, model.apply_train(params, x, jax.random.key(3)))


def test_regression_history_plots_r2():
  h = fs.History.from_records([{"round": 1, "train_loss": 2.0, "test_loss": 1.5, "test_r2": 0.1},
                               {"round": 2, "train_loss": 1.0, "test_loss": 0.9, "test_r2": 0.4}])
  fig = h.plot()
  ax = fig.axes[1]
  assert ax.get_ylabel() == "r2"
  np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.1, 0.4])
