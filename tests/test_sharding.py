"""The client axis sharded over 4 (forced) CPU devices gives the single-device result."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, optax
    import fedjax_sim as fs
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4))
    clients = []
    for n in rng.integers(1, 60, size=22):
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
