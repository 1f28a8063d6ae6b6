"""Per-client update transforms: clipping bound, attacks, reference equality, robustness in a run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, testing, transforms


def _model():
  return fs.models.mlp(8, (16,), 4)


def test_clipped_updates_never_exceed_the_bound():
  t = transforms.clip_by_norm(0.5)
  for s in range(20):
    d = {"a": jax.random.normal(jax.random.key(s), (7, 3)) * (s + 0.01), "b": jnp.ones(4) * s}
    out = t(d, jax.random.key(0), jnp.int32(0))[0]
    n = float(transforms.base.global_norm(out))
    assert n <= 0.5 * (1 + 1e-6)
    if float(transforms.base.global_norm(d)) <= 0.5:   # small updates pass unchanged
      testing.assert_trees_close(out, d, atol=0)


def test_attacker_set_is_seeded_and_about_the_fraction():
  ids = jnp.arange(5000)
  bad = jax.vmap(lambda c: transforms.is_attacker(c, 0.2, seed=3))(ids)
  assert abs(float(bad.mean()) - 0.2) < 0.03
  again = jax.vmap(lambda c: transforms.is_attacker(c, 0.2, seed=3))(ids)
  np.testing.assert_array_equal(bad, again)


@pytest.mark.parametrize("transform", [
    transforms.clip_by_norm(0.05),
    transforms.chain(transforms.sign_flip_attack(0.3, seed=1), transforms.clip_by_norm(0.1)),
    transforms.gaussian_attack(0.3, std=0.1, seed=2),
])
@pytest.mark.slow
def test_transformed_round_equals_sequential_reference(ragged_data, transform):
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16),
                             update_transform=transform)
  res = fs.run(algo, _model(), ragged_data, rounds=2, cohort_size=10, chunk_size=3,
               progress=False)
  ref, _ = testing.sequential_run(algo, _model(), ragged_data, rounds=2, cohort_size=10)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


@pytest.mark.slow
def test_median_resists_scaled_attack_that_breaks_mean():
  train, test = fs.datasets.digits()
  data = fs.FederatedData.from_partition(train, fs.partition.iid(train["y"], 30, seed=0),
                                         num_classes=10)
  model = fs.models.logistic_regression(64, 10)
  attack = transforms.scale_attack(0.2, factor=-50.0, seed=0)
  base = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=16, local_epochs=2)
  acc = {}
  for name, agg, t in [("clean", aggregators.mean(), None), ("mean", aggregators.mean(), attack),
                       ("median", aggregators.coordinate_median(), attack)]:
    algo = dataclasses.replace(base, aggregator=agg, update_transform=t)
    r = fs.run(algo, model, data, rounds=15, cohort_size=15, eval_data=test, eval_every=15,
               progress=False)
    acc[name] = r.history.last("test_accuracy")
  assert acc["clean"] > 0.8
  assert acc["mean"] < acc["clean"] - 0.3          # plain averaging collapses
  assert acc["median"] > acc["clean"] - 0.05       # the median stays within 5 points


def test_bad_transform_parameters():
  with pytest.raises(ValueError, match="clip norm"):
    transforms.clip_by_norm(0.0)
  with pytest.raises(ValueError, match="attacker fraction"):
    transforms.sign_flip_attack(1.0)
  with pytest.raises(ValueError, match="attacker fraction"):
    transforms.scale_attack(-0.1)
