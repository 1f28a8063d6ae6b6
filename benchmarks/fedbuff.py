"""FedBuff (asynchronous, buffer K=10, M clients in flight) vs synchronous FedAvg (cohort 10) on
the same straggler-prone devices: test accuracy against *simulated* wall-clock time.

Both use the same per-client speed factors and duration model
(:class:`fedjax_sim.asynchronous.DurationModel`, lognormal: some devices are persistently
several times slower), the same local work and client optimizer, and uniform client weights.
A synchronous round lasts as long as the slowest client of its cohort (``max`` of the cohort's
durations); FedBuff updates whenever K updates have arrived. Writes one JSON line per run to
``benchmarks/results/fedbuff.jsonl`` and the figure ``benchmarks/results/fedbuff.png``.

  python benchmarks/fedbuff.py                       # digits, M = 50 and 100
  python benchmarks/fedbuff.py --dataset fashion_mnist --fedavg-rounds 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import asynchronous  # noqa: E402
from fedjax_sim.algorithms.fedbuff import fedbuff  # noqa: E402
from fedjax_sim.data.federated import local_steps  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(name: str, num_clients: int, alpha: float, seed: int):
  if name == "digits":
    train, test = fs.datasets.digits(seed=seed)
    model = fs.models.mlp(64, (64,), 10)
  else:
    train, test = fs.datasets.fashion_mnist()
    model = fs.models.mlp(784, (200,), 10)
  parts = fs.partition.dirichlet(train["y"], num_clients, alpha, seed=seed)
  return fs.FederatedData.from_partition(train, parts, num_classes=10), test, model


def time_to(sim_time, acc, target):
  ok = np.flatnonzero(np.nan_to_num(acc, nan=-1.0) >= target)
  return float(sim_time[ok[0]]) if ok.size else None


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dataset", choices=["digits", "fashion_mnist"], default="digits")
  ap.add_argument("--clients", type=int, default=200)
  ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
  ap.add_argument("--buffer", type=int, default=10)
  ap.add_argument("--concurrency", type=int, nargs="+", default=[50, 100])
  ap.add_argument("--max-staleness", type=int, default=100)
  ap.add_argument("--server-lr", type=float, default=1.0, help="eta_g of both methods")
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--local-epochs", type=int, default=2)
  ap.add_argument("--speed-sigma", type=float, default=1.0)
  ap.add_argument("--noise-sigma", type=float, default=0.3)
  ap.add_argument("--fedavg-rounds", type=int, default=60)
  ap.add_argument("--max-server-steps", type=int, default=20000,
                  help="cap on FedBuff steps (runs stop at FedAvg's simulated time)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=os.path.join(RESULTS, "fedbuff"))
  args = ap.parse_args()

  data, test, model = load(args.dataset, args.clients, args.alpha, args.seed)
  duration = asynchronous.DurationModel(1.0, args.speed_sigma, args.noise_sigma)
  client_opt = optax.sgd(args.client_lr)
  common = {"dataset": args.dataset, "clients": args.clients, "alpha": args.alpha,
            "duration": {"step_time": 1.0, "speed_sigma": args.speed_sigma,
                         "noise_sigma": args.noise_sigma},
            "batch_size": args.batch_size, "local_epochs": args.local_epochs,
            "client_lr": args.client_lr, "server_lr": args.server_lr, "seed": args.seed,
            "backend": jax.default_backend()}
  runs, records = {}, []
  speed_key = asynchronous.speed_key(args.seed)   # the devices FedBuff's run_async simulates

  # --- synchronous FedAvg: a round lasts as long as its slowest client ------------------------
  algo = fs.algorithms.fedavg(client_opt, optax.sgd(args.server_lr),
                              local_epochs=args.local_epochs, batch_size=args.batch_size,
                              weighting="uniform")
  cohorts = []

  def remember(r, state, out):
    cohorts.append(np.asarray(out.clients["id"]))

  t0 = time.perf_counter()
  res = fs.run(algo, model, data, rounds=args.fedavg_rounds, cohort_size=args.buffer,
               eval_data=test, eval_every=2, seed=args.seed, progress=False, callback=remember,
               rounds_per_call=2)
  wall = time.perf_counter() - t0
  ids = jnp.asarray(np.stack(cohorts))                          # [R, C]
  steps = local_steps(algo.work, jnp.asarray(data.sizes)[ids])
  job_keys = jax.random.split(jax.random.key(args.seed + 7919), ids.shape[0])
  durs = jax.vmap(lambda k, i, s: asynchronous.client_durations(duration, speed_key, k, i, s))(
      job_keys, ids, steps)
  round_time = np.asarray(jnp.max(durs, axis=1))
  h = res.history
  h["sim_time"] = np.cumsum(round_time)
  h["client_updates"] = h["round"] * args.buffer
  horizon = float(h["sim_time"][-1])
  name = f"FedAvg C={args.buffer} (sync)"
  runs[name] = h
  records.append((dict(common, method="fedavg", name=name, cohort_size=args.buffer,
                       rounds=args.fedavg_rounds, wall_seconds=wall,
                       compile_seconds=res.compile_seconds,
                       mean_round_time=float(round_time.mean()),
                       mean_client_duration=float(np.mean(durs)),
                       final_sim_time=horizon), h))
  print(f"{name}: {args.fedavg_rounds} rounds, sim time {horizon:.0f} (round "
        f"{round_time.mean():.1f} vs mean client job {np.mean(durs):.1f}), final acc "
        f"{h.last('test_accuracy'):.4f}, wall {wall:.1f}s", flush=True)

  # --- FedBuff, one run per concurrency, for the same simulated time -------------------------
  for m in args.concurrency:
    config = fedbuff(client_opt, optax.sgd(args.server_lr), buffer_size=args.buffer,
                     concurrency=m, max_staleness=args.max_staleness,
                     local_epochs=args.local_epochs, batch_size=args.batch_size,
                     duration=duration)
    t0 = time.perf_counter()
    res = asynchronous.run_async(config, model, data, rounds=args.max_server_steps,
                                 until_time=horizon, eval_data=test, eval_every=50,
                                 seed=args.seed, progress=False, rounds_per_call=50)
    wall = time.perf_counter() - t0
    assert bool(jnp.all(jax.random.key_data(res.state.speed_key) ==
                        jax.random.key_data(speed_key)))
    h = res.history
    h["client_updates"] = np.cumsum(h["num_counted"])
    name = f"FedBuff K={args.buffer} M={m}"
    runs[name] = h
    rec = dict(common, method="fedbuff", name=name, buffer_size=args.buffer, concurrency=m,
               max_staleness=args.max_staleness, server_steps=h.num_rounds, wall_seconds=wall,
               compile_seconds=res.compile_seconds,
               mean_step_time=float(h["sim_time"][-1] / h.num_rounds),
               mean_staleness=float(np.mean(h["mean_staleness"])),
               max_staleness_seen=float(np.max(h["max_staleness"])),
               stale_dropped=int(np.sum(h["num_stale_dropped"])),
               final_sim_time=float(h["sim_time"][-1]))
    records.append((rec, h))
    print(f"{name}: {h.num_rounds} steps, sim time {h['sim_time'][-1]:.0f}, final acc "
          f"{h.last('test_accuracy'):.4f}, mean staleness {rec['mean_staleness']:.2f} "
          f"(max {rec['max_staleness_seen']:.0f}, {rec['stale_dropped']} dropped), "
          f"wall {wall:.1f}s", flush=True)

  # --- summary: accuracy at equal simulated time, time to targets --------------------------
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".jsonl", "w") as f:
    for rec, h in records:
      t, acc = h["sim_time"], h["test_accuracy"]
      ok = ~np.isnan(acc)
      within = ok & (t <= horizon)
      rec.update(
          horizon=horizon,
          accuracy_at_horizon=float(acc[within][-1]) if within.any() else None,
          final_accuracy=float(acc[ok][-1]),
          client_updates=float(h["client_updates"][-1]),
          time_to_accuracy={str(a): time_to(t, acc, a) for a in (0.8, 0.85, 0.9, 0.93)},
          curve={"sim_time": t[ok].round(3).tolist(),
                 "client_updates": h["client_updates"][ok].tolist(),
                 "test_accuracy": acc[ok].round(4).tolist()})
      f.write(json.dumps(rec) + "\n")
      print(json.dumps({k: rec[k] for k in ("name", "accuracy_at_horizon", "final_accuracy",
                                            "time_to_accuracy")}), flush=True)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for i, (name, h) in enumerate(runs.items()):
    t, acc = h["sim_time"], h["test_accuracy"]
    ok = ~np.isnan(acc)
    axes[0].plot(t[ok], acc[ok], marker="o", ms=2, lw=1.5, color=f"C{i}", label=name)
    axes[1].plot(t, h["train_loss"], lw=1, alpha=0.7, color=f"C{i}", label=name)
    axes[2].plot(h["client_updates"][ok], acc[ok], lw=1.5, color=f"C{i}", label=name)
  axes[0].set_ylabel("test accuracy")
  axes[1].set_ylabel("train loss (arrivals / cohort)")
  axes[1].set_yscale("log")
  for ax in axes[:2]:
    ax.set_xlabel("simulated time (local steps of a median-speed device)")
    ax.set_xlim(0, horizon)
  axes[2].set_xlabel("client updates aggregated")
  axes[2].set_ylabel("test accuracy")
  axes[2].set_xscale("log")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylim(0.3, 1.0)
  axes[2].set_ylim(0.3, 1.0)
  fig.suptitle(f"{args.dataset}: {args.clients} clients, Dirichlet({args.alpha}), lognormal "
               f"device speeds (sigma={args.speed_sigma})", fontsize=10)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)
  print("wrote", args.out + ".jsonl", args.out + ".png")


if __name__ == "__main__":
  main()
