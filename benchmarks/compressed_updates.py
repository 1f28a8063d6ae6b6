"""Compressed updates: accuracy vs bytes uploaded on Fashion-MNIST.

100 clients (Dirichlet(0.5) label skew), FedAvg with 10 clients per round, 1 local epoch of SGD,
logistic regression (default, fast) or the 2NN (``--model mlp_2nn``). Every configuration runs
the same rounds from the same seed; the upload is read from the history (``bytes_up``: the
encoded size of every counted client's update, from the transform's ``wire_bytes``):

* ``none``: float32 updates;
* ``q1/q2/q4/q8``: stochastic uniform quantization to 1, 2, 4, 8 bits (one min/max per update);
* ``hadamard1/hadamard2``: random rotation + 1 / 2-bit quantization;
* ``topk1%/topk10%``: top-k sparsification with error feedback;
* ``secagg16``: no compression but the mean through simulated secure aggregation (updates
  clipped to L2 norm ``--clip``, 16-bit fixed point, masked in the smallest ring that cannot
  wrap, 16 + ceil(log2 10) = 20 bits per coordinate); its bytes are the masked vectors'.

One JSON line per configuration (final accuracy, total MB up, the accuracy-vs-MB curve) goes to
``benchmarks/results/compression.jsonl``; the plot to ``benchmarks/results/compression.png``::

  python benchmarks/compressed_updates.py                # default: ~5 minutes on 2 CPU cores
  python benchmarks/compressed_updates.py --rounds 5     # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fedjax_sim as fs  # noqa: E402
from fedjax_sim.aggregators import secure as sa  # noqa: E402
from fedjax_sim import transforms  # noqa: E402
from fedjax_sim.transforms import compression  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def configs(clip: float, secagg_bits: int, cohort: int):
  """name -> (update transform, aggregator, ring bits for secure aggregation or None)."""
  out = {"none": (None, None, None)}
  for b in (1, 2, 4, 8):
    out[f"q{b}"] = (compression.stochastic_quantize(b), None, None)
  for b in (1, 2):
    out[f"hadamard{b}"] = (compression.hadamard_quantize(b), None, None)
  out["topk1%"] = (compression.top_k(0.01), None, None)
  out["topk10%"] = (compression.top_k(0.10), None, None)
  ring = sa.bits_needed(secagg_bits, cohort)
  out[f"secagg{secagg_bits}"] = (transforms.clip_by_norm(clip),
                                 sa.secure_sum(clip, secagg_bits, ring_bits=ring), ring)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="logistic_regression",
                 choices=["logistic_regression", "mlp_2nn"])
  p.add_argument("--rounds", type=int, default=80)
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--eval-every", type=int, default=5)
  p.add_argument("--clip", type=float, default=5.0, help="L2 clip of the secure-aggregation run")
  p.add_argument("--secagg-bits", type=int, default=16)
  p.add_argument("--only", nargs="*", help="run only these configurations")
  p.add_argument("--out", default=str(RESULTS / "compression"))
  args = p.parse_args(argv)

  train, test = fs.datasets.fashion_mnist()
  parts = fs.partition.dirichlet(train["y"], args.clients, args.alpha, seed=0)
  data = fs.FederatedData.from_partition(train, parts, num_classes=10)
  model = fs.models.logistic_regression(784, 10) if args.model == "logistic_regression" else \
      fs.models.mlp_2nn(784, 10)
  params = model.init(jax.random.key(0))
  n = fs.tree.num_params(params)
  base = fs.algorithms.fedavg(optax.sgd(args.lr), optax.sgd(1.0), local_epochs=1,
                              batch_size=args.batch_size)
  out_jsonl = Path(args.out + ".jsonl")
  out_jsonl.parent.mkdir(parents=True, exist_ok=True)
  records = []
  with out_jsonl.open("w") as f:
    for name, (t, agg, ring) in configs(args.clip, args.secagg_bits, args.cohort).items():
      if args.only and name not in args.only:
        continue
      algo = dataclasses.replace(base, update_transform=t,
                                 aggregator=agg if agg is not None else fs.aggregators.mean())
      t0 = time.perf_counter()
      res = fs.run(algo, model, data, rounds=args.rounds, cohort_size=args.cohort,
                   eval_data=test, eval_every=args.eval_every, rounds_per_call=args.eval_every,
                   progress=False, seed=0)
      wall = time.perf_counter() - t0
      h = res.history
      per_client = float(h["bytes_up_per_client"][0])
      bytes_up = np.asarray(h["bytes_up"])
      if ring is not None:   # the aggregator, not a transform, decides this run's encoding
        per_client = float(sa.cost(n, args.cohort, args.secagg_bits, args.clip, ring).bytes_up)
        bytes_up = per_client * np.asarray(h["num_counted"])
      cum_mb = np.cumsum(bytes_up) / 1e6
      ev = ~np.isnan(h["test_accuracy"])
      rec = {
          "benchmark": "compression", "config": name, "model": args.model, "num_params": n,
          "clients": args.clients, "alpha": args.alpha, "cohort": args.cohort,
          "rounds": args.rounds, "lr": args.lr,
          "bytes_up_per_client": per_client,
          "compression_ratio": 4.0 * n / per_client,
          "bytes_down_per_client": float(h["bytes_down_per_client"][0]),
          "total_mb_up": float(cum_mb[-1]),
          "final_test_accuracy": float(h.last("test_accuracy")),
          "best_test_accuracy": float(np.nanmax(h["test_accuracy"])),
          "final_train_loss": float(h["train_loss"][-1]),
          "curve_round": [int(r) for r in h["round"][ev]],
          "curve_mb_up": [round(float(m), 4) for m in cum_mb[ev]],
          "curve_test_accuracy": [round(float(a), 4) for a in h["test_accuracy"][ev]],
          "compile_seconds": round(res.compile_seconds, 2),
          "seconds_per_round": round(float(np.mean(h["seconds"])), 4),
          "wall_seconds": round(wall, 1),
      }
      if ring is not None:
        rec.update(secagg_ring_bits=ring, secagg_value_bits=args.secagg_bits,
                   secagg_clip=args.clip)
      records.append(rec)
      line = json.dumps(rec)
      print(line, flush=True)
      f.write(line + "\n")
      f.flush()
  plot(records, Path(args.out + ".png"))


def plot(records, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in records:
    style = "--" if r["config"].startswith(("topk", "secagg")) else "-"
    ax.plot(r["curve_mb_up"], r["curve_test_accuracy"], style, marker=".",
            label=f"{r['config']} ({r['bytes_up_per_client'] / 1e3:.1f} kB/client)")
  ax.set_xscale("log")
  ax.set_xlabel("cumulative MB uploaded (all clients)")
  ax.set_ylabel("test accuracy")
  r0 = records[0]
  ax.set_title(f"Fashion-MNIST, {r0['model']}, {r0['clients']} clients Dir({r0['alpha']}), "
               f"{r0['cohort']}/round, {r0['rounds']} rounds")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  main()
