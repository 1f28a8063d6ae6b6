"""DP-FedAvg on Fashion-MNIST: accuracy at epsilon 1, 3, 8 (delta 1e-5) vs non-private, and the
per-round overhead of clipping + noise on workload W1.

Accuracy: the 60k training images split IID over ``--clients`` clients (default 1000, 60 each),
``--cohort`` clients per round (default 100, q = 0.1), ``--rounds`` rounds. For each target
epsilon the noise multiplier comes from ``noise_multiplier_for`` for exactly that sampling (fixed-
size cohorts without replacement, RDP, replace-one neighbours; the Poisson add/remove epsilon of
the same run is printed alongside). Central DP with adaptive clipping (Andrew et al. 2021, target
median, initial C = 0.1, clipped_count_stddev = max(cohort / 20, z)); uniform weighting throughout, the non-private baseline included.

Overhead: W1 (2NN, 100 examples per client, benchmarks/common.py) with ``--overhead-clients``
clients per round (default 1000), the round compiled with ``engine.make_round`` as in w1_w2.py;
plain FedAvg (uniform weights) vs central DP (fixed and adaptive clip) vs local DP. Rounds of the
variants are interleaved (ABCD ABCD ...) so background load hits them alike; medians reported.

  python benchmarks/privacy.py                                  # defaults, < 10 min on 2 cores
  python benchmarks/privacy.py --rounds 30 --overhead-clients 200   # quick check

Prints JSON lines and writes them to benchmarks/results/privacy.jsonl (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Python puts this folder first on sys.path; a benchmark module here named like a (backported)
# stdlib module (benchmarks/compression.py vs `compression`, which jax imports) would shadow it.
# Import the libraries first, then make benchmarks/common.py importable from the END of the path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import engine, privacy  # noqa: E402
from fedjax_sim.privacy import accounting  # noqa: E402

sys.path.append(HERE)
RESULTS = os.path.join(HERE, "results", "privacy.jsonl")


def accuracy_runs(a, emit):
  train, test = fs.datasets.fashion_mnist()
  parts = fs.partition.iid(train["y"], a.clients, seed=0)
  data = fs.FederatedData.from_partition(train, parts, num_classes=10)
  model = fs.models.mlp_2nn() if a.model == "2nn" else fs.models.logistic_regression(784, 10)
  base = fs.algorithms.fedavg(optax.sgd(a.client_lr), optax.sgd(a.server_lr, momentum=0.9),
                              batch_size=20, local_epochs=1, weighting="uniform")
  q = a.cohort / a.clients
  for eps in [None] + a.epsilons:
    if eps is None:
      algo, z, cb = base, 0.0, None
    else:
      z = accounting.noise_multiplier_for(eps, a.delta, q, a.rounds, population=a.clients)
      # Andrew et al.'s sigma_b = m/20 needs z < m/10; above that (epsilon 1 at 200 rounds) use
      # sigma_b = z, which costs the update a factor (1 - 1/4)^-1/2 = 1.15 more noise.
      algo = privacy.dp_fedavg(base, noise_multiplier=z, clip_norm=0.1, adaptive=True,
                               clipped_count_stddev=max(a.cohort / 20, z))
      cb = privacy.privacy_callback(z, q, a.delta, population=a.clients)
    t = time.perf_counter()
    res = fs.run(algo, model, data, rounds=a.rounds, cohort_size=a.cohort, eval_data=test,
                 eval_every=a.rounds, seed=0, callback=cb, progress=False, rounds_per_call=10)
    h = res.history
    rec = {"bench": "accuracy", "model": model.name, "clients": a.clients, "cohort": a.cohort,
           "rounds": a.rounds, "target_epsilon": eps, "delta": a.delta, "noise_multiplier": z,
           "test_accuracy": float(h["test_accuracy"][-1]),
           "train_loss_last": float(h["train_loss"][-1]),
           "seconds": round(time.perf_counter() - t, 1)}
    if eps is not None:
      rec.update(epsilon_fixed_size_replace_one=float(h["epsilon"][-1]),
                 epsilon_poisson_add_remove=accounting.epsilon(z, q, a.rounds, a.delta,
                                                               sampling="poisson"),
                 final_clip_norm=float(h["clip_norm"][-1]))
    emit(rec)


def overhead(a, emit):
  from common import workload
  c = a.overhead_clients
  data, model, w1_algo, _ = workload("W1", c)
  base = fs.algorithms.fedavg(w1_algo.client_optimizer, w1_algo.server_optimizer,
                              batch_size=w1_algo.work.batch_size, local_epochs=1,
                              weighting="uniform")
  variants = {
      "fedavg": base,
      "dp_central_fixed": privacy.dp_fedavg(base, noise_multiplier=1.0, clip_norm=1.0),
      "dp_central_adaptive": privacy.dp_fedavg(base, noise_multiplier=1.0, clip_norm=1.0,
                                               adaptive=True),
      "dp_local": privacy.dp_fedavg(base, noise_multiplier=1.0, clip_norm=1.0, local=True),
  }
  dev = engine.to_device(data, np.ones(c, np.float32))
  params = model.init(jax.random.key(0))
  runners, compile_s = {}, {}
  for name, algo in variants.items():
    state = engine.init_state(algo, params, c)
    rf = engine.make_round(algo, model, population=c, cohort_size=c,
                           max_client_size=data.max_client_size)
    t = time.perf_counter()
    compiled = jax.jit(rf).lower(state, dev, jax.random.key(0)).compile()
    compile_s[name] = time.perf_counter() - t
    runners[name] = [compiled, state]
  times = {n: [] for n in variants}
  for r in range(a.overhead_rounds + 1):   # round 0 is a warm-up
    for name, holder in runners.items():
      t = time.perf_counter()
      holder[1], out = holder[0](holder[1], dev, jax.random.key(r))
      jax.block_until_ready((holder[1].params, out.metrics))
      if r > 0:
        times[name].append(time.perf_counter() - t)
  ref = statistics.median(times["fedavg"])
  for name in variants:
    sec = statistics.median(times[name])
    emit({"bench": "overhead", "workload": "W1", "clients": c, "variant": name,
          "sec_per_round": sec, "ratio_vs_fedavg": sec / ref, "times": times[name],
          "compile_sec": compile_s[name]})


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=["logreg", "2nn"], default="logreg")
  p.add_argument("--clients", type=int, default=1000)
  p.add_argument("--cohort", type=int, default=100)
  p.add_argument("--rounds", type=int, default=200)
  p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--client-lr", type=float, default=0.1)
  p.add_argument("--server-lr", type=float, default=1.0)
  p.add_argument("--overhead-clients", type=int, default=1000)
  p.add_argument("--overhead-rounds", type=int, default=5)
  p.add_argument("--skip", choices=["accuracy", "overhead"], nargs="*", default=[])
  p.add_argument("--out", default=RESULTS)
  a = p.parse_args()
  out = open(a.out, "w") if a.out else None

  def emit(rec):
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
      out.write(line + "\n")
      out.flush()

  t = time.perf_counter()
  if "accuracy" not in a.skip:
    accuracy_runs(a, emit)
  if "overhead" not in a.skip:
    overhead(a, emit)
  emit({"bench": "total", "seconds": round(time.perf_counter() - t, 1),
        "args": {k: v for k, v in vars(a).items() if k != "out"},
        "note": "timings taken on a shared 2-core CPU while other jobs ran; noisy"})


if __name__ == "__main__":
  main()
