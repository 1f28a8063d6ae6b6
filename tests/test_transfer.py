"""Frozen encoder + head: cached features train the same head as the in-step encoder."""

import flax.linen as nn
import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import testing
from fedjax_sim.models import transfer


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.tanh(nn.Dense(6)(nn.relu(nn.Dense(32)(x))))


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
