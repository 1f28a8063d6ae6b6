"""One federated run spread over several JAX processes (hosts): a launcher example.

Every process runs this same script; ``fedjax_sim.distributed.initialize()`` joins them into one
JAX run (``jax.distributed``), and ``fs.run`` splits each round's cohort over the devices of all
processes. Only process 0 prints. See ``docs/multihost.md``.

On a cluster, one command per host (same coordinator address everywhere, host 0's address)::

  # host 0                                   # host 1
  python benchmarks/multihost_launch.py \\    python benchmarks/multihost_launch.py \\
      --coordinator host0:12345 \\                --coordinator host0:12345 \\
      --num-processes 2 --process-id 0           --num-processes 2 --process-id 1

Under SLURM (``srun``, one task per host) no flags are needed: JAX reads the SLURM variables.

To try it on one machine, ``--local N`` starts N copies of this script on localhost, each with
``--cpu-devices`` CPU devices (gloo collectives between them), and waits for them::

  python benchmarks/multihost_launch.py --local 2 --cpu-devices 2 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--coordinator", help="host:port of process 0 (default: $FEDJAX_SIM_COORDINATOR "
                 "or auto-detected under SLURM / Open MPI)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("--cpu-devices", type=int, help="CPU devices per process (CPU runs only)")
  p.add_argument("--local", type=int, metavar="N", help="start N processes on localhost")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--cohort-size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def launch_local(args) -> int:
  """Starts ``args.local`` copies of this script on localhost; returns the worst exit code."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  argv = list(sys.argv[1:])
  i = argv.index("--local")
  del argv[i:i + 2]
  procs = []
  for pid in range(args.local):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--coordinator", f"localhost:{port}",
           "--num-processes", str(args.local), "--process-id", str(pid)]
    procs.append(subprocess.Popen(cmd, env=env))
  return max(p.wait() for p in procs)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.local:
    return launch_local(args)

  from fedjax_sim import distributed
  distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)

  import jax
  import optax
  import fedjax_sim as fs

  main_process = distributed.is_main_process()
  if main_process:
    print(f"{jax.process_count()} process(es), {jax.device_count()} device(s): "
          f"{[str(d) for d in jax.devices()]}", flush=True)
  # Every process builds the same population (same seed): the data is replicated, the cohort split.
  train, test = fs.datasets.digits(seed=args.seed)
  data = fs.FederatedData.from_partition(
      train, fs.partition.dirichlet(train["y"], args.clients, 0.5, seed=args.seed), num_classes=10)
  algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  t = time.perf_counter()
  result = fs.run(algo, fs.models.mlp(64, (64,), 10), data, rounds=args.rounds,
                  cohort_size=args.cohort_size, eval_data=test, eval_every=args.rounds,
                  seed=args.seed, progress=main_process)
  if main_process:
    h = result.history
    print(f"final train_loss {h['train_loss'][-1]:.4f}  test_accuracy "
          f"{h['test_accuracy'][-1]:.4f}  compile {result.compile_seconds:.1f}s  total "
          f"{time.perf_counter() - t:.1f}s", flush=True)
  distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
