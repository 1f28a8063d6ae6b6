"""Divergence is recorded, never silently applied (issue 15, items 1-3 and 12).

* A non-finite aggregate (finite client updates whose weighted sum overflows) or a server step
  that would make the model non-finite is not applied: the global model stays as it was and the
  round counts in ``aggregate_nonfinite``.
* ``train_loss`` / ``train_accuracy`` are NaN, not 0, when no client trained finitely; one
  ``RuntimeWarning`` per run says so.
* A diverged run does not crash the command line nor skip the remaining seeds.
* A ``data_dir`` that lacks the files is an error, not a fall-back to another copy.
"""

import json
import struct
import warnings

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli, engine, server
from fedjax_sim.data import datasets


def _model():
  return fs.models.mlp(input_dim=8, hidden=(8,), num_classes=4)


def _run(data, algo, **kw):
  kw = {"rounds": 3, "cohort_size": 4, "progress": False, "seed": 0, **kw}
  return fs.run(algo, _model(), data, **kw)


def _leaves(t):
  return [np.asarray(a) for a in jax.tree.leaves(t)]


@pytest.mark.slow
def test_overflowing_aggregate_keeps_the_global_model(ragged_data):
  """One local step at learning rate 1e36: every client's update is finite (~1e35), but their
  float32 weighted sum (weights 1000) overflows."""
  init = _model().init(jax.random.key(1))
  algo = fs.algorithms.fedavg(optax.sgd(1e36), batch_size=16, local_steps=1)
  with pytest.warns(RuntimeWarning, match=r"3 of 3 rounds produced a non-finite aggregate"):
    res = _run(ragged_data, algo, init_params=init, client_weights=np.full(12, 1e3))
  h = res.history
  np.testing.assert_array_equal(h["aggregate_nonfinite"], [1, 1, 1])
  np.testing.assert_array_equal(h["num_nonfinite"], [0, 0, 0])   # each client was fine
  np.testing.assert_array_equal(h["num_counted"], [4, 4, 4])
  assert np.isfinite(h["train_loss"]).all()
  assert all(np.isfinite(a).all() for a in _leaves(res.params))
  for a, b in zip(_leaves(res.params), _leaves(init)):
    np.testing.assert_array_equal(a, b)   # the model was kept exactly
  assert int(res.state.round) == 3

  # the same run with a sane learning rate applies every round, without a warning
  sane = fs.algorithms.fedavg(optax.sgd(0.5), batch_size=16, local_steps=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    ok = _run(ragged_data, sane, init_params=init, client_weights=np.full(12, 1e3))
  np.testing.assert_array_equal(ok.history["aggregate_nonfinite"], [0, 0, 0])
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(ok.params), _leaves(init)))


def test_total_weight_overflow_is_not_applied(ragged_data):
  """A total weight beyond float32 (reachable through the engine directly) would divide the
  update down to 0 and look like a finite, applied round: it is refused."""
  algo = fs.algorithms.fedavg(optax.sgd(0.5), batch_size=16)
  model = _model()
  init = model.init(jax.random.key(1))
  state = engine.init_state(algo, init, ragged_data.num_clients)
  round_fn = jax.jit(engine.make_round(algo, model, population=12, cohort_size=4,
                                       max_client_size=ragged_data.max_client_size))
  new, out = round_fn(state, engine.to_device(ragged_data, np.full(12, 1e38, np.float32)),
                      jax.random.key(3))
  assert int(out.metrics["aggregate_nonfinite"]) == 1 and int(out.metrics["num_counted"]) == 4
  for a, b in zip(_leaves(new.params), _leaves(init)):
    np.testing.assert_array_equal(a, b)


def test_server_step_to_a_non_finite_model_is_not_applied(ragged_data):
  """A finite aggregate whose server step makes the params non-finite (an infinite server
  learning rate): the step is refused, and the optimizer state (momentum, which alone would
  have stayed finite) is kept with the params."""
  init = _model().init(jax.random.key(2))
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16,
                              server_optimizer=optax.sgd(float("inf"), momentum=0.9))
  with pytest.warns(RuntimeWarning, match="non-finite aggregate"):
    res = _run(ragged_data, algo, init_params=init)
  h = res.history
  assert h["aggregate_nonfinite"].sum() == 3 and h["num_nonfinite"].sum() == 0
  for a, b in zip(_leaves(res.params), _leaves(init)):
    np.testing.assert_array_equal(a, b)
  assert all(np.all(a == 0) for a in _leaves(res.state.opt_state))   # momentum never moved


def test_server_step_reports_applied():
  params = {"w": np.ones(3, np.float32)}
  state = server.init(params, optax.sgd(1.0))
  s1, applied = server.step(optax.sgd(1.0), state, {"w": np.full(3, 0.5, np.float32)}, True)
  assert bool(applied) and np.allclose(s1.params["w"], 0.5)
  for bad in (np.array([0.5, np.nan, 0.5], np.float32), np.array([np.inf, 0, 0], np.float32)):
    s2, applied = server.step(optax.sgd(1.0), state, {"w": bad}, True)
    assert not bool(applied) and np.array_equal(s2.params["w"], params["w"])
    assert int(s2.round) == 1
  s3, applied = server.step(optax.sgd(1.0), state, {"w": np.ones(3, np.float32)}, False)
  assert not bool(applied) and np.array_equal(s3.params["w"], params["w"])


def test_no_client_finite_gives_nan_train_loss_and_one_warning(ragged_data):
  init = _model().init(jax.random.key(1))
  algo = fs.algorithms.fedavg(optax.sgd(float("inf")), batch_size=16)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = _run(ragged_data, algo, init_params=init, rounds=4)
  h = res.history
  np.testing.assert_array_equal(h["num_counted"], [0, 0, 0, 0])
  assert np.isnan(h["train_loss"]).all() and np.isnan(h["train_accuracy"]).all()
  np.testing.assert_array_equal(h["aggregate_nonfinite"], [0, 0, 0, 0])   # nothing to apply
  diverged = [w for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(diverged) == 1, [str(w.message) for w in caught]   # once per run, not per round
  assert "4 of 4 rounds had no client with finite local training" in str(diverged[0].message)
  for a, b in zip(_leaves(res.params), _leaves(init)):
    np.testing.assert_array_equal(a, b)


def test_mean_or_nan():
  assert np.isnan(engine.mean_or_nan(np.float32(0.0), np.float32(0.0)))
  assert float(engine.mean_or_nan(np.float32(3.0), np.float32(2.0))) == 1.5


@pytest.mark.slow
def test_diverged_seed_does_not_stop_the_others(tmp_path, capsys):
  """`--seed 0 1` with a learning rate that diverges: both seeds run, summary.json records it."""
  out = tmp_path / "run"
  rc = cli.main(["run", "--dataset", "digits", "--num-clients", "10", "--cohort-size", "3",
                 "--rounds", "2", "--eval-every", "1", "--client-lr", "1e38", "--seed", "0", "1",
                 "--model", "logistic_regression",
                 "--out", str(out), "--no-progress"])
  assert rc == 0
  err = capsys.readouterr().err
  assert "warning: seed 0:" in err and "warning: seed 1:" in err and "Traceback" not in err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["seeds"] == [0, 1] and summary["diverged"] == [0, 1]
  assert len(summary["final_test_accuracy"]) == 2
  for s in (0, 1):
    h = json.loads((out / f"seed-{s}" / "history.json").read_text())
    assert len(h["round"]) == 2 and h["train_loss"][-1] is None   # NaN -> null


def test_final_value_of_a_never_finite_metric():
  h = fs.History.from_records([{"round": 1, "test_loss": float("nan"), "test_accuracy": 0.1},
                               {"round": 2}])
  assert np.isnan(cli.final_value(h, "test_loss")) and cli.final_value(h, "test_accuracy") == 0.1
  assert np.isnan(cli.final_value(fs.History.from_records([{"round": 1}]), "test_loss"))


def _write_idx(path, array):
  dtype_code = {np.dtype(np.uint8): 0x08}[array.dtype]
  header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(">" + "I" * array.ndim,
                                                               *array.shape)
  path.write_bytes(header + array.tobytes())


def _fake_fashion_mnist(folder, n_train=6, n_test=4):
  folder.mkdir()
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    _write_idx(folder / f"{prefix}-images-idx3-ubyte",
               rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def test_missing_data_dir_does_not_fall_back(tmp_path, monkeypatch, capsys):
  system = tmp_path / "system"
  _fake_fashion_mnist(system)
  monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(system),))
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
  train, _ = datasets.fashion_mnist()          # no data_dir: the system copy
  assert train["x"].shape == (6, 784)
  given = tmp_path / "mine"
  with pytest.raises(datasets.DatasetNotFoundError, match=r"data_dir '.*mine' does not exist"):
    datasets.fashion_mnist(given)
  given.mkdir()
  with pytest.raises(datasets.DatasetNotFoundError, match=r"data_dir '.*mine' lacks them"):
    datasets.fashion_mnist(given)
  (tmp_path / "afile").write_text("")
  with pytest.raises(datasets.DatasetNotFoundError, match="is not a folder"):
    datasets.fashion_mnist(tmp_path / "afile")
  own = tmp_path / "own"
  _fake_fashion_mnist(own, n_train=8)
  assert datasets.fashion_mnist(own)[0]["x"].shape == (8, 784)   # the given folder is read
  # the command line: an error, not a run on the system copy recorded as the given folder
  assert cli.main(["run", "--data-dir", str(given), "--num-clients", "2", "--cohort-size", "1",
                   "--rounds", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "data_dir" in err[0] and "mine" in err[0]


def test_mean_accumulates_low_precision_updates_in_float32():
  """float16 updates of 100 with weights 1000: the float16 sum (4e5) would overflow at 65504;
  accumulated in float32 the mean is exactly 100, returned in float16."""
  from fedjax_sim import aggregators
  agg = aggregators.mean()
  params = {"w": jax.numpy.zeros(3, jax.numpy.float16),
            "b": jax.numpy.zeros((), jax.numpy.bfloat16)}
  state = agg.init(params, 4)
  deltas = {"w": jax.numpy.full((4, 3), 100, jax.numpy.float16),
            "b": jax.numpy.full((4,), 1 / 3, jax.numpy.bfloat16)}
  state = agg.accumulate(state, deltas, jax.numpy.full(4, 1000.0))
  update, total = agg.finalize(agg.combine(jax.tree.map(lambda a: a[None], state)))
  assert update["w"].dtype == np.float16 and update["b"].dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(update["w"]), np.full(3, 100, np.float16))
  assert float(update["b"]) == float(jax.numpy.bfloat16(1 / 3)) and float(total) == 4000.0


def test_cli_failed_checkpoint_write_is_one_line(tmp_path, capfd, monkeypatch):
  """A full disk during a checkpoint: orbax logs the failure with a long traceback (through
  absl, from its worker thread) before raising it. The command line prints one line."""
  import threading

  from absl import logging as absl_logging

  from fedjax_sim import checkpoint

  def full_disk(self, step, *args, **kwargs):
    def worker():   # as orbax's _SignalingThread does
      try:
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']")
      except ValueError:
        absl_logging.exception("_SignalingThread.run() raised an exception")
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    raise ValueError(f"RESOURCE_EXHAUSTED: writing step {step}: No space left on device")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", full_disk)
  # outside pytest, absl's handler writes such records to stderr; pytest's log capture would
  # swallow them, so put a plain stderr handler on the logger
  import logging
  import sys
  handler = logging.StreamHandler(sys.stderr)
  logging.getLogger("absl").addHandler(handler)
  monkeypatch.setattr(logging.getLogger("absl"), "propagate", False)
  try:
    rc = cli.main(["run", "--dataset", "digits", "--num-clients", "10", "--cohort-size", "3",
                   "--rounds", "2", "--model", "logistic_regression", "--checkpoint-dir",
                   str(tmp_path / "ck"), "--checkpoint-every", "1", "--out",
                   str(tmp_path / "o"), "--no-progress"])
  finally:
    logging.getLogger("absl").removeHandler(handler)
  assert rc == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert err == ["error: RESOURCE_EXHAUSTED: writing step 1: No space left on device"], err
  assert logging.getLogger("absl").level != logging.CRITICAL   # restored after the command
