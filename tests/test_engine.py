"""The vectorized round equals the sequential reference; masks, chunking and NaN handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import testing


def _mlp():
  return fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)


@pytest.mark.parametrize("chunk_size", [3, 5, 100])
@pytest.mark.parametrize("server_opt", ["sgd", "adam"])
@pytest.mark.slow
def test_vectorized_equals_sequential_3_rounds(ragged_data, chunk_size, server_opt):
  algo = fs.algorithms.fedavg(
      optax.sgd(0.05, momentum=0.9),
      optax.sgd(1.0) if server_opt == "sgd" else optax.adam(0.01),
      local_epochs=3, batch_size=16)
  model = _mlp()
  res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=10, seed=1, chunk_size=chunk_size,
               progress=False)
  ref_state, ref_hist = testing.sequential_run(algo, model, ragged_data, rounds=3,
                                               cohort_size=10, seed=1)
  testing.assert_trees_close(res.params, ref_state.params, atol=1e-5)
  np.testing.assert_allclose(res.history["train_loss"], [h["train_loss"] for h in ref_hist],
                             rtol=1e-5)
  # the model did move: equivalence is not trivially true
  assert fs.tree.max_abs_diff(res.params, model.init(jax.random.split(jax.random.key(1))[0])) > 1e-3


@pytest.mark.slow
def test_local_steps_and_uniform_weighting(ragged_data):
  algo = fs.algorithms.fedavg(optax.adam(1e-2), local_steps=4, batch_size=8, weighting="uniform")
  res = fs.run(algo, _mlp(), ragged_data, rounds=2, cohort_size=12, seed=3, chunk_size=5,
               progress=False)
  ref, _ = testing.sequential_run(algo, _mlp(), ragged_data, rounds=2, cohort_size=12, seed=3)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


@pytest.mark.slow
def test_custom_client_weights_match_reference(ragged_data):
  w = np.linspace(0.0, 2.0, ragged_data.num_clients)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), local_epochs=1, batch_size=32)
  res = fs.run(algo, _mlp(), ragged_data, rounds=2, cohort_size=12, client_weights=w,
               progress=False)
  ref, _ = testing.sequential_run(algo, _mlp(), ragged_data, rounds=2, cohort_size=12, weights=w)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


@pytest.mark.slow
def test_masked_steps_change_nothing():
  """A client with all-masked steps (padding) returns a zero delta, even with momentum/Adam."""
  model = _mlp()
  train = fs.client.make_client_train(model, optax.adam(0.1))
  params = model.init(jax.random.key(0))
  x = jnp.ones((4, 5, 8))
  y = jnp.zeros((4, 5), jnp.int32)
  mask = jnp.zeros((4, 5), bool)
  out = train(params, x, y, mask)
  assert fs.tree.max_abs_diff(out.delta, fs.tree.zeros_like(params)) == 0.0
  # masking the last 2 steps == running only the first 2
  mask = mask.at[:2].set(True)
  full = train(params, x, y, mask)
  short = train(params, x[:2], y[:2], mask[:2])
  testing.assert_trees_close(full.delta, short.delta, atol=0)
  # a masked example does not influence the gradient, whatever its (garbage) features
  mask2 = jnp.ones((1, 5), bool).at[0, 4].set(False)
  a = train(params, x[:1], y[:1], mask2)
  b = train(params, x[:1].at[0, 4].set(1e6), y[:1], mask2)
  testing.assert_trees_close(a.delta, b.delta, atol=0)


@pytest.mark.slow
def test_nonfinite_client_is_dropped_not_poisoning(ragged_data):
  """A client whose update becomes NaN gets weight 0 and is counted."""
  model = _mlp()
  bad_loss = lambda logits, y: jnp.where(jnp.any(logits > -1e9), 1.0, 0.0) * jnp.where(
      y == 3, jnp.nan, optax.softmax_cross_entropy_with_integer_labels(logits, y))
  poisoned = fs.models.Model(model.init, model.apply, model.input_shape, 4, loss=bad_loss)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  res = fs.run(algo, poisoned, ragged_data, rounds=2, cohort_size=12, progress=False)
  assert np.all(np.isfinite(np.concatenate([np.ravel(l) for l in jax.tree.leaves(res.params)])))
  assert res.history["num_nonfinite"][0] > 0
  ref, hist = testing.sequential_run(algo, poisoned, ragged_data, rounds=2, cohort_size=12)
  assert hist[0]["num_nonfinite"] == res.history["num_nonfinite"][0]
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


def test_all_clients_nonfinite_keeps_model(ragged_data):
  model = _mlp()
  nan_model = fs.models.Model(model.init, model.apply, model.input_shape, 4,
                              loss=lambda logits, y: jnp.full(y.shape, jnp.nan))
  algo = fs.algorithms.fedavg(optax.sgd(0.1), optax.adam(0.1), batch_size=16)
  with pytest.warns(RuntimeWarning, match="2 of 2 rounds had no client with finite"):
    res = fs.run(algo, nan_model, ragged_data, rounds=2, cohort_size=4, progress=False)
  init = nan_model.init(jax.random.split(jax.random.key(0))[0])
  testing.assert_trees_close(res.params, init, atol=0)
  assert list(res.history["num_nonfinite"]) == [4, 4]
  assert np.isnan(res.history["train_loss"]).all()   # no loss to report, not 0


@pytest.mark.slow
def test_same_seed_same_numbers(ragged_data):
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  a = fs.run(algo, _mlp(), ragged_data, rounds=3, cohort_size=5, seed=7, progress=False)
  b = fs.run(algo, _mlp(), ragged_data, rounds=3, cohort_size=5, seed=7, progress=False)
  c = fs.run(algo, _mlp(), ragged_data, rounds=3, cohort_size=5, seed=8, progress=False)
  testing.assert_trees_close(a.params, b.params, atol=0)
  np.testing.assert_array_equal(a.history["train_loss"], b.history["train_loss"])
  assert fs.tree.max_abs_diff(a.params, c.params) > 1e-4


@pytest.mark.slow
def test_fedavg_learns_on_digits():
  train, test = fs.datasets.digits()
  data = fs.FederatedData.from_partition(train, fs.partition.dirichlet(train["y"], 30, 0.5, seed=0),
                                         num_classes=10)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16, local_epochs=2)
  res = fs.run(algo, fs.models.mlp(64, (64,), 10), data, rounds=30, cohort_size=10,
               eval_data=test, eval_every=10, progress=False)
  h = res.history
  assert h["train_loss"][-5:].mean() < 0.5 * h["train_loss"][0]
  assert h.last("test_accuracy") > 0.8   # chance is 0.1


@pytest.mark.slow
def test_rounds_per_call_equals_round_by_round(ragged_data):
  """Blocks of rounds in one compiled scan give exactly the round-by-round results."""
  algo = fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.9), optax.adam(0.01), batch_size=16)
  test = {"x": ragged_data.arrays["x"][:50], "y": ragged_data.arrays["y"][:50]}
  seen = []
  kw = dict(rounds=7, cohort_size=5, eval_data=test, eval_every=3, seed=5, progress=False)
  a = fs.run(algo, _mlp(), ragged_data, **kw)
  b = fs.run(algo, _mlp(), ragged_data, rounds_per_call=4, callback=lambda r, s, o: seen.append(r),
             **kw)
  testing.assert_trees_close(a.params, b.params, atol=0)
  for k in a.history:
    if k != "seconds":
      np.testing.assert_array_equal(a.history[k], b.history[k], err_msg=k)
  assert seen == list(range(1, 8))
  assert np.isnan(b.history["test_accuracy"][0]) and not np.isnan(b.history["test_accuracy"][2])


# Client sizes with a heavy tail (max/mean ~ 8x): most clients take one or two local steps, one
# takes 50; chunks sorted by work must still give the sequential reference's numbers.
HEAVY_TAILED = (1, 1, 2, 2, 3, 4, 5, 6, 8, 11, 15, 23, 40, 90, 400)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_heavy_tailed_sizes_equal_sequential(chunk_size):
  data = testing.ragged_clients(HEAVY_TAILED)
  p = data.num_clients
  rng = np.random.default_rng(1)
  # Stragglers and per-client epochs / batch sizes change the step counts after batching: the
  # per-chunk trip count must follow the masked work, not the sizes.
  het = fs.Heterogeneity(straggler_fraction=0.4, local_epochs=rng.integers(1, 3, p),
                         batch_size=rng.integers(4, 9, p))
  algo = fs.algorithms.fedprox(optax.sgd(0.05, momentum=0.9), mu=0.1, batch_size=8,
                               local_epochs=2)
  res = fs.run(algo, _mlp(), data, rounds=2, cohort_size=11, seed=2, chunk_size=chunk_size,
               heterogeneity=het, progress=False)
  ref, hist = testing.sequential_run(algo, _mlp(), data, rounds=2, cohort_size=11, seed=2,
                                     heterogeneity=het)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)
  np.testing.assert_allclose(res.history["train_loss"], [h["train_loss"] for h in hist], rtol=1e-5)
  assert res.history["num_stragglers"].sum() > 0


@pytest.mark.slow
def test_lognormal_sizes_equal_sequential_local_steps():
  """Fixed local steps (every client the same count) on lognormal sizes, uneven cohort split."""
  sizes = tuple(int(s) for s in np.random.default_rng(0).lognormal(3.0, 1.0, 13).clip(1, 300))
  data = testing.ragged_clients(sizes)
  algo = fs.algorithms.fedavg(optax.adam(1e-2), local_steps=3, batch_size=8)
  res = fs.run(algo, _mlp(), data, rounds=2, cohort_size=13, seed=4, chunk_size=5, progress=False)
  ref, _ = testing.sequential_run(algo, _mlp(), data, rounds=2, cohort_size=13, seed=4)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


def test_cohort_layout_sorts_by_work_and_balances_devices():
  work = jnp.asarray([3, 9, -1, 5, 9, 1, 0, 7], jnp.int32)
  one = np.asarray(fs.engine.cohort_layout(work, 1))
  assert sorted(one.tolist()) == list(range(8))
  assert np.all(np.diff(np.asarray(work)[one]) <= 0)       # descending
  assert one[:2].tolist() == [1, 4]                          # ties keep cohort order
  two = np.asarray(fs.engine.cohort_layout(work, 2)).reshape(2, 4)
  shares = np.asarray(work)[two]
  assert sorted(two.ravel().tolist()) == list(range(8))
  assert np.all(np.diff(shares, axis=1) <= 0)                # each device's share descending
  assert abs(int(shares[0].sum()) - int(shares[1].sum())) <= 9   # balanced within one client
  assert shares[:, 0].tolist() == [9, 9]


def test_cohort_layout_balances_a_zipf_cohort_across_devices():
  """The largest clients are placed greedily: a Zipf a=1 cohort's two device shares differ by
  a few steps (round-robin dealing left the first device ~290 steps, 11%, heavier)."""
  steps = -(-np.floor(13227 / np.arange(1, 1001)).astype(np.int64) // 20)
  work = jnp.asarray(np.concatenate([steps, -np.ones(8, np.int64)]), jnp.int32)
  lay = np.asarray(fs.engine.cohort_layout(work, 2)).reshape(2, -1)
  assert sorted(lay.ravel().tolist()) == list(range(1008))
  shares = np.asarray(work)[lay]
  assert np.all(np.diff(shares, axis=1) <= 0)
  loads = np.maximum(shares, 0).sum(axis=1)
  assert abs(int(loads[0]) - int(loads[1])) <= 10, loads


def test_phase_widths_halve_down_to_one():
  assert fs.engine.phase_widths(1) == (1,)
  assert fs.engine.phase_widths(8) == (8, 4, 2, 1)
  assert fs.engine.phase_widths(6) == (6, 4, 2, 1)
  assert fs.engine.phase_widths(9) == (9, 8, 4, 2, 1)


def test_step_widths_compile_one_width_when_every_client_takes_the_same_steps():
  lw = fs.data.federated.LocalWork
  het = fs.heterogeneity.Heterogeneity(straggler_fraction=0.5)
  assert fs.engine.step_widths(8, lw(10, local_epochs=None, local_steps=5), 3, 500) == (8,)
  assert fs.engine.step_widths(8, lw(10, local_epochs=2), 95, 100) == (8,)      # 10 batches each
  assert fs.engine.step_widths(8, lw(10, local_epochs=2), 90, 100) == (8, 4, 2, 1)
  assert fs.engine.step_widths(8, lw(10, local_epochs=2), 0, 100) == (8, 4, 2, 1)   # unknown
  assert fs.engine.step_widths(8, lw(10, local_epochs=None, local_steps=5), 3, 500,
                               het) == (8, 4, 2, 1)


@pytest.mark.slow
def test_fold_with_known_min_size_equals_the_fold_without():
  """Equal step counts compile only width K (and fewer shuffle bounds); the results, including a
  partly padded chunk and a chunk of one real client, are exactly those of the full fold."""
  data = testing.ragged_clients((77, 78, 80, 79, 77, 80))   # 20 batches of 4 each
  model = _mlp()
  params = model.init(jax.random.key(0))
  dev = fs.engine.to_device(data)
  keys = fs.engine.round_keys(jax.random.key(5))
  ids = jnp.asarray([[3, 0, 5, 1], [2, 4, 0, 0], [1, 0, 0, 0]], jnp.int32)
  valid = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  for work in ({"local_epochs": 1}, {"local_epochs": None, "local_steps": 3}):
    algo = fs.algorithms.fedavg(optax.sgd(0.05), batch_size=4, **work)
    state = fs.engine.init_state(algo, params, data.num_clients)
    assert fs.engine.step_widths(4, algo.work, data.min_client_size, data.max_client_size) == (4,)
    outs = []
    for least in (0, data.min_client_size):
      fold = fs.engine.make_cohort_fold(algo, model, max_client_size=data.max_client_size,
                                        chunk_size=4, min_client_size=least)
      outs.append(jax.jit(fold)(state.params, state.aux, state.clients, state.hparams, dev, keys,
                                ids, valid))
    for name in ("loss_sum", "steps", "weight"):
      np.testing.assert_array_equal(outs[0].clients[name], outs[1].clients[name])
    for a, b in zip(jax.tree.leaves(outs[0].aggregate), jax.tree.leaves(outs[1].aggregate)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_fold_is_independent_of_slot_order():
  """Phases of halving width assume a chunk's busiest clients come first; an unsorted chunk
  (busiest last) must only be slower: every client's result is the same, for any chunk size."""
  data = testing.ragged_clients((90, 3, 40, 1, 11, 23, 5, 2))
  algo = fs.algorithms.fedavg(optax.sgd(0.05, momentum=0.9), batch_size=4, local_epochs=1)
  model = _mlp()
  params = model.init(jax.random.key(0))
  state = fs.engine.init_state(algo, params, data.num_clients)
  dev = fs.engine.to_device(data)
  keys = fs.engine.round_keys(jax.random.key(5))
  sizes = np.asarray(data.sizes)
  results = []
  for k, ids in [(8, np.argsort(sizes)), (8, np.argsort(-sizes)), (4, np.arange(8)), (1, np.arange(8))]:
    fold = fs.engine.make_cohort_fold(algo, model, max_client_size=data.max_client_size,
                                      chunk_size=k)
    ids_c = jnp.asarray(ids.reshape(-1, k), jnp.int32)
    out = jax.jit(fold)(state.params, state.aux, state.clients, state.hparams, dev, keys,
                        ids_c, jnp.ones(ids_c.shape, bool))
    back = np.argsort(ids)   # rows in client-id order
    results.append({n: np.asarray(out.clients[n]).reshape(-1)[back] for n in ("loss_sum", "steps")})
  np.testing.assert_array_equal(results[0]["steps"], -(-sizes // 4))
  for r in results[1:]:
    np.testing.assert_array_equal(r["steps"], results[0]["steps"])
    np.testing.assert_allclose(r["loss_sum"], results[0]["loss_sum"], rtol=1e-5)


@pytest.mark.slow
def test_outputs_follow_cohort_order_not_layout(ragged_data):
  """Per-client outputs come back in sampled-cohort order whatever the work-sorted layout."""
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  state = fs.engine.init_state(algo, _mlp().init(jax.random.key(0)), ragged_data.num_clients)
  dev = fs.engine.to_device(ragged_data)
  outs = []
  for k in (1, 3, 12):
    rf = jax.jit(fs.engine.make_round(algo, _mlp(), population=ragged_data.num_clients,
                                      cohort_size=12, max_client_size=ragged_data.max_client_size,
                                      chunk_size=k))
    _, out = rf(state, dev, jax.random.key(3))
    outs.append(out.clients)
  np.testing.assert_array_equal(outs[0]["count"], ragged_data.sizes[np.asarray(outs[0]["id"])])
  for o in outs[1:]:
    np.testing.assert_array_equal(o["id"], outs[0]["id"])
    np.testing.assert_allclose(o["loss"], outs[0]["loss"], rtol=1e-5)
    np.testing.assert_array_equal(o["steps"], outs[0]["steps"])


class _FakeGPU:
  platform, device_kind = "gpu", "Fake GPU"

  def memory_stats(self):
    return {"bytes_limit": 4_000_000, "bytes_in_use": 0}


def test_memory_guard_reads_the_accelerator_memory(monkeypatch):
  """On an accelerator the per-client state guard compares with device memory, not host RAM."""
  assert fs.engine.device_memory_bytes(_FakeGPU()) == (4_000_000, "Fake GPU device memory")
  ram, where = fs.engine.device_memory_bytes(jax.devices("cpu")[0])
  assert where == "this machine's RAM" and ram > 4_000_000
  monkeypatch.setattr(fs.engine.jax, "local_devices", lambda: [_FakeGPU()])
  algo = fs.algorithms.scaffold(optax.sgd(0.1))
  params = _mlp().init(jax.random.key(0))              # 212 floats: ~1.7 kB of state per client
  fs.engine.init_state(algo, params, 100)               # 0.17 MB: fits in half of 4 MB
  with pytest.raises(ValueError, match="Fake GPU device memory"):
    fs.engine.init_state(algo, params, 10_000)          # 17 MB


def test_default_chunk_size_per_backend():
  assert fs.engine.default_chunk_size("cpu") == fs.engine.DEFAULT_CHUNK_SIZE
  assert fs.engine.default_chunk_size("gpu") == fs.engine.ACCELERATOR_CHUNK_SIZE
  assert fs.engine.default_chunk_size() == fs.engine.DEFAULT_CHUNK_SIZE   # the tests run on CPU
