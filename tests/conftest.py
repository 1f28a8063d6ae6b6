import os

# Tests run on the CPU with small sizes; keep XLA from grabbing every core's worth of threads
# in ways that make CI timings erratic.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")   # catches silent broadcasting over C


@pytest.fixture
def ragged_data():
  """12 clients of sizes 1..200 (ragged), 8 features, 4 classes, learnable labels."""
  import fedjax_sim as fs
  rng = np.random.default_rng(0)
  sizes = [1, 3, 7, 20, 33, 50, 64, 99, 120, 150, 180, 200]
  w = rng.normal(size=(8, 4))
  clients = []
  for n in sizes:
    x = rng.normal(size=(n, 8)).astype(np.float32)
    clients.append({"x": x, "y": np.argmax(x @ w, 1).astype(np.int32)})
  return fs.FederatedData.from_clients(clients, num_classes=4)
