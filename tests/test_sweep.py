"""Sweeps: E experiments as one vmapped program equal the experiments run one by one."""

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import sweep as sweep_mod


def _setup():
  tr, te = fs.datasets.digits()
  data = fs.FederatedData.from_partition(tr, fs.partition.dirichlet(tr["y"], 20, 0.5, seed=0),
                                         num_classes=10)
  return data, te, fs.models.logistic_regression(64, 10)


@pytest.mark.slow
def test_sweep_equals_one_by_one():
  data, te, model = _setup()
  algo = fs.algorithms.fedprox(optax.sgd(0.05), mu=0.1, batch_size=16)
  axes = sweep_mod.grid(seed=[0, 1], client_lr_scale=[0.5, 2.0], mu=[0.0, 1.0])
  hists = sweep_mod.sweep(algo, model, data, rounds=4, cohort_size=5, eval_data=te,
                          eval_every=2, rounds_per_call=3, progress=False, **axes)
  assert len(hists) == 8
  for i, h in enumerate(hists):
    hp = {k: axes[k][i] for k in ("client_lr_scale", "mu")}
    one = fs.run(algo, model, data, rounds=4, cohort_size=5, eval_data=te, eval_every=2,
                 seed=axes["seed"][i], hparams=hp, progress=False)
    np.testing.assert_allclose(h["train_loss"], one.history["train_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h["test_accuracy"], one.history["test_accuracy"], atol=1e-6)
    assert h["seed"][0] == axes["seed"][i] and h["mu"][0] == hp["mu"]
  # the swept values matter
  assert not np.allclose(hists[0]["train_loss"], hists[2]["train_loss"])


@pytest.mark.slow
def test_hparams_equal_sequential_reference_and_server_lr():
  data, _, model = _setup()
  algo = fs.algorithms.fedavgm(optax.sgd(0.05), batch_size=16)
  hp = {"client_lr_scale": 0.5, "server_lr_scale": 0.3}
  res = fs.run(algo, model, data, rounds=3, cohort_size=5, hparams=hp, progress=False)
  ref, _ = fs.testing.sequential_run(algo, model, data, rounds=3, cohort_size=5, hparams=hp)
  fs.testing.assert_trees_close(res.params, ref.params, atol=1e-5)


def test_bad_sweeps():
  data, _, model = _setup()
  algo = fs.algorithms.fedavg(batch_size=16)
  with pytest.raises(ValueError, match="different lengths"):
    sweep_mod.sweep(algo, model, data, rounds=1, cohort_size=2, seed=[0, 1],
                    client_lr_scale=[1.0, 2.0, 3.0], progress=False)
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    sweep_mod.sweep(algo, model, data, rounds=1, cohort_size=2, learning_rate=[1.0],
                    progress=False)
  with pytest.raises(ValueError, match="finite scalar"):
    fs.run(algo, model, data, rounds=1, cohort_size=2, hparams={"client_lr_scale": -1.0},
           progress=False)


@pytest.mark.slow
def test_shared_seed_sweep_equals_one_by_one():
  # One seed: the round key is shared (not vmapped), cohorts and gathers computed once.
  data, _, model = _setup()
  algo = fs.algorithms.fedavg(optax.sgd(0.05), batch_size=16)
  hists = sweep_mod.sweep(algo, model, data, rounds=3, cohort_size=5, seed=4,
                          client_lr_scale=[0.5, 1.5], progress=False)
  for h, lr in zip(hists, [0.5, 1.5]):
    one = fs.run(algo, model, data, rounds=3, cohort_size=5, seed=4,
                 hparams={"client_lr_scale": lr}, progress=False)
    np.testing.assert_allclose(h["train_loss"], one.history["train_loss"], rtol=1e-5, atol=1e-6)
