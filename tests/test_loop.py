"""run(): callback metrics and early stop, communication accounting."""

import warnings

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs


def _setup():
  tr, te = fs.datasets.digits()
  data = fs.FederatedData.from_partition(tr, fs.partition.iid(tr["y"], 20, seed=0), num_classes=10)
  return data, te, fs.models.logistic_regression(64, 10)


@pytest.mark.slow
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


class _Budget:
  """A callback that allows ``allowed`` rounds (as a privacy budget does)."""

  def __init__(self, allowed, reason=True):
    self.allowed = allowed
    if reason:
      self.max_rounds_reason = lambda r: f"the budget allows {r} rounds"

  def max_rounds(self):
    return self.allowed

  def __call__(self, r, state, out):
    return {"spent": float(r)}


@pytest.mark.slow
def test_a_round_cap_is_said_once_and_recorded(capsys):
  data, te, model = _setup()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  res = fs.run(algo, model, data, rounds=10, cohort_size=5, callback=_Budget(3), progress=True,
               rounds_per_call=2)
  out = capsys.readouterr()
  said = (out.out + out.err).count("stopping after round 3 of the 10 requested: the budget "
                                   "allows 3 rounds")
  assert said == 1
  h = res.history
  np.testing.assert_array_equal(h["round"], [1, 2, 3])
  assert h["stopped_early"][-1] == 1.0 and h["rounds_requested"][-1] == 10.0
  assert np.isnan(h["rounds_requested"][:-1]).all()
  # without a progress bar it is a warning; a callback without a reason still says the cap
  with pytest.warns(UserWarning, match="stopping after round 2 of the 10 requested: the "
                    "callback allows 2 rounds"):
    fs.run(algo, model, data, rounds=10, cohort_size=5, callback=_Budget(2, reason=False),
           progress=False)
  # a cap that does not bite says nothing and records nothing
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    h = fs.run(algo, model, data, rounds=3, cohort_size=5, callback=_Budget(5),
               progress=False).history
  assert "stopped_early" not in h and "rounds_requested" not in h


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


def test_a_second_run_of_the_same_objects_reuses_the_compiled_round():
  """fs.run with the same algorithm, model and population sizes reuses the compiled block
  (compile_seconds 0) and gives exactly what a fresh compile gives, for another seed, other client
  weights and other init params; a different population size or a new algorithm object
  compiles."""
  data, _, model = _setup()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  kw = dict(rounds=3, cohort_size=5, progress=False)
  fs.experiment.clear_block_cache()
  first = fs.run(algo, model, data, seed=0, **kw)
  assert first.compile_seconds > 0
  # one program for the whole run: the state a round returns (other weak types; replicated on a
  # mesh) must not look like new arguments
  (_, programs), = fs.experiment._BLOCK_PROGRAMS.values()
  assert len(programs) == 1
  sig = fs.experiment.arg_signature
  assert sig({"r": jax.numpy.asarray(1)}) == sig({"r": jax.numpy.int32(1)})   # weak vs strong
  assert sig({"r": jax.numpy.zeros(2)}) != sig({"r": jax.numpy.zeros(3)})
  w = np.linspace(1.0, 3.0, data.num_clients)
  reused = fs.run(algo, model, data, seed=1, client_weights=w, init_params=first.params, **kw)
  assert reused.compile_seconds == 0
  fs.experiment.clear_block_cache()
  fresh = fs.run(algo, model, data, seed=1, client_weights=w, init_params=first.params, **kw)
  assert fresh.compile_seconds > 0
  for a, b in zip(jax.tree.leaves(reused.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(reused.history["train_loss"], fresh.history["train_loss"])
  smaller = fs.FederatedData.from_partition(
      {k: v[:1000] for k, v in data.arrays.items()},
      fs.partition.iid(data.arrays["y"][:1000], 20, seed=0), num_classes=10)
  assert fs.run(algo, model, smaller, **kw).compile_seconds > 0
  assert fs.run(algo.replace(), model, data, **kw).compile_seconds > 0
