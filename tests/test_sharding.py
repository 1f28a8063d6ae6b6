"""The client axis sharded over 4 (forced) CPU devices gives the single-device result."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, optax
    import fedjax_sim as fs
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4))
    clients = []
    for n in list(rng.integers(1, 60, size=21)) + [300]:   # a heavy tail: one client of 300
      x = rng.normal(size=(n, 8)).astype(np.float32)
      clients.append({"x": x, "y": np.argmax(x @ w, 1).astype(np.int32)})
    data = fs.FederatedData.from_clients(clients, num_classes=4)
    model = fs.models.mlp(8, (16,), 4)
    algo = fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.9), optax.adam(0.05), local_epochs=2,
                                batch_size=8)
    out = {}
    for d in (1, 2, 4):
      for k in (3, 100):
        r = fs.run(algo, model, data, rounds=3, cohort_size=19, num_devices=d, chunk_size=k,
                   progress=False)
        out[f"{d}-{k}"] = [np.concatenate([np.ravel(l) for l in jax.tree.leaves(r.params)]).tolist(),
                           r.history["train_loss"].tolist()]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  import numpy as np
  ref_params, ref_loss = map(np.asarray, out["1-100"])
  assert np.abs(ref_params).max() > 0
  for key, (params, loss) in out.items():
    np.testing.assert_allclose(params, ref_params, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=key)


def test_cpu_devices_in_a_started_process():
  import jax
  from fedjax_sim import distributed
  have = jax.device_count("cpu")
  assert distributed.cpu_devices() == have          # default: keep what the backend started with
  assert distributed.cpu_devices(have) == have
  with pytest.raises(ValueError, match="already started"):
    distributed.cpu_devices(2 if have == 1 else 1)   # a count the machine allows
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="positive integer"):
      distributed.cpu_devices(bad)


@pytest.mark.slow
def test_cli_splits_the_cpu_into_devices(tmp_path):
  """A fresh CLI process makes the requested CPU devices, trains on them, records the count."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, "-m", "fedjax_sim", "run", "--dataset", "digits",
                        "--num-clients", "10", "--cohort-size", "4", "--rounds", "2",
                        "--eval-every", "2", "--cpu-devices", "2", "--no-progress",
                        "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "cpu_devices = 2" in (tmp_path / "run" / "config.toml").read_text()
  assert "2 cpu device(s)" in res.stdout
  hist = json.loads((tmp_path / "run" / "history.json").read_text())
  assert hist["round"] == [1.0, 2.0] and all(np.isfinite(hist["train_loss"]))


def test_cpu_devices_default_applies_to_cpu_hosts_only():
  """Before JAX starts: the one-device-per-core default is set for a CPU backend, and left alone
  where an accelerator is the default backend (judged without starting the backends)."""
  code = ("import os, jax; from fedjax_sim import distributed as d; "
          "print(d.accelerator_expected(), d.cpu_devices(), jax.config.jax_num_cpu_devices, "
          "os.cpu_count())")
  for platforms in ("cuda", "cpu"):
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    accel, n, configured, cores = res.stdout.split()
    if platforms == "cuda":
      assert (accel, n, configured) == ("True", "1", "-1")
    else:
      assert (accel, n, configured) == ("False", cores, cores)
