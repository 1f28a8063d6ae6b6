"""Compressed updates: unbiased quantizers, top-k with error feedback, bad input, and all of them
inside the vectorized round (equal to the sequential reference, wire bytes in the history)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import testing, transforms
from fedjax_sim.transforms import compression


def _model():
  return fs.models.mlp(8, (16,), 4)


def _update(seed=0):
  """A two-leaf update (90 params) with leaves of different scales."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w": jax.random.normal(k1, (10, 8)), "b": 0.1 * jax.random.normal(k2, (10,))}


def _draws(t, delta, num):
  keys = jax.random.split(jax.random.key(123), num)
  out = jax.jit(jax.vmap(lambda k: t(delta, k, jnp.int32(0))[0]))(keys)
  return np.asarray(jax.vmap(compression.flatten)(out), np.float64)     # [num, n]


@pytest.mark.parametrize("make", [
    lambda: compression.stochastic_quantize(1),
    lambda: compression.stochastic_quantize(3),
    lambda: compression.stochastic_quantize(2, per_leaf=True),
    lambda: compression.hadamard_quantize(1),
    lambda: compression.hadamard_quantize(4),
], ids=["q1", "q3", "q2-leaf", "hadamard1", "hadamard4"])
@pytest.mark.slow
def test_quantizers_are_unbiased(make):
  delta = _update()
  x = np.asarray(compression.flatten(delta), np.float64)
  num = 2000
  d = _draws(make(), delta, num)
  assert not np.allclose(d[0], x, atol=1e-3)                 # it really is lossy
  sem = d.std(axis=0) / np.sqrt(num)                          # standard error of each mean
  z = (d.mean(axis=0) - x) / (sem + 1e-6)   # + float rounding of exact (min/max) coordinates
  assert np.max(np.abs(z)) < 5.0                              # every coordinate within 5 sigma
  assert abs(np.mean(z)) < 5.0 / np.sqrt(x.size)              # and no shared drift


def test_stochastic_quantize_uses_2_pow_bits_levels_within_range():
  delta = _update(1)
  x = np.asarray(compression.flatten(delta))
  for bits in (1, 3):
    d = _draws(compression.stochastic_quantize(bits), delta, 50)
    for row in d:
      assert len(np.unique(np.round(row, 5))) <= 2 ** bits
    assert d.min() >= x.min() - 1e-5 and d.max() <= x.max() + 1e-5
    step = (x.max() - x.min()) / (2 ** bits - 1)
    assert np.max(np.abs(d - x)) <= step * (1 + 1e-5)


def test_constant_update_is_exact():
  delta = {"w": jnp.full((5, 3), 0.25), "b": jnp.full((3,), 0.25)}
  for t in (compression.stochastic_quantize(1), compression.stochastic_quantize(1, per_leaf=True)):
    testing.assert_trees_close(jax.jit(lambda *a: t(*a)[0])(delta, jax.random.key(0), jnp.int32(0)), delta,
                               atol=0)


def test_fwht_is_orthonormal_and_self_inverse():
  x = jax.random.normal(jax.random.key(0), (64,))
  fwht = jax.jit(compression.fwht)
  h = np.asarray(jax.vmap(fwht)(jnp.eye(64)))
  np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-5)
  np.testing.assert_allclose(fwht(fwht(x)), x, atol=1e-5)
  k = jax.random.key(1)
  rot = jax.jit(compression.random_rotation, static_argnames="inverse")
  y = rot(x, k)
  np.testing.assert_allclose(rot(y, k, inverse=True), x, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5)


def test_hadamard_has_lower_error_than_plain_quantization_on_spiky_updates():
  # One large coordinate: plain min/max quantization wastes its levels on the range.
  x = np.zeros(256, np.float32)
  x[:] = 0.01 * np.asarray(jax.random.normal(jax.random.key(0), (256,)))
  x[7] = 5.0
  delta = {"v": jnp.asarray(x)}
  mse = {name: np.mean((_draws(t, delta, 200) - x) ** 2)
         for name, t in [("plain", compression.stochastic_quantize(2)),
                         ("hadamard", compression.hadamard_quantize(2))]}
  assert mse["hadamard"] < 0.5 * mse["plain"]


def test_wire_bytes():
  params = {"w": jnp.zeros((10, 8)), "b": jnp.zeros((10,))}     # 90 params, 2 leaves
  assert compression.stochastic_quantize(4).wire_bytes(params) == 45 + 8
  assert compression.stochastic_quantize(1, per_leaf=True).wire_bytes(params) == 12 + 16
  assert compression.hadamard_quantize(2).wire_bytes(params) == 128 * 2 // 8 + 8
  assert compression.top_k(0.1).wire_bytes(params) == 9 * 8
  assert compression.top_k(0.001).wire_bytes(params) == 8          # at least one coordinate
  clipped = transforms.chain(transforms.clip_by_norm(1.0), compression.top_k(0.5))
  assert clipped.wire_bytes(params) == 45 * 8


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True, "4"])
def test_bad_bits(bits):
  for make in (compression.stochastic_quantize, compression.hadamard_quantize):
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.16"):
      make(bits)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.01, 2, float("nan"), True])
def test_bad_top_k_fraction(fraction):
  with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
    compression.top_k(fraction)


def test_top_k_keeps_the_largest_and_full_fraction_is_identity():
  delta = _update(2)
  x = np.asarray(compression.flatten(delta))
  out = np.asarray(compression.flatten(
      compression.top_k(0.1, error_feedback=False)(delta, jax.random.key(0), 0)[0]))
  kept = np.flatnonzero(out)
  assert kept.size == 9
  np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(x))[:9]))
  np.testing.assert_array_equal(out[kept], x[kept])
  t = compression.top_k(1.0)
  full, res = t.apply(delta, jax.random.key(0), 0, t.init(delta))
  testing.assert_trees_close(full, delta, atol=0)
  assert not np.any(np.asarray(res))


def test_error_feedback_residual_is_exactly_what_was_dropped_and_is_carried():
  t = compression.top_k(0.1)
  d1, d2 = _update(3), _update(4)
  e0 = t.init(d1)
  assert e0.shape == (90,) and not np.any(np.asarray(e0))
  apply = jax.jit(t.apply)
  s1, e1 = apply(d1, jax.random.key(0), jnp.int32(5), e0)
  v1 = np.asarray(compression.flatten(d1))
  sent1 = np.asarray(compression.flatten(s1))
  np.testing.assert_array_equal(sent1 + np.asarray(e1), v1)            # nothing lost
  np.testing.assert_array_equal(np.asarray(e1)[sent1 != 0], 0.0)      # sent coords: residual 0
  assert np.count_nonzero(sent1) == 9
  # Round 2 compresses delta + residual.
  s2, e2 = apply(d2, jax.random.key(1), jnp.int32(5), e1)
  v2 = np.asarray(compression.flatten(d2)) + np.asarray(e1)
  sent2 = np.asarray(compression.flatten(s2))
  np.testing.assert_array_equal(sent2, np.asarray(compression.sparsify(jnp.asarray(v2), 9)))
  np.testing.assert_array_equal(sent2 + np.asarray(e2), v2)
  # Summed over rounds, what was sent plus the final residual is all that was to be sent.
  np.testing.assert_allclose(sent1 + sent2 + np.asarray(e2),
                             v1 + np.asarray(compression.flatten(d2)), atol=1e-6)


@pytest.mark.slow
def test_error_feedback_state_in_run(ragged_data):
  """The engine stores each client's residual: a client that took part holds exactly what its
  last compressed update left out, one that never did holds zeros."""
  t = compression.top_k(0.2)
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16),
                             update_transform=t)
  n = fs.tree.num_params(_model().init(jax.random.key(0)))
  k = compression.top_k_count(0.2, n)
  seen = set()

  def callback(r, state, out):
    res = np.asarray(state.clients.transform)       # [P, n]
    assert res.shape == (ragged_data.num_clients, n)
    ids = np.asarray(out.clients["id"])[np.asarray(out.clients["counted"])]
    seen.update(int(i) for i in ids)
    for c in range(ragged_data.num_clients):
      if c in seen:   # the top-k coordinates were sent (residual 0), the others kept
        assert 0 < np.count_nonzero(res[c]) <= n - k
      else:
        assert not np.any(res[c])

  res = fs.run(algo, _model(), ragged_data, rounds=2, cohort_size=5, chunk_size=2,
               progress=False, callback=callback)
  ref, _ = testing.sequential_run(algo, _model(), ragged_data, rounds=2, cohort_size=5)
  assert len(seen) < ragged_data.num_clients
  testing.assert_trees_close(res.state.clients.transform, ref.clients.transform, atol=1e-5)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)


@pytest.mark.parametrize("transform", [
    transforms.chain(transforms.clip_by_norm(0.5), compression.stochastic_quantize(4)),
    transforms.chain(transforms.clip_by_norm(0.5), compression.stochastic_quantize(2, True)),
    transforms.chain(transforms.clip_by_norm(0.5), compression.hadamard_quantize(3)),
    transforms.chain(transforms.clip_by_norm(0.5), compression.top_k(0.1)),
    transforms.chain(transforms.clip_by_norm(0.5), compression.top_k(0.3, error_feedback=False)),
], ids=["quant4", "quant2-leaf", "hadamard3", "topk-ef", "topk"])
@pytest.mark.slow
def test_compressed_round_equals_sequential_reference(ragged_data, transform):
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16),
                             update_transform=transform)
  res = fs.run(algo, _model(), ragged_data, rounds=2, cohort_size=7, chunk_size=3,
               progress=False)
  ref, _ = testing.sequential_run(algo, _model(), ragged_data, rounds=2, cohort_size=7)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)
  params = _model().init(jax.random.key(0))
  np.testing.assert_array_equal(res.history["bytes_up_per_client"], transform.wire_bytes(params))
  np.testing.assert_array_equal(res.history["bytes_up"],
                                transform.wire_bytes(params) * res.history["num_counted"])


def test_compression_composes_with_a_robust_aggregator(ragged_data):
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16),
                             update_transform=compression.top_k(0.2),
                             aggregator=fs.aggregators.coordinate_median())
  res = fs.run(algo, _model(), ragged_data, rounds=2, cohort_size=6, chunk_size=4,
               progress=False)
  assert np.all(np.isfinite(res.history["train_loss"]))
  assert np.all(res.history["num_counted"] == 6)
