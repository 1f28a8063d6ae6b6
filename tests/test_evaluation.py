"""Per-client evaluation equals a plain per-client loop."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.evaluation import evaluate_clients


@pytest.mark.slow
def test_per_client_evaluation_matches_loop(ragged_data):
  model = fs.models.mlp(8, (16,), 4)
  params = model.init(jax.random.key(3))
  out = evaluate_clients(model, params, ragged_data, batch_size=16, chunk_size=5, worst=3)
  for p in range(ragged_data.num_clients):
    c = ragged_data.client(p)
    logits = np.asarray(model.apply(params, c["x"]))
    acc = np.mean(np.argmax(logits, 1) == c["y"])
    loss = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, c["y"])))
    assert abs(out["accuracy"][p] - acc) < 1e-6
    assert abs(out["loss"][p] - loss) < 1e-5
    assert out["count"][p] == len(c["y"])
  s = out["summary"]
  assert s["worst_accuracy"] == sorted(out["accuracy"])[:3]
  assert s["accuracy_p10"] <= s["accuracy_p50"] <= s["accuracy_p90"]
  all_y = ragged_data.arrays["y"]
  all_acc = np.mean(np.argmax(np.asarray(model.apply(params, ragged_data.arrays["x"])), 1) == all_y)
  assert abs(s["accuracy_weighted"] - all_acc) < 1e-6
