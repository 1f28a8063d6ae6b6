"""Federated transferability estimates equal centralized NumPy computations on pooled features."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.transfer import transferability as tr


def _population(seed=0, n=600, d=6, k=3, clients=9, mean_shift=0.5):
  """Ragged clients of features that carry some label information."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n).astype(np.int32)
  centers = rng.normal(size=(k, d))
  x = (mean_shift + centers[y] + rng.normal(size=(n, d))).astype(np.float32)
  cuts = np.sort(rng.choice(np.arange(1, n), clients - 1, replace=False))
  parts = np.split(rng.permutation(n), cuts)
  return fs.FederatedData.from_partition({"x": x, "y": y}, parts, num_classes=k)


# --- centralized references, written from the papers on the pooled examples ----------------------

def logme_reference(f, y, k, tol=1e-2, max_iter=11):
  """You et al. (2021), Algorithm 1, with F itself: SVD of F, A = alpha I + beta F^T F; the
  stopping rule of their code (1% change of alpha / beta, at most 11 steps)."""
  f = np.asarray(f, np.float64)
  n, d = f.shape
  s = np.linalg.svd(f, compute_uv=False)
  sigma = np.zeros(d)
  sigma[:s.size] = s ** 2
  out = []
  for c in range(k):
    t = (y == c).astype(np.float64)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
      a = alpha * np.eye(d) + beta * f.T @ f
      m = beta * np.linalg.solve(a, f.T @ t)
      gamma = np.sum(beta * sigma / (alpha + beta * sigma))
      new_alpha = gamma / (m @ m + 1e-5)                     # the code's epsilon = 1e-5
      new_beta = (n - gamma) / (np.sum((f @ m - t) ** 2) + 1e-5)
      done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < tol
      alpha, beta = new_alpha, new_beta
      if done:
        break
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ t)
    ev = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
          - beta / 2 * (np.sum((f @ m - t) ** 2) + 1e-5) - alpha / 2 * (m @ m + 1e-5)
          - 0.5 * np.linalg.slogdet(a)[1])
    out.append(ev / n)
  return float(np.mean(out))


def hscore_reference(f, y, k):
  """Bao et al. (2019), as in their code: tr(pinv(cov f) cov(g)), g = class-mean of f."""
  f = np.asarray(f, np.float64)
  g = np.zeros_like(f)
  for c in range(k):
    if np.any(y == c):
      g[y == c] = f[y == c].mean(0)
  cov = lambda a: (a - a.mean(0)).T @ (a - a.mean(0)) / (len(a) - 1)
  return float(np.trace(np.linalg.pinv(cov(f), rcond=1e-10) @ cov(g)))


def leep_reference(theta, y, k):
  """Nguyen et al. (2020), Eqs. 1-2."""
  theta = np.asarray(theta, np.float64)
  n = len(y)
  joint = np.stack([theta[y == c].sum(0) for c in range(k)]) / n      # P(y, z)
  cond = joint / joint.sum(0, keepdims=True)                          # P(y | z)
  return float(np.mean(np.log(np.sum(cond[y] * theta, axis=1))))


def test_logme_federated_equals_centralized():
  data = _population()
  est = tr.logme(data)
  ref = logme_reference(data.arrays["x"], data.arrays["y"], 3)
  assert abs(est.score - ref) < 1e-5, (est.score, ref)
  assert est.num_examples == data.num_examples and est.rounds == 1
  # informative features score higher than noise features
  noise = fs.FederatedData(dict(data.arrays, x=np.random.default_rng(1).normal(
      size=data.arrays["x"].shape).astype(np.float32)), data.offsets, data.client_ids, 3)
  assert tr.logme(noise).score < est.score


def test_logme_with_more_dimensions_than_examples():
  data = _population(n=40, d=60, clients=5)
  ref = logme_reference(data.arrays["x"], data.arrays["y"], 3)
  assert abs(tr.logme(data).score - ref) < 1e-5


def test_hscore_federated_equals_centralized():
  data = _population(seed=2)
  ref = hscore_reference(data.arrays["x"], data.arrays["y"], 3)
  est = tr.hscore(data)
  assert abs(est.score - ref) < 1e-5, (est.score, ref)
  # the H-score lies in [0, K - 1] (a trace of a "between / total" ratio)
  assert 0 < est.score < 2
  # shrinkage=1: the covariance is (tr(cov) / D) I, so H = D tr(cov_between) / tr(cov)
  x, y = data.arrays["x"].astype(np.float64), data.arrays["y"]
  mu = x.mean(0)
  between = sum((y == c).mean() * np.outer(x[y == c].mean(0) - mu, x[y == c].mean(0) - mu)
                for c in range(3))
  want = 6 * np.trace(between) / np.trace(np.cov(x.T, bias=True))
  assert abs(tr.hscore(data, shrinkage=1.0).score - want) < 1e-5


def test_leep_federated_equals_centralized():
  data = _population(seed=3)
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 7))
  logits = data.arrays["x"] @ w
  theta = np.exp(logits - logits.max(1, keepdims=True))
  theta = (theta / theta.sum(1, keepdims=True)).astype(np.float32)
  probs = fs.FederatedData(dict(data.arrays, x=theta), data.offsets, data.client_ids, 3)
  est = tr.leep(probs)
  assert abs(est.score - leep_reference(theta, data.arrays["y"], 3)) < 1e-5
  assert est.rounds == 2 and est.score < 0   # an average log-likelihood


def test_statistics_are_aggregated_like_updates():
  """The per-client means weighted by client size (the FedAvg weighting) give the pooled sums,
  whatever the chunking of clients."""
  data = _population(seed=4)
  stat = tr.hscore_statistics(3)
  a, n = tr.aggregate_statistics(stat, data, chunk_size=2)
  b, _ = tr.aggregate_statistics(stat, data, chunk_size=64)
  x = data.arrays["x"].astype(np.float64)
  assert n == data.num_examples
  np.testing.assert_allclose(a["ff"], x.T @ x, rtol=1e-5)
  np.testing.assert_allclose(a["f"], x.sum(0), rtol=1e-5)
  np.testing.assert_allclose(a["count"], np.bincount(data.arrays["y"], minlength=3), rtol=1e-6)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


class Enc(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.tanh(nn.Dense(self.width)(x))


@pytest.mark.slow
def test_choose_source_ranks_informative_encoders_first():
  data = _population(seed=5, d=6)
  x = data.arrays["x"]
  identity = tr.Candidate(lambda p, x: x * p, np.float32(1.0))
  # keeps only one coordinate (less information), and one that drops all of it
  one_dim = tr.Candidate(lambda p, x: x[:, :1] * p, np.float32(1.0))
  noise = tr.Candidate(lambda p, x: jax.random.normal(jax.random.key(0), x.shape) * p,
                       np.float32(1.0))
  enc = Enc(4)
  rand = tr.Candidate(lambda p, x: enc.apply({"params": p}, x),
                      enc.init(jax.random.key(0), x[:1])["params"])
  cands = {"identity": identity, "one_dim": one_dim, "noise": noise, "random_tanh": rand}
  for metric in ("logme", "hscore"):
    r = tr.choose_source(cands, data, metric=metric)
    assert r.best == "identity", (metric, r)
    assert r.order[-1] == "noise", (metric, r)
    assert set(r.order) == set(cands)
    assert r.estimates["identity"].floats_up_per_client > 36


def test_choose_source_leep_uses_the_source_classifier():
  data = _population(seed=6)
  # a source classifier whose logits are the similarities to the target class centres
  cands = {"aligned": tr.Candidate(lambda p, x: x, None, lambda p, x: x @ _centers(data)),
           "constant": tr.Candidate(lambda p, x: x, None, lambda p, x: 0 * x[:, :4])}
  r = tr.choose_source(cands, data, metric="leep")
  assert r.best == "aligned"
  # a constant source prediction carries no information: LEEP = log of the class prior
  prior = np.bincount(data.arrays["y"]) / data.num_examples
  assert abs(r.estimates["constant"].score - np.sum(prior * np.log(prior))) < 1e-5


def _centers(data):
  x, y = data.arrays["x"], data.arrays["y"]
  return np.stack([x[y == c].mean(0) for c in range(3)], 1)


def test_bad_input():
  data = _population()
  with pytest.raises(ValueError, match="metric"):
    tr.choose_source({"a": None, "b": None}, data, metric="accuracy")
  with pytest.raises(ValueError, match="at least 2"):
    tr.choose_source({"a": tr.Candidate(lambda p, x: x, None)}, data)
  with pytest.raises(ValueError, match="source_logits"):
    tr.choose_source({"a": tr.Candidate(lambda p, x: x, None),
                      "b": tr.Candidate(lambda p, x: x, None)}, data, metric="leep")
  with pytest.raises(ValueError, match="probability"):
    tr.leep(data)
  with pytest.raises(ValueError, match="shrinkage"):
    tr.hscore(data, shrinkage=2.0)


def test_spearman():
  assert tr.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert tr.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # ties get average ranks: matches the Pearson correlation of the rank vectors
  assert tr.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
  with pytest.raises(ValueError):
    tr.spearman([1], [1])
