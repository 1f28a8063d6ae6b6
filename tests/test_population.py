"""Population scale: O(cohort) sampling, procedural clients, state-memory guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import engine
from fedjax_sim.data.procedural import synthetic_population


@pytest.mark.parametrize("population, cohort", [(200_000, 500), (100_000_000, 2000), (50, 7)])
def test_cohorts_are_distinct_and_in_range(population, cohort):
  for s in range(3):
    ids, valid = engine.sample_cohort(jax.random.key(s), population, cohort)
    ids = np.asarray(ids)
    assert bool(np.all(valid)) and ids.shape == (cohort,)
    assert len(np.unique(ids)) == cohort and ids.min() >= 0 and ids.max() < population


def test_sparse_sampling_is_uniform():
  # Inclusion frequency of every client over many rounds: P = 100k, C = 5000 (sparse path).
  P, C, R = 100_000, 5000, 400
  draw = jax.jit(jax.vmap(lambda k: engine.sample_cohort(k, P, C)[0]))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), R))).ravel(),
                       minlength=P)
  assert counts.sum() == R * C
  # Each client is included Binomial(R, C/P) times: mean 20, sd ~4.36. Pool clients into 100
  # groups of 1000 so each group count is ~N(20000, 138): all within 5 sd, and a chi-square test.
  groups = counts.reshape(100, -1).sum(1)
  expected = R * C / 100
  chi2 = float(np.sum((groups - expected) ** 2 / expected))
  assert chi2 < 160, chi2       # 99.99th percentile of chi2(99) is ~154
  assert abs(counts.mean() - R * C / P) < 1e-9
  assert counts.std() == pytest.approx(np.sqrt(R * C / P * (1 - C / P)), rel=0.05)


@pytest.mark.slow
def test_procedural_client_is_identical_every_time():
  pop = synthetic_population(100_000_000, 1.0, 1.0, examples_per_client=20, seed=3)
  a = pop.materialize([5, 99_999_999, 12345])
  b = pop.materialize([12345, 5])
  np.testing.assert_array_equal(a.client(2)["x"], b.client(0)["x"])
  np.testing.assert_array_equal(a.client(0)["y"], b.client(1)["y"])
  assert not np.array_equal(a.client(0)["x"], a.client(1)["x"])
  # inside the round: rows gathered in any order give the same examples
  ids = jnp.asarray([12345, 5], jnp.int32)
  rows = jnp.asarray([[[3, 0]], [[19, 7]]])
  x, y = pop.examples(ids, rows)
  np.testing.assert_allclose(np.asarray(x[0, 0, 0]), b.client(0)["x"][3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(x[1, 0, 1]), b.client(1)["x"][7], rtol=1e-6)
  assert int(y[1, 0, 0]) == b.client(1)["y"][19]
  test = pop.materialize([5], split="test", examples_per_client=10)
  assert not np.array_equal(test.client(0)["x"], a.client(0)["x"][:10])


@pytest.mark.slow
def test_procedural_run_learns_and_matches_materialized():
  pop = synthetic_population(10_000_000, iid=True, alpha=0.0, beta=0.0, examples_per_client=20)
  test = pop.materialize(np.arange(100), split="test", examples_per_client=20)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10, local_epochs=1)
  res = fs.run(algo, fs.models.logistic_regression(60, 10), pop, rounds=20, cohort_size=50,
               eval_data=test, eval_every=20, progress=False, rounds_per_call=10)
  assert res.history["test_accuracy"][-1] > 0.3     # chance is 0.1
  # The same clients stored: one round equals the procedural round on the same cohort.
  small = synthetic_population(60, iid=True, alpha=0.0, beta=0.0, examples_per_client=20)
  stored = small.materialize(np.arange(60))
  r1 = fs.run(algo, fs.models.logistic_regression(60, 10), small, rounds=2, cohort_size=8,
              progress=False)
  r2 = fs.run(algo, fs.models.logistic_regression(60, 10), stored, rounds=2, cohort_size=8,
              progress=False)
  fs.testing.assert_trees_close(r1.params, r2.params, atol=1e-5)


def test_population_state_memory_guard():
  pop = synthetic_population(100_000_000, examples_per_client=20)
  algo = fs.algorithms.scaffold(optax.sgd(0.1), batch_size=10)
  with pytest.raises(ValueError, match="bytes of state per client"):
    fs.run(algo, fs.models.logistic_regression(60, 10), pop, rounds=1, cohort_size=10,
           progress=False)


def test_size_weighted_sampling_statistics():
  sizes = np.array([1, 2, 3, 4, 10, 20, 60], np.float32)
  draw = jax.jit(jax.vmap(lambda k: engine.sample_cohort(k, 7, 1, weights=jnp.asarray(sizes))[0]))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 20000))).ravel(),
                       minlength=7)
  expected = 20000 * sizes / sizes.sum()
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 22.5, (counts, expected)      # 99.9th percentile of chi2(6)
  ids, valid = engine.sample_cohort(jax.random.key(1), 7, 5, weights=jnp.asarray(sizes))
  assert bool(valid.all()) and len(set(np.asarray(ids).tolist())) == 5
  # zero-weight clients are never drawn; the cohort shrinks instead
  ids, valid = engine.sample_cohort(jax.random.key(2), 7, 5,
                                    weights=jnp.asarray([0, 0, 0, 1, 1, 1, 0], jnp.float32))
  assert int(valid.sum()) == 3 and set(np.asarray(ids)[np.asarray(valid)]) == {3, 4, 5}


@pytest.mark.slow
def test_size_weighted_run_equals_reference(ragged_data):
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16, weighting="uniform")
  model = fs.models.logistic_regression(8, 4)
  res = fs.run(algo, model, ragged_data, rounds=2, cohort_size=4, cohort_sampling="size",
               progress=False)
  ref, _ = fs.testing.sequential_run(algo, model, ragged_data, rounds=2, cohort_size=4,
                                     cohort_sampling="size")
  fs.testing.assert_trees_close(res.params, ref.params, atol=1e-5)
  with pytest.raises(ValueError, match="cohort_sampling"):
    fs.run(algo, model, ragged_data, rounds=1, cohort_size=4, cohort_sampling="big",
           progress=False)
