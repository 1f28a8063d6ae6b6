"""Two JAX processes on localhost (CPU devices, gloo collectives) give the single-process result.

Each worker process joins a ``jax.distributed`` run through
:func:`fedjax_sim.distributed.initialize` (settings from the ``FEDJAX_SIM_*`` environment
variables, as on a cluster), creates 2 CPU devices and trains its half of every cohort (a 4-device
"clients" mesh over both processes); the final params must match ``fs.run(num_devices=1)`` in this
process.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import loop

# The experiment, built identically by the workers and the reference: 20 IID clients of a small
# linearly separable problem (numpy only, so no dataset download or scikit-learn import).
SETUP = textwrap.dedent("""
    import numpy as np, optax
    import fedjax_sim as fs
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 5))
    x = rng.normal(size=(900, 16)).astype(np.float32)
    y = np.argmax(x @ w, 1).astype(np.int32)
    train, test = {"x": x[:700], "y": y[:700]}, {"x": x[700:], "y": y[700:]}
    data = fs.FederatedData.from_partition(train, fs.partition.iid(train["y"], 20), num_classes=5)
    algo = fs.algorithms.fedavg(optax.sgd(0.1), optax.sgd(1.0, momentum=0.9), batch_size=16)
    model = fs.models.logistic_regression(16, 5)
""")

WORKER = textwrap.dedent("""
    import json, sys
    from fedjax_sim import distributed
    distributed.initialize()            # FEDJAX_SIM_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    assert len(jax.local_devices()) == 2, jax.local_devices()
    mode, out = sys.argv[1], sys.argv[2]
""") + SETUP + textwrap.dedent("""
    if mode == "helpers":
      from fedjax_sim import experiment
      params, metrics = experiment.run_rounds(algo, model, data, rounds=3, cohort_size=8,
                                               chunk_size=3)
      loss, test_acc = metrics["train_loss"], None
    else:
      r = fs.run(algo, model, data, rounds=3, cohort_size=8, chunk_size=3, eval_data=test,
                 eval_every=3, progress=False)
      params, loss, test_acc = r.params, r.history["train_loss"], r.history["test_accuracy"][-1]
    flat = np.concatenate([np.ravel(l) for l in jax.tree.leaves(params)])
    with open(out, "w") as f:
      json.dump({"process": jax.process_index(), "params": flat.tolist(),
                 "loss": np.asarray(loss).tolist(),
                 "test_accuracy": None if test_acc is None else float(test_acc)}, f)
    distributed.shutdown()
""")

# Generous: on a loaded 2-core machine a worker needs ~10 CPU-s but can take minutes of wall time.
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_workers(mode: str, tmp_path, num_processes: int = 2):
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(fs.__file__)))
  procs = []
  for pid in range(num_processes):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=root,
               FEDJAX_SIM_COORDINATOR=f"localhost:{port}",
               FEDJAX_SIM_NUM_PROCESSES=str(num_processes), FEDJAX_SIM_PROCESS_ID=str(pid),
               FEDJAX_SIM_LOCAL_DEVICE_COUNT="2")
    out = tmp_path / f"{mode}-{pid}.json"
    procs.append((subprocess.Popen([sys.executable, "-c", WORKER, mode, str(out)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                  out))
  return procs


def _wait(procs):
  """Waits for every worker (killing all on a timeout); fails with their stderr if one failed."""
  logs, failed = [], False
  for i, (p, _) in enumerate(procs):
    try:
      stdout, stderr = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      stdout, stderr = p.communicate()
      stderr += f"\n[timed out after {TIMEOUT_S} s]"
    failed |= p.returncode != 0
    logs.append(f"--- process {i} (rc={p.returncode}) ---\n{stdout[-2000:]}\n{stderr[-4000:]}")
  if failed:
    pytest.fail("multi-process workers failed:\n" + "\n".join(logs))
  return [json.loads(out.read_text()) for _, out in procs]


@functools.lru_cache(maxsize=1)
def _reference():
  """The same experiment in this (single-device, single-process) test process."""
  ns = {}
  exec(SETUP, ns)   # noqa: S102 - the same code the workers run
  r = fs.run(ns["algo"], ns["model"], ns["data"], rounds=3, cohort_size=8, chunk_size=3,
             num_devices=1, eval_data=ns["test"], eval_every=3, progress=False)
  import jax
  flat = np.concatenate([np.ravel(l) for l in jax.tree.leaves(r.params)])
  return flat, np.asarray(r.history["train_loss"]), float(r.history["test_accuracy"][-1])


def _check(results, ref):
  ref_params, ref_loss, ref_acc = ref
  assert np.abs(ref_params).max() > 0
  assert sorted(r["process"] for r in results) == list(range(len(results)))
  for r in results:   # every process ends with the same (replicated) model
    where = f"process {r['process']}"
    np.testing.assert_allclose(r["params"], ref_params, atol=1e-5, err_msg=where)
    np.testing.assert_allclose(r["loss"], ref_loss, rtol=1e-5, err_msg=where)
    if r["test_accuracy"] is not None:
      assert abs(r["test_accuracy"] - ref_acc) < 1e-6


@pytest.mark.slow
def test_two_processes_equal_single_process(tmp_path):
  """experiment.run_rounds (the calls run() makes) over 2 processes x 2 CPU devices."""
  procs = _start_workers("helpers", tmp_path)
  try:
    ref = _reference()   # overlaps with the workers' start-up and compilation
  finally:
    results = _wait(procs)
  _check(results, ref)


@pytest.mark.skipif(not hasattr(loop, "distributed"),
                    reason="fedjax_sim.loop.run() is not multi-process aware yet")
@pytest.mark.slow
def test_run_two_processes_equal_single_process(tmp_path):
  """fs.run() itself in 2 processes (with evaluation) equals the single-process run."""
  procs = _start_workers("run", tmp_path)
  try:
    ref = _reference()
  finally:
    results = _wait(procs)
  _check(results, ref)


def test_initialize_errors(monkeypatch):
  from fedjax_sim import distributed
  for var in ("FEDJAX_SIM_COORDINATOR", "FEDJAX_SIM_NUM_PROCESSES", "FEDJAX_SIM_PROCESS_ID",
              "JAX_COORDINATOR_ADDRESS", *distributed._AUTO_DETECTED_ENVS):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("FEDJAX_SIM_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="must be an integer"):
    distributed.initialize()
  monkeypatch.setenv("FEDJAX_SIM_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="coordinator address"):
    distributed.initialize()
  with pytest.raises(ValueError, match="cpu_collectives"):
    distributed.initialize("localhost:1", 2, 0, cpu_collectives="nccl")
  distributed.initialize(num_processes=1)   # a single process: nothing to do
  assert not distributed.is_multiprocess() and distributed.is_main_process()


def test_single_process_helpers():
  """replicate / fetch / global_mesh also work (trivially) in a single process."""
  import jax
  from fedjax_sim import distributed
  mesh = distributed.global_mesh()
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "k": jax.random.key(3), "n": None,
          "s": 2.5}
  rep = distributed.replicate(tree, mesh)
  assert rep["a"].sharding == distributed.replicated(mesh) and rep["n"] is None
  back = distributed.fetch(rep)
  np.testing.assert_array_equal(back["a"], tree["a"])
  np.testing.assert_array_equal(back["k"], jax.random.key_data(tree["k"]))
  assert float(back["s"]) == 2.5
  assert distributed.replicate(rep, mesh)["a"] is rep["a"]
  with pytest.raises(ValueError, match="only"):
    distributed.global_mesh(jax.device_count() + 1)
