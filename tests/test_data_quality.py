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


def test_federated_median_equals_the_centralized_median_to_one_bin():
  data = population()
  dirty, missing, _ = quality.corrupt(data, quality.Corruption(0.5, missing_rate=0.3), seed=3)
  x = dirty.arrays["x"].astype(np.float64)
  med = quality.federated_median(dirty, -20.0, 20.0, bins=2000, missing=missing)
  width = 40.0 / 2000
  for j in range(5):
    obs = x[~missing[:, j], j]
    exact = np.quantile(obs, 0.5, method="inverted_cdf")
    assert exact - 1e-6 <= med[j] <= exact + width + 1e-5, (j, med[j], exact)
  # the histogram the median comes from is the centralized one, per feature
  h = quality.federated_histogram(dirty, -20.0, 20.0, bins=2000, missing=missing)
  assert h.shape == (5, 2000)
  np.testing.assert_array_equal(h.sum(1), (~missing).sum(0))
  # per-feature ranges: each feature's own [low, high], resolution (high - low) / bins
  lo, hi = x.min(0) - 1.0, x.max(0) + 1.0
  med2 = quality.federated_median(dirty, lo, hi, bins=512, missing=missing)
  for j in range(5):
    exact = np.quantile(x[~missing[:, j], j], 0.5, method="inverted_cdf")
    assert exact - 1e-5 <= med2[j] <= exact + (hi[j] - lo[j]) / 512 + 1e-5
  filled = quality.impute(dirty, missing, med)
  np.testing.assert_array_equal(filled.arrays["x"][missing],
                                np.broadcast_to(med, x.shape)[missing])


def test_per_client_pass_equals_each_clients_own_numpy_statistic():
  data = population(p=13)
  dirty, missing, _ = quality.corrupt(data, quality.Corruption(0.5, missing_rate=0.3), seed=0)
  sums, counts = quality.client_feature_sums(dirty, missing)
  for chunk in (1, 4, 13):   # chunking (with padding slots) changes nothing
    got_s, got_c = quality.per_client(
        dirty, lambda x, obs, valid, y: (jnp.sum(jnp.where(obs, x, 0.0), 0),
                                         jnp.sum(obs, 0)), missing, chunk_size=chunk)
    np.testing.assert_allclose(got_s, sums, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got_c, counts)


def test_federated_statistics_through_secure_aggregation_equal_the_plain_round():
  data = population(p=30)
  dirty, missing, _ = quality.corrupt(data, quality.Corruption(0.5, missing_rate=0.3), seed=0)
  # every entry of a client's histogram is a count <= 60 and its feature sums are below 2000
  # in magnitude: clip bounds them, 24 bits give 2000 / 2^23 = 2.4e-4 per client
  sec_h = fs.aggregators.secure_sum(clip=64.0, bits=24, ring_bits=32)
  plain = quality.federated_histogram(dirty, -20.0, 20.0, bins=200, missing=missing)
  secure = quality.federated_histogram(dirty, -20.0, 20.0, bins=200, missing=missing,
                                       aggregator=sec_h)
  np.testing.assert_array_equal(secure, plain)   # integer counts: exactly the same
  np.testing.assert_array_equal(
      quality.federated_median(dirty, -20.0, 20.0, 200, missing, aggregator=sec_h),
      quality.federated_median(dirty, -20.0, 20.0, 200, missing))
  sec_m = fs.aggregators.secure_sum(clip=2000.0, bits=24, ring_bits=32)
  central = np.nanmean(np.where(missing, np.nan, dirty.arrays["x"].astype(np.float64)), 0)
  got = quality.federated_mean(dirty, missing, aggregator=sec_m)
  # 30 clients' rounding errors (<= 1.2e-4 each) over >= 500 observed values per feature
  np.testing.assert_allclose(got, central, atol=1e-5)
  assert not np.array_equal(got, np.zeros(5))


def test_client_quality_computes_each_clients_fractions_and_scores_dirty_clients_lower():
  data = population(p=20)
  spec = quality.Corruption(0.3, missing_rate=0.2, outlier_rate=0.1, outlier_scale=10.0,
                            label_noise=0.5)
  dirty, missing, info = quality.corrupt(data, spec, seed=0)
  fence = quality.norm_fence(dirty, missing)
  norms = quality.example_norms(dirty, missing)
  x = dirty.arrays["x"].astype(np.float64)
  np.testing.assert_allclose(norms, np.sqrt((np.where(missing, 0, x) ** 2).sum(1)), rtol=1e-5)
  assert np.mean(norms[info["outlier"]] > fence) > 0.9     # the 10x rows are beyond the fence
  assert np.mean(norms[~info["outlier"]] > fence) < 0.02
  # a "global model" that knows the true labelling rule: disagreement = the noisy share
  model = fs.models.logistic_regression(5, 4)
  truth = population(p=20)   # same seed: the same labelling rule, clean labels
  fit = fs.run(fs.algorithms.fedavg(optax.sgd(0.5), batch_size=16, local_epochs=3),
               model, truth, rounds=15, cohort_size=20, progress=False).params
  q = quality.client_quality(dirty, missing, max_norm=fence, model=model, params=fit)
  owner = np.repeat(np.arange(20), dirty.sizes)
  pred = np.argmax(np.asarray(model.apply(fit, np.where(missing, 0, dirty.arrays["x"]))), 1)
  for p in range(20):
    r = owner == p
    np.testing.assert_allclose(q["missing_fraction"][p], missing[r].mean(), atol=1e-6)
    np.testing.assert_allclose(q["outlier_fraction"][p], np.mean(norms[r] > fence), atol=1e-6)
    np.testing.assert_allclose(q["disagreement"][p], np.mean(pred[r] != dirty.arrays["y"][r]),
                               atol=1e-6)
  s = quality.quality_scores(q)
  d = q["disagreement"].astype(np.float64)
  ref = np.median(d)
  expect = ((1 - q["missing_fraction"]) * (1 - q["outlier_fraction"])
            * (1 - np.clip((d - ref) / (1 - ref), 0, 1)))
  np.testing.assert_allclose(s, expect, rtol=1e-5)
  dirty_c = np.isin(np.arange(20), info["dirty_clients"])
  assert s[dirty_c].max() < s[~dirty_c].min(), (s[dirty_c], s[~dirty_c])
  wts = quality.quality_weights(dirty, s, power=2.0)
  np.testing.assert_allclose(wts, dirty.sizes * s.astype(np.float64) ** 2, rtol=1e-5)


def test_quality_weights_lower_a_clients_influence_on_the_aggregate():
  # two clients, full cohort, full-batch local steps (no shuffling effect): one round's update
  # is exactly the weighted mean of the two clients' own updates
  rng = np.random.default_rng(0)
  clients = [{"x": rng.normal(size=(8, 3)).astype(np.float32) + s,
              "y": np.full(8, c, np.int32)} for c, s in ((0, -1.0), (1, 1.0))]
  data = fs.FederatedData.from_clients(clients, num_classes=2)
  model = fs.models.logistic_regression(3, 2)
  algo = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=8, local_epochs=1)
  p0 = model.init(jax.random.key(0))

  def one_round(weights):
    res = fs.run(algo, model, data, rounds=1, cohort_size=2, init_params=p0,
                 client_weights=weights, progress=False)
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(res.params)])

  start = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p0)])
  solo = [one_round(np.array(w, np.float32)) - start for w in ((1.0, 0.0), (0.0, 1.0))]
  s1 = 0.25
  upd = one_round(quality.quality_weights(data, np.array([1.0, s1], np.float32))) - start
  np.testing.assert_allclose(upd, (8 * solo[0] + 8 * s1 * solo[1]) / (8 + 8 * s1), atol=1e-6)
  # client 1's pull: 1/5 of the distance between the two instead of 1/2 at equal weights
  gap = np.linalg.norm(solo[1] - solo[0])
  np.testing.assert_allclose(np.linalg.norm(upd - solo[0]), gap * s1 / (1 + s1), rtol=1e-4)


def test_symmetric_cross_entropy_against_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(7, 5)).astype(np.float32) * 2
  y = rng.integers(0, 5, 7)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(5)[y]
  ce = -np.log(p[np.arange(7), y])
  rce = -np.sum(p * np.log(np.clip(onehot, np.exp(-4.0), 1.0)), 1)   # log 0 taken as -4
  for a, b in ((0.1, 1.0), (1.0, 0.0), (0.5, 2.0)):
    got = remedies.symmetric_cross_entropy(a, b)(jnp.asarray(logits), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), a * ce + b * rce, rtol=1e-5)
  with pytest.raises(ValueError, match="log_zero"):
    remedies.symmetric_cross_entropy(log_zero=0.0)
  with pytest.raises(ValueError, match="alpha"):
    remedies.symmetric_cross_entropy(alpha=-1.0)


def test_cleaning_bad_input_raises():
  data = population(p=4)
  with pytest.raises(ValueError, match="aggregator"):
    quality.federated_sum(data, lambda x, o, v, y: jnp.sum(x), aggregator="mean")
  with pytest.raises(ValueError, match="bins"):
    quality.federated_histogram(data, 0.0, 1.0, bins=0)
  with pytest.raises(ValueError, match="both model and params"):
    quality.client_quality(data, model=fs.models.logistic_regression(5, 4))
  with pytest.raises(ValueError, match="scores"):
    quality.quality_weights(data, np.array([1.0, 2.0, 0.5, 0.5]))
  with pytest.raises(ValueError, match="no example"):
    quality.drop_examples(data, np.arange(data.num_examples) >= data.sizes[0])
  kept = quality.drop_examples(data, np.arange(data.num_examples) % 2 == 0)
  assert kept.num_examples == (data.num_examples + 1) // 2 and kept.num_clients == 4


def test_cleaned_population_weights_and_robust_loss_run_inside_the_scan_over_rounds():
  data = population(p=10)
  dirty, missing, _ = quality.corrupt(data, quality.Corruption(0.3, missing_rate=0.2,
                                                               outlier_rate=0.05,
                                                               label_noise=0.3), seed=0)
  fence = quality.norm_fence(dirty, missing)
  keep = quality.example_norms(dirty, missing) <= fence
  clean, m = quality.drop_examples(dirty, keep), missing[keep]
  clean = quality.impute(clean, m, quality.federated_median(clean, -20.0, 20.0, 400, m))
  w = quality.quality_weights(clean, quality.quality_scores(
      quality.client_quality(dirty, missing, max_norm=fence)))
  model = dataclasses.replace(fs.models.logistic_regression(5, 4),
                              loss=remedies.symmetric_cross_entropy())
  algo = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=16)
  out = [fs.run(algo, model, clean, rounds=4, cohort_size=5, client_weights=w, progress=False,
                rounds_per_call=k).params for k in (1, 4)]
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
