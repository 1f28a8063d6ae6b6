"""Ditto and APFL: NumPy references from the papers' equations, the sequential reference,
personalized evaluation, learning on a pathological non-IID split, bad input."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import evaluation, personalize
from fedjax_sim.algorithms.apfl import APFLState
from fedjax_sim.algorithms.ditto import DittoState

DIM, CLASSES, LR, STEPS = 3, 3, 0.4, 3


@pytest.fixture(scope="module")
def tiny():
  """3 clients of 5, 7, 9 examples, a linear softmax model and non-zero initial params."""
  rng = np.random.default_rng(1)
  clients = fs.testing.tiny_logistic_clients((5, 7, 9), DIM, CLASSES, rng)
  data = fs.FederatedData.from_clients(clients, num_classes=CLASSES)
  model = fs.models.logistic_regression(DIM, CLASSES)
  params = jax.tree.map(lambda a: np.asarray(rng.normal(size=a.shape) * 0.5, np.float32),
                        model.init(jax.random.key(0)))
  return data, model, params, clients


def _np_params(params):
  return (np.asarray(params["Dense_0"]["kernel"], np.float64),
          np.asarray(params["Dense_0"]["bias"], np.float64))


def _full_batch(algo_factory, **kw):
  # batch_size >= every client's size: each of the STEPS local epochs is one full-batch GD step
  return algo_factory(optax.sgd(LR), local_epochs=STEPS, batch_size=16, **kw)


def _run(algo, tiny, rounds=3, callback=None, hparams=None):
  data, model, params, _ = tiny
  return fs.run(algo, model, data, rounds=rounds, cohort_size=3, seed=0, init_params=params,
                progress=False, callback=callback, hparams=hparams)


def test_ditto_equals_numpy_reference(tiny):
  lam = 0.7
  outs = []
  res = _run(_full_batch(fs.algorithms.ditto, lam=lam), tiny,
             callback=lambda r, s, o: outs.append(jax.device_get(o.clients)))
  _, _, params, clients = tiny
  w = _np_params(params)
  v = [w for _ in clients]   # v_k^0 = w^0
  for _ in range(3):
    locals_, personal_acc = [], []
    for k, c in enumerate(clients):
      x, y = c["x"].astype(np.float64), c["y"]
      # v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t)); w_k: local SGD (FedAvg)
      path = fs.testing.np_sgd_iterates(v[k], x, y, STEPS, LR, correction=lambda p: tuple(
          lam * (a - b) for a, b in zip(p, w)))
      personal_acc.append(0.0)
      for vk in path[:-1]:   # v_k's accuracy before each step's update
        personal_acc[k] += np.mean(np.argmax(x @ vk[0] + vk[1], 1) == y) / STEPS
      v[k] = path[-1]
      locals_.append(fs.testing.np_local_sgd(w, x, y, STEPS, LR))
    # w^{t+1} = w^t + (1/|S|) sum_k (w_k - w^t): uniform, as Algorithm 1
    w = tuple(np.mean([lw[i] for lw in locals_], 0) for i in range(2))
  np.testing.assert_allclose(_np_params(res.params)[0], w[0], atol=1e-5)
  np.testing.assert_allclose(_np_params(res.params)[1], w[1], atol=1e-5)
  state = res.state.clients.algorithm
  assert isinstance(state, DittoState)
  for k in range(3):
    got = _np_params(jax.tree.map(lambda a: a[k], state.personal))
    np.testing.assert_allclose(got[0], v[k][0], atol=1e-5)
    np.testing.assert_allclose(got[1], v[k][1], atol=1e-5)
  assert not np.allclose(v[0][0], w[0], atol=1e-3)   # the personal models are not the global one
  # the last round's per-client training accuracy of v_k (before each step's update)
  last = outs[-1]
  np.testing.assert_allclose(last["personal_accuracy"], np.asarray(personal_acc)[last["id"]],
                             atol=1e-6)


@pytest.mark.parametrize("adaptive", [True, False])
def test_apfl_equals_numpy_reference(tiny, adaptive):
  alpha0 = 0.5
  # alpha is an in-state hyperparameter: run(hparams=...) overrides the factory's default
  res = _run(_full_batch(fs.algorithms.apfl, alpha=0.9, adaptive_alpha=adaptive), tiny,
             hparams={"alpha": alpha0})
  _, _, params, clients = tiny
  w = _np_params(params)
  v = [w for _ in clients]
  alpha = [alpha0] * len(clients)
  for _ in range(3):
    locals_ = []
    for i, c in enumerate(clients):
      x, y = c["x"].astype(np.float64), c["y"]
      w_path = fs.testing.np_sgd_iterates(w, x, y, STEPS, LR)   # w_i: local SGD (FedAvg)
      vi, a = v[i], alpha[i]
      for wi in w_path[:-1]:
        vbar = tuple(a * p + (1 - a) * q for p, q in zip(vi, wi))
        g = fs.testing.np_logistic_grad(vbar, x, y)
        # grad_v f(vbar) = alpha grad f(vbar); grad_alpha f(vbar) = <v - w, grad f(vbar)>
        ga = sum(np.sum((p - q) * gg) for p, q, gg in zip(vi, wi, g))
        vi = tuple(p - LR * a * gg for p, gg in zip(vi, g))
        if adaptive:
          a = float(np.clip(a - LR * ga, 0.0, 1.0))
      v[i], alpha[i] = vi, a
      locals_.append(w_path[-1])
    w = tuple(np.mean([lw[j] for lw in locals_], 0) for j in range(2))
  np.testing.assert_allclose(_np_params(res.params)[0], w[0], atol=1e-5)
  np.testing.assert_allclose(_np_params(res.params)[1], w[1], atol=1e-5)
  state = res.state.clients.algorithm
  assert isinstance(state, APFLState)
  np.testing.assert_allclose(alpha0 + np.asarray(state.alpha_offset), alpha, atol=1e-5)
  if adaptive:
    assert np.ptp(alpha) > 1e-3   # the mixing weights did move, and apart
  for i in range(3):
    got = _np_params(jax.tree.map(lambda a: a[i], state.personal))
    np.testing.assert_allclose(got[0], v[i][0], atol=1e-5)
    np.testing.assert_allclose(got[1], v[i][1], atol=1e-5)
  # the personalized model evaluated is alpha_i v_i + (1 - alpha_i) w
  mixed = personalize.personal_params(res.state, np.arange(3))
  for i in range(3):
    want = alpha[i] * v[i][0] + (1 - alpha[i]) * w[0]
    np.testing.assert_allclose(np.asarray(mixed["Dense_0"]["kernel"][i]), want, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("ditto", {"lam": 0.3}), ("apfl", {"alpha": 0.4})])
def test_equals_sequential_reference(name, kw):
  data = fs.testing.ragged_clients()
  model = fs.models.logistic_regression(8, 4)
  algo = fs.algorithms.make(name, client_optimizer=optax.sgd(0.1), batch_size=16, **kw)
  ref, _ = fs.testing.sequential_run(algo, model, data, rounds=3, cohort_size=5, seed=3)
  for chunk in (4,):   # chunk-size invariance in general: test_registry_contract.py
    res = fs.run(algo, model, data, rounds=3, cohort_size=5, seed=3, chunk_size=chunk,
                 progress=False)
    fs.testing.assert_trees_close(res.params, ref.params, atol=1e-5)
    fs.testing.assert_trees_close(res.state.clients.algorithm, ref.clients.algorithm, atol=1e-5)


@pytest.fixture(scope="module")
def ditto_run(tiny):
  """Ditto on ``tiny`` for 3 rounds with the personal-evaluation callback every 2 rounds (and at
  the last); also records each round's per-client outputs."""
  data, model, params, _ = tiny
  cb = personalize.personal_eval_callback(model, data, every=2, rounds=3, include_global=True)
  seen = []

  def callback(r, state, out):
    seen.append(out.clients)
    return cb(r, state, out)

  res = fs.run(_full_batch(fs.algorithms.ditto, lam=0.1), model, data, rounds=3, cohort_size=3,
               seed=0, init_params=params, progress=False, callback=callback)
  return res, seen


def _accuracy(params, x, y):
  k, b = _np_params(params)
  return float(np.mean(np.argmax(x @ k + b, 1) == y))


def test_evaluate_personal_is_each_clients_own_model_and_callback_records_it(tiny, ditto_run):
  data, model, _, clients = tiny
  res, seen = ditto_run
  out = personalize.evaluate_personal(model, res.state, data, chunk_size=2)
  for k, c in enumerate(clients):
    v = jax.tree.map(lambda a: a[k], res.state.clients.algorithm.personal)
    np.testing.assert_allclose(out["accuracy"][k], _accuracy(v, c["x"], c["y"]), atol=1e-6)
  h = res.history
  assert np.isnan(h["personal_accuracy_mean"][0])            # not an evaluation round
  np.testing.assert_allclose(h["personal_accuracy_mean"][2], out["accuracy"].mean(), atol=1e-6)
  np.testing.assert_allclose(h["personal_accuracy_p10"][2],
                             np.percentile(out["accuracy"], 10), atol=1e-6)
  glob = [_accuracy(res.params, c["x"], c["y"]) for c in clients]
  np.testing.assert_allclose(h["client_accuracy_mean"][2], np.mean(glob), atol=1e-6)
  # every round: the personal models' training metrics, example-weighted over the clients
  for r, clients in enumerate(seen):
    want = np.sum(clients["personal_accuracy"] * clients["count"]) / np.sum(clients["count"])
    np.testing.assert_allclose(h["train_personal_accuracy"][r], want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("ditto", {"lam": 0.1}), ("apfl", {"alpha": 0.5})])
def test_personal_models_beat_global_on_pathological_non_iid(name, kw):
  train, _ = fs.datasets.digits(seed=0)
  parts = fs.partition.shards(train["y"], 20, shards_per_client=2, seed=0)
  rng = np.random.default_rng(0)
  parts = [rng.permutation(p) for p in parts]
  fit = fs.FederatedData.from_partition(train, [p[:len(p) // 2] for p in parts], num_classes=10)
  held = fs.FederatedData.from_partition(train, [p[len(p) // 2:] for p in parts], num_classes=10)
  model = fs.models.logistic_regression(64, 10)
  algo = fs.algorithms.make(name, client_optimizer=optax.sgd(0.3), batch_size=10, **kw)
  res = fs.run(algo, model, fit, rounds=15, cohort_size=20, seed=0, progress=False)
  personal = personalize.evaluate_personal(model, res.state, held)["summary"]
  glob = evaluation.evaluate_clients(model, res.params, held)["summary"]
  assert personal["accuracy_mean"] > glob["accuracy_mean"] + 0.05, (personal, glob)
  assert personal["accuracy_p10"] >= glob["accuracy_p10"]


@pytest.mark.parametrize("make,kwargs,match", [
    (fs.algorithms.ditto, {"lam": -0.1}, "lam"),
    (fs.algorithms.ditto, {"lam": float("nan")}, "lam"),
    (fs.algorithms.ditto, {"personal_optimizer": "sgd"}, "personal_optimizer"),
    (fs.algorithms.apfl, {"alpha": -0.1}, "alpha"),
    (fs.algorithms.apfl, {"alpha": 1.5}, "alpha"),
    (fs.algorithms.apfl, {"adaptive_alpha": 1}, "adaptive_alpha"),
])
def test_bad_input(make, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


def test_personal_evaluation_bad_input(tiny, ditto_run):
  data, model, params, _ = tiny
  plain = fs.engine.init_state(fs.algorithms.fedavg(), params, data.num_clients)
  with pytest.raises(ValueError, match="no personal models"):
    personalize.evaluate_personal(model, plain, data)
  with pytest.raises(ValueError, match="holds 2 clients"):
    personalize.evaluate_personal(model, ditto_run[0].state, data.subset([0, 1]))
  with pytest.raises(ValueError, match="every"):
    personalize.personal_eval_callback(model, data, every=0)
