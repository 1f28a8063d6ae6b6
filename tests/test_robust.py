"""Robust aggregators: equal to numpy on the valid clients, shardable, robust, usable in run()."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators as agg_lib

SHAPES = {"w": (3, 4), "b": (4,)}
C, K = 12, 4    # 3 chunks of 4 client slots


def _template():
  return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def _updates(rng, c=C):
  return {k: rng.normal(size=(c,) + s).astype(np.float32) for k, s in SHAPES.items()}


def _weights(rng, c=C, zero=(2, 7, 10, 11)):
  w = rng.uniform(1.0, 5.0, size=c).astype(np.float32)
  w[list(zero)] = 0.0
  return w


def _feed(agg, ups, w, num_clients, start, k=K):
  """Folds rows ``[start, start + num_clients)`` chunk by chunk into a fresh state."""
  state = agg.init(_template(), num_clients)
  for i in range(start, start + num_clients, k):
    d = {n: jnp.asarray(np.where(w[i:i + k].reshape((-1,) + (1,) * len(SHAPES[n])) > 0,
                                 v[i:i + k], 0.0)) for n, v in ups.items()}
    state = agg.accumulate(state, d, jnp.asarray(w[i:i + k]))
  return state


def _flat(ups):
  return np.concatenate([ups[k].reshape(ups[k].shape[0], -1) for k in sorted(ups)], axis=1)


def _unflat(v):
  out, i = {}, 0
  for k in sorted(SHAPES):
    n = int(np.prod(SHAPES[k]))
    out[k] = v[i:i + n].reshape(SHAPES[k])
    i += n
  return out


def _np_trimmed(x, beta):
  n = x.shape[0]
  t = int(np.floor(beta * n))
  return np.sort(x, axis=0)[t:n - t].mean(axis=0)


def _np_krum(x, f, m):
  n = x.shape[0]
  d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).astype(np.float64)
  scores = []
  for i in range(n):
    others = np.sort(np.delete(d[i], i))
    scores.append(others[: n - f - 2].sum())
  return x[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


def _np_norm_bounded(x, w, max_norm):
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  clipped = x * np.minimum(1.0, max_norm / norms)
  return (w[:, None] * clipped).sum(0) / w.sum()


CASES = [
    ("median", agg_lib.coordinate_median, lambda x, w: np.median(x, axis=0)),
    ("trimmed0", lambda: agg_lib.trimmed_mean(0.0), lambda x, w: x.mean(0)),
    ("trimmed.2", lambda: agg_lib.trimmed_mean(0.2), lambda x, w: _np_trimmed(x, 0.2)),
    ("trimmed.4", lambda: agg_lib.trimmed_mean(0.4), lambda x, w: _np_trimmed(x, 0.4)),
    ("krum", lambda: agg_lib.krum(2), lambda x, w: _np_krum(x, 2, 1)),
    ("multikrum", lambda: agg_lib.krum(1, multi_m=3), lambda x, w: _np_krum(x, 1, 3)),
    ("normbound", lambda: agg_lib.norm_bounded_mean(2.5),
     lambda x, w: _np_norm_bounded(x, w, 2.5)),
]


@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
def test_equals_numpy_on_valid_clients_and_combine(name, make, ref):
  rng = np.random.default_rng(1)
  ups, w = _updates(rng), _weights(rng)
  valid = w > 0
  agg = make()
  expected = _unflat(ref(_flat(ups)[valid], w[valid]))

  update, total = jax.jit(lambda: agg.finalize(_feed(agg, ups, w, C, 0)))()
  np.testing.assert_allclose(float(total), w[valid].sum(), rtol=1e-6)
  for k in SHAPES:
    np.testing.assert_allclose(update[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)

  # Two fake devices with 6 slots each (2 chunks of 3), stacked then combined.
  states = [_feed(agg, ups, w, 6, s, k=3) for s in (0, 6)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  update2, total2 = agg.finalize(agg.combine(stacked))
  np.testing.assert_allclose(float(total2), w[valid].sum(), rtol=1e-6)
  for k in SHAPES:
    np.testing.assert_allclose(update2[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("make", [agg_lib.coordinate_median, lambda: agg_lib.trimmed_mean(0.3),
                                  lambda: agg_lib.krum(1)])
def test_no_valid_client_gives_zero_update_and_weight(make):
  agg = make()
  rng = np.random.default_rng(2)
  update, total = agg.finalize(_feed(agg, _updates(rng), np.zeros(C, np.float32), C, 0))
  assert float(total) == 0.0
  for k in SHAPES:
    np.testing.assert_array_equal(update[k], 0.0)


@pytest.mark.parametrize("attack", ["scaled", "sign_flip"])
def test_robust_to_20_percent_attackers(attack):
  rng = np.random.default_rng(3)
  c, bad = 20, 4
  mu = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
  ups = {k: mu[k] + 0.1 * rng.normal(size=(c,) + s).astype(np.float32) for k, s in SHAPES.items()}
  honest = {k: v[bad:].mean(0) for k, v in ups.items()}
  for k in ups:
    ups[k][:bad] = 100.0 * ups[k][:bad] if attack == "scaled" else -10.0 * ups[k][:bad]
  w = np.ones(c, np.float32)

  def err(agg):
    state = agg.init(_template(), c)
    for i in range(0, c, 5):
      state = agg.accumulate(state, {k: jnp.asarray(v[i:i + 5]) for k, v in ups.items()},
                             jnp.asarray(w[i:i + 5]))
    update, _ = agg.finalize(state)
    return max(float(np.abs(update[k] - honest[k]).max()) for k in SHAPES)

  assert err(agg_lib.mean()) > 2.0
  assert err(agg_lib.coordinate_median()) < 0.15
  assert err(agg_lib.trimmed_mean(0.25)) < 0.15
  assert err(agg_lib.krum(bad)) < 0.5
  assert err(agg_lib.krum(bad, multi_m=5)) < 0.3


@pytest.mark.parametrize("name,agg,chunk", [
    ("median", agg_lib.coordinate_median(), None),
    ("median_chunk3", agg_lib.coordinate_median(), 3),
    ("trimmed_chunk3", agg_lib.trimmed_mean(0.2), 3),
    ("krum_chunk3", agg_lib.krum(1, multi_m=2), 3),
    ("normbound_chunk3", agg_lib.norm_bounded_mean(1.0), 3),
])
@pytest.mark.slow
def test_trains_inside_run(ragged_data, name, agg, chunk):
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16), aggregator=agg)
  model = fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)
  res = fs.run(algo, model, ragged_data, rounds=6, cohort_size=8, chunk_size=chunk, seed=0,
               progress=False)
  loss = res.history["train_loss"]
  assert np.all(np.isfinite(loss))
  assert loss[-1] < loss[0]
  assert np.all(res.history["total_weight"] > 0)


def test_bad_hyperparameters_raise(ragged_data):
  for bad in (-0.1, 0.5, 0.7):
    with pytest.raises(ValueError):
      agg_lib.trimmed_mean(bad)
  for kwargs in ({"num_byzantine": -1}, {"num_byzantine": 1, "multi_m": 0},
                 {"num_byzantine": 1.5}):
    with pytest.raises(ValueError):
      agg_lib.krum(**kwargs)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError):
      agg_lib.norm_bounded_mean(bad)
  # Krum needs cohort_size > 2f + 2: rejected when the round is built.
  algo = dataclasses.replace(fs.algorithms.fedavg(batch_size=16), aggregator=agg_lib.krum(3))
  model = fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)
  with pytest.raises(ValueError, match="cohort_size"):
    fs.run(algo, model, ragged_data, rounds=1, cohort_size=8, progress=False)
  # Buffering aggregators need the client count.
  with pytest.raises(ValueError):
    agg_lib.coordinate_median().init(_template())


SHARDED = """
import json, dataclasses
import jax, numpy as np, optax
import fedjax_sim as fs
assert jax.device_count() == 2, jax.devices()
rng = np.random.default_rng(0)
w = rng.normal(size=(8, 4))
clients = []
for n in rng.integers(1, 40, size=10):
  x = rng.normal(size=(n, 8)).astype(np.float32)
  clients.append({"x": x, "y": np.argmax(x @ w, 1).astype(np.int32)})
data = fs.FederatedData.from_clients(clients, num_classes=4)
model = fs.models.mlp(8, (8,), 4)
out = {}
for name, agg in [("median", fs.aggregators.coordinate_median()),
                  ("krum", fs.aggregators.krum(1, multi_m=2))]:
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=8), aggregator=agg)
  for d in (1, 2):
    r = fs.run(algo, model, data, rounds=2, cohort_size=7, num_devices=d, chunk_size=3,
               progress=False)
    out[f"{name}-{d}"] = np.concatenate([np.ravel(l) for l in jax.tree.leaves(r.params)]).tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_equals_single_device():
  import json
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  for name in ("median", "krum"):
    np.testing.assert_allclose(out[f"{name}-2"], out[f"{name}-1"], atol=1e-5, err_msg=name)
