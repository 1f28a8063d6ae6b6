"""W1 and W2 (benchmarks/README.md) in Flower's simulation engine, for a side-by-side figure.

Flower runs in its own virtual environment (its Ray backend pins its own dependencies) and this
script imports nothing from fedjax_sim (the workload's data generator is repeated here, identical
to ``benchmarks/common.workload``)::

  make flower-venv                                        # .venv-flower: flwr[simulation] 1.20
  .venv-flower/bin/python benchmarks/flower_w1_w2.py      # W2:1000 and W1:100
  .venv-flower/bin/python benchmarks/flower_w1_w2.py --only W2:100 --rounds 4

Flower's ``run_simulation`` with its ``FedAvg`` strategy (every client every round), one
``NumPyClient`` per client on the Ray backend (one CPU per client actor, so two run at once on
two cores). Each client trains the workload's model with plain NumPy SGD (1 epoch, lr 0.1, batch
20 for W1 / 10 for W2): the cheapest client code there is, so the times are a lower bound for
Flower with a real framework inside the client. Seconds per round are the medians of the gaps
between successive rounds' ``configure_fit`` calls, the first round (actor start-up) excluded.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from workloads import WORKLOADS, side_by_side_main, workload_arrays

_DATA: dict = {}


def cached_arrays(name: str, num_clients: int):
  """The workload's arrays, drawn once per process (each Ray actor is a process)."""
  if (name, num_clients) not in _DATA:
    _DATA[name, num_clients] = workload_arrays(name, num_clients)
  return _DATA[name, num_clients]


def init_params(name: str, seed: int = 0) -> list[np.ndarray]:
  w = WORKLOADS[name]
  rng = np.random.default_rng(seed + 1)
  dims = [w["dim"], *w["hidden"], 10]
  out = []
  for a, b in zip(dims[:-1], dims[1:]):
    out += [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), np.zeros(b, np.float32)]
  return out


def sgd_epoch(params, x, y, batch_size, lr, rng):
  """One epoch of minibatch SGD on softmax cross-entropy for an MLP (ReLU) in NumPy."""
  params = [p.copy() for p in params]
  order = rng.permutation(len(y))
  n_layers = len(params) // 2
  for s in range(0, len(y), batch_size):
    idx = order[s:s + batch_size]
    hs = [x[idx]]
    for i in range(n_layers):
      z = hs[-1] @ params[2 * i] + params[2 * i + 1]
      hs.append(np.maximum(z, 0) if i < n_layers - 1 else z)
    logits = hs[-1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = p
    g[np.arange(len(idx)), y[idx]] -= 1
    g /= len(idx)
    for i in reversed(range(n_layers)):
      gw, gb = hs[i].T @ g, g.sum(0)
      if i > 0:
        g = (g @ params[2 * i].T) * (hs[i] > 0)
      params[2 * i] -= lr * gw
      params[2 * i + 1] -= lr * gb
  return params


def run(spec: str, rounds: int) -> dict:
  from flwr.client import ClientApp, NumPyClient
  from flwr.common import Context, ndarrays_to_parameters
  from flwr.server import ServerApp, ServerAppComponents, ServerConfig
  from flwr.server.strategy import FedAvg
  from flwr.simulation import run_simulation

  name, c = spec.split(":")
  c = int(c)
  w = WORKLOADS[name]

  class Client(NumPyClient):
    def __init__(self, cid: int):
      self.cid = cid

    def fit(self, parameters, config):
      x, y, per = cached_arrays(name, c)
      sl = slice(self.cid * per, (self.cid + 1) * per)
      rng = np.random.default_rng(int(config.get("round", 0)) * c + self.cid)
      new = sgd_epoch(parameters, x[sl], y[sl], w["batch_size"], w["lr"], rng)
      return new, per, {}

  def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()

  starts: list[float] = []

  class TimedFedAvg(FedAvg):
    def configure_fit(self, server_round, parameters, client_manager):
      starts.append(time.perf_counter())
      return super().configure_fit(server_round, parameters, client_manager)

  def server_fn(context: Context):
    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=c,
                           min_available_clients=c, min_evaluate_clients=0,
                           initial_parameters=ndarrays_to_parameters(init_params(name)),
                           on_fit_config_fn=lambda r: {"round": r})
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds + 2))

  t0 = time.perf_counter()
  run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                 num_supernodes=c,
                 backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
  total = time.perf_counter() - t0
  # Gaps between round starts: the first (round 1) includes the actors' start-up, and the last
  # round (which no later start closes) is not timed.
  gaps = np.diff(starts)[1:]
  sec = statistics.median(gaps) if len(gaps) else float("nan")
  n_params = sum(p.size for p in init_params(name))
  return {"workload": name, "clients": c, "engine": "flower-1.20 run_simulation (ray), NumPy clients",
          "cpus": os.cpu_count(), "sec_per_round": sec, "sec_per_client": sec / c,
          "gflops": 6.0 * n_params * c * w["per_client"] / sec / 1e9,
          "rounds_timed": len(gaps), "total_sec": total}


def main():
  side_by_side_main(run, ["W2:1000", "W1:100"], __doc__.split("\n")[0], "timed rounds after the first")


if __name__ == "__main__":
  main()
