"""Attacks: label flipping poisons exactly the seeded attacker set, the same set as the update
attacks; the registry applies data and transform attacks; bad input is rejected."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import transforms
from fedjax_sim.transforms import attacks


def _population(num_clients=40, k=5, seed=0, labels=None):
  rng = np.random.default_rng(seed)
  clients = []
  for n in rng.integers(1, 12, size=num_clients):
    clients.append({"x": rng.normal(size=(n, 3)).astype(np.float32),
                    "y": rng.integers(0, labels or k, size=n).astype(np.int32)})
  return fs.FederatedData.from_clients(clients, num_classes=k)


@pytest.mark.parametrize("fraction,seed", [(0.3, 0), (0.5, 7), (0.0, 0)])
def test_label_flip_flips_exactly_the_attackers(fraction, seed):
  data = _population()
  y_before = data.arrays["y"].copy()
  poisoned = attacks.label_flip(data, fraction, seed=seed)
  bad = np.array([bool(fs.transforms.is_attacker(jnp.int32(p), fraction, seed))
                  for p in range(data.num_clients)])
  np.testing.assert_array_equal(attacks.attackers(data.num_clients, fraction, seed), bad)
  if fraction > 0:
    assert 0 < bad.sum() < data.num_clients
  for p in range(data.num_clients):
    before, after = data.client(p), poisoned.client(p)
    expected = 4 - before["y"] if bad[p] else before["y"]
    np.testing.assert_array_equal(after["y"], expected, err_msg=f"client {p}")
    np.testing.assert_array_equal(after["x"], before["x"])
  np.testing.assert_array_equal(data.arrays["y"], y_before)   # input untouched
  np.testing.assert_array_equal(poisoned.offsets, data.offsets)
  np.testing.assert_array_equal(poisoned.client_ids, data.client_ids)
  assert poisoned.num_classes == data.num_classes


def test_label_flip_num_classes_default_and_override():
  data = fs.FederatedData.from_clients(
      [{"x": np.zeros((3, 1), np.float32), "y": np.array([0, 1, 2], np.int32)}] * 6)
  everyone = next(s for s in range(100) if attacks.attackers(6, 0.9, s).all())
  np.testing.assert_array_equal(attacks.label_flip(data, 0.9, seed=everyone).client(0)["y"],
                                [2, 1, 0])                                  # K = max(y) + 1
  np.testing.assert_array_equal(
      attacks.label_flip(data, 0.9, num_classes=10, seed=everyone).client(0)["y"], [9, 8, 7])


def test_data_and_update_attacks_pick_the_same_clients():
  data = _population(num_clients=30, labels=2)   # labels 0, 1 of 5: every flip changes them
  fraction, seed = 0.4, 3
  poisoned = attacks.label_flip(data, fraction, seed=seed)
  flipped = np.array([not np.array_equal(poisoned.client(p)["y"], data.client(p)["y"])
                      for p in range(data.num_clients)])
  t = attacks.sign_flip_attack(fraction, factor=1.0, seed=seed)
  ids = jnp.arange(data.num_clients, dtype=jnp.int32)
  delta = {"w": jnp.ones((data.num_clients, 2))}
  out, _ = jax.vmap(lambda *a: t(*a))(delta, jax.random.split(jax.random.key(0), data.num_clients), ids)
  negated = np.asarray(out["w"][:, 0] < 0)
  bad = attacks.attackers(data.num_clients, fraction, seed)
  assert 0 < bad.sum() < data.num_clients
  np.testing.assert_array_equal(negated, bad)
  np.testing.assert_array_equal(flipped, bad)


def test_registry_and_apply_attack():
  assert set(attacks.ATTACKS) == {"label_flip", "sign_flip", "scale", "gaussian"}
  assert attacks.ATTACKS["label_flip"].kind == "data"
  assert {a.kind for n, a in attacks.ATTACKS.items() if n != "label_flip"} == {"transform"}
  data = _population()
  algo = fs.algorithms.fedavg()
  a2, d2 = attacks.apply_attack("label_flip", algo, data, 0.3)
  assert a2 is algo and d2 is not data
  a3, d3 = attacks.apply_attack("scale", algo, data, 0.3, factor=5.0)
  assert d3 is data and a3.update_transform is not transforms.IDENTITY
  assert algo.update_transform is transforms.IDENTITY
  # Chained after an existing transform: clip to 1 then attackers scale by 5.
  clipped = dataclasses.replace(algo, update_transform=fs.transforms.clip_by_norm(1.0))
  a4, _ = attacks.apply_attack("scale", clipped, data, 0.3, factor=5.0, seed=1)
  bad = int(np.flatnonzero(attacks.attackers(data.num_clients, 0.3, 1))[0])
  out = a4.update_transform({"w": jnp.full((4,), 10.0)}, jax.random.key(0), jnp.int32(bad))[0]
  np.testing.assert_allclose(float(fs.transforms.base.global_norm(out)), 5.0, rtol=1e-5)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_fraction_raises(fraction):
  data = _population()
  with pytest.raises(ValueError, match="fraction"):
    attacks.label_flip(data, fraction)
  with pytest.raises(ValueError, match="fraction"):
    attacks.apply_attack("sign_flip", fs.algorithms.fedavg(), data, fraction)


def test_other_bad_input_raises():
  data = _population()
  with pytest.raises(ValueError, match="unknown attack"):
    attacks.apply_attack("backdoor", fs.algorithms.fedavg(), data, 0.2)
  with pytest.raises(ValueError, match="labels must lie"):
    attacks.label_flip(data, 0.2, num_classes=3)     # labels go up to 4
  with pytest.raises(ValueError, match="num_classes"):
    attacks.label_flip(data, 0.2, num_classes=1)
  with pytest.raises(ValueError, match="num_clients"):
    attacks.attackers(0, 0.2)


def test_update_attack_end_to_end_median_resists(ragged_data):
  """A transform attack from apply_attack runs inside run(); the median shrugs it off (the
  attackers send -100x their update, which would wreck the mean)."""
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  bad_algo, _ = attacks.apply_attack("scale", algo, ragged_data, 0.3, factor=-100.0, seed=1)
  assert attacks.attackers(12, 0.3, 1).sum() >= 1
  med = dataclasses.replace(bad_algo, aggregator=fs.aggregators.coordinate_median())
  res = fs.run(med, fs.models.logistic_regression(8, 4), ragged_data, rounds=5, cohort_size=12,
               eval_data=ragged_data.centralized(), eval_every=5, progress=False,
               rounds_per_call=5, chunk_size=12)
  assert res.history.last("test_accuracy") > 0.6
