"""Algorithm-specific behaviour and bad input (the registry contract is test_registry_contract.py)."""

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


# Every registered algorithm's equality to the sequential reference, single trace and lax.scan
# invariance are checked by tests/test_registry_contract.py (one suite over every entry).


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
