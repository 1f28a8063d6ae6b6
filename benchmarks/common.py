"""Shared pieces of the benchmark scripts: the workloads of benchmarks/README.md, timing, memory."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from workloads import WORKLOADS, workload_arrays


def workload(name: str, num_clients: int, seed: int = 0):
  """(FederatedData, Model, Algorithm, flops per round) of workload W1 or W2 with C clients.

  x ~ N(0, 1), y = argmax(x @ W_true) with one fixed W_true; every client holds the same number
  of examples; 1 local epoch of plain SGD; FedAvg with example weighting.
  """
  w = WORKLOADS[name]
  x, y, _ = workload_arrays(name, num_clients, seed)
  offsets = np.arange(num_clients + 1, dtype=np.int64) * w["per_client"]
  data = fs.FederatedData({"x": x, "y": y}, offsets, np.arange(num_clients), 10)
  model = fs.models.mlp(w["dim"], w["hidden"], 10) if w["hidden"] else \
      fs.models.logistic_regression(w["dim"], 10)
  algo = fs.algorithms.fedavg(optax.sgd(w["lr"]), optax.sgd(1.0), local_epochs=1,
                              batch_size=w["batch_size"])
  n_params = fs.tree.num_params(model.init(jax.random.key(0)))
  return data, model, algo, 6.0 * n_params * x.shape[0]


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far (GB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), ts


def matmul_roofline(n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of a large jitted float32 matmul: the machine's practical compute roof."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t, _ = median_time(lambda: f(a, b).block_until_ready(), repeats)
  return 2 * n ** 3 / t / 1e9


def batched_gemm_gflops(clients: int = 8, batch: int = 20, d_in: int = 784, d_out: int = 200,
                        chunks: int = 100, repeats: int = 5) -> float:
  """GFLOP/s of W1's dominant operation run alone: the first layer's forward product of
  ``clients`` clients at once, each with its own weights (``[K, B, 784] x [K, 784, 200]``, the
  batched ``dot_general`` that ``vmap`` over clients makes), ``lax.map``-ed over ``chunks``
  chunks, split over all devices as the engine splits a cohort. It is the ceiling of a
  per-client engine on this backend, next to the big-matmul roofline: small per-client products
  run far below a 2048^3 matmul."""
  k = jax.random.key(0)
  n_dev = jax.device_count()
  chunks = -(-chunks // n_dev) * n_dev
  x = jax.random.normal(k, (chunks, clients, batch, d_in), jnp.float32)
  w = jax.random.normal(k, (clients, d_in, d_out), jnp.float32)
  body = lambda x, w: jax.lax.map(lambda xc: jnp.einsum("kbi,kio->kbo", xc, w), x)  # noqa: E731
  if n_dev > 1:   # the engine's own client mesh, so the split is the one a round uses
    mesh = fs.engine.client_mesh()
    spec = jax.sharding.PartitionSpec("clients")
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    body = jax.shard_map(body, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()),
                         out_specs=spec)
  f = jax.jit(body)
  f(x, w).block_until_ready()
  t, _ = median_time(lambda: f(x, w).block_until_ready(), repeats)
  return 2 * chunks * clients * batch * d_in * d_out / t / 1e9


def sequential_baseline(algo, model, data, clients: int, max_clients: int = 1000) -> dict:
  """The sequential baseline (``fedjax_sim.testing.sequential_round``: a Python loop over
  clients, one jitted step per batch) for a round of ``clients`` clients of ``data``, timed on at
  most ``max_clients`` of them (a subset population with the same per-client work) and scaled
  linearly: its cost is exactly per-client. Returns the ``baseline_*`` fields of a record."""
  from fedjax_sim import engine, testing
  nb = min(clients, max_clients, data.num_clients)
  sub = data.subset(np.arange(nb)) if nb < data.num_clients else data
  state = engine.init_state(algo, model.init(jax.random.key(0)), nb)
  testing.sequential_round(algo, model, sub, state, jax.random.key(0), min(nb, 10))   # warm-up
  sec, _ = median_time(lambda: testing.sequential_round(algo, model, sub, state,
                                                        jax.random.key(1), nb),
                       1 if nb >= 1000 else 3)
  return {"baseline_sec_per_round": sec * clients / nb, "baseline_sec_per_client": sec / nb,
          "baseline_measured_clients": nb}


def device_info() -> dict:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": d.device_kind, "num_devices": jax.device_count(),
          "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}


def emit(record: dict):
  print(json.dumps(record), flush=True)


def seconds_per_round(algo, model, state, data, *, population: int, cohort: int,
                      max_client_size: int, repeats: int = 5, chunk_size: int | None = None,
                      mesh=None, info: dict | None = None,
                      min_client_size: int = 0) -> tuple[float, float]:
  """(median s/round after a warm-up round, compile seconds) of the compiled round.
  ``min_client_size``: the population's smallest client, as ``fs.run`` passes it (0: unknown).

  ``info``, if given, receives the compiled program's ``temp_gb`` (XLA's scratch memory for one
  round: activations, batches; a deterministic figure, unlike timings) and ``argument_gb``."""
  from fedjax_sim import engine
  t = time.perf_counter()
  rf = jax.jit(engine.make_round(algo, model, population=population, cohort_size=cohort,
                                 max_client_size=max_client_size, chunk_size=chunk_size,
                                 mesh=mesh, min_client_size=min_client_size)).lower(state, data, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  if info is not None:
    mem = rf.memory_analysis()
    if mem is not None:
      info["temp_gb"] = mem.temp_size_in_bytes / 1e9
      info["argument_gb"] = mem.argument_size_in_bytes / 1e9
  holder = [state]

  def step(r=[0]):
    r[0] += 1
    holder[0], out = rf(holder[0], data, jax.random.key(r[0]))
    jax.block_until_ready(out.metrics)
  step()
  return median_time(step, repeats)[0], compile_s
