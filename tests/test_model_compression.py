"""Model compression: exact magnitude pruning, masked training keeps pruned weights at exactly 0
through federated rounds, bfloat16 compute trains and matches float32, FLOP and non-zero
counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.models import cost, precision, pruning


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"a": {"kernel": jax.random.normal(k1, (20, 30)), "bias": jax.random.normal(k3, (30,))},
          "b": {"kernel": 0.1 * jax.random.normal(k2, (30, 4)), "bias": jnp.ones((4,))}}


def test_global_prune_exact_sparsity_smallest_magnitudes():
  params = _params()
  pruned, mask = pruning.magnitude_prune(params, 0.7)
  kernels = [("a", "kernel"), ("b", "kernel")]
  n = sum(params[l][k].size for l, k in kernels)
  kept = sum(int(mask[l][k].sum()) for l, k in kernels)
  assert n - kept == int(np.floor(0.7 * n))
  for l in ("a", "b"):                                       # biases are never pruned
    assert bool(mask[l]["bias"].all())
    np.testing.assert_array_equal(pruned[l]["bias"], params[l]["bias"])
  absval = lambda t, m: np.concatenate([np.abs(np.asarray(t[l][k]))[np.asarray(m[l][k])]
                                        for l, k in kernels])
  inv = jax.tree.map(lambda m: ~m, mask)
  assert absval(params, inv).max() <= absval(params, mask).min()   # one global threshold
  for l, k in kernels:
    np.testing.assert_array_equal(pruned[l][k], np.where(mask[l][k], params[l][k], 0.0))
    assert pruned[l][k].dtype == params[l][k].dtype
  # The small-scale layer "b" is pruned harder under the global threshold.
  assert float(mask["b"]["kernel"].mean()) < float(mask["a"]["kernel"].mean())
  assert pruning.num_nonzero(pruned) == pruning.num_nonzero(params) - (n - kept)


def test_layer_prune_each_kernel_to_its_own_sparsity():
  params = _params()
  pruned, mask = pruning.magnitude_prune(params, 0.5, scope="layer")
  for l in ("a", "b"):
    m, w = np.asarray(mask[l]["kernel"]), np.abs(np.asarray(params[l]["kernel"]))
    assert (~m).sum() == w.size // 2
    assert w[~m].max() <= w[m].min()
  assert pruning.magnitude_prune(params, 0.0)[1]["a"]["kernel"].all()


@pytest.mark.parametrize("kw", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=0.5,
                                                                                scope="row")])
def test_prune_bad_input(kw):
  with pytest.raises(ValueError):
    pruning.magnitude_prune(_params(), **kw)
  with pytest.raises(ValueError, match="prunable"):
    pruning.magnitude_prune({"b": jnp.ones(3)}, 0.5)


@pytest.mark.slow
def test_pruned_weights_stay_zero_through_federated_training(ragged_data):
  model = fs.models.mlp(8, (16,), 4)
  params = model.init(jax.random.key(0))
  pruned, mask = pruning.magnitude_prune(params, 0.6)
  inner = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  algo = fs.algorithms.fedavg(pruning.masked_optimizer(inner, mask),
                              optax.sgd(1.0, momentum=0.5), batch_size=16)
  kw = dict(rounds=6, cohort_size=6, progress=False, rounds_per_call=6, init_params=pruned)
  res = fs.run(algo, model, ragged_data, **kw)
  for p, m in zip(jax.tree.leaves(res.params), jax.tree.leaves(mask)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)      # exactly zero
  assert pruning.num_nonzero(res.params) <= int(sum(m.sum() for m in jax.tree.leaves(mask)))
  assert res.history["train_loss"][-1] < res.history["train_loss"][0]
  # Without the mask the inner optimizer does move pruned coordinates (weight decay, momentum).
  grads = jax.tree.map(jnp.ones_like, pruned)
  for opt, moved in ((inner, True), (pruning.masked_optimizer(inner, mask), False)):
    updates, _ = opt.update(grads, opt.init(pruned), pruned)
    off = [np.asarray(u)[~np.asarray(m)] for u, m in zip(jax.tree.leaves(updates),
                                                          jax.tree.leaves(mask))]
    assert any(np.any(o != 0) for o in off) == moved


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32_and_trains(ragged_data):
  model = fs.models.mlp(8, (16,), 4)
  bf = precision.bfloat16_compute(model)
  params = model.init(jax.random.key(0))
  x = jnp.asarray(ragged_data.arrays["x"][:64])
  ref, out = model.apply(params, x), bf.apply(params, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
  assert not np.array_equal(np.asarray(out), np.asarray(ref))   # really computed in bf16
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  res = fs.run(algo, bf, ragged_data, rounds=6, cohort_size=6, progress=False, rounds_per_call=6)
  assert res.history["train_loss"][-1] < 0.8 * res.history["train_loss"][0]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(res.params))   # float32 masters


def test_count_flops_and_cost():
  model = fs.models.logistic_regression(64, 10)
  flops = cost.count_flops(model, jnp.zeros((32, 64)))
  matmul = 2 * 32 * 64 * 10
  assert matmul <= flops <= matmul + 4 * 32 * 10          # the matmul plus the bias add
  c = cost.cost(model, {"x": jax.ShapeDtypeStruct((32, 64), jnp.float32)})
  assert c["flops"] == flops and c["bytes_accessed"] > 0
  mlp = fs.models.mlp(64, (32,), 10)
  pruned, _ = pruning.magnitude_prune(mlp.init(jax.random.key(0)), 0.9)
  assert cost.count_flops(mlp, jnp.zeros((8, 64)), pruned) == \
      cost.count_flops(mlp, jnp.zeros((8, 64)))       # XLA runs pruned weights densely


def test_num_nonzero():
  assert pruning.num_nonzero({"a": jnp.array([0.0, 1.0, -2.0]), "b": jnp.zeros((3, 3))}) == 2
