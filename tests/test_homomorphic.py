"""Homomorphic (CKKS) aggregation: the decrypted sum equals the plaintext weighted mean within
CKKS precision (several cohort sizes, drop-outs, clipping, DP noise added before encryption),
the server's key cannot decrypt, a wrong key is refused, costs are recorded, bad parameters are
rejected. Needs the ``he`` extra (TenSEAL)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("tenseal", reason="homomorphic aggregation needs the 'he' extra (TenSEAL)")

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import testing, transforms  # noqa: E402
from fedjax_sim.aggregators import homomorphic as he  # noqa: E402

# Documented CKKS precision at the default parameters (scale 2^40): ~1e-9 per coordinate.
ATOL = 1e-6


@pytest.fixture(scope="module")
def keys():
  return he.KeyHolder()


def _feed(agg, ups, w, k=4):
  template = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), ups)
  cap = w.shape[0]
  state = agg.init(template, cap)
  for i in range(0, cap, k):
    state = agg.accumulate(state, jax.tree.map(lambda a: jnp.asarray(a[i:i + k]), ups),
                           jnp.asarray(w[i:i + k]))
  return state


def _plain(ups, w, agg=None):
  agg = agg or fs.aggregators.mean()
  return jax.jit(agg.finalize)(_feed(agg, ups, w))


@pytest.mark.parametrize("cap, n", [(1, 30), (8, 5000), (40, 300)])
def test_decrypted_aggregate_equals_the_plaintext_mean(keys, cap, n):
  rng = np.random.default_rng(cap)
  ups = {"w": rng.normal(scale=0.3, size=(cap, n - 7)).astype(np.float32),
         "b": rng.normal(scale=0.3, size=(cap, 7)).astype(np.float32)}
  w = rng.uniform(1, 50, size=cap).astype(np.float32)
  dropped = np.arange(cap) % 3 == 1                   # drop-outs / padding: weight 0
  w[dropped] = 0.0
  agg = he.ckks_mean(key_holder=keys)
  got, total = jax.jit(agg.finalize)(_feed(agg, ups, w))
  want, want_total = _plain(ups, w)
  assert float(total) == pytest.approx(float(want_total), rel=1e-6)
  testing.assert_trees_close(got, want, atol=ATOL)
  assert fs.tree.max_abs_diff(got, want) > 0         # it did go through CKKS
  cost, = he.session_of(agg).costs
  assert cost.num_clients == int((~dropped).sum()) and cost.num_params == n
  assert cost.ciphertexts_per_client == -(-n // 4096)   # packed: 4096 values per ciphertext
  assert cost.bytes_up_per_client > 10 * cost.plain_bytes_per_client   # CKKS expands ~20x
  assert min(cost.encrypt_seconds, cost.sum_seconds, cost.decrypt_seconds) > 0


def test_everyone_dropped_gives_zero_and_nothing_is_encrypted(keys):
  agg = he.ckks_mean(key_holder=keys)
  ups = {"v": np.ones((4, 10), np.float32)}
  got, total = jax.jit(agg.finalize)(_feed(agg, ups, np.zeros(4, np.float32)))
  assert float(total) == 0 and np.all(np.asarray(got["v"]) == 0)
  cost, = he.session_of(agg).costs          # nothing encrypted, but one record per round
  assert cost.num_clients == 0 and cost.bytes_up_per_client == 0 and cost.encrypt_seconds == 0


def test_clip_matches_the_norm_bounded_mean(keys):
  rng = np.random.default_rng(2)
  ups = {"v": rng.normal(scale=1.0, size=(6, 50)).astype(np.float32)}   # norms ~7
  w = rng.uniform(1, 5, size=6).astype(np.float32)
  agg = he.ckks_mean(clip=2.0, key_holder=keys)
  got, _ = jax.jit(agg.finalize)(_feed(agg, ups, w, k=3))
  want, _ = _plain(ups, w, fs.aggregators.norm_bounded_mean(2.0))
  testing.assert_trees_close(got, want, atol=ATOL)
  assert fs.tree.max_abs_diff(want, _plain(ups, w)[0]) > 0.1   # the clip did bite


def test_public_key_cannot_decrypt_and_a_wrong_key_is_refused(keys):
  pk = keys.public_key()
  x = np.linspace(-1, 1, 100)
  ct = pk.add([pk.encrypt(x), pk.encrypt(2 * x)])
  np.testing.assert_allclose(keys.decrypt(ct), 3 * x, atol=ATOL)
  with pytest.raises(ValueError, match="needs the secret key"):
    pk.decrypt(ct)
  other = he.KeyHolder()
  with pytest.raises(ValueError, match="wrong key"):
    other.decrypt(ct)
  with pytest.raises(ValueError, match="another public key"):
    pk.add([ct, other.public_key().encrypt(x)])
  # The server's context really has no secret key (TenSEAL itself refuses).
  ts = he.tenseal()
  with pytest.raises(ValueError, match="secret"):
    ts.ckks_tensor_from(pk.context, ct.chunks[0]).decrypt()
  with pytest.raises(ValueError, match="clip the updates"):
    pk.encrypt(np.array([0.0, 3e6]))


def test_bad_parameters(keys):
  with pytest.raises(ValueError, match="poly_modulus_degree"):
    he.ckks_mean(poly_modulus_degree=1000)
  with pytest.raises(ValueError, match="128-bit-security"):
    he.ckks_mean(poly_modulus_degree=4096)           # 60+40+40+60 > 109 bits
  with pytest.raises(ValueError, match="scale_bits"):
    he.ckks_mean(scale_bits=60)
  with pytest.raises(ValueError, match="coeff_mod_bit_sizes"):
    he.ckks_mean(coeff_mod_bit_sizes=(60,))
  for clip in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="clip"):
      he.ckks_mean(clip=clip)
  with pytest.raises(ValueError, match="key_holder has parameters"):
    he.ckks_mean(scale_bits=30, key_holder=keys)
  with pytest.raises(ValueError, match="not a homomorphic aggregator"):
    he.session_of(fs.aggregators.mean())
  for threads in (0, 1.5, True):
    with pytest.raises(ValueError, match="threads"):
      he.ckks_mean(threads=threads)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_pool_gives_the_same_sum_and_is_recorded(threads):
  """A client's ciphertexts are one batched tensor encrypted on TenSEAL's thread pool: the
  decrypted mean does not depend on the pool size, which the cost record states."""
  rng = np.random.default_rng(threads)
  ups = {"v": rng.normal(scale=0.3, size=(6, 9000)).astype(np.float32)}   # 3 ciphertexts
  w = rng.uniform(1, 5, size=6).astype(np.float32)
  agg = he.ckks_mean(threads=threads)
  got, _ = jax.jit(agg.finalize)(_feed(agg, ups, w, k=3))
  want, _ = jax.jit(fs.aggregators.mean().finalize)(_feed(fs.aggregators.mean(), ups, w, k=3))
  testing.assert_trees_close(got, want, atol=ATOL)
  cost, = he.session_of(agg).costs
  assert cost.threads == threads and cost.ciphertexts_per_client == 3


def test_run_with_dp_noise_before_encryption_matches_the_plain_run(ragged_data):
  """FedAvg with local DP (clip + Gaussian noise on each client, before encryption): the CKKS
  run trains the model the plain-mean run trains, within CKKS precision, with drop-outs."""
  model = fs.models.mlp(8, (16,), 4)
  dp = fs.privacy.local_gaussian_noise(noise_multiplier=0.5, clip_norm=1.0)
  base = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16),
                             update_transform=dp)
  agg = he.ckks_mean()
  run = lambda algo, **kw: fs.run(algo, model, ragged_data, rounds=2, cohort_size=6,
                                  chunk_size=4, progress=False,
                                  heterogeneity=fs.Heterogeneity(dropout_fraction=0.3), **kw)
  plain = run(base)
  enc = run(dataclasses.replace(base, aggregator=agg), callback=he.cost_callback(agg))
  testing.assert_trees_close(enc.params, plain.params, atol=1e-5)
  assert fs.tree.max_abs_diff(enc.params, plain.params) > 0
  costs = he.session_of(agg).costs
  h = enc.history
  assert len(costs) == 2                               # one record per round, in the history
  np.testing.assert_array_equal(h["he_num_clients"], [c.num_clients for c in costs])
  np.testing.assert_array_equal(h["he_num_clients"], h["num_counted"])
  np.testing.assert_array_equal(h["he_bytes_up_per_client"],
                                [c.bytes_up_per_client for c in costs])
  assert np.all(h["he_encrypt_seconds"] > 0) and np.all(h["he_poly_modulus_degree"] == 8192)
  # Blocks of rounds (lax.scan): the same model, one record per round still.
  scanned = run(dataclasses.replace(base, aggregator=agg), callback=he.cost_callback(agg),
                rounds_per_call=2)
  testing.assert_trees_close(scanned.params, enc.params, atol=1e-6)
  np.testing.assert_array_equal(scanned.history["he_num_clients"], h["num_counted"])
  no_noise = fs.run(dataclasses.replace(base, update_transform=None), model, ragged_data,
                    rounds=2, cohort_size=6, progress=False)
  assert fs.tree.max_abs_diff(no_noise.params, enc.params) > 1e-3   # the noise is in there
