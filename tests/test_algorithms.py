"""Registry contract: every algorithm equals the sequential reference and compiles once."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms, engine, testing

KW = dict(batch_size=16, local_epochs=2)
# fedbuff is asynchronous (fs.run_async); test_registry_contract.py covers it
SYNCHRONOUS = sorted(n for n in algorithms.REGISTRY if n != "fedbuff")


def _model():
  return fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)


@pytest.mark.parametrize("name", SYNCHRONOUS)
@pytest.mark.slow
def test_algorithm_equals_sequential_reference(ragged_data, name):
  extra = {"fedprox": {"mu": 0.5}, "scaffold": {"client_optimizer": optax.sgd(0.05)},
           "fednova": {"client_optimizer": optax.sgd(0.05, momentum=0.5)}}.get(
               name, {"client_optimizer": optax.sgd(0.05, momentum=0.5)})
  algo = algorithms.make(name, **KW, **extra)
  assert algo.name == name
  res = fs.run(algo, _model(), ragged_data, rounds=3, cohort_size=8, chunk_size=3, seed=2,
               progress=False)
  ref, _ = testing.sequential_run(algo, _model(), ragged_data, rounds=3, cohort_size=8, seed=2)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


@pytest.mark.parametrize("name", SYNCHRONOUS)
@pytest.mark.slow
def test_algorithm_traces_once_and_runs_in_scan(ragged_data, name):
  algo = algorithms.make(name, **KW)
  model = _model()
  rf = engine.make_round(algo, model, population=12, cohort_size=4, max_client_size=200)
  traces = []
  f = jax.jit(lambda *a: (traces.append(1), rf(*a))[1])
  state = engine.init_state(algo, model.init(jax.random.key(0)), 12)
  data = engine.to_device(ragged_data)
  for r in range(3):
    state, _ = f(state, data, jax.random.key(r))
  assert len(traces) == 1
  # rounds as a lax.scan: same result as the Python loop
  state0 = engine.init_state(algo, model.init(jax.random.key(0)), 12)
  scanned, _ = jax.jit(lambda s: jax.lax.scan(
      lambda s, k: rf(s, data, k), s, jax.random.split(jax.random.key(9), 3)))(state0)
  looped = state0
  for k in jax.random.split(jax.random.key(9), 3):
    looped, _ = f(looped, data, k)
  testing.assert_trees_close(scanned.params, looped.params, atol=1e-6)


@pytest.mark.slow
def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_toward_global(ragged_data):
  m = _model()
  a = fs.run(algorithms.fedavg(optax.sgd(0.1), **KW), m, ragged_data, rounds=2, cohort_size=6,
             progress=False)
  b = fs.run(algorithms.fedprox(optax.sgd(0.1), mu=0.0, **KW), m, ragged_data, rounds=2,
             cohort_size=6, progress=False)
  testing.assert_trees_close(a.params, b.params, atol=1e-7)
  c = fs.run(algorithms.fedprox(optax.sgd(0.1), mu=5.0, **KW), m, ragged_data, rounds=2,
             cohort_size=6, progress=False)
  assert c.history["update_norm"][0] < 0.8 * a.history["update_norm"][0]


@pytest.mark.parametrize("make, kwargs, match", [
    (algorithms.fedprox, {"mu": -0.1}, "mu must be"),
    (algorithms.fedadam, {"server_lr": 0.0}, "server_lr must be"),
    (algorithms.fedyogi, {"server_lr": -1.0}, "server_lr must be"),
    (algorithms.fedavgm, {"momentum": 1.5}, "momentum must"),
    (algorithms.fedadam, {"beta1": 1.0}, "beta1 must"),
    (algorithms.fedyogi, {"beta2": -0.1}, "beta2 must"),
    (algorithms.fedadagrad, {"tau": 0.0}, "tau must"),
])
def test_bad_hyperparameters(make, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_servers_learn_with_the_paper_defaults(ragged_data, name):
  model = fs.models.logistic_regression(8, 4)
  algo = algorithms.make(name, client_optimizer=optax.sgd(0.1), batch_size=16)
  h = fs.run(algo, model, ragged_data, rounds=30, cohort_size=6, progress=False,
             rounds_per_call=10).history
  assert np.mean(h["train_loss"][-5:]) < 0.7 * np.mean(h["train_loss"][:3])
