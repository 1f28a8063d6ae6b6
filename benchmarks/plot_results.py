"""Log-log plot of seconds per round against client count from benchmark JSON lines.

  python benchmarks/plot_results.py benchmarks/results/w1_w2.jsonl benchmarks/results/w1_w2.png
"""

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str):
  rows = [json.loads(l) for l in open(src) if l.strip()]
  roof = next((r for r in rows if "roofline_matmul_gflops" in r), {})
  series = defaultdict(list)
  for r in rows:
    if "sec_per_round" in r:
      series[(r["workload"], "fedjax_sim")].append((r["clients"], r["sec_per_round"]))
      if "baseline_sec_per_round" in r:
        series[(r["workload"], "sequential loop")].append((r["clients"], r["baseline_sec_per_round"]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, wl in zip(axes, ("W1", "W2")):
    for (w, eng), pts in sorted(series.items()):
      if w != wl:
        continue
      pts.sort()
      ax.loglog(*zip(*pts), marker="o", ls="-" if eng == "fedjax_sim" else "--", label=eng)
    ax.set_title(f"{wl}: seconds per round ({roof.get('device', '')}, "
                 f"roof {roof.get('roofline_matmul_gflops', 0):.0f} GFLOP/s)")
    ax.set_xlabel("clients per round C")
    ax.set_ylabel("s / round")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
  fig.tight_layout()
  fig.savefig(dst, dpi=120)
  print(f"wrote {dst}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
