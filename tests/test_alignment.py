"""Alignment losses (CORAL, MMD) against NumPy, and the joint objective's c * align term."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import transfer
from fedjax_sim.transfer import alignment


def _feats(seed, n=50, d=5, shift=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  return (shift + scale * rng.normal(size=(n, d)) @ rng.normal(size=(d, d))).astype(np.float32)


def test_coral_matches_numpy_with_padding_masked():
  src, tgt = _feats(0, 80), _feats(1, 30, scale=2.0)
  cs = np.cov(src.astype(np.float64).T)
  want = np.sum((cs - np.cov(tgt.astype(np.float64).T)) ** 2) / (4 * 5 * 5)
  padded = np.concatenate([tgt, 100 + _feats(2, 10)])
  mask = np.arange(40) < 30
  got = alignment.coral_loss(cs, padded, mask)
  assert abs(float(got) - want) / want < 1e-5
  assert float(alignment.coral_loss(cs, src)) < 1e-9   # same covariance: zero


def test_mmd_random_features_match_numpy_and_the_gaussian_kernel():
  src, tgt = _feats(0, 60, d=3), _feats(1, 40, d=3, shift=0.7)
  rff = alignment.random_fourier_features(jax.random.key(0), 3, num_features=20000, bandwidth=2.0)
  w, b = np.asarray(rff.w, np.float64), np.asarray(rff.b, np.float64)
  phi = lambda f: np.sqrt(2 / w.shape[1]) * np.cos(f.astype(np.float64) @ w + b)
  mom = alignment.source_moments(src, rff)
  got = float(alignment.mmd_loss(mom.rff_mean, tgt, None, rff))
  want = np.sum((phi(src).mean(0) - phi(tgt).mean(0)) ** 2)
  assert abs(got - want) < 1e-5
  # and it estimates the Gaussian-kernel MMD^2 (biased V-statistic), computed exactly
  k = lambda a, c: np.exp(-((a[:, None, :] - c[None, :, :]) ** 2).sum(-1) / (2 * 2.0 ** 2))
  exact = k(src, src).mean() + k(tgt, tgt).mean() - 2 * k(src, tgt).mean()
  assert abs(got - exact) < 0.1 * exact
  # linear kernel: squared distance of the means
  lin = float(alignment.mmd_loss(mom.mean, tgt))
  assert abs(lin - np.sum((src.mean(0) - tgt.mean(0)) ** 2)) < 1e-5


def test_source_moments_federated_equal_centralized():
  src = _feats(3, 90, shift=1.0)
  fed = fs.FederatedData.from_partition({"x": src}, [np.arange(0, 7), np.arange(7, 50),
                                                     np.arange(50, 90)])
  rff = alignment.random_fourier_features(jax.random.key(1), 5, 64)
  a, b = alignment.source_moments(fed, rff), alignment.source_moments(src, rff)
  np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
  np.testing.assert_allclose(a.cov, b.cov, atol=1e-4)
  np.testing.assert_allclose(a.rff_mean, b.rff_mean, atol=1e-5)
  assert a.count == b.count == 90


def test_moment_loss_matches_numpy_and_affine_map_zeroes_it():
  src, tgt = _feats(4, 70, shift=1.0), _feats(5, 40, shift=-2.0, scale=3.0)
  s64, t64 = src.astype(np.float64), tgt.astype(np.float64)
  want = (np.mean((s64.mean(0) - t64.mean(0)) ** 2)
          + np.mean((s64.var(0, ddof=1) - t64.var(0, ddof=1)) ** 2))
  mom = alignment.source_moments(src)
  padded = np.concatenate([tgt, 50 + _feats(6, 8)])
  mask = np.arange(48) < 40
  got = float(alignment.make_align("moments", mom)(jnp.asarray(padded), jnp.asarray(mask)))
  assert abs(got - want) / want < 1e-5
  # the closed-form map: NumPy's per-feature standardize-then-recolour, federated target moments
  fed = fs.FederatedData.from_partition({"x": tgt}, [np.arange(0, 13), np.arange(13, 40)])
  scale, shift = alignment.affine_map(mom, alignment.source_moments(fed), eps=0.0)
  ref = (t64 - t64.mean(0)) / t64.std(0, ddof=1) * s64.std(0, ddof=1) + s64.mean(0)
  mapped = tgt * scale + shift
  np.testing.assert_allclose(mapped, ref, rtol=1e-4, atol=1e-4)
  assert float(alignment.moment_loss(mom.mean, np.diag(mom.cov), mapped)) < 1e-6
  # it undoes a per-feature affine shift of the same distribution exactly
  a, b = np.linspace(0.5, 2.0, 5).astype(np.float32), np.arange(5, dtype=np.float32)
  scale, shift = alignment.affine_map(mom, alignment.source_moments(src * a + b), eps=0.0)
  np.testing.assert_allclose((src * a + b) * scale + shift, src, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="features"):
    alignment.affine_map(mom, alignment.source_moments(_feats(0, d=3)))


class Enc(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="adapter")(x)


@pytest.mark.slow
def test_joint_objective_alignment_term_trains_the_encoder_towards_the_source():
  """c * CORAL in the local objective: the target features' covariance moves towards the
  source's, and c = 0 reproduces the plain joint model exactly."""
  rng = np.random.default_rng(0)
  enc = Enc()
  params = enc.init(jax.random.key(0), np.zeros((1, 6), np.float32))["params"]
  enc_apply = lambda p, x: enc.apply({"params": p}, x)
  src_x = rng.normal(size=(200, 6)).astype(np.float32)
  src = {"x": src_x, "y": rng.integers(0, 2, 200).astype(np.int32)}
  tgt_x = (3.0 * rng.normal(size=(240, 6))).astype(np.float32)   # a scaled (shifted) domain
  tgt_y = (tgt_x[:, 0] > 0).astype(np.int32)
  data = fs.FederatedData.from_partition({"x": tgt_x, "y": tgt_y},
                                         np.array_split(np.arange(240), 8), num_classes=2)
  mom = alignment.source_moments(transfer.encode(enc_apply, params, src_x))
  align = alignment.make_align("coral", mom)

  def build(c):
    return transfer.joint_objective_model(enc_apply, params, nn.Dense(2), nn.Dense(2), (6,), 2, 2,
                                          src, a=0.0, b=1.0, c=c, align=align,
                                          trainable=lambda p: "adapter" in p)

  algo = fs.algorithms.fedavg(optax.sgd(0.01), batch_size=30)
  runs = {c: fs.run(algo, build(c), data, rounds=4, cohort_size=8, seed=0, progress=False)
          for c in (0.0, 1.0)}

  def dist(res):
    tuned = transfer.merge_encoder(params, res.params["encoder_trainable"])
    return float(alignment.coral_loss(mom.cov, enc_apply(tuned, tgt_x)))

  assert dist(runs[1.0]) < 0.5 * dist(runs[0.0]), (dist(runs[1.0]), dist(runs[0.0]))
  # the target task is still learned with the alignment term on
  assert runs[1.0].history["train_loss"][-1] < runs[1.0].history["train_loss"][0]
  # c = 0 is the plain joint objective: same loss and gradients
  plain = transfer.joint_objective_model(enc_apply, params, nn.Dense(2), nn.Dense(2), (6,), 2, 2,
                                         src, a=0.0, b=1.0, trainable=lambda p: "adapter" in p)
  p0 = plain.init(jax.random.key(3))
  xb, yb, mb = tgt_x[:30], tgt_y[:30], np.ones(30, bool)
  g_plain = jax.grad(lambda p: plain.batch_loss(p, xb, yb, mb)[0])(p0)
  g_zero = jax.grad(lambda p: build(0.0).batch_loss(p, xb, yb, mb)[0])(p0)
  fs.testing.assert_trees_close(g_plain, g_zero, atol=1e-7)
  g_one = jax.grad(lambda p: build(1.0).batch_loss(p, xb, yb, mb)[0])(p0)
  assert float(jnp.abs(g_one["encoder_trainable"]["adapter/kernel"]
                       - g_zero["encoder_trainable"]["adapter/kernel"]).max()) > 1e-3


def test_bad_input():
  mom = alignment.source_moments(_feats(0))
  with pytest.raises(ValueError, match="unknown alignment"):
    alignment.make_align("wasserstein", mom)
  with pytest.raises(ValueError, match="rff"):
    alignment.make_align("mmd", mom)
  with pytest.raises(ValueError, match="at least 2"):
    alignment.source_moments(_feats(0)[:1])
  enc_apply = lambda p, x: x * p
  src = {"x": np.zeros((4, 3), np.float32), "y": np.zeros(4, np.int32)}
  with pytest.raises(ValueError, match="align"):
    transfer.joint_objective_model(enc_apply, jnp.float32(1.0), nn.Dense(2), nn.Dense(2), (3,), 2,
                                   2, src, c=1.0)
  with pytest.raises(ValueError, match=">= 0"):
    transfer.joint_objective_model(enc_apply, jnp.float32(1.0), nn.Dense(2), nn.Dense(2), (3,), 2,
                                   2, src, c=-1.0, align=lambda f, m: 0.0)
