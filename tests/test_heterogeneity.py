"""Heterogeneous clients as masks; SCAFFOLD and FedNova against plain paper-equation loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms, testing, tree
from fedjax_sim.heterogeneity import Heterogeneity

P = 12


def _model():
  return fs.models.logistic_regression(8, 4)


@pytest.mark.slow
def test_mixed_heterogeneity_equals_sequential_reference(ragged_data):
  rng = np.random.default_rng(0)
  het = Heterogeneity(straggler_fraction=0.5, dropout_fraction=0.25,
                      local_epochs=rng.integers(1, 4, P),
                      learning_rate_scale=rng.uniform(0.5, 2.0, P),
                      batch_size=rng.integers(4, 17, P),
                      availability=rng.uniform(0.3, 1.0, (3, P)))
  algo = algorithms.fedprox(optax.sgd(0.1), mu=0.1, batch_size=16, local_epochs=3)
  res = fs.run(algo, _model(), ragged_data, rounds=3, cohort_size=6, chunk_size=4, seed=3,
               heterogeneity=het, progress=False)
  ref, hist = testing.sequential_run(algo, _model(), ragged_data, rounds=3, cohort_size=6, seed=3,
                                     heterogeneity=het)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)
  assert list(res.history["num_counted"]) == [h["num_counted"] for h in hist]
  h = res.history
  assert h["num_stragglers"].sum() > 0 and h["num_dropped"].sum() > 0
  assert np.all(h["num_counted"] <= h["num_clients"] - h["num_dropped"])
  assert h["steps_wasted"].sum() > 0


@pytest.mark.slow
def test_stragglers_stop_part_way_and_fedavg_drops_them(ragged_data):
  base = algorithms.fedavg(optax.sgd(0.1), batch_size=8, local_epochs=4)
  het = Heterogeneity(straggler_fraction=1.0)
  full = fs.run(base, _model(), ragged_data, rounds=1, cohort_size=P, progress=False)
  seen = []
  fs.run(base, _model(), ragged_data, rounds=1, cohort_size=P, heterogeneity=het, progress=False,
         callback=lambda r, s, out: seen.append(jax.device_get(out.clients)))
  c = seen[0]
  steps_full = np.ceil(ragged_data.sizes[c["id"]] / 8).astype(int) * 4
  multi = steps_full > 1
  # Straggler epochs e ~ U{1..E-1}: a multiple of the per-epoch steps, strictly below E epochs.
  per_epoch = steps_full // 4
  assert np.all(c["steps"][multi] < steps_full[multi])
  assert np.all(c["steps"][multi] % per_epoch[multi] == 0)
  assert np.all(c["straggler"][multi])
  assert int(full.history["num_stragglers"][0]) == 0
  dropping = algorithms.fedavg(optax.sgd(0.1), batch_size=8, local_epochs=4, drop_stragglers=True)
  assert dropping.drop_stragglers and not base.drop_stragglers
  dropped = fs.run(dropping, _model(), ragged_data, rounds=1, cohort_size=P, heterogeneity=het,
                   progress=False)
  # Only the one-step clients (which cannot straggle) count.
  assert int(dropped.history["num_counted"][0]) == int((~multi).sum())


def test_per_client_epochs_and_availability(ragged_data):
  epochs = np.array([1, 2, 3] * 4)
  avail = np.ones(P)
  avail[:4] = 0.0                     # never online
  het = Heterogeneity(local_epochs=epochs, availability=avail)
  algo = algorithms.fedavg(optax.sgd(0.1), batch_size=8, local_epochs=3)
  seen = []
  res = fs.run(algo, _model(), ragged_data, rounds=4, cohort_size=10, heterogeneity=het,
               progress=False, callback=lambda r, s, out: seen.append(jax.device_get(out.clients)))
  for c in seen:
    ok = c["counted"]
    assert np.all(c["id"][ok] >= 4), "offline clients were sampled"
    ids = c["id"][ok]
    np.testing.assert_array_equal(c["steps"][ok], epochs[ids] * np.ceil(
        ragged_data.sizes[ids] / 8).astype(int))
  # only 8 clients are online: the cohort of 10 shrinks to 8
  assert np.all(res.history["num_clients"] == 8) and np.all(res.history["num_online"] == 8)


@pytest.mark.parametrize("kw, match", [
    ({"straggler_fraction": 1.5}, "straggler_fraction"),
    ({"dropout_fraction": 1.0}, "dropout_fraction"),
    ({"local_steps": np.ones(5)}, "one value per client"),
    ({"learning_rate_scale": -np.ones(P)}, "learning_rate_scale"),
    ({"batch_size": np.full(P, 99)}, "maximum batch"),
    ({"local_epochs": np.full(P, 9)}, "local epochs"),
    ({"availability": np.full(P, 2.0)}, "probabilities"),
])
def test_bad_heterogeneity(ragged_data, kw, match):
  algo = algorithms.fedavg(batch_size=16, local_epochs=2)
  with pytest.raises(ValueError, match=match):
    fs.run(algo, _model(), ragged_data, rounds=1, cohort_size=4, heterogeneity=Heterogeneity(**kw),
           progress=False)


# --- SCAFFOLD / FedNova against their papers' equations, written as plain loops ---------------
# Full-batch local steps (batch >= largest client, epoch mode): client i takes E gradient steps
# on its whole data, so the reference needs no shuffling and no engine pieces at all.

def _grad(model, params, x, y):
  def loss(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y))
  return jax.grad(loss)(params)


def _clients(data):
  return [(data.arrays["x"][data.offsets[i]:data.offsets[i + 1]],
           data.arrays["y"][data.offsets[i]:data.offsets[i + 1]]) for i in range(data.num_clients)]


@pytest.mark.slow
def test_scaffold_matches_paper_equations(ragged_data):
  lr, E, rounds = 0.1, 3, 3
  model = _model()
  algo = algorithms.scaffold(optax.sgd(lr), batch_size=256, local_epochs=E)
  res = fs.run(algo, model, ragged_data, rounds=rounds, cohort_size=P, seed=0, progress=False)
  x = model.init(jax.random.split(jax.random.key(0))[0])
  c = jax.tree.map(jnp.zeros_like, x)
  ci = [c] * P
  for _ in range(rounds):
    dys, dcs = [], []
    for i, (cx, cy) in enumerate(_clients(ragged_data)):
      y = x
      for _ in range(E):
        g = _grad(model, y, cx, cy)
        y = jax.tree.map(lambda y_, g_, c_, ci_: y_ - lr * (g_ - ci_ + c_), y, g, c, ci[i])
      new_ci = jax.tree.map(lambda ci_, c_, x_, y_: ci_ - c_ + (x_ - y_) / (E * lr), ci[i], c, x, y)
      dys.append(jax.tree.map(jnp.subtract, y, x))
      dcs.append(jax.tree.map(jnp.subtract, new_ci, ci[i]))
      ci[i] = new_ci
    x = jax.tree.map(lambda x_, *d: x_ + sum(d) / P, x, *dys)
    c = jax.tree.map(lambda c_, *d: c_ + sum(d) / P, c, *dcs)   # |S|/N * mean = sum / N
  testing.assert_trees_close(res.params, x, atol=1e-5)
  testing.assert_trees_close(res.state.aux, c, atol=1e-5)
  testing.assert_trees_close(res.state.clients.algorithm, tree.stack(ci), atol=1e-5)
  # the population's control variates (P copies of the model) are reported in the history
  assert res.history["client_state_bytes"][0] == P * 4 * tree.num_params(x)


@pytest.mark.slow
def test_fednova_matches_paper_equations_with_unequal_steps(ragged_data):
  lr, E = 0.1, 3
  epochs = np.array([1, 2, 3] * 4)
  model = _model()
  algo = algorithms.fednova(optax.sgd(lr), batch_size=256, local_epochs=E)
  res = fs.run(algo, model, ragged_data, rounds=2, cohort_size=P, seed=0, progress=False,
               heterogeneity=Heterogeneity(local_epochs=epochs))
  fedavg = fs.run(algorithms.fedavg(optax.sgd(lr), batch_size=256, local_epochs=E), model,
                  ragged_data, rounds=2, cohort_size=P, seed=0, progress=False,
                  heterogeneity=Heterogeneity(local_epochs=epochs))
  p = ragged_data.sizes / ragged_data.sizes.sum()
  x = model.init(jax.random.split(jax.random.key(0))[0])
  for _ in range(2):
    ds = []
    for i, (cx, cy) in enumerate(_clients(ragged_data)):
      y = x
      for _ in range(epochs[i]):
        y = jax.tree.map(lambda y_, g_: y_ - lr * g_, y, _grad(model, y, cx, cy))
      ds.append(jax.tree.map(lambda x_, y_: (x_ - y_) / epochs[i], x, y))   # d_i = delta / tau_i
    tau_eff = float(np.sum(p * epochs))
    x = jax.tree.map(lambda x_, *d: x_ - tau_eff * sum(pi * di for pi, di in zip(p, d)), x, *ds)
  testing.assert_trees_close(res.params, x, atol=1e-5)
  assert tree.max_abs_diff(res.params, fedavg.params) > 1e-3   # and it is not FedAvg


def test_scaffold_fednova_bad_input():
  with pytest.raises(ValueError, match="client_lr"):
    algorithms.scaffold(client_lr=0.1)
  with pytest.raises(ValueError, match="momentum"):
    algorithms.fednova(optax.sgd(0.1), momentum=0.5)
  with pytest.raises(ValueError, match="client_optimizer"):
    algorithms.fednova(0.1)
