"""Agnostic FedAvg and HypCluster: NumPy references from the equations, equality with the
sequential reference, learning, bad input."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms, testing

DIM, CLASSES, LR = 3, 2, 0.5


# ---------------------------------------------------------------- a tiny softmax regression in NumPy

def _grad(w, b, x, y):
  """Mean cross-entropy of softmax(x w + b) and its gradient (float64)."""
  z = x @ w + b
  z = z - z.max(1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  onehot = np.eye(w.shape[1])[y]
  loss = -np.mean(np.sum(onehot * np.log(p), 1))
  return loss, x.T @ (p - onehot) / len(y), np.mean(p - onehot, 0)


def _local(w, b, x, y, steps):
  for _ in range(steps):
    _, gw, gb = _grad(w, b, x, y)
    w, b = w - LR * gw, b - LR * gb
  return w, b


def _clients(sizes, seed, permute=()):
  """Clients with labels argmax(x W); clients in ``permute`` get the labels reversed."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(DIM, CLASSES))
  out = []
  for i, n in enumerate(sizes):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = np.argmax(x @ w, 1)
    if i in permute:
      y = CLASSES - 1 - y
    out.append({"x": x, "y": y.astype(np.int32)})
  return out


def _params(w, b):
  return {"Dense_0": {"kernel": np.asarray(w, np.float32), "bias": np.asarray(b, np.float32)}}


# full-batch local steps: one batch holds a whole client, 2 epochs = 2 gradient steps
FULL = dict(batch_size=16, local_epochs=2)


def test_afl_matches_numpy_reference():
  sizes, domains = [5, 9, 3, 12, 7], np.array([0, 1, 1, 2, 0])
  clients = _clients(sizes, seed=1)
  data = fs.FederatedData.from_clients(clients, num_classes=CLASSES)
  rng = np.random.default_rng(2)
  w0, b0 = rng.normal(size=(DIM, CLASSES)) * 0.3, rng.normal(size=CLASSES) * 0.1
  eta, lam0 = 0.7, np.array([0.5, 0.3, 0.2])
  algo = algorithms.agnostic_fedavg(optax.sgd(LR), domains=domains, client_weights=data.sizes,
                                    init_domain_weights=lam0, domain_learning_rate=eta, **FULL)
  res = fs.run(algo, fs.models.logistic_regression(DIM, CLASSES), data, rounds=3, cohort_size=5,
               init_params=_params(w0, b0), progress=False)

  # FedJAX's agnostic_fed_avg (the whole population is the cohort): client weight
  # lambda_d n_i / N_d, per-domain loss of the global model, exponentiated-gradient step
  w, b, lam = w0.copy(), b0.copy(), lam0.copy()
  for _ in range(3):
    n = np.array(sizes, float)
    n_dom = np.bincount(domains, weights=n, minlength=3)
    loss_dom = np.zeros(3)
    dw, db, tot = np.zeros_like(w), np.zeros_like(b), 0.0
    for i, c in enumerate(clients):
      x, y = c["x"].astype(np.float64), c["y"]
      loss_dom[domains[i]] += n[i] * _grad(w, b, x, y)[0]
      wi, bi = _local(w, b, x, y, steps=2)
      p = lam[domains[i]] * n[i] / n_dom[domains[i]]
      dw, db, tot = dw + p * (w - wi), db + p * (b - bi), tot + p
    w, b = w - dw / tot, b - db / tot
    loss_dom /= n_dom
    lam = lam * np.exp(eta * loss_dom)
    lam /= lam.sum()
  testing.assert_trees_close(res.params, _params(w, b), atol=2e-5)
  np.testing.assert_allclose(res.state.aux.domain_weights, lam, atol=1e-5)
  np.testing.assert_allclose(res.state.aux.domain_loss, loss_dom, atol=1e-5)
  assert not np.allclose(lam, lam0, atol=1e-3)   # lambda moved


def test_hypcluster_matches_numpy_reference():
  sizes = [6, 9, 4, 12, 8, 5]
  clients = _clients(sizes, seed=3, permute=(1, 3, 5))
  data = fs.FederatedData.from_clients(clients, num_classes=CLASSES)
  rng = np.random.default_rng(4)
  w0, b0 = rng.normal(size=(2, DIM, CLASSES)), rng.normal(size=(2, CLASSES)) * 0.1
  model = algorithms.hypcluster_model(fs.models.logistic_regression(DIM, CLASSES), 2)
  seen = []
  res = fs.run(algorithms.hypcluster(optax.sgd(LR), num_clusters=2, **FULL), model, data,
               rounds=3, cohort_size=6, init_params=_params(w0, b0), progress=False,
               callback=lambda r, s, out: seen.append(
                   np.asarray(out.clients["cluster"])[np.argsort(out.clients["id"])]))

  w, b = w0.copy(), b0.copy()
  ref_clusters = []
  for _ in range(3):
    dw, db, tot = np.zeros_like(w), np.zeros_like(b), np.zeros(2)
    chosen = []
    for c, n in zip(clients, sizes):
      x, y = c["x"].astype(np.float64), c["y"]
      j = int(np.argmin([_grad(w[m], b[m], x, y)[0] for m in range(2)]))
      chosen.append(j)
      wi, bi = _local(w[j], b[j], x, y, steps=2)
      dw[j] += n * (w[j] - wi)
      db[j] += n * (b[j] - bi)
      tot[j] += n
    for j in range(2):
      if tot[j] > 0:
        w[j], b[j] = w[j] - dw[j] / tot[j], b[j] - db[j] / tot[j]
    ref_clusters.append(chosen)
  np.testing.assert_array_equal(np.stack(seen), np.array(ref_clusters))
  assert len(set(ref_clusters[-1])) == 2      # both clusters in use: the test sees both paths
  testing.assert_trees_close(res.params, _params(w, b), atol=2e-5)


def _stacked_ragged():
  return algorithms.hypcluster_model(fs.models.mlp(input_dim=8, hidden=(8,), num_classes=4), 2)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1])   # multi-domain AFL, k = 2: not in the contract suite
def test_equal_to_sequential_reference(ragged_data, chunk_size):
  kw = dict(batch_size=16, local_epochs=2)
  domains = np.array([0, 1, 2] * 4)
  cases = [
      (algorithms.agnostic_fedavg(optax.sgd(0.05, momentum=0.5), domains=domains,
                                  client_weights=ragged_data.sizes, domain_learning_rate=1.0,
                                  **kw), fs.models.mlp(input_dim=8, hidden=(8,), num_classes=4)),
      (algorithms.hypcluster(optax.sgd(0.05), **kw), _stacked_ragged()),
  ]
  for algo, model in cases:
    res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=8, chunk_size=chunk_size,
                 seed=2, progress=False)
    ref, _ = testing.sequential_run(algo, model, ragged_data, rounds=3, cohort_size=8, seed=2)
    testing.assert_trees_close(res.params, ref.params, atol=1e-5)
    testing.assert_trees_close(res.state.aux, ref.aux, atol=1e-5)


@pytest.mark.slow
def test_one_domain_and_one_cluster_are_fedavg(ragged_data):
  kw = dict(batch_size=16, local_epochs=1)
  m = fs.models.mlp(input_dim=8, hidden=(8,), num_classes=4)
  ref = fs.run(algorithms.fedavg(optax.sgd(0.1), **kw), m, ragged_data, rounds=2, cohort_size=6,
               progress=False)
  for algo in (algorithms.agnostic_fedavg(optax.sgd(0.1), **kw),
               algorithms.hypcluster(optax.sgd(0.1), **kw)):
    res = fs.run(algo, m, ragged_data, rounds=2, cohort_size=6, progress=False)
    testing.assert_trees_close(res.params, ref.params, atol=1e-6)


def _split(clients, frac=0.5):
  train, test = [], []
  for c in clients:
    n = max(1, int(len(c["y"]) * frac))
    train.append({k: v[:n] for k, v in c.items()})
    test.append({k: v[n:] for k, v in c.items()})
  return (fs.FederatedData.from_clients(train, num_classes=CLASSES),
          fs.FederatedData.from_clients(test, num_classes=CLASSES))


@pytest.mark.slow
def test_hypcluster_separates_permuted_groups_and_beats_fedavg():
  group_b = tuple(range(1, 12, 2))
  train, test = _split(_clients([60] * 12, seed=5, permute=group_b))
  base = fs.models.logistic_regression(DIM, CLASSES)
  model = algorithms.hypcluster_model(base, 2)
  kw = dict(batch_size=10, local_epochs=1)
  cb = algorithms.hypcluster_callback(model, train, test, every=5, rounds=15)
  res = fs.run(algorithms.hypcluster(optax.sgd(0.3), **kw), model, train, rounds=15,
               cohort_size=6, seed=0, progress=False, callback=cb)
  ev = algorithms.hypcluster_evaluate(model, res.params, train, test)
  # the personalized accuracy is in the history at the evaluation rounds (5, 10, 15)
  assert res.history["personal_accuracy_p10"][-1] == pytest.approx(ev["summary"]["accuracy_p10"])
  assert res.history["num_clusters_used"][-1] == 2.0
  assert np.isnan(res.history["personal_accuracy_p10"][0])
  groups = np.isin(np.arange(12), group_b)
  # each group in one cluster, the two groups in different clusters
  assert len(set(ev["cluster"][groups])) == 1 and len(set(ev["cluster"][~groups])) == 1
  assert ev["cluster"][groups][0] != ev["cluster"][~groups][0]
  avg = fs.run(algorithms.fedavg(optax.sgd(0.3), **kw), base, train, rounds=15, cohort_size=6,
               seed=0, progress=False)
  fedavg_acc = fs.evaluation.evaluate_clients(base, avg.params, test)["accuracy"]
  for g in (groups, ~groups):
    assert ev["accuracy"][g].mean() > fedavg_acc[g].mean() + 0.2
  assert ev["summary"]["accuracy_p10"] > 0.8
  assert set(ev["summary"]) >= {"accuracy_p10", "accuracy_p50", "accuracy_p90", "worst_clients"}


@pytest.mark.slow
def test_afl_raises_the_worst_domain():
  # domain 1: two small clients whose labels follow another rule; FedAvg mostly fits domain 0
  rng = np.random.default_rng(7)
  clients = _clients([80] * 8, seed=6)
  for c in clients[6:]:
    c["y"] = (c["x"][:, 0] > 0.3).astype(np.int32)
    for k in c:
      c[k] = c[k][:20]
  domains = np.array([0] * 6 + [1] * 2)
  del rng
  train, test = _split(clients)
  m = fs.models.mlp(input_dim=DIM, hidden=(16,), num_classes=CLASSES)
  kw = dict(batch_size=10, local_epochs=1)

  def worst(params):
    acc = fs.evaluation.evaluate_clients(m, params, test)["accuracy"]
    return min(acc[domains == d].mean() for d in (0, 1))

  avg = fs.run(algorithms.fedavg(optax.sgd(0.2), **kw), m, train, rounds=30, cohort_size=8,
               progress=False)
  afl = fs.run(algorithms.agnostic_fedavg(optax.sgd(0.2), domains=domains,
                                          client_weights=train.sizes, domain_learning_rate=2.0,
                                          **kw), m, train, rounds=30, cohort_size=8,
               progress=False)
  lam = np.asarray(afl.state.aux.domain_weights)
  assert lam[1] > 0.5                                   # the hard domain gained weight
  assert worst(afl.params) > worst(avg.params) + 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(domains=np.zeros((3, 2), int)), "1-D"),
    (dict(domains=np.array([0, 1, 3]), num_domains=3), r"\[0, 3\)"),
    (dict(domains=np.array([0, -1, 1])), r"\[0, 2\)"),
    (dict(domains=np.array([0.0, 1.0])), "integers"),
    (dict(domains=np.array([0, 1])), "client_weights=data.sizes"),
    (dict(domains=np.array([0, 1]), client_weights=np.ones(3)), r"\[2\]"),
    (dict(domains=np.array([0, 1]), weighting="uniform", init_domain_weights=[1.0]), r"\[2\]"),
    (dict(domains=np.array([0, 1]), weighting="uniform", domain_learning_rate=-1.0), ">= 0"),
])
def test_afl_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    algorithms.agnostic_fedavg(**kwargs)


def test_afl_domains_must_cover_the_population(ragged_data):
  algo = algorithms.agnostic_fedavg(domains=np.array([0, 1] * 3), weighting="uniform")
  with pytest.raises(ValueError, match="population"):
    fs.run(algo, fs.models.logistic_regression(8, 4), ragged_data, rounds=1, cohort_size=4,
           progress=False)


def test_hypcluster_bad_input():
  base = fs.models.logistic_regression(DIM, CLASSES)
  for k in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="clusters"):
      algorithms.hypcluster_model(base, k)
    with pytest.raises(ValueError, match="clusters"):
      algorithms.hypcluster(num_clusters=k)
  data = fs.FederatedData.from_clients(_clients([4, 4], seed=0), num_classes=CLASSES)
  with pytest.raises(ValueError, match="hypcluster_model"):   # k = 3 needs the stacked model
    fs.run(algorithms.hypcluster(num_clusters=3), base, data, rounds=1, cohort_size=2,
           progress=False)
  with pytest.raises(ValueError, match="2 clusters"):
    fs.run(algorithms.hypcluster(num_clusters=3), algorithms.hypcluster_model(base, 2), data,
           rounds=1, cohort_size=2, progress=False)
  with pytest.raises(ValueError, match="hypcluster_model"):
    algorithms.hypcluster_evaluate(base, base.init(jax.random.key(0)), data, data)


def test_domain_learning_rate_is_an_in_state_hyperparameter():
  data = fs.FederatedData.from_clients(_clients([4, 6, 5], seed=0), num_classes=CLASSES)
  algo = algorithms.agnostic_fedavg(optax.sgd(LR), domains=np.array([0, 1, 1]),
                                    client_weights=data.sizes, init_domain_weights=[0.6, 0.4],
                                    **FULL)
  assert algo.hparams == {"domain_learning_rate": 0.1}
  res = fs.run(algo, fs.models.logistic_regression(DIM, CLASSES), data, rounds=2, cohort_size=3,
               hparams={"domain_learning_rate": 0.0}, progress=False)
  np.testing.assert_allclose(res.state.aux.domain_weights, [0.6, 0.4], atol=1e-6)
  assert np.all(np.asarray(res.state.aux.domain_loss) > 0)


@pytest.mark.slow
def test_blocks_of_rounds_in_one_scan_equal_single_rounds(ragged_data):
  kw = dict(batch_size=16, local_epochs=1)
  cases = [(algorithms.agnostic_fedavg(domains=np.arange(12) % 2, client_weights=ragged_data.sizes,
                                       domain_learning_rate=1.0, **kw),
            fs.models.mlp(input_dim=8, hidden=(8,), num_classes=4)),
           (algorithms.hypcluster(**kw), _stacked_ragged())]
  for algo, model in cases:
    one = fs.run(algo, model, ragged_data, rounds=3, cohort_size=6, progress=False)
    block = fs.run(algo, model, ragged_data, rounds=3, cohort_size=6, rounds_per_call=3,
                   progress=False)
    testing.assert_trees_close(block.params, one.params, atol=1e-6)
    testing.assert_trees_close(block.state.aux, one.state.aux, atol=1e-6)


def test_hypcluster_init_picks_one_center_per_group():
  group_b = (1, 3, 4)
  train, test = _split(_clients([40] * 6, seed=8, permute=group_b))
  model = algorithms.hypcluster_model(fs.models.logistic_regression(DIM, CLASSES), 2)
  params = algorithms.hypcluster_init(model, train, np.arange(6), client_optimizer=optax.sgd(0.5),
                                      local_epochs=3, batch_size=10, seed=1)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, model.init(jax.random.key(0)))
  ev = algorithms.hypcluster_evaluate(model, params, train, test)
  groups = np.isin(np.arange(6), group_b)
  assert len(set(ev["cluster"][groups])) == 1 and len(set(ev["cluster"][~groups])) == 1
  assert ev["cluster"][groups][0] != ev["cluster"][~groups][0]
  with pytest.raises(ValueError, match="client_ids"):
    algorithms.hypcluster_init(model, train, np.array([0, 6]))
