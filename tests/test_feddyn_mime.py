"""FedDyn, Mime and MimeLite: NumPy references from the papers' equations, equivalence to the
sequential reference, learning, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms, testing

DIM, K = 3, 3
SIZES = (5, 8, 3, 6)


def _linear_model():
  """Multinomial logistic regression with params {"w": [DIM, K], "b": [K]}."""
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (DIM, K)), "b": jnp.zeros(K)}
  return fs.models.Model(init, lambda p, x: x @ p["w"] + p["b"][None], (DIM,), K, name="linear")


def _tiny_data():   # heterogeneous clients: shifted features
  return fs.FederatedData.from_clients(testing.tiny_logistic_clients(SIZES, DIM, K, 3, shift=1.0),
                                       num_classes=K)


def _run(algo, data, rounds, cohort_size):
  """fs.run with a callback recording each round's cohort; returns (result, cohorts, x0)."""
  cohorts = []
  res = fs.run(algo, _linear_model(), data, rounds=rounds, cohort_size=cohort_size, seed=4,
               progress=False,
               callback=lambda r, s, out: cohorts.append(np.asarray(out.clients["id"])))
  key_init, _ = jax.random.split(jax.random.key(4))
  p0 = _linear_model().init(key_init)
  x0 = [np.asarray(p0["w"], np.float64), np.asarray(p0["b"], np.float64)]
  return res, cohorts, x0


def _client(data, i):
  lo, hi = data.offsets[i], data.offsets[i + 1]
  return data.arrays["x"][lo:hi].astype(np.float64), data.arrays["y"][lo:hi]


LR, STEPS = 0.3, 3
FULL_BATCH = dict(batch_size=16, local_epochs=STEPS)   # every local step sees all the client's data


def test_feddyn_matches_numpy_reference():
  data, alpha, rounds = _tiny_data(), 0.1, 3
  algo = algorithms.feddyn(optax.sgd(LR), alpha=alpha, **FULL_BATCH)
  res, cohorts, x = _run(algo, data, rounds, cohort_size=3)
  m = len(SIZES)
  g = [[np.zeros((DIM, K)), np.zeros(K)] for _ in range(m)]    # grad L_k(theta_k), zeros
  h = [np.zeros((DIM, K)), np.zeros(K)]
  for cohort in cohorts:
    thetas = []
    for k in cohort:
      xs, ys = _client(data, k)
      th = [a.copy() for a in x]
      for _ in range(STEPS):   # local objective L_k(th) - <g_k, th> + alpha/2 ||th - x||^2
        grad = testing.np_logistic_grad(th, xs, ys)
        th = [t - LR * (gr - gk + alpha * (t - x0)) for t, gr, gk, x0 in zip(th, grad, g[k], x)]
      g[k] = [gk - alpha * (t - x0) for gk, t, x0 in zip(g[k], th, x)]
      thetas.append(th)
    mean = [np.mean([t[j] for t in thetas], axis=0) for j in range(2)]
    h = [hj - alpha / m * sum(t[j] - x[j] for t in thetas) for j, hj in enumerate(h)]
    x = [mean[j] - h[j] / alpha for j in range(2)]
  assert len(cohorts) == rounds and all(len(set(c)) == 3 for c in cohorts)
  testing.assert_trees_close(res.params, {"w": x[0], "b": x[1]}, atol=1e-5)
  testing.assert_trees_close(res.state.aux, {"w": h[0], "b": h[1]}, atol=1e-5)
  testing.assert_trees_close(res.state.clients.algorithm,
                             {"w": np.stack([gk[0] for gk in g]),
                              "b": np.stack([gk[1] for gk in g])}, atol=1e-5)
  assert np.abs(h[0]).max() > 1e-3   # the reference exercises the correction
  # alpha lives in the state: the same run with another default and run(hparams=) agrees
  other = fs.run(algorithms.feddyn(optax.sgd(LR), alpha=1.0, **FULL_BATCH), _linear_model(), data,
                 rounds=rounds, cohort_size=3, seed=4, progress=False, hparams={"alpha": alpha})
  testing.assert_trees_close(other.params, res.params, atol=1e-6)


@pytest.mark.parametrize("name,weighting", [("mime", "examples"), ("mime", "uniform"),
                                            ("mimelite", "examples")])
def test_mime_matches_numpy_reference(name, weighting):
  data, beta, rounds = _tiny_data(), 0.6, 3
  algo = algorithms.make(name, client_optimizer=optax.sgd(LR), beta=beta, weighting=weighting,
                         **FULL_BATCH)
  res, cohorts, x = _run(algo, data, rounds, cohort_size=3)
  mom = [np.zeros((DIM, K)), np.zeros(K)]
  c = [np.zeros((DIM, K)), np.zeros(K)]       # Mime: the previous round's mean gradient at x
  for r, cohort in enumerate(cohorts):
    ys_, full, w = [], [], []
    for i in cohort:
      xs, ys = _client(data, i)
      gx = testing.np_logistic_grad(x, xs, ys)
      y = [a.copy() for a in x]
      for _ in range(STEPS):
        gy = testing.np_logistic_grad(y, xs, ys)
        if name == "mime":   # SVRG-style correction with the server's c
          gy = [a - b + cj for a, b, cj in zip(gy, gx, c)]
        y = [yj - LR * ((1 - beta) * gj + beta * mj) for yj, gj, mj in zip(y, gy, mom)]
      ys_.append(y)
      full.append(gx)
      w.append(len(ys) if weighting == "examples" else 1.0)
    w = np.asarray(w) / np.sum(w)
    x = [sum(wi * yi[j] for wi, yi in zip(w, ys_)) for j in range(2)]
    c = [sum(wi * gi[j] for wi, gi in zip(w, full)) for j in range(2)]
    mom = [(1 - beta) * cj + beta * mj for cj, mj in zip(c, mom)]
    if r == 0 and name == "mime":   # c = m = 0 in round 1: clients do not move
      assert res.history["update_norm"][0] == 0.0
  testing.assert_trees_close(res.params, {"w": x[0], "b": x[1]}, atol=1e-5)
  testing.assert_trees_close(res.state.aux.momentum, {"w": mom[0], "b": mom[1]}, atol=1e-5)
  testing.assert_trees_close(res.state.aux.grad, {"w": c[0], "b": c[1]}, atol=1e-5)


def _mlp():
  return fs.models.mlp(input_dim=8, hidden=(8,), num_classes=4)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [
    ("feddyn", {"alpha": 0.05}), ("mime", {"beta": 0.5}), ("mimelite", {"beta": 0.5})])
def test_equals_sequential_reference_across_chunk_sizes(name, kwargs):
  data = testing.ragged_clients(sizes=(1, 3, 7, 20, 33, 50))
  algo = algorithms.make(name, client_optimizer=optax.sgd(0.1), batch_size=8, local_epochs=2,
                         **kwargs)
  ref, _ = testing.sequential_run(algo, _mlp(), data, rounds=3, cohort_size=4, seed=1)
  for chunk in (3,):   # chunk-size invariance in general: test_registry_contract.py
    res = fs.run(algo, _mlp(), data, rounds=3, cohort_size=4, chunk_size=chunk, seed=1,
                 progress=False)
    testing.assert_trees_close(res.params, ref.params, atol=1e-5)
    testing.assert_trees_close(res.state.aux, ref.aux, atol=1e-5)
    testing.assert_trees_close(res.state.clients.algorithm, ref.clients.algorithm, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [
    ("feddyn", {"alpha": 0.01}), ("mime", {"beta": 0.5}), ("mimelite", {"beta": 0.5})])
def test_learns_digits(name, kwargs):
  train, test = fs.datasets.digits()
  parts = fs.partition.dirichlet(train["y"], 20, alpha=0.5, seed=0)
  data = fs.FederatedData.from_partition(train, parts, num_classes=10)
  algo = algorithms.make(name, client_optimizer=optax.sgd(0.1), batch_size=16, local_epochs=1,
                         **kwargs)
  res = fs.run(algo, fs.models.logistic_regression(64, 10), data, rounds=15, cohort_size=5,
               eval_data=test, eval_every=15, seed=0, progress=False)
  losses = res.history["train_loss"]
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
  assert res.history.last("test_accuracy") > 0.6, res.history.last("test_accuracy")  # chance 0.1


@pytest.mark.parametrize("make,kwargs", [
    (algorithms.feddyn, {"alpha": 0.0}), (algorithms.feddyn, {"alpha": -1.0}),
    (algorithms.feddyn, {"alpha": float("inf")}), (algorithms.feddyn, {"alpha": True}),
    (algorithms.mime, {"beta": 1.0}), (algorithms.mime, {"beta": -0.1}),
    (algorithms.mimelite, {"beta": 1.5}), (algorithms.mimelite, {"beta": "0.9"})])
def test_bad_hyperparameters_raise(make, kwargs):
  with pytest.raises(ValueError, match="alpha|beta"):
    make(**kwargs)
