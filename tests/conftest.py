import os

# Tests run on the CPU with small sizes; keep XLA from grabbing every core's worth of threads
# in ways that make CI timings erratic.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")   # catches silent broadcasting over C


@pytest.fixture
def ragged_data():
  """12 clients of sizes 1..200 (ragged), 8 features, 4 classes, learnable labels."""
  from fedjax_sim import testing
  return testing.ragged_clients()
