"""Pseudo-labels on unlabeled client data, checked against a NumPy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.models.core import Model, softmax_cross_entropy
from fedjax_sim.transfer import semi_supervised as ss

D, K = 5, 3


def linear_model():
  init = lambda key: {"w": jnp.zeros((D, K)), "b": jnp.zeros(K)}
  apply = lambda p, x: x @ p["w"] + p["b"][None]
  return Model(init, apply, (D,), K, softmax_cross_entropy, "linear")


@pytest.fixture
def setup():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(0, 2, (D, K)).astype(np.float32),
            "b": rng.normal(0, 1, K).astype(np.float32)}
  lab_sizes, unl_sizes = [2, 1, 3, 1], [5, 1, 7, 3]
  lab = fs.FederatedData.from_clients(
      [{"x": rng.normal(size=(n, D)).astype(np.float32), "y": rng.integers(0, K, n)}
       for n in lab_sizes], client_ids=["a", "b", "c", "d"], num_classes=K)
  unl = fs.FederatedData.from_clients(
      [{"x": rng.normal(size=(n, D)).astype(np.float32), "y": np.zeros(n, np.int64)}
       for n in unl_sizes])
  return params, lab, unl


def numpy_probs(params, x):
  z = x.astype(np.float64) @ params["w"] + params["b"]
  e = np.exp(z - z.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def test_pseudo_labels_match_numpy(setup):
  params, _, unl = setup
  x = unl.arrays["x"]
  pl = ss.pseudo_labels(linear_model(), params, x, threshold=0.8, batch_size=4)
  p = numpy_probs(params, x)
  np.testing.assert_array_equal(pl.labels, p.argmax(1))
  np.testing.assert_allclose(pl.confidence, p.max(1), atol=1e-5)
  np.testing.assert_array_equal(pl.keep, p.max(1) >= 0.8)
  assert 0 < pl.keep.sum() < x.shape[0]   # the threshold really splits this data


def test_with_pseudo_labels_adds_each_clients_own_confident_rows(setup):
  params, lab, unl = setup
  out, added = ss.with_pseudo_labels(linear_model(), params, lab, unl, threshold=0.8)
  assert list(out.client_ids) == ["a", "b", "c", "d"] and out.num_classes == K
  for c in range(lab.num_clients):
    xu = unl.client(c)["x"]
    p = numpy_probs(params, xu)
    keep = p.max(1) >= 0.8
    got = out.client(c)
    np.testing.assert_array_equal(got["x"], np.concatenate([lab.client(c)["x"], xu[keep]]))
    np.testing.assert_array_equal(got["y"], np.concatenate([lab.client(c)["y"],
                                                            p.argmax(1)[keep]]))
    assert added[c] == keep.sum()
  assert out.num_examples == lab.num_examples + added.sum()


def test_threshold_one_keeps_only_certain_rows_and_low_threshold_keeps_all(setup):
  params, lab, unl = setup
  _, added_all = ss.with_pseudo_labels(linear_model(), params, lab, unl, threshold=1e-6)
  np.testing.assert_array_equal(added_all, unl.sizes)


@pytest.mark.parametrize("threshold", [0, 1.5, -0.1, True, "0.9"])
def test_bad_threshold_raises(setup, threshold):
  params, lab, unl = setup
  with pytest.raises(ValueError, match="threshold"):
    ss.with_pseudo_labels(linear_model(), params, lab, unl, threshold=threshold)


def test_mismatched_populations_raise(setup):
  params, lab, unl = setup
  with pytest.raises(ValueError, match="clients"):
    ss.with_pseudo_labels(linear_model(), params, lab, unl.subset([0, 1]))
  wide = fs.FederatedData.from_clients([{"x": np.zeros((1, D + 1), np.float32),
                                         "y": np.zeros(1, np.int64)}] * 4)
  with pytest.raises(ValueError, match="shape"):
    ss.with_pseudo_labels(linear_model(), params, lab, wide)
  with pytest.raises(ValueError, match="expects"):
    ss.pseudo_labels(linear_model(), params, np.zeros((3, D + 1), np.float32))
