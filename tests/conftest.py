import os

# Tests run on the CPU with small sizes; keep XLA from grabbing every core's worth of threads
# in ways that make CI timings erratic.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile hundreds of small programs and run each for a few steps: compile time dominates.
# LLVM's backend optimisation level 0 cuts the suite's CPU time by about a quarter (measured on
# tests/test_heterogeneity.py: 57 -> 43 s of CPU) and changes no float semantics (XLA:CPU does
# not use fast-math either way); the vectorized-vs-sequential comparisons run under the same
# flags. Benchmarks and users keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")   # catches silent broadcasting over C


@pytest.fixture
def ragged_data():
  """12 clients of sizes 1..200 (ragged), 8 features, 4 classes, learnable labels."""
  from fedjax_sim import testing
  return testing.ragged_clients()


def pytest_collection_modifyitems(config, items):
  """Tests marked slow run first (stable order otherwise): with several xdist workers, long
  tests started last leave the other workers idle at the end (longest-first scheduling)."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
