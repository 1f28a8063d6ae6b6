"""One accelerator check (issue 20): the headline benchmarks at accelerator sizes, in one process.

Run through ``benchmarks/device_check.sh``. Prints JSON lines, each case beside the sequential
baseline (``fedjax_sim.testing.sequential_round``: a Python loop over clients, one jitted step per
batch) on the same device, timed on at most ``--baseline-clients`` clients and scaled linearly
(its cost is exactly per client):

* ``roofline``: a large jitted matmul (float32 and bfloat16) and W1's batched per-client product
  (``common.batched_gemm_gflops``): what the device can do;
* ``w1_w2``: W1 (2NN) at C = 100 .. 100,000 and W2 (logistic regression) at C = 10,000 ..
  1,000,000, full participation, s/round, GFLOP/s, compile seconds, device memory. The
  populations are drawn on the device (``jax.random``, the workloads' distribution; NumPy would
  take minutes for W1's 7.8e9 values at C = 100,000) and handed to the round as
  ``engine.DeviceData``, so no host copy is made;
* ``chunks``: W1 at C = 10,000 with chunk sizes K = 16, 64, 256 (the accelerator default, 64,
  is a guess until this has run);
* ``stored``: the 1,000,000-client stored population of ``scale.py`` (cohort 10,000);
* ``sweep``: 16 W2 experiments as one vmapped program vs 16 ``fs.run`` calls (``scale.py``);
* ``transfer``: a linear head on cached frozen-encoder features (the McMahan CNN's 512 features
  of Fashion-MNIST-shaped inputs; random weights: timing only) vs the same head with the encoder
  inside every local step, and the sequential baseline of the cached head.

``--smoke`` runs every case at tiny sizes (CI, on a CPU). ``--only`` picks cases.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FULL = {"w1": [100, 1000, 10_000, 100_000], "w2": [10_000, 100_000, 1_000_000],
        "stored": dict(clients=1_000_000, cohort=10_000, baseline_clients=100),
        "sweep": dict(clients=1000, experiments=16, rounds=20),
        "transfer": dict(clients=1000, per_client=50, cohort=100, rounds=5),
        "chunks": dict(workload="W1", clients=10_000, sizes=[16, 64, 256]),
        "matmul": 8192, "gemm_chunks": 100, "baseline_clients": 100, "rounds": 3}
SMOKE = {"w1": [10], "w2": [20],
         "stored": dict(clients=2000, cohort=50, baseline_clients=5),
         "sweep": dict(clients=20, experiments=2, rounds=2),
         "transfer": dict(clients=8, per_client=10, cohort=4, rounds=2),
         "chunks": dict(workload="W1", clients=16, sizes=[4]),
         "matmul": 256, "gemm_chunks": 4, "baseline_clients": 5, "rounds": 1}
CASES = ("roofline", "w1_w2", "chunks", "stored", "sweep", "transfer")


def device_memory() -> dict:
  """Peak and limit of the first device's memory (accelerators; empty on a CPU)."""
  import jax
  d = jax.local_devices()[0]
  try:
    s = d.memory_stats() or {}
  except Exception:   # noqa: BLE001 - not implemented on some backends
    s = {}
  return {k + "_gb": s[k] / 1e9 for k in ("peak_bytes_in_use", "bytes_limit") if k in s}


def device_population(name: str, clients: int, seed: int = 0):
  """Workload ``name`` with ``clients`` clients drawn on the device: ``(DeviceData, model,
  algorithm, flops per round)``, same sizes, model and algorithm as ``common.workload``."""
  import jax
  import jax.numpy as jnp
  import fedjax_sim as fs
  from common import workload
  from workloads import WORKLOADS
  w = WORKLOADS[name]
  _, model, algo, _ = workload(name, 1)
  n, d = clients * w["per_client"], w["dim"]
  key = jax.random.key(seed)
  w_true = jax.random.normal(jax.random.fold_in(key, 1), (d, 10))
  # Whole clients per block, <= 1 GB of float32, the block count dividing C: written in place
  # into one donated buffer (no concatenation, no second copy of the population).
  per_block = max(b for b in range(1, clients + 1)
                  if clients % b == 0 and b * w["per_client"] * d <= max(1 << 28, w["per_client"] * d))
  block = per_block * w["per_client"]

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def fill(xbuf, ybuf, i):
    xb = jax.random.normal(jax.random.fold_in(key, 2 + i), (block, d))
    yb = jnp.argmax(xb @ w_true, axis=1).astype(jnp.int32)
    return (jax.lax.dynamic_update_slice(xbuf, xb, (i * block, 0)),
            jax.lax.dynamic_update_slice(ybuf, yb, (i * block,)))

  x, y = jnp.zeros((n, d), jnp.float32), jnp.zeros((n,), jnp.int32)
  for i in range(n // block):
    x, y = fill(x, y, i)
  sizes = jnp.full((clients,), w["per_client"], jnp.int32)
  offsets = jnp.arange(clients, dtype=jnp.int32) * w["per_client"]
  data = fs.engine.DeviceData(x, y, offsets, sizes, sizes.astype(jnp.float32))
  n_params = fs.tree.num_params(model.init(jax.random.key(0)))
  return data, model, algo, 6.0 * n_params * n


def case_roofline(cfg) -> list[dict]:
  import jax.numpy as jnp
  from common import batched_gemm_gflops, matmul_roofline
  return [{"case": "roofline", "matmul_n": cfg["matmul"],
           "matmul_float32_gflops": matmul_roofline(cfg["matmul"]),
           "matmul_bfloat16_gflops": _matmul_bf16(cfg["matmul"], jnp),
           "w1_batched_gemm_gflops": batched_gemm_gflops(clients=8, chunks=cfg["gemm_chunks"]),
           "w1_batched_gemm_gflops_k64": batched_gemm_gflops(
               clients=64, chunks=max(1, cfg["gemm_chunks"] // 8))}]


def _matmul_bf16(n, jnp):
  import jax
  from common import median_time
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  t, _ = median_time(lambda: f(a, a).block_until_ready(), 10)
  return 2 * n ** 3 / t / 1e9


def case_w1_w2(cfg) -> list[dict]:
  import jax
  from common import seconds_per_round, sequential_baseline, workload
  from fedjax_sim import engine
  out = []
  for name, sizes in (("W1", cfg["w1"]), ("W2", cfg["w2"])):
    host, model, algo, _ = workload(name, cfg["baseline_clients"])   # the baseline's clients
    for c in sizes:
      data, model, algo, flops = device_population(name, c)
      state = engine.init_state(algo, model.init(jax.random.key(0)), c)
      info = {}
      sec, compile_s = seconds_per_round(
          algo, model, state, data, population=c, cohort=c, max_client_size=int(data.sizes[0]),
          repeats=cfg["rounds"], info=info,
          mesh=engine.client_mesh() if jax.device_count() > 1 else None)
      del data, state
      rec = {"case": "w1_w2", "workload": name, "clients": c,
             "chunk_size": min(c, engine.default_chunk_size()), "sec_per_round": sec,
             "gflops": flops / sec / 1e9, "compile_sec": compile_s, **info, **device_memory()}
      rec.update(sequential_baseline(algo, model, host, c, cfg["baseline_clients"]))
      rec["speedup"] = rec["baseline_sec_per_round"] / sec
      out.append(rec)
  return out


def case_chunks(cfg) -> list[dict]:
  """Seconds per round by chunk size K (``engine.ACCELERATOR_CHUNK_SIZE`` is a guess until this
  has run on an accelerator)."""
  import jax
  from common import seconds_per_round
  from fedjax_sim import engine
  ch = cfg["chunks"]
  data, model, algo, flops = device_population(ch["workload"], ch["clients"])
  state = engine.init_state(algo, model.init(jax.random.key(0)), ch["clients"])
  out = []
  for k in ch["sizes"]:
    info = {}
    sec, compile_s = seconds_per_round(
        algo, model, state, data, population=ch["clients"], cohort=ch["clients"],
        max_client_size=int(data.sizes[0]), repeats=cfg["rounds"], chunk_size=k, info=info,
        mesh=engine.client_mesh() if jax.device_count() > 1 else None)
    out.append({"case": "chunks", "workload": ch["workload"], "clients": ch["clients"],
                "chunk_size": k, "sec_per_round": sec, "gflops": flops / sec / 1e9,
                "compile_sec": compile_s, **info})
  return out


def case_stored(cfg) -> list[dict]:
  import scale
  return [{**scale.case_stored(**cfg["stored"]), **device_memory()}]


def case_sweep(cfg) -> list[dict]:
  import scale
  return [{**scale.case_sweep(**cfg["sweep"]), **device_memory()}]


def case_transfer(cfg) -> list[dict]:
  """A linear head on cached CNN features vs the encoder in every step, and the sequential
  baseline of the cached head (``fedjax_sim.transfer``)."""
  import flax.linen as nn
  import jax
  import numpy as np
  import optax
  import fedjax_sim as fs
  from common import sequential_baseline
  from fedjax_sim import transfer
  t = cfg["transfer"]
  c, m = t["clients"], t["per_client"]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(c * m, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 5, c * m).astype(np.int32)
  data = fs.FederatedData({"x": x, "y": y}, np.arange(c + 1) * m, np.arange(c), 5)
  cnn = fs.models.cnn((28, 28, 1), 5)
  enc_apply, enc_params = transfer.flax_encoder(fs.models.zoo.CNNModule((28, 28, 1), 5),
                                                cnn.init(jax.random.key(0)), "Dense_1")
  t0 = time.perf_counter()
  cached = transfer.feature_cache(enc_apply, enc_params, data)
  cache_s = time.perf_counter() - t0
  head = transfer.head_model(enc_apply, enc_params, nn.Dense(5), (28, 28, 1), 5)
  in_step = transfer.frozen_encoder_model(enc_apply, enc_params, nn.Dense(5), (28, 28, 1), 5)
  algo = fs.algorithms.fedavg(optax.sgd(0.3), optax.sgd(1.0), batch_size=10, local_epochs=5)
  kw = dict(rounds=t["rounds"], cohort_size=t["cohort"], progress=False, seed=0)

  def sec(res):
    s = np.asarray(res.history["seconds"])
    return float(np.median(s[1:] if len(s) > 1 else s))

  r_head = fs.run(algo, head, cached, **kw)
  r_in = fs.run(algo, in_step, data, **kw)
  rec = {"case": "transfer", "clients": c, "examples_per_client": m, "cohort": t["cohort"],
         "feature_cache_sec": cache_s, "cached_head_sec_per_round": sec(r_head),
         "cached_head_compile_sec": r_head.compile_seconds,
         "in_step_encoder_sec_per_round": sec(r_in),
         "cached_speedup_x": sec(r_in) / sec(r_head), **device_memory()}
  rec.update(sequential_baseline(algo, head, cached, t["cohort"], t["cohort"]))
  rec["speedup"] = rec["baseline_sec_per_round"] / rec["cached_head_sec_per_round"]
  return [rec]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CI on a CPU)")
  p.add_argument("--only", nargs="+", choices=CASES, default=list(CASES))
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  a = p.parse_args(argv)
  from fedjax_sim import distributed
  distributed.cpu_devices()   # one device per core on a CPU host; nothing on an accelerator
  from common import device_info, emit
  cfg = SMOKE if a.smoke else FULL
  fns = {"roofline": case_roofline, "w1_w2": case_w1_w2, "chunks": case_chunks,
         "stored": case_stored,
         "sweep": case_sweep, "transfer": case_transfer}
  info = {"case": "device", **device_info(), "smoke": a.smoke}
  records = [info]
  emit(info)
  t0 = time.perf_counter()
  for name in a.only:
    t = time.perf_counter()
    for rec in fns[name](cfg):
      rec["case_wall_sec"] = time.perf_counter() - t
      records.append(rec)
      emit(rec)
  done = {"case": "done", "wall_sec": time.perf_counter() - t0}
  records.append(done)
  emit(done)
  if a.out:
    import json
    with open(a.out, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return records


if __name__ == "__main__":
  main()
