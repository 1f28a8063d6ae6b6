"""W1 and W2 (benchmarks/README.md) run by FedJAX 0.0.17 itself, for a side-by-side figure.

FedJAX pins an older JAX than fedjax_sim, so this script runs in its own virtual environment and
imports nothing from fedjax_sim (the workload's data generator is repeated here, identical to
``benchmarks/common.workload``)::

  make fedjax-venv                                       # .venv-fedjax: fedjax 0.0.17, jax 0.4.30
  .venv-fedjax/bin/python benchmarks/fedjax_w1_w2.py     # W1:1000 and W2:10000
  .venv-fedjax/bin/python benchmarks/fedjax_w1_w2.py --only W1:100 --rounds 5

FedJAX's own FedAvg (``fedjax.algorithms.fed_avg``) with its default ``for_each_client`` backend
(one jitted step per batch, a Python loop over clients) on ``fedjax.InMemoryFederatedData``, the
2NN as a Haiku MLP; client SGD lr 0.1, batch 20 (W1) or 10 (W2), one epoch, server SGD 1.0.
Prints one JSON line per configuration: seconds per round (median after a warm-up round, which
includes compilation), GFLOP/s by the workload's 6 x params x examples convention.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from workloads import WORKLOADS, side_by_side_main, workload_arrays


def one(spec: str, rounds: int) -> dict:
  import fedjax
  import haiku as hk
  import jax

  name, c = spec.split(":")
  c = int(c)
  w = WORKLOADS[name]
  x, y, per = workload_arrays(name, c)
  clients = {f"{i:07d}".encode(): {"x": x[i * per:(i + 1) * per], "y": y[i * per:(i + 1) * per]}
             for i in range(c)}
  fd = fedjax.InMemoryFederatedData(clients)

  def forward(batch):
    return hk.nets.MLP(list(w["hidden"]) + [10])(batch["x"])   # ReLU between, linear output

  model = fedjax.create_model_from_haiku(
      transformed_forward_pass=hk.transform(forward),
      sample_batch={"x": np.zeros((1, w["dim"]), np.float32)},
      train_loss=lambda batch, preds: fedjax.metrics.unreduced_cross_entropy_loss(batch["y"], preds),
      eval_metrics={"accuracy": fedjax.metrics.Accuracy()})
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(w["lr"]), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=w["batch_size"], num_epochs=1))
  params = model.init(jax.random.PRNGKey(0))
  n_params = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
  state = algorithm.init(params)
  ids = list(fd.client_ids())

  def round_(r, state):
    cohort = [(cid, fd.get_client(cid), jax.random.PRNGKey(r * c + i)) for i, cid in enumerate(ids)]
    state, _ = algorithm.apply(state, cohort)
    jax.block_until_ready(state.params)
    return state

  t0 = time.perf_counter()
  state = round_(0, state)
  warm = time.perf_counter() - t0
  ts = []
  for r in range(1, rounds + 1):
    t0 = time.perf_counter()
    state = round_(r, state)
    ts.append(time.perf_counter() - t0)
  sec = statistics.median(ts)
  flops = 6.0 * n_params * c * per
  return {"workload": name, "clients": c, "engine": "fedjax-0.0.17 for_each_client (jit)",
          "jax": jax.__version__, "devices": jax.device_count(), "sec_per_round": sec,
          "sec_per_client": sec / c, "gflops": flops / sec / 1e9,
          "warmup_round_sec": warm, "rounds_timed": rounds}


def main():
  side_by_side_main(one, ["W1:1000", "W2:10000"], __doc__.split("\n")[0], "timed rounds after the warm-up")


if __name__ == "__main__":
  main()
