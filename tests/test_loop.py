"""run(): callback metrics and early stop, communication accounting."""

import numpy as np
import optax

import fedjax_sim as fs


def _setup():
  tr, te = fs.datasets.digits()
  data = fs.FederatedData.from_partition(tr, fs.partition.iid(tr["y"], 20, seed=0), num_classes=10)
  return data, te, fs.models.logistic_regression(64, 10)


def test_callback_records_metrics_and_stops_early():
  data, te, model = _setup()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  res = fs.run(algo, model, data, rounds=10, cohort_size=5, eval_data=te, eval_every=5,
               progress=False, callback=lambda r, s, o: {"eps": 0.5 * r, "stop": 0.5 * r >= 2.0})
  h = res.history
  np.testing.assert_array_equal(h["round"], [1, 2, 3, 4])
  np.testing.assert_allclose(h["eps"], [0.5, 1.0, 1.5, 2.0])
  assert h["stopped_early"][-1] == 1.0
  assert np.isfinite(h["test_accuracy"][-1]), "a stopped run is evaluated at its last round"
  assert int(res.state.round) == 4


def test_communication_is_recorded():
  data, te, model = _setup()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  res = fs.run(algo, model, data, rounds=2, cohort_size=5, progress=False)
  n = 64 * 10 + 10
  h = res.history
  np.testing.assert_array_equal(h["params_up_per_client"], n)
  np.testing.assert_array_equal(h["bytes_down_per_client"], 4 * n)
  np.testing.assert_array_equal(h["bytes_up"], 4 * n * h["num_counted"])
  np.testing.assert_array_equal(h["bytes_down"], 4 * n * 5)
