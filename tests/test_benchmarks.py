"""The accelerator check and the uneven-clients benchmark run end to end at their --smoke sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.mark.slow
def test_device_check_smoke():
  res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--smoke"],
                       capture_output=True, text=True, env=_env(), timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  recs = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
  cases = [r["case"] for r in recs]
  assert cases[0] == "device" and cases[-1] == "done"
  assert {"roofline", "w1_w2", "chunks", "stored", "sweep", "transfer"} <= set(cases)
  for r in recs:
    if "sec_per_round" in r and "baseline_sec_per_round" in r:
      assert r["sec_per_round"] > 0 and r["baseline_sec_per_round"] > 0, r
  assert [r["workload"] for r in recs if r["case"] == "w1_w2"] == ["W1", "W2"]


@pytest.mark.slow
def test_uneven_clients_smoke(tmp_path):
  out = tmp_path / "uneven"
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uneven_clients.py"), "--smoke",
                        "--only", "lognormal", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  rec = json.loads(res.stdout.splitlines()[0])
  # Work-sorted chunks never run more client-steps than padding every client to the largest,
  # and never fewer than the real ones.
  assert rec["real_client_steps"] <= rec["executed_client_steps"] <= rec["padded_client_steps"]
  assert rec["sec_per_round"] > 0 and rec["equal_sec_per_round"] > 0
  assert (tmp_path / "uneven.png").stat().st_size > 0
