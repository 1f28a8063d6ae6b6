"""Frozen encoder + head: cached features train the same head as the in-step encoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import testing
from fedjax_sim import transfer


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.tanh(nn.Dense(6)(nn.relu(nn.Dense(32)(x))))


@pytest.mark.slow
def test_cached_features_train_the_same_head_as_in_step_encoder(ragged_data):
  enc = Encoder()
  enc_params = enc.init(jax.random.key(1), np.zeros((1, 8), np.float32))["params"]
  enc_apply = lambda p, x: enc.apply({"params": p}, x)
  head = nn.Dense(4)
  in_step = transfer.frozen_encoder_model(enc_apply, enc_params, head, (8,), 4)
  cached_data = transfer.feature_cache(enc_apply, enc_params, ragged_data, batch_size=7)
  cached = transfer.head_model(enc_apply, enc_params, head, (8,), 4)
  algo = fs.algorithms.fedavg(optax.sgd(0.2, momentum=0.5), batch_size=16, local_epochs=2)
  a = fs.run(algo, in_step, ragged_data, rounds=3, cohort_size=8, seed=4, progress=False)
  b = fs.run(algo, cached, cached_data, rounds=3, cohort_size=8, seed=4, progress=False)
  testing.assert_trees_close(a.params, b.params, atol=1e-5)
  # only the head is federated: 6*4 + 4 parameters, the encoder's ~500 stay frozen and shared
  assert fs.tree.num_params(a.params) == 28
  assert fs.tree.num_params(enc_params) > 400
  assert a.history["train_loss"][-1] < a.history["train_loss"][0]
  # the features equal the encoder's output row by row
  np.testing.assert_allclose(cached_data.arrays["x"],
                             np.asarray(enc_apply(enc_params, ragged_data.arrays["x"])), atol=1e-6)


def _encoder():
  enc = Encoder()
  params = enc.init(jax.random.key(1), np.zeros((1, 8), np.float32))["params"]
  return (lambda p, x: enc.apply({"params": p}, x)), params


@pytest.mark.slow
def test_partial_unfreezing_trains_only_the_selected_leaves(ragged_data):
  enc_apply, enc_params = _encoder()
  model = transfer.partially_frozen_model(enc_apply, enc_params, nn.Dense(4), (8,), 4,
                                          trainable=lambda path: "Dense_1" in path)
  params = model.init(jax.random.key(0))
  assert sorted(params["encoder_trainable"]) == ["Dense_1/bias", "Dense_1/kernel"]
  # gradients reach the head and exactly the selected encoder leaves
  x, y = ragged_data.arrays["x"][:32], ragged_data.arrays["y"][:32]
  grads = jax.grad(lambda p: model.batch_loss(p, x, y, np.ones(32, bool))[0])(params)
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  algo = fs.algorithms.fedavg(optax.sgd(0.2), batch_size=16)
  res = fs.run(algo, model, ragged_data, rounds=3, cohort_size=6, seed=0, progress=False)
  tuned = transfer.merge_encoder(enc_params, res.params["encoder_trainable"])
  # the frozen layer is bit-identical, the selected one moved
  testing.assert_trees_close(tuned["Dense_0"], enc_params["Dense_0"], atol=0)
  assert fs.tree.max_abs_diff(tuned["Dense_1"], enc_params["Dense_1"]) > 1e-4
  # Flax names the outer Dense(6) first: Dense_1 is the 8->32 input layer
  assert fs.tree.num_params(res.params) == 6 * 4 + 4 + 8 * 32 + 32
  assert res.history["train_loss"][-1] < res.history["train_loss"][0]


def test_unfreezing_predicate_matching_nothing_is_a_clear_error():
  enc_apply, enc_params = _encoder()
  with pytest.raises(ValueError, match=r"matches none.*'Dense_0/bias'"):
    transfer.partially_frozen_model(enc_apply, enc_params, nn.Dense(4), (8,), 4,
                                    trainable=lambda path: "layer_5" in path)


def test_communication_counts_head_only_vs_full():
  enc_apply, enc_params = _encoder()
  head = transfer.head_model(enc_apply, enc_params, nn.Dense(4), (8,), 4)
  c = transfer.communication(head.init(jax.random.key(0)), cohort_size=10, rounds=2)
  assert c["params_per_client_round"] == 28
  assert c["bytes_up_per_client_round"] == 28 * 4 == c["bytes_down_per_client_round"]
  assert c["bytes_total"] == 2 * 112 * 10 * 2
  assert transfer.num_params(enc_params) == fs.tree.num_params(enc_params)


@pytest.mark.slow
def test_pretrain_learns_and_checkpoint_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 8)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(8, 3)), 1).astype(np.int32)
  model = fs.models.mlp(8, (16,), 3)
  res = transfer.pretrain(model, {"x": x, "y": y}, optax.adam(1e-2), epochs=5, batch_size=32,
                          key=jax.random.key(0))
  assert res.epoch_losses.shape == (5,) and res.epoch_losses[-1] < 0.6 * res.epoch_losses[0]
  again = transfer.pretrain(model, {"x": x, "y": y}, optax.adam(1e-2), epochs=5, batch_size=32,
                            key=jax.random.key(0))
  testing.assert_trees_close(res.params, again.params, atol=0)
  steps = transfer.pretrain(model, {"x": x, "y": y}, optax.adam(1e-2), steps=13, batch_size=32)
  assert steps.epoch_losses.shape == (2,)   # 10 batches per epoch: one epoch + 3 steps
  path = transfer.save_encoder(tmp_path / "enc.msgpack", res.params)
  testing.assert_trees_close(transfer.load_encoder(path), res.params, atol=0)
  like = model.init(jax.random.key(5))
  testing.assert_trees_close(transfer.load_encoder(path, like=like), res.params, atol=0)
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    transfer.load_encoder(tmp_path / "missing.msgpack")
  bad = tmp_path / "bad.msgpack"
  bad.write_bytes(path.read_bytes()[:40])
  with pytest.raises(ValueError, match="bad.msgpack.*not a valid"):
    transfer.load_encoder(bad)
  with pytest.raises(ValueError, match="enc.msgpack.*shape"):
    transfer.load_encoder(path, like=fs.models.mlp(8, (17,), 3).init(jax.random.key(0)))


def test_encoder_head_shape_mismatch_is_a_clear_error():
  enc_apply, enc_params = _encoder()
  wrong_head = fs.models.logistic_regression(5, 4)
  with pytest.raises(ValueError, match=r"features of shape \(6,\).*expects.*\(5,\)"):
    transfer.frozen_encoder_model(enc_apply, enc_params, wrong_head, (8,), 4)
  with pytest.raises(ValueError, match="cannot run on examples of shape"):
    transfer.head_model(enc_apply, enc_params, nn.Dense(4), (9,), 4)


@pytest.mark.slow
def test_flax_encoder_is_the_classifier_minus_its_last_layer():
  model = fs.models.cnn((8, 8, 1), 3)
  params = model.init(jax.random.key(0))
  enc_apply, enc_params = transfer.flax_encoder(fs.models.zoo.CNNModule((8, 8, 1), 3), params,
                                                "Dense_1")
  assert "Dense_1" not in enc_params
  x = np.random.default_rng(0).random((4, 8, 8, 1), np.float32)
  f = enc_apply(enc_params, x)
  assert f.shape == (4, 512)
  np.testing.assert_allclose(f @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None],
                             model.apply(params, x), atol=1e-5)


def _source_task():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(200, 8)).astype(np.float32)
  return {"x": x, "y": np.argmax(x @ rng.normal(size=(8, 3)), 1).astype(np.int32)}


@pytest.mark.slow
def test_joint_objective_with_a0_b1_is_plain_training(ragged_data):
  enc_apply, enc_params = _encoder()
  every = lambda path: True
  plain = transfer.partially_frozen_model(enc_apply, enc_params, nn.Dense(4), (8,), 4, every)
  joint = transfer.joint_objective_model(enc_apply, enc_params, nn.Dense(4), nn.Dense(3), (8,),
                                         4, 3, _source_task(), trainable=every)
  algo = fs.algorithms.fedavg(optax.sgd(0.2), batch_size=16)
  # identical init of the shared parts (head, encoder); the joint model adds a source head
  p0 = plain.init(jax.random.key(0))
  j0 = dict(joint.init(jax.random.key(1)), head=p0["head"])
  a = fs.run(algo, plain, ragged_data, rounds=2, cohort_size=6, seed=1, progress=False,
             init_params=p0)
  b = fs.run(algo, joint, ragged_data, rounds=2, cohort_size=6, seed=1, progress=False,
             init_params=j0)
  testing.assert_trees_close(a.params["head"], b.params["head"], atol=1e-6)
  testing.assert_trees_close(a.params["encoder_trainable"], b.params["encoder_trainable"],
                             atol=1e-6)
  testing.assert_trees_close(b.params["source_head"], j0["source_head"], atol=0)


@pytest.mark.slow
def test_joint_objective_with_a_positive_moves_toward_the_source_task(ragged_data):
  enc_apply, enc_params = _encoder()
  src = _source_task()
  algo = fs.algorithms.fedavg(optax.sgd(0.2), batch_size=16)

  def train(a):
    m = transfer.joint_objective_model(enc_apply, enc_params, nn.Dense(4), nn.Dense(3), (8,), 4,
                                       3, src, a=a, trainable=lambda p: True, seed=0)
    r = fs.run(algo, m, ragged_data, rounds=4, cohort_size=6, seed=1, progress=False)
    logits = m.source_apply(r.params, src["x"])
    return r, float(optax.softmax_cross_entropy_with_integer_labels(logits, src["y"]).mean())

  plain, src_loss_plain = train(0.0)
  joint, src_loss_joint = train(1.0)
  assert src_loss_joint < 0.8 * src_loss_plain
  assert fs.tree.max_abs_diff(plain.params["encoder_trainable"],
                              joint.params["encoder_trainable"]) > 1e-3
  # the reported metrics stay the target task's
  assert joint.history["train_loss"][-1] < joint.history["train_loss"][0]


def test_minilm_split_tail_equals_the_whole_module_and_trains_only_the_tail():
  """A small random MiniLM: prefix (``upto=j``) + tail (:func:`minilm.split_tail`) equals the
  whole module at every split point, and a partially frozen model on the packed prefix states
  sends exactly the tail's blocks plus the head."""
  from fedjax_sim.transfer import minilm
  cfg = minilm.BertConfig(vocab_size=50, hidden=16, layers=3, heads=2, intermediate=32,
                          max_positions=12)
  module = minilm.MiniLM(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (4, 10)), jnp.int32)
  mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [3], [7], [1]]))
  params = module.init(jax.random.key(0), ids, mask)["params"]
  full = module.apply({"params": params}, ids, mask)
  for j in range(cfg.layers + 1):
    h = module.apply({"params": params}, ids, mask, upto=j)
    x = jnp.concatenate([h, mask[..., None].astype(h.dtype)], axis=-1)
    tail_apply, tail_params = minilm.split_tail(params, j, cfg)
    np.testing.assert_allclose(tail_apply(tail_params, x), full, atol=1e-5)
  with pytest.raises(ValueError, match="start must lie in"):
    minilm.split_tail(params, 4, cfg)
  tail_apply, tail_params = minilm.split_tail(params, 2, cfg)
  model = transfer.partially_frozen_model(tail_apply, tail_params, nn.Dense(3), (10, 17), 3,
                                          trainable=lambda path: path.startswith("layer_2"))
  p = model.init(jax.random.key(1))
  assert set(p["encoder_trainable"]) == set(transfer.unfreeze.param_paths(tail_params))
  assert model.apply(p, x).shape == (4, 3)
