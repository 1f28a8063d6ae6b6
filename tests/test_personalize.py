"""Personalization: local fine-tuning after federated training, vectorized over clients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import evaluation, personalize
from fedjax_sim.data.federated import LocalWork, batch_indices


@pytest.fixture(scope="module")
def split():
  """16 Dirichlet(0.2) label-skewed clients; each keeps the first half of its examples for
  fine-tuning and the second half (same label mix) as its held-out test set."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1200, 10)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(10, 5)), 1).astype(np.int32)
  parts = fs.partition.dirichlet(y, 16, alpha=0.2, seed=0, min_size=6)
  parts = [rng.permutation(p) for p in parts]
  train = fs.FederatedData.from_partition({"x": x, "y": y}, [p[:len(p) // 2] for p in parts],
                                          num_classes=5)
  test = fs.FederatedData.from_partition({"x": x, "y": y}, [p[len(p) // 2:] for p in parts],
                                         num_classes=5)
  model = fs.models.logistic_regression(10, 5)
  algo = fs.algorithms.fedavg(optax.sgd(0.05), batch_size=16)
  params = fs.run(algo, model, train, rounds=3, cohort_size=4, seed=0, progress=False).params
  return model, params, train, test


def test_personalized_beats_global_on_non_iid_clients(split):
  model, params, train, test = split
  out = personalize.personalize(model, params, train, test, optax.sgd(0.1), steps=20,
                                batch_size=8, seed=0, chunk_size=5)
  before, after = out["before"]["summary"], out["after"]["summary"]
  assert after["accuracy_mean"] > before["accuracy_mean"] + 0.05
  assert after["accuracy_p50"] >= before["accuracy_p50"]
  # "before" is exactly the global model's per-client evaluation
  ref = evaluation.evaluate_clients(model, params, test)
  np.testing.assert_allclose(out["before"]["accuracy"], ref["accuracy"], atol=1e-6)
  np.testing.assert_allclose(out["count"], test.sizes)


@pytest.mark.slow
def test_vectorized_equals_a_per_client_loop(split):
  model, params, train, test = split
  opt = optax.sgd(0.1, momentum=0.5)
  steps, bs, seed = 7, 8, 3
  out = personalize.personalize(model, params, train, test, opt, steps=steps, batch_size=bs,
                                seed=seed, chunk_size=3, return_params=True)
  grad_fn = jax.jit(jax.grad(lambda p, x, y, m: model.batch_loss(p, x, y, m)[0]))
  evaluate = evaluation.make_evaluate(model)
  work = LocalWork(bs, local_epochs=None, local_steps=steps)
  for p in range(train.num_clients):
    rows, mask = batch_indices(jax.random.key(seed), jnp.asarray([p]),
                               jnp.asarray([train.offsets[p]]), jnp.asarray([train.sizes[p]]),
                               work, train.max_client_size)
    rows, mask = np.asarray(rows[0]), np.asarray(mask[0])
    local, state = params, opt.init(params)
    for s in range(steps):
      g = grad_fn(local, train.arrays["x"][rows[s]], train.arrays["y"][rows[s]], mask[s])
      u, state = opt.update(g, state, local)
      local = optax.apply_updates(local, u)
    fs.testing.assert_trees_close(jax.tree.map(lambda a: a[p], out["params"]), local, atol=1e-5)
    ev = evaluate(local, test.client(p)["x"], test.client(p)["y"])
    assert abs(out["after"]["accuracy"][p] - float(ev["accuracy"])) < 1e-6
    assert abs(out["after"]["loss"][p] - float(ev["loss"])) < 1e-4


def test_trainable_predicate_and_bad_input(split):
  model, params, train, test = split
  out = personalize.personalize(model, params, train, test, optax.sgd(0.1), steps=3,
                                trainable=lambda path: path.endswith("bias"), return_params=True)
  kernel = out["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(kernel, np.broadcast_to(params["Dense_0"]["kernel"], kernel.shape))
  with pytest.raises(ValueError, match="matches none"):
    personalize.personalize(model, params, train, test, optax.sgd(0.1), steps=3,
                            trainable=lambda path: "head" in path)
  with pytest.raises(ValueError, match="same clients"):
    personalize.personalize(model, params, train, test.subset([0, 1]), optax.sgd(0.1), steps=3)
