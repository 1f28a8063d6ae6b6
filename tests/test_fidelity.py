"""Fidelity to the papers: the library's rounds against plain NumPy float64 implementations of
the papers' equations, sharing no code with the engine.

The NumPy side re-implements the model (multinomial logistic regression, mean softmax
cross-entropy per batch), local SGD with heavy-ball momentum and the fixed batch order
(``shuffle=False``: stored order, step t reads positions ``(t B + j) mod n``), all three in
``fedjax_sim.testing``'s NumPy helpers (``np_logistic_grad``, ``np_local_sgd``), and here the
server rules of Reddi et al. (2021), Algorithm 2 and Wang et al. (2020), FedNova. The only things
it takes from the run are the initial parameters (given to the run) and which clients were
sampled each round (partial participation: recorded by a callback).
"""

import numpy as np
import optax
import pytest

import fedjax_sim as fs

DIM, CLASSES, B, K, LR = 5, 3, 4, 3, 0.1
SIZES = (7, 12, 5, 9, 15, 10)
ROUNDS, COHORT = 4, 3


def _population():
  return fs.testing.tiny_logistic_clients(SIZES, DIM, CLASSES, 0, labels="linear",
                                          label_noise=0.5)


def _init():
  rng = np.random.default_rng(1)
  return {"Dense_0": {"kernel": (0.1 * rng.normal(size=(DIM, CLASSES))).astype(np.float32),
                      "bias": (0.1 * rng.normal(size=CLASSES)).astype(np.float32)}}


def _run(algo, rounds=ROUNDS, **kw):
  """Runs the library; returns (final params as float64 (W, b), cohorts per round)."""
  clients = _population()
  data = fs.FederatedData.from_clients(clients, num_classes=CLASSES)
  cohorts = []

  def record(r, state, out):
    ids = np.asarray(out.clients["id"])
    cohorts.append(ids[np.asarray(out.clients["counted"])])

  res = fs.run(algo, fs.models.logistic_regression(DIM, CLASSES), data, rounds=rounds,
               cohort_size=COHORT, init_params=_init(), callback=record, progress=False,
               num_devices=1, **kw)
  p = res.params["Dense_0"]
  assert all(len(c) == COHORT for c in cohorts)
  return (np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)), cohorts, clients


# --- NumPy float64 reference ------------------------------------------------------------------

def np_local_sgd(params, client, steps, lr, momentum=0.0):
  """``steps`` SGD steps of batches of B in stored order (step t: positions (t B + j) mod n),
  heavy-ball momentum u_t = momentum u_{t-1} + g_t, y <- y - lr u_t."""
  return fs.testing.np_local_sgd(params, client["x"], client["y"], steps, lr, batch_size=B,
                                 momentum=momentum)


def np_init():
  p = _init()["Dense_0"]
  return p["kernel"].astype(np.float64), p["bias"].astype(np.float64)


def np_fedopt(kind, cohorts, clients, eta, beta1, beta2, tau):
  """Reddi et al. (2021), Algorithm 2, for ``kind`` in adagrad / adam / yogi."""
  x = list(np_init())
  m = [np.zeros_like(a) for a in x]
  v = [np.full_like(a, tau ** 2) for a in x]
  for ids in cohorts:
    deltas = [[yi - xi for yi, xi in zip(np_local_sgd(x, clients[i], K, LR), x)] for i in ids]
    for j in range(2):
      d = np.mean([dl[j] for dl in deltas], axis=0)          # uniform average of Delta_i
      m[j] = beta1 * m[j] + (1 - beta1) * d
      if kind == "adagrad":
        v[j] = v[j] + d ** 2
      elif kind == "yogi":
        v[j] = v[j] - (1 - beta2) * d ** 2 * np.sign(v[j] - d ** 2)
      else:
        v[j] = beta2 * v[j] + (1 - beta2) * d ** 2
      x[j] = x[j] + eta * m[j] / (np.sqrt(v[j]) + tau)
  return tuple(x)


def np_fednova(cohorts, clients, steps_cap, lr_scale, momentum, base_lr):
  """Wang et al. (2020): x <- x - eta tau_eff sum_i p_i d_i, d_i = G_i a_i / ||a_i||_1 with
  x - y_i = eta G_i a_i; per-client lr eta s_i and momentum rho give
  a_{i,k} = s_i (1 - rho^(tau_i - k + 1)) / (1 - rho), tau_eff = sum_i p_i ||a_i||_1."""
  x = np_init()
  for ids in cohorts:
    n = np.array([len(clients[i]["y"]) for i in ids], np.float64)
    p = n / n.sum()                                               # example weighting
    upd = [np.zeros_like(a) for a in x]
    tau_eff = 0.0
    for pi, i in zip(p, ids):
      tau_i = min(K, steps_cap[i])
      s_i = lr_scale[i]
      y = np_local_sgd(x, clients[i], tau_i, base_lr * s_i, momentum)
      k = np.arange(1, tau_i + 1)
      a = s_i * (1 - momentum ** (tau_i - k + 1)) / (1 - momentum)
      norm = a.sum()
      tau_eff += pi * norm
      for j in range(2):
        upd[j] += pi * (x[j] - y[j]) / norm                          # = eta * p_i d_i
    x = tuple(xj - tau_eff * u for xj, u in zip(x, upd))
  return x


def _close(got, want, atol=1e-5):
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=atol)


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, beta1", [("adam", 0.9), ("yogi", 0.9), ("adagrad", 0.9),
                                         ("adagrad", 0.0)])
def test_adaptive_server_optimizers_equal_algorithm_2(kind, beta1):
  make = {"adam": fs.algorithms.fedadam, "yogi": fs.algorithms.fedyogi,
          "adagrad": fs.algorithms.fedadagrad}[kind]
  eta, beta2, tau = 0.03, 0.99, 1e-3
  kw = {} if kind == "adagrad" else {"beta2": beta2}
  algo = make(optax.sgd(LR), server_lr=eta, beta1=beta1, tau=tau, local_steps=K, batch_size=B,
              shuffle=False, **kw)
  assert algo.weighting == "uniform"   # Algorithm 2 averages uniformly
  got, cohorts, clients = _run(algo)
  assert len({tuple(sorted(c)) for c in cohorts}) > 1   # partial participation, varying cohorts
  want = np_fedopt(kind, cohorts, clients, eta, beta1, beta2, tau)
  _close(got, want)
  # and the server actually moved the model by much more than the tolerance
  assert np.abs(want[0] - np_init()[0]).max() > 5e-3


def test_optax_adam_is_a_different_algorithm_still_reachable():
  algo = fs.algorithms.fedavg(optax.sgd(LR), optax.adam(0.03, b1=0.9, b2=0.99, eps=1e-3),
                              local_steps=K, batch_size=B, shuffle=False, weighting="uniform")
  got, cohorts, clients = _run(algo)
  want = np_fedopt("adam", cohorts, clients, 0.03, 0.9, 0.99, 1e-3)
  assert np.abs(got[0] - want[0]).max() > 1e-3


def test_fednova_with_unequal_steps_lr_scales_and_momentum():
  caps = np.array([1, 3, 2, 3, 1, 2])
  scales = np.array([0.5, 1.0, 2.0, 1.5, 0.8, 1.2])
  het = fs.Heterogeneity(local_steps=caps, learning_rate_scale=scales)
  hp_scale, rho = 0.7, 0.5
  algo = fs.algorithms.fednova(optax.sgd(LR, momentum=rho or None), local_steps=K, batch_size=B, shuffle=False)
  got, cohorts, clients = _run(algo, heterogeneity=het, hparams={"client_lr_scale": hp_scale})
  want = np_fednova(cohorts, clients, caps, hp_scale * scales, rho, LR)
  _close(got, want)
  # The normalisation matters here: the rule that ignores the lr scales lands elsewhere.
  wrong = np_fednova(cohorts, clients, caps, np.ones(6), rho, LR)
  assert max(np.abs(w - v).max() for w, v in zip(want, wrong)) > 1e-3


def test_fixed_batch_order_in_epoch_mode_is_fedjax_batching():
  """``shuffle=False`` with epochs: every pass reads the stored order in batches of B, the last
  one partial (FedJAX's ``batch``), and it is the same for the sequential reference."""
  algo = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=2, batch_size=B, shuffle=False)
  got, cohorts, clients = _run(algo, rounds=3)
  x = np_init()
  for ids in cohorts:
    n = np.array([len(clients[i]["y"]) for i in ids], np.float64)
    new = [np.zeros_like(a) for a in x]
    for ni, i in zip(n, ids):
      w, b = x
      cx, cy = clients[i]["x"].astype(np.float64), clients[i]["y"]
      for _ in range(2):
        for s in range(0, len(cy), B):
          gw, gb = fs.testing.np_logistic_grad((w, b), cx[s:s + B], cy[s:s + B])
          w, b = w - LR * gw, b - LR * gb
      new = [a + ni / n.sum() * c for a, c in zip(new, (w, b))]
    x = tuple(new)
  _close(got, x)
  data = fs.FederatedData.from_clients(clients, num_classes=CLASSES)
  state, _ = fs.testing.sequential_run(algo, fs.models.logistic_regression(DIM, CLASSES), data,
                                       rounds=3, cohort_size=COHORT, init_params=_init())
  p = state.params["Dense_0"]
  _close((p["kernel"], p["bias"]), x)
