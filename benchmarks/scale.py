"""Population-scale benchmarks (issue 3); each case runs in its own process so peak memory is its own.

  python benchmarks/scale.py                 # all cases
  python benchmarks/scale.py --only stored   # one of the cases below
  python benchmarks/scale.py --only stored_numpy stored_numpy_aligned stored_numpy_reordered
                                             # the README path

* stored:     1,000,000 stored clients x 20 examples x 60 features (4.8 GB), W2's model, cohort
              10,000: build time, peak memory, s/round vs the sequential loop's per-client cost.
* stored_numpy / stored_numpy_aligned: the same population through the README's path: NumPy
              arrays (allocated by ``np.empty``, or by ``fs.data.aligned_empty``, whose
              64-byte alignment lets XLA:CPU use them in place) -> FederatedData.from_partition
              (one index array per client) -> to_device -> one round; peak memory against the
              data's size (only memory: no timing). The user does not keep the arrays, so the
              population is their only holder and FederatedData.device_array moves the
              unaligned ones into aligned memory block by block instead of copying them.
* stored_numpy_reordered: the same with a partition that reorders every row (client p owns rows
              p, p + P, ...): from_partition makes one aligned reordered copy while the user's
              arrays are still alive (2x at the peak), then only that copy remains.
* procedural: 100,000,000 procedural Synthetic(1,1) clients, cohort 10,000: peak memory, s/round.
* cohort:     W2 (50 examples per client), a population of 100,000 clients, cohorts of 10,000 and
              100,000: peak memory (the population's data is the same in both) and s/round.
* sweep:      16 W2 experiments (C=1000, 20 rounds) as one vmapped program vs 16 fs.run calls:
              16 learning rates with one seed, and 16 (seed, learning rate) pairs.
Prints JSON lines; appends them to benchmarks/results/scale.jsonl.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "scale.jsonl")


def case_stored(clients: int = 1_000_000, cohort: int = 10_000, baseline_clients: int = 100):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from common import peak_rss_gb, seconds_per_round, sequential_baseline
  import fedjax_sim as fs
  from fedjax_sim import engine
  P, n, dim, C = clients, 20, 60, cohort
  t = time.perf_counter()
  # Features drawn in device memory, block by block into one donated buffer (XLA's threefry uses
  # every core; numpy's single-threaded normal generator took 2 minutes for these 1.2e9 values).
  # FederatedData keeps the device arrays and zero-copy host views: one copy of 4.8 GB.
  block = math.gcd(1_000_000, P * n)   # divides P * n: no trailing slice (a slice is a copy)
  w_true = fs.tree.random_normal(jax.random.key(1), (dim, 10))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def fill(xbuf, ybuf, i):
    xb = fs.tree.random_normal(jax.random.fold_in(jax.random.key(0), i), (block, dim))
    yb = jnp.argmax(xb @ w_true, axis=1).astype(jnp.int32)
    return (jax.lax.dynamic_update_slice(xbuf, xb, (i * block, 0)),
            jax.lax.dynamic_update_slice(ybuf, yb, (i * block,)))

  rows = P * n
  assert rows % block == 0
  x, y = jnp.zeros((rows, dim), jnp.float32), jnp.zeros((rows,), jnp.int32)
  for i in range(rows // block):
    x, y = fill(x, y, i)
  data = fs.FederatedData({"x": x, "y": y}, np.arange(P + 1, dtype=np.int64) * n, np.arange(P), 10)
  build_s = time.perf_counter() - t
  model = fs.models.logistic_regression(dim, 10)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), local_epochs=1, batch_size=10)
  nb = min(baseline_clients, P)
  sub = data.subset(np.arange(nb))   # for the sequential baseline below
  t = time.perf_counter()
  dev = engine.to_device(data)
  jax.block_until_ready(dev)
  to_device_s = time.perf_counter() - t
  rss_after_to_device = peak_rss_gb()
  state = engine.init_state(algo, model.init(jax.random.key(0)), P)
  sec, _ = seconds_per_round(algo, model, state, dev, population=P, cohort=C, max_client_size=n)
  # Sequential loop baseline: per-client cost on nb clients of the same population.
  base = sequential_baseline(algo, model, sub, C, nb)["baseline_sec_per_round"]
  return {"case": "stored", "population": P, "cohort": C, "build_sec": build_s,
          "to_device_sec": to_device_s, "sec_per_round": sec, "baseline_sec_per_round": base,
          "speedup": base / sec, "peak_rss_after_build_gb": rss_after_to_device,
          "peak_rss_gb": peak_rss_gb(),
          "rss_now_gb": int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1e6}


def case_stored_numpy(aligned: bool, clients: int = 1_000_000, reorder: bool = False):
  """The README path on the 1M-client population: peak RSS / data size (goal <= 1.3). With
  ``reorder`` client p owns rows p, p + P, p + 2P, ... (from_partition reorders them)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from common import peak_rss_gb
  import fedjax_sim as fs
  from fedjax_sim import engine
  from fedjax_sim.data import aligned_empty
  P, n, dim, C = clients, 20, 60, min(10_000, clients)
  rss0 = peak_rss_gb()
  t = time.perf_counter()
  rows = P * n
  block = min(rows, 250_000)
  w_true = fs.tree.random_normal(jax.random.key(1), (dim, 10))

  @jax.jit
  def gen(i):
    xb = fs.tree.random_normal(jax.random.fold_in(jax.random.key(0), i), (block, dim))
    return xb, jnp.argmax(xb @ w_true, axis=1).astype(jnp.int32)

  def user_arrays():
    # A user's arrays, filled block by block (JAX draws the numbers: NumPy's generator takes
    # minutes for 1.2e9 normals); only from_partition's argument refers to them afterwards.
    alloc = aligned_empty if aligned else np.empty
    x, y = alloc((rows, dim), np.float32), alloc((rows,), np.int32)
    for i in range(rows // block):
      xb, yb = gen(i)
      x[i * block:(i + 1) * block] = np.asarray(xb)
      y[i * block:(i + 1) * block] = np.asarray(yb)
    aligned_in.append(x.ctypes.data % 64 == 0)
    return {"x": x, "y": y}

  aligned_in = []

  if reorder:                                   # client p owns rows p, p + P, ...
    parts = [np.arange(p, rows, P) for p in range(P)]
  else:                                         # client p owns its 20 consecutive rows
    parts = np.split(np.arange(rows), P)
  data = fs.FederatedData.from_partition(user_arrays(), parts, num_classes=10)
  del parts
  build_s = time.perf_counter() - t
  rss_build = peak_rss_gb()
  model = fs.models.logistic_regression(dim, 10)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), local_epochs=1, batch_size=10)
  dev = engine.to_device(data)
  jax.block_until_ready(dev)
  rss_dev = peak_rss_gb()
  state = engine.init_state(algo, model.init(jax.random.key(0)), P)
  rf = jax.jit(engine.make_round(algo, model, population=P, cohort_size=C, max_client_size=n))
  state, out = rf(state, dev, jax.random.key(1))
  jax.block_until_ready(out.metrics)
  data_gb = (data.arrays["x"].nbytes + data.arrays["y"].nbytes) / 1e9
  peak = peak_rss_gb()
  case = "stored_numpy" + ("_aligned" if aligned else "") + ("_reordered" if reorder else "")
  return {"case": case, "population": P,
          "cohort": C, "data_gb": data_gb, "build_sec": build_s,
          "user_x_aligned_64": aligned_in[0],
          "device_uses_host_buffer": dev.x.unsafe_buffer_pointer() == data.arrays["x"].ctypes.data,
          "rss_before_gb": rss0, "peak_rss_after_build_gb": rss_build,
          "peak_rss_after_to_device_gb": rss_dev, "peak_rss_gb": peak,
          "peak_over_data": peak / data_gb, "peak_minus_start_over_data": (peak - rss0) / data_gb,
          "rss_now_gb": int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1e6}


def case_procedural():
  import jax
  import optax
  from common import peak_rss_gb, seconds_per_round
  import fedjax_sim as fs
  from fedjax_sim import engine
  from fedjax_sim.data.procedural import synthetic_population
  P, C = 100_000_000, 10_000
  pop = synthetic_population(P, 1.0, 1.0, examples_per_client=20)
  model = fs.models.logistic_regression(60, 10)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), local_epochs=1, batch_size=10)
  state = engine.init_state(algo, model.init(jax.random.key(0)), P)
  sec, compile_s = seconds_per_round(algo, model, state, pop, population=P, cohort=C,
                                     max_client_size=20)
  return {"case": "procedural", "population": P, "cohort": C, "sec_per_round": sec,
          "compile_sec": compile_s, "peak_rss_gb": peak_rss_gb()}


def case_cohort(c: int):
  import jax
  from common import peak_rss_gb, seconds_per_round, workload
  from fedjax_sim import engine
  P = 100_000
  data, model, algo, _ = workload("W2", P)
  dev = engine.to_device(data)
  jax.block_until_ready(dev)
  rss_data = peak_rss_gb()
  state = engine.init_state(algo, model.init(jax.random.key(0)), P)
  sec, _ = seconds_per_round(algo, model, state, dev, population=P, cohort=c,
                             max_client_size=data.max_client_size, repeats=3)
  return {"case": "cohort", "workload": "W2", "population": P, "cohort": c, "sec_per_round": sec,
          "data_gb": data.arrays["x"].nbytes / 1e9, "rss_after_data_gb": rss_data,
          "peak_rss_gb": peak_rss_gb(), "training_gb": peak_rss_gb() - rss_data}


def case_sweep(clients: int = 1000, experiments: int = 16, rounds: int = 20):
  from common import workload
  import fedjax_sim as fs
  C = clients
  data, model, algo, _ = workload("W2", C)
  E, R = experiments, rounds
  lrs = [0.25 + 0.1 * i for i in range(E)]
  out = {"case": "sweep", "experiments": E, "rounds": R, "cohort": C}
  t = time.perf_counter()
  for i in range(E):
    fs.run(algo, model, data, rounds=R, cohort_size=C, seed=0,
           hparams={"client_lr_scale": lrs[i]}, rounds_per_call=R, progress=False)
  out["one_by_one_sec"] = time.perf_counter() - t
  # 16 learning rates, one seed (common random numbers: cohorts and shuffles shared) ...
  t = time.perf_counter()
  fs.sweep.sweep(algo, model, data, rounds=R, cohort_size=C, seed=0, client_lr_scale=lrs,
                 rounds_per_call=R, progress=False)
  out["sweep_lr_sec"] = time.perf_counter() - t
  out["speedup_lr"] = out["one_by_one_sec"] / out["sweep_lr_sec"]
  # ... and 16 (seed, learning rate) pairs: every experiment has its own cohorts.
  t = time.perf_counter()
  fs.sweep.sweep(algo, model, data, rounds=R, cohort_size=C, seed=list(range(E)),
                 client_lr_scale=lrs, rounds_per_call=R, progress=False)
  out["sweep_seeds_sec"] = time.perf_counter() - t
  out["speedup_seeds"] = out["one_by_one_sec"] / out["sweep_seeds_sec"]
  return out


CASES = {"stored": case_stored, "procedural": case_procedural,
         "cohort10k": lambda: case_cohort(10_000), "cohort100k": lambda: case_cohort(100_000),
         "sweep": case_sweep, "stored_numpy": functools.partial(case_stored_numpy, False),
         "stored_numpy_aligned": functools.partial(case_stored_numpy, True),
         "stored_numpy_reordered": functools.partial(case_stored_numpy, False, reorder=True)}
SIZED = ("stored_numpy", "stored_numpy_aligned", "stored_numpy_reordered")   # take --clients


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--only", nargs="+", choices=sorted(CASES))
  ap.add_argument("--clients", type=int, default=None,
                  help=f"population of the {', '.join(SIZED)} cases (default 1,000,000); a "
                       "smaller one is a quick check and is not appended to the results")
  ap.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    sys.path.insert(0, HERE)
    kw = {"clients": a.clients} if a.clients and a.child in SIZED else {}
    print("RESULT " + json.dumps(CASES[a.child](**kw)), flush=True)
    return
  for name in (a.only or list(CASES)):
    extra = ["--clients", str(a.clients)] if a.clients else []
    p = subprocess.run([sys.executable, __file__, "--child", name] + extra, capture_output=True,
                       text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
      print(json.dumps({"case": name, "error": p.stderr[-2000:]}))
      continue
    rec = json.loads(lines[-1][7:])
    print(json.dumps(rec), flush=True)
    if a.clients:
      continue
    with open(RESULTS, "a") as f:
      f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
