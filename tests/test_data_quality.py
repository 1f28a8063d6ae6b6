"""Dirty client data (issue 17): the corruption model, federated cleaning, noise-robust loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import remedies
from fedjax_sim.data import quality


def population(p=40, dim=5, k=4, seed=0):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(20, 60, p)
  w = rng.normal(size=(dim, k))
  clients = []
  for n in sizes:
    x = (rng.normal(size=(n, dim)) * [1, 2, 3, 0.5, 1] + [0, 1, -2, 3, 0]).astype(np.float32)
    clients.append({"x": x, "y": np.argmax(x @ w, 1).astype(np.int32)})
  return fs.FederatedData.from_clients(clients, num_classes=k)


def test_corruption_rates_are_what_was_asked():
  data = population(p=200)
  spec = quality.Corruption(client_fraction=0.3, missing_rate=0.2, outlier_rate=0.05,
                            outlier_scale=10.0, label_noise=0.3, duplicate_rate=0.1)
  dirty, missing, info = quality.corrupt(data, spec, seed=1)
  assert len(info["dirty_clients"]) == 60
  owner = np.repeat(np.arange(200), data.sizes)
  rows = np.isin(owner, info["dirty_clients"])
  # nothing happens to clean clients
  np.testing.assert_array_equal(dirty.arrays["x"][~rows], data.arrays["x"][~rows])
  np.testing.assert_array_equal(dirty.arrays["y"][~rows], data.arrays["y"][~rows])
  assert not missing[~rows].any()
  assert abs(missing[rows].mean() - 0.2) < 0.02
  assert np.all(dirty.arrays["x"][missing] == 0)
  assert abs(info["outlier"][rows].mean() - 0.05) < 0.015
  assert abs(info["noisy_label"][rows].mean() - 0.3) < 0.03
  assert abs(info["duplicate"][rows].mean() - 0.1) < 0.02
  # symmetric noise never keeps the true label (on rows that were not duplicated)
  keep = info["noisy_label"] & ~info["duplicate"]
  assert np.all(dirty.arrays["y"][keep] != data.arrays["y"][keep])
  # outliers are their (possibly duplicated) row times 10 where observed
  o = info["outlier"] & ~info["duplicate"] & ~missing.any(1)
  np.testing.assert_allclose(dirty.arrays["x"][o], 10 * data.arrays["x"][o], rtol=1e-6)
  # pair-flip: c -> c + 1 mod K
  d2, _, i2 = quality.corrupt(data, quality.Corruption(1.0, label_noise=0.5,
                                                       label_noise_kind="pair"), seed=2)
  f = i2["noisy_label"]
  np.testing.assert_array_equal(d2.arrays["y"][f], (data.arrays["y"][f] + 1) % 4)
  np.testing.assert_array_equal(d2.arrays["y"][~f], data.arrays["y"][~f])


def test_federated_imputation_and_quantiles_equal_the_centralized_statistics():
  data = population()
  dirty, missing, _ = quality.corrupt(data, quality.Corruption(0.5, missing_rate=0.3), seed=0)
  x = dirty.arrays["x"].astype(np.float64)
  central = np.nanmean(np.where(missing, np.nan, x), 0)
  np.testing.assert_allclose(quality.federated_mean(dirty, missing), central, rtol=1e-5)
  filled = quality.impute(dirty, missing, quality.federated_mean(dirty, missing))
  np.testing.assert_allclose(filled.arrays["x"][missing],
                             np.broadcast_to(central, x.shape)[missing], rtol=1e-5)
  np.testing.assert_array_equal(filled.arrays["x"][~missing], dirty.arrays["x"][~missing])
  qs = quality.federated_quantiles(dirty, [0.01, 0.5, 0.99], -20.0, 20.0, bins=4000,
                                   missing=missing)
  for j in range(5):
    obs = x[~missing[:, j], j]
    exact = np.quantile(obs, [0.01, 0.5, 0.99], method="inverted_cdf")
    np.testing.assert_allclose(qs[:, j], exact, atol=0.0101)   # one bin width
  cl = quality.clip_features(dirty, qs[0], qs[2])
  assert np.all(cl.arrays["x"] <= qs[2] + 1e-6) and np.all(cl.arrays["x"] >= qs[0] - 1e-6)


def test_generalized_cross_entropy_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  y = rng.integers(0, 4, 6)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  py = p[np.arange(6), y]
  for q in (0.3, 0.7, 1.0):
    got = remedies.generalized_cross_entropy(q)(jnp.asarray(logits), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), (1 - py ** q) / q, rtol=1e-5)
  small = remedies.generalized_cross_entropy(1e-4)(jnp.asarray(logits), jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(small), -np.log(py), rtol=1e-3)


def test_generalized_cross_entropy_trains_through_run_and_resists_label_noise():
  data = population(p=20)
  noisy, _, _ = quality.corrupt(data, quality.Corruption(1.0, label_noise=0.4), seed=0)
  test = data.centralized()
  base = fs.models.logistic_regression(5, 4)
  algo = fs.algorithms.fedavg(optax.sgd(0.5), batch_size=16, local_epochs=2)
  acc = {}
  for name, model in [("ce", base),
                      ("gce", dataclasses.replace(base,
                                                  loss=remedies.generalized_cross_entropy(0.7)))]:
    res = fs.run(algo, model, noisy, rounds=6, cohort_size=20, progress=False)
    acc[name] = np.mean(np.argmax(np.asarray(model.apply(res.params, test["x"])), 1) == test["y"])
  assert acc["gce"] > 0.75 and acc["gce"] >= acc["ce"] - 0.02, acc


def test_quality_bad_input_raises():
  data = population(p=4)
  with pytest.raises(ValueError, match="probability"):
    quality.Corruption(missing_rate=1.5)
  with pytest.raises(ValueError, match="label_noise_kind"):
    quality.Corruption(label_noise_kind="flip")
  with pytest.raises(ValueError, match="must be a Corruption"):
    quality.corrupt(data, {"missing_rate": 0.1})
  with pytest.raises(ValueError, match="bool mask"):
    quality.federated_mean(data, np.zeros((3, 5), bool))
  with pytest.raises(ValueError, match="low < high"):
    quality.federated_quantiles(data, [0.5], 1.0, 1.0)
  with pytest.raises(ValueError, match="q must be"):
    remedies.generalized_cross_entropy(0.0)
