"""Workloads W1 and W2 (benchmarks/README.md): vectorized engine vs a sequential baseline.

Prints one JSON line per (workload, client count): seconds per round (median after a warm-up
round, compile time apart), achieved GFLOP/s, peak memory, and the same for the sequential
baseline (a Python loop over clients with one jitted step per batch, FedJAX's default backend
style: ``fedjax_sim.testing.sequential_round``); then one line with a large jitted matmul's
GFLOP/s as the roofline. W1 records also carry ``batched_gemm_gflops``: W1's dominant operation
run alone on the same devices (the first layer's per-client products for chunks of 8 clients, a
batched ``dot_general``), the ceiling on this backend of an engine that runs every client's
products on that client's own weights.
Each configuration runs in a fresh subprocess so peak memory is its own.

  python benchmarks/w1_w2.py                        # W1 C=10,100,1000,10000; W2 C=1000,10000,100000
  python benchmarks/w1_w2.py --only W1:1000 W2:10000
  python benchmarks/w1_w2.py --chunk-sweep W1:1000  # seconds per round by chunk size
  python benchmarks/w1_w2.py --cpu-devices 1        # one CPU device (default: one per core)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT = ["W1:10", "W1:100", "W1:1000", "W1:10000", "W2:1000", "W2:10000", "W2:100000"]


def one(spec: str, rounds: int, chunk_size: int | None, baseline_max_clients: int,
        baseline: bool, cpu_devices: int | None) -> dict:
  from fedjax_sim import distributed
  if cpu_devices is not None:
    distributed.cpu_devices(cpu_devices or None)
  import jax
  from common import (batched_gemm_gflops, peak_rss_gb, seconds_per_round, sequential_baseline,
                      workload)
  from fedjax_sim import engine

  name, c = spec.split(":")
  c = int(c)
  data, model, algo, flops = workload(name, c)
  state = engine.init_state(algo, model.init(jax.random.key(0)), c)
  dev = engine.to_device(data)
  sec, compile_s = seconds_per_round(
      algo, model, state, dev, population=c, cohort=c, max_client_size=data.max_client_size,
      min_client_size=data.min_client_size,
      repeats=rounds, chunk_size=chunk_size,
      mesh=engine.client_mesh() if jax.device_count() > 1 else None)
  rec = {"workload": name, "clients": c, "engine": "vectorized", "devices": jax.device_count(),
         "chunk_size": min(c, chunk_size or engine.default_chunk_size()),
         "sec_per_round": sec, "sec_per_client": sec / c, "gflops": flops / sec / 1e9,
         "compile_sec": compile_s, "peak_rss_gb": peak_rss_gb()}
  if name == "W1":   # the per-client product W1 is made of, alone, on the same devices
    rec["batched_gemm_gflops"] = batched_gemm_gflops()
  if baseline:
    b = sequential_baseline(algo, model, data, c, baseline_max_clients)
    rec.update(b)
    rec.update({"baseline_gflops": flops / b["baseline_sec_per_round"] / 1e9,
                "speedup": b["baseline_sec_per_round"] / sec})
  return rec


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="*", default=DEFAULT, help="WORKLOAD:CLIENTS items")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
  p.add_argument("--chunk-size", type=int, default=None)
  p.add_argument("--chunk-sweep", default=None, help="WORKLOAD:CLIENTS to sweep chunk sizes on")
  p.add_argument("--baseline-max-clients", type=int, default=1000)
  p.add_argument("--no-baseline", action="store_true")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="CPU devices the vectorized engine splits the cohort over "
                      "(fedjax_sim.distributed.cpu_devices; default 0 = one per core)")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._one:
    print(json.dumps(one(a._one, a.rounds, a.chunk_size, a.baseline_max_clients,
                         not a.no_baseline, a.cpu_devices)), flush=True)
    return
  from common import device_info, emit, matmul_roofline

  def sub(spec, extra):
    cmd = [sys.executable, __file__, "--_one", spec, "--rounds", str(a.rounds),
           "--baseline-max-clients", str(a.baseline_max_clients),
           "--cpu-devices", str(a.cpu_devices)] + extra
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
      return {"spec": spec, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])

  out = open(a.out, "a") if a.out else None
  records = []
  if a.chunk_sweep:
    jobs = [(a.chunk_sweep, ["--chunk-size", str(k), "--no-baseline"]) for k in
            (1, 4, 8, 16, 32, 64, 128, 1000)]
  else:
    extra = (["--chunk-size", str(a.chunk_size)] if a.chunk_size else []) + \
        (["--no-baseline"] if a.no_baseline else [])
    jobs = [(s, extra) for s in a.only]
  for spec, extra in jobs:
    rec = sub(spec, extra)
    records.append(rec)
    emit(rec)
    if out:
      out.write(json.dumps(rec) + "\n")
  roof = {"roofline_matmul_gflops": matmul_roofline(), **device_info()}
  for r in records:
    if "gflops" in r:
      r["fraction_of_roofline"] = r["gflops"] / roof["roofline_matmul_gflops"]
  emit(roof)
  for r in records:
    if "fraction_of_roofline" in r:
      emit({"workload": r["workload"], "clients": r["clients"], "chunk_size": r["chunk_size"],
            "fraction_of_roofline": round(r["fraction_of_roofline"], 3),
            "fraction_of_batched_gemm": round(r["gflops"] / r["batched_gemm_gflops"], 3)
            if "batched_gemm_gflops" in r else None,
            "speedup_vs_sequential": round(r.get("speedup", math.nan), 2)})
  if out:
    out.write(json.dumps(roof) + "\n")


if __name__ == "__main__":
  main()
