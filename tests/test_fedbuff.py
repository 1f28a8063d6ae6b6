"""FedBuff's compiled discrete-event step against plain Python references: the slot/clock logic
against an event queue, the training and staleness-weighted update against a loop over clients."""

import functools
import heapq

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import asynchronous, engine, testing
from fedjax_sim.algorithms.fedbuff import fedbuff
from fedjax_sim.asynchronous import DurationModel
from fedjax_sim.data.federated import batch_indices, local_steps

EQUAL_SPEED = DurationModel(step_time=1.0, speed_sigma=0.0, noise_sigma=0.0)
STRAGGLY = DurationModel(step_time=1.0, speed_sigma=0.8, noise_sigma=0.3)


def _mlp():
  return fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)


def _setup(config, data, seed=0):
  model = _mlp()
  dev = engine.to_device(data, fs.validation.resolve_client_weights(data, config.algorithm.weighting))
  state = asynchronous.init_state(config, model.init(jax.random.key(seed)), dev,
                                  jax.random.key(seed + 1))
  step = jax.jit(asynchronous.make_server_step(config, model, population=data.num_clients,
                                               max_client_size=data.max_client_size,
                                               chunk_size=2))
  return model, dev, state, step


@functools.lru_cache(maxsize=None)
def _sgd_step(model, opt):
  @jax.jit
  def step(p, o, x, y, m):
    grads = jax.grad(lambda q: model.batch_loss(q, x, y, m)[0])(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o
  return step


_client_rows = jax.jit(batch_indices, static_argnames=("work", "max_client_size"))


def _reference_update(config, model, data, key, arrivals, start_params, params, opt_state):
  """A Python loop over the arrivals: each trains from its own start params step by step; the
  server applies sum_k p_k g(s_k) delta_k / sum_k p_k (aggregation="mean")."""
  work = config.algorithm.work
  opt = config.algorithm.client_optimizer
  batch_key = engine.round_keys(key).batch
  w_all = fs.validation.resolve_client_weights(data, config.algorithm.weighting)
  sgd_step = _sgd_step(model, opt)
  acc = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  total_p = 0.0
  for cid, version, g in zip(arrivals["client"], arrivals["start_version"],
                             arrivals["staleness_weight"]):
    cid = int(cid)
    start = start_params[int(version)]
    rows, mask = _client_rows(batch_key, jnp.asarray([cid]), jnp.asarray([data.offsets[cid]]),
                               jnp.asarray([data.sizes[cid]]), work, data.max_client_size)
    rows, mask = np.asarray(rows[0]), np.asarray(mask[0])
    p, o = start, opt.init(start)
    for s in range(rows.shape[0]):
      if mask[s].any():
        p, o = sgd_step(p, o, data.arrays["x"][rows[s]], data.arrays["y"][rows[s]], mask[s])
    w = float(w_all[cid]) * float(g)
    acc = jax.tree.map(lambda a, s0, l: a + w * (np.asarray(s0, np.float64) - np.asarray(l)),
                       acc, start, p)
    total_p += float(w_all[cid])
  update = jax.tree.map(lambda a, p: jnp.asarray(a / total_p, p.dtype), acc, params)
  updates, _ = config.algorithm.server_optimizer.update(update, opt_state, params)
  return optax.apply_updates(params, updates)


@pytest.mark.slow
def test_no_staleness_equals_synchronous_fedavg(ragged_data):
  """M = K and equal speeds: every buffer is one synchronous cohort, all arrivals have staleness
  0, and the server step is FedAvg (uniform weights) on that cohort, checked over 2 steps."""
  config = fedbuff(optax.sgd(0.1), optax.sgd(0.7), buffer_size=4, concurrency=4,
                   max_staleness=2, local_steps=3, batch_size=8, duration=EQUAL_SPEED)
  model, dev, state, step = _setup(config, ragged_data)
  params = {0: state.server.params}
  for r in range(2):
    in_flight = sorted(np.asarray(state.client).tolist())
    key = jax.random.key(100 + r)
    new, out = step(state, dev, key)
    arr = jax.device_get(out.arrivals)
    assert sorted(arr["client"].tolist()) == in_flight   # the whole cohort arrives
    assert np.all(arr["staleness"] == 0) and np.all(arr["staleness_weight"] == 1.0)
    assert float(new.now) == pytest.approx(3.0 * (r + 1))   # 3 steps of 1 s each
    # every restarted client downloads the new model
    assert np.all(np.asarray(new.start_version) == r + 1)
    ref = _reference_update(config, model, ragged_data, key, arr, params, state.server.params,
                            state.server.opt_state)
    testing.assert_trees_close(new.server.params, ref, atol=1e-5)
    assert fs.tree.max_abs_diff(new.server.params, state.server.params) > 1e-3
    state = new
    params[r + 1] = state.server.params
  assert int(state.server.round) == 2


def _finish(starts, i, start_time):
  """The finish time the step gave start i: its start time plus its duration (to float32
  rounding: XLA may fuse the sum), taken exactly so that the event order is decided on the same
  numbers."""
  assert starts["start_time"][i] == start_time
  np.testing.assert_allclose(starts["finish_time"][i], start_time + starts["duration"][i],
                             rtol=1e-6)
  return starts["finish_time"][i]


def _event_simulation(init, starts, k, restart):
  """An event queue of (finish time, slot): pops K arrivals per server step, restarts slots with
  the clients/durations the compiled step drew (it only replays its random draws), and checks
  that no client is started while in flight. Returns per-step arrival lists and clock."""
  client = list(init["client"])
  version = [0] * len(client)
  start_time = [np.float32(0)] * len(client)
  finish = list(init["finish_time"])
  heap = [(finish[j], j) for j in range(len(client))]
  heapq.heapify(heap)
  in_flight = set(client)
  assert len(in_flight) == len(client)
  t, steps = 0, []
  for st in starts:
    arrivals, restarted = [], set()
    for i in range(k):
      fin, j = heapq.heappop(heap)
      arrivals.append((j, client[j], version[j], fin))
      in_flight.remove(client[j])
      if restart == "arrival":
        new = int(st["client"][i])
        assert new not in in_flight
        in_flight.add(new)
        client[j], version[j], start_time[j] = new, t, fin
        finish[j] = _finish(st, i, fin)
        heapq.heappush(heap, (finish[j], j))
        restarted.add(j)
    now = arrivals[-1][3]
    if restart == "arrival":
      for j in restarted:
        if start_time[j] == now:
          version[j] = t + 1
    else:
      for i, (j, *_) in enumerate(arrivals):
        new = int(st["client"][i])
        assert new not in in_flight
        in_flight.add(new)
        client[j], version[j], start_time[j] = new, t + 1, now
        finish[j] = _finish(st, i, now)
        heapq.heappush(heap, (finish[j], j))
    steps.append({"arrivals": arrivals, "now": now, "t": t})
    t += 1
  return steps


@pytest.mark.parametrize("restart,max_staleness", [("arrival", 16), ("update", 3)])
@pytest.mark.slow
def test_staleness_and_clock_match_event_simulation(ragged_data, restart, max_staleness):
  """M > K with stragglers: arrival order, staleness, clock and weights 1/sqrt(1+s) follow a
  Python event simulation; too-stale arrivals are dropped; the last server step (with stale
  arrivals) equals a loop that trains each from its own start version."""
  k, steps = 3, 7
  config = fedbuff(optax.sgd(0.1), buffer_size=k, concurrency=9, max_staleness=max_staleness,
                   local_steps=2, batch_size=8, duration=STRAGGLY, restart=restart)
  model, dev, state, step = _setup(config, ragged_data, seed=3)
  init = jax.device_get({"client": state.client, "finish_time": state.finish_time})
  params, outs, prev = {0: state.server.params}, [], None
  for r in range(steps):
    prev = state
    key = jax.random.key(200 + r)
    state, out = step(state, dev, key)
    params[r + 1] = state.server.params
    outs.append(jax.device_get(out))
  assert step._cache_size() == 1   # compiled once

  sim = _event_simulation(init, [o.starts for o in outs], k, restart)
  saw_stale = 0
  for o, s in zip(outs, sim):
    a = o.arrivals
    assert a["slot"].tolist() == [x[0] for x in s["arrivals"]]
    assert a["client"].tolist() == [x[1] for x in s["arrivals"]]
    assert a["start_version"].tolist() == [x[2] for x in s["arrivals"]]
    np.testing.assert_array_equal(a["arrival_time"], [x[3] for x in s["arrivals"]])
    assert np.all(np.diff(a["arrival_time"]) >= 0)
    assert o.metrics["sim_time"] == s["now"]
    stale = s["t"] - np.asarray([x[2] for x in s["arrivals"]])
    np.testing.assert_array_equal(a["staleness"], stale)
    np.testing.assert_allclose(a["staleness_weight"], 1 / np.sqrt(1 + stale), rtol=1e-6)
    dropped = stale >= max_staleness
    assert o.metrics["num_stale_dropped"] == dropped.sum()
    assert np.all(a["weight"][dropped] == 0) and not np.any(a["counted"][dropped])
    np.testing.assert_allclose(a["weight"][~dropped], 1 / np.sqrt(1 + stale[~dropped]),
                               rtol=1e-6)   # uniform p_i = 1
    assert o.metrics["max_staleness"] == stale.max()
    saw_stale += int(np.sum(stale > 0))
  assert saw_stale >= 3
  if max_staleness == 3:
    assert sum(o.metrics["num_stale_dropped"] for o in outs) >= 1

  last = outs[-1].arrivals
  kept = {n: v[last["counted"]] for n, v in last.items()}
  assert np.any(kept["staleness"] > 0)
  ref = _reference_update(config, model, ragged_data, jax.random.key(200 + steps - 1), kept,
                          params, prev.server.params, prev.server.opt_state)
  testing.assert_trees_close(state.server.params, ref, atol=1e-5)


def test_durations_persistent_speed_and_work():
  """A client's speed factor is the same in every job; duration scales with local steps."""
  ids = jnp.arange(50, dtype=jnp.int32)
  steps = jnp.full(50, 4, jnp.int32)
  sk = jax.random.key(0)
  d = DurationModel(step_time=0.5, speed_sigma=1.0, noise_sigma=0.0)
  a = asynchronous.client_durations(d, sk, jax.random.key(1), ids, steps)
  b = asynchronous.client_durations(d, sk, jax.random.key(2), ids, 2 * steps)
  np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
  assert float(jnp.max(a) / jnp.min(a)) > 5   # persistently slow and fast devices
  noisy = DurationModel(step_time=0.5, speed_sigma=1.0, noise_sigma=0.3)
  c = asynchronous.client_durations(noisy, sk, jax.random.key(1), ids, steps)
  assert np.corrcoef(np.log(a), np.log(c))[0, 1] > 0.9
  steps_e = local_steps(fs.LocalWork(10, local_epochs=2), jnp.asarray([1, 10, 11]))
  assert steps_e.tolist() == [2, 2, 4]


@pytest.mark.slow
def test_learns_digits_and_compiles_once(monkeypatch):
  train, test = fs.datasets.digits()
  data = fs.FederatedData.from_partition(train, fs.partition.dirichlet(train["y"], 20, 1.0),
                                         num_classes=10)
  traces = []
  make = asynchronous.make_server_step

  def counting(*args, **kwargs):
    fn = make(*args, **kwargs)

    def step(*a):
      traces.append(1)
      return fn(*a)
    return step

  monkeypatch.setattr(asynchronous, "make_server_step", counting)
  config = fedbuff(optax.sgd(0.2), buffer_size=5, concurrency=12, max_staleness=20,
                   batch_size=32, duration=STRAGGLY)
  res = asynchronous.run_async(config, fs.models.logistic_regression(64, 10), data,
                               rounds=30, eval_data=test, eval_every=10, seed=0,
                               progress=False, rounds_per_call=10)
  h = res.history
  assert len(traces) == 1
  assert h.num_rounds == 30 and h["round"].tolist() == list(range(1, 31))
  assert np.all(np.diff(h["sim_time"]) >= 0) and np.all(h["mean_staleness"] >= 0)
  assert h["mean_staleness"][5:].mean() > 0.5      # M > K: stale updates arrive
  assert np.sum(~np.isnan(h["test_accuracy"])) == 3
  assert h.last("test_accuracy") > 0.6             # chance is 0.1
  assert h["train_loss"][-5:].mean() < h["train_loss"][:3].mean() - 0.3
  assert np.all(h["num_stale_dropped"] == 0)


@pytest.mark.parametrize("kwargs", [
    dict(buffer_size=5, concurrency=3),
    dict(buffer_size=0, concurrency=3),
    dict(buffer_size=-1, concurrency=3),
    dict(buffer_size=2, concurrency=3, max_staleness=0),
    dict(buffer_size=2, concurrency=3, max_staleness=-2),
    dict(buffer_size=2.0, concurrency=3),
    dict(buffer_size=2, concurrency=3, staleness="exp"),
    dict(buffer_size=2, concurrency=3, aggregation="median"),
    dict(buffer_size=2, concurrency=3, restart="never"),
    dict(buffer_size=2, concurrency=3, duration="lognormal"),
])
def test_bad_config(kwargs):
  with pytest.raises(ValueError):
    fedbuff(**kwargs)
  with pytest.raises(ValueError, match="speed_sigma"):
    DurationModel(speed_sigma=-1.0)


def test_bad_run_input(ragged_data):
  config = fedbuff(buffer_size=2, concurrency=20)   # population is 12
  with pytest.raises(ValueError, match="concurrency"):
    asynchronous.run_async(config, _mlp(), ragged_data, rounds=2, progress=False)
  ok = fedbuff(buffer_size=2, concurrency=4)
  with pytest.raises(ValueError, match="server_steps"):
    asynchronous.run_async(ok, _mlp(), ragged_data, rounds=0, progress=False)
  with pytest.raises(ValueError, match="config"):
    asynchronous.run_async(fs.algorithms.fedavg(), _mlp(), ragged_data, rounds=2,
                           progress=False)
  with pytest.raises(ValueError, match="does not support"):
    asynchronous.AsyncConfig("x", fs.algorithms.scaffold(), buffer_size=2, concurrency=4,
                             max_staleness=4)


@pytest.mark.slow
def test_run_until_simulated_time(ragged_data):
  """Equal speeds, 1 local step of 1 s and M = K: one update per simulated second, so
  until_time=3 stops after the third step (and evaluates there)."""
  config = fedbuff(optax.sgd(0.1), buffer_size=2, concurrency=2, max_staleness=1,
                   local_steps=1, batch_size=4, duration=EQUAL_SPEED)
  res = asynchronous.run_async(config, _mlp(), ragged_data, rounds=100, until_time=3.0,
                               eval_data=ragged_data, eval_every=10, seed=4, progress=False)
  h = res.history
  assert h["round"].tolist() == [1, 2, 3]
  np.testing.assert_allclose(h["sim_time"], [1.0, 2.0, 3.0])
  assert np.all(h["max_staleness"] == 0) and np.isfinite(h["test_accuracy"][-1])
  assert int(res.state.server.round) == 3
  np.testing.assert_array_equal(jax.random.key_data(res.state.speed_key),
                                jax.random.key_data(asynchronous.speed_key(4)))


def test_run_async_refuses_a_cohort_privacy_accountant(ragged_data):
  pytest.importorskip("dp_accounting")
  from fedjax_sim.privacy import accounting
  cb = accounting.privacy_callback(1.0, 4 / 12, 1e-5, population=12)
  config = fedbuff(optax.sgd(0.1), buffer_size=2, concurrency=4, batch_size=16)
  with pytest.raises(ValueError, match="asynchronous"):
    fs.run_async(config, fs.models.logistic_regression(8, 4), ragged_data, rounds=2,
                 callback=cb, progress=False)
