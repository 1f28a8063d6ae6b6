"""Experiment tooling: learning-rate schedules across rounds, early stopping, loggers."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import engine, testing


def _mlp():
  return fs.models.mlp(8, (16,), 4)


def _hand_run(algo, model, data, scales, cohort_size, seed, hparam):
  """Round by round with the plain sequential reference, setting the in-state scale ``hparam``
  of round r (1-based) to ``scales[r - 1]`` by hand."""
  key_init, key_rounds = jax.random.split(jax.random.key(seed))
  state = engine.init_state(algo, model.init(key_init), data.num_clients, {hparam: 1.0})
  for r, s in enumerate(scales, start=1):
    state = state.replace(hparams={hparam: np.float32(s)})
    state, _ = testing.sequential_round(algo, model, data, state,
                                        jax.random.fold_in(key_rounds, r), cohort_size)
  return state.params


def test_client_lr_schedule_matches_hand_computation(ragged_data):
  model = _mlp()
  sched = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)   # 1, 1/2, 1/4
  base = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=32)
  algo = fs.algorithms.with_client_lr_schedule(base, sched)
  res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=5, seed=4, progress=False)
  want = _hand_run(base, model, ragged_data, [float(sched(r)) for r in range(3)], 5, 4,
                   "client_lr_scale")
  testing.assert_trees_close(res.params, want, atol=1e-5)
  assert int(res.state.aux.round) == 3
  # the schedule matters: without it the model differs
  plain = fs.run(base, model, ragged_data, rounds=3, cohort_size=5, seed=4, progress=False)
  assert fs.tree.max_abs_diff(plain.params, res.params) > 1e-4


def test_server_lr_schedule_is_indexed_by_round(ragged_data):
  model = _mlp()
  sched = optax.linear_schedule(1.0, 0.25, transition_steps=2)            # 1, 0.625, 0.25
  base = fs.algorithms.fedavg(optax.sgd(0.1), optax.sgd(1.0), batch_size=32)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), optax.sgd(sched), batch_size=32)
  res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=5, seed=2, progress=False)
  want = _hand_run(base, model, ragged_data, [float(sched(r)) for r in range(3)], 5, 2,
                   "server_lr_scale")
  testing.assert_trees_close(res.params, want, atol=1e-5)


def test_schedule_must_be_callable():
  with pytest.raises(ValueError, match="function of the round"):
    fs.algorithms.with_client_lr_schedule(fs.algorithms.fedavg(optax.sgd(0.1)), 0.5)


# --- early stopping ---------------------------------------------------------------------------


def test_early_stopping_stops_and_keeps_the_best_model(ragged_data):
  model = _mlp()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=32)
  val = {"x": ragged_data.arrays["x"][:200], "y": ragged_data.arrays["y"][:200]}
  # "max" of the loss with patience 2: the loss falls, so round 1 stays best and the run stops
  # after round 3
  stop = fs.callbacks.EarlyStopping("loss", mode="max", patience=2, model=model, eval_data=val)
  res = fs.run(algo, model, ragged_data, rounds=10, cohort_size=6, seed=0, callback=stop,
               progress=False)
  assert res.history.num_rounds == 3 and res.history["stopped_early"][-1] == 1
  assert stop.best_round == 1
  one = fs.run(algo, model, ragged_data, rounds=1, cohort_size=6, seed=0, progress=False)
  testing.assert_trees_close(stop.best_params, one.params, atol=0)
  ev = fs.evaluation.make_evaluate(model)(one.params, val["x"], val["y"])
  np.testing.assert_allclose(stop.best_value, ev["loss"], rtol=1e-6)
  np.testing.assert_allclose(res.history["early_stopping_best"], [float(ev["loss"])] * 3,
                             rtol=1e-6)


def test_early_stopping_on_a_training_metric(ragged_data):
  model = _mlp()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=32)
  stop = fs.callbacks.EarlyStopping("train_loss", patience=100)
  res = fs.run(algo, model, ragged_data, rounds=4, cohort_size=12, seed=0, callback=stop,
               progress=False)
  h = res.history
  assert stop.best_value == np.min(h["train_loss"])
  assert stop.best_round == int(h["round"][np.argmin(h["train_loss"])])
  assert "stopped_early" not in h


def test_early_stopping_bad_input():
  with pytest.raises(ValueError, match="mode"):
    fs.callbacks.EarlyStopping(mode="up")
  with pytest.raises(ValueError, match="patience"):
    fs.callbacks.EarlyStopping(patience=0)
  with pytest.raises(ValueError, match="both model and eval_data"):
    fs.callbacks.EarlyStopping("loss", model=_mlp())


# --- loggers ----------------------------------------------------------------------------------


def test_csv_and_function_loggers_hold_the_history(ragged_data, tmp_path):
  import csv
  model = _mlp()
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=32)
  seen = []
  live = fs.callbacks.CSVLogger(tmp_path / "live.csv")
  cb = fs.callbacks.chain(live, fs.callbacks.log_with(lambda m, step: seen.append((step, m))))
  res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=6, eval_data={
      "x": ragged_data.arrays["x"], "y": ragged_data.arrays["y"]}, eval_every=2, callback=cb,
      progress=False)
  live.close()
  h = res.history
  rows = list(csv.DictReader(open(tmp_path / "live.csv")))
  assert [int(r["round"]) for r in rows] == [1, 2, 3]
  np.testing.assert_allclose([float(r["train_loss"]) for r in rows], h["train_loss"], rtol=1e-6)
  assert [s for s, _ in seen] == [1, 2, 3]
  np.testing.assert_allclose([m["update_norm"] for _, m in seen], h["update_norm"], rtol=1e-6)
  # the whole history, test metrics included, after the run
  full = fs.callbacks.CSVLogger(tmp_path / "history.csv")
  full.write_history(h)
  full.close()
  rows = list(csv.DictReader(open(tmp_path / "history.csv")))
  assert float(rows[1]["test_accuracy"]) == pytest.approx(h["test_accuracy"][1])
  assert rows[0]["test_accuracy"] == ""   # round 1 was not evaluated


def _tensorboard_scalars(logdir) -> dict[tuple[str, int], float]:
  """``{(tag, step): value}`` read back from the event files under ``logdir`` (TFRecord
  framing: u64 length, u32 crc, the Event proto, u32 crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for f in sorted(p for p in logdir.rglob("*") if p.is_file()):
    raw = f.read_bytes()
    pos = 0
    while pos < len(raw):
      (n,) = struct.unpack("<Q", raw[pos:pos + 8])
      ev = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out[v.tag, ev.step] = v.simple_value
  return out


def test_tensorboard_logger(tmp_path):
  try:
    logger = fs.callbacks.TensorBoardLogger(tmp_path / "tb")
  except ImportError as e:
    assert "tensorboardX" in str(e)
    pytest.skip("neither flax.metrics.tensorboard (TensorFlow) nor tensorboardX is installed")
  h = fs.History.from_records([{"round": 1, "train_loss": 2.0}, {"round": 2, "train_loss": 1.0}])
  logger.write_history(h)
  logger.close()
  pytest.importorskip("tensorboardX", reason="the event-file reader uses tensorboardX's proto")
  scalars = _tensorboard_scalars(tmp_path / "tb")   # flax and tensorboardX write the same format
  assert scalars[("train_loss", 1)] == pytest.approx(2.0)
  assert scalars[("train_loss", 2)] == pytest.approx(1.0)
