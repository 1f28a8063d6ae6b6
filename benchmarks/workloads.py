"""The data of workloads W1 and W2 (benchmarks/README.md), with NumPy only.

Imported by ``common.py`` (fedjax_sim's benchmarks) and by the side-by-side scripts that run
other frameworks in their own environments (``fedjax_w1_w2.py``, ``flower_w1_w2.py``), so every
system trains on the same draws.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

WORKLOADS = {
    # name: (input dim, hidden layers, examples per client, batch size, lr)
    "W1": dict(dim=784, hidden=(200, 200), per_client=100, batch_size=20, lr=0.1),
    "W2": dict(dim=60, hidden=(), per_client=50, batch_size=10, lr=0.1),
}


def workload_arrays(name: str, num_clients: int, seed: int = 0):
  """``(x [N, d] float32, y [N] int32, per_client)`` of workload W1 or W2 with C clients (client
  i holds rows ``i * per_client`` to ``(i + 1) * per_client``): x ~ N(0, 1), y = argmax(x @ W_true)
  for one fixed W_true drawn from ``seed``."""
  w = WORKLOADS[name]
  rng = np.random.default_rng(seed)
  w_true = rng.standard_normal((w["dim"], 10)).astype(np.float32)
  n = num_clients * w["per_client"]
  x = rng.standard_normal((n, w["dim"]), dtype=np.float32)
  y = np.argmax(x @ w_true, axis=1).astype(np.int32)
  return x, y, w["per_client"]


def side_by_side_main(measure, defaults: list[str], description: str, rounds_help: str):
  """Command line of a side-by-side script: ``measure(spec, rounds) -> dict`` for each
  ``WORKLOAD:CLIENTS`` of ``--only``, printed (and appended to ``--out``) as JSON lines."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--only", nargs="*", default=defaults, help="WORKLOAD:CLIENTS items")
  p.add_argument("--rounds", type=int, default=3, help=rounds_help)
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  a = p.parse_args()
  for spec in a.only:
    rec = measure(spec, a.rounds)
    print(json.dumps(rec), flush=True)
    if a.out:
      with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
