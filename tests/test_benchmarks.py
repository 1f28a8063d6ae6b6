"""The accelerator check and the uneven-clients benchmark run end to end at their --smoke sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.slow
def test_secure_aggregation_smoke(tmp_path):
  pytest.importorskip("tenseal", reason="the CKKS variant needs the 'he' extra (TenSEAL)")
  out = tmp_path / "sa.jsonl"
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "secure_aggregation.py"),
                        "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  recs = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(recs) == {"plain", "secagg", "secagg_plus", "ckks"}
  n = recs["plain"]["num_params"]
  assert n == 199_210 and recs["plain"]["bytes_up_per_client"] == 4 * n
  for m in ("secagg", "secagg_plus"):
    assert recs[m]["bytes_up_per_client"] == -(-recs[m]["ring_bits"] * n // 8)
    assert recs[m]["neighbours"] == 2                           # C = 3: both graphs complete
    assert recs[m]["prg_words_per_client"] == 3 * n             # 2 pairwise + 1 self mask
  assert recs["ckks"]["ciphertexts_per_client"] == 49          # 199,210 values / 4096 slots
  assert recs["ckks"]["threads"] >= 1
  assert recs["ckks"]["bytes_up_per_client"] > 10 * recs["plain"]["bytes_up_per_client"]
  assert all(r["sec_per_round"] > 0 for r in recs.values())
  assert (tmp_path / "sa.png").stat().st_size > 0


def _transfer_benchmark():
  import importlib.util
  spec = importlib.util.spec_from_file_location("transfer_benchmark",
                                                ROOT / "benchmarks" / "transfer.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_rotation_pretext_labels_each_rotation():
  tb = _transfer_benchmark()
  x = np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype(np.float32)
  xs, ys = tb.rotations(x, seed=1)
  assert xs.shape == (12, 4, 4, 1) and np.bincount(ys).tolist() == [3, 3, 3, 3]
  for img, r in zip(xs, ys):   # undoing the labelled rotation gives back one of the originals
    back = np.rot90(img, -r, axes=(0, 1))
    assert min(np.abs(back - x[i]).max() for i in range(3)) == 0


def test_scarce_results_are_read_from_the_last_full_run(tmp_path):
  tb = _transfer_benchmark()
  rows = [{"experiment": "meta", "small": False},
          {"stage": "result", "model": "a", "k": 1, "federated_test_accuracy_per_seed": [0.1]},
          {"experiment": "meta", "small": False},
          {"stage": "result", "model": "a", "k": 1, "federated_test_accuracy_per_seed": [0.5]},
          {"stage": "result", "model": "b", "k": 5, "federated_test_accuracy_per_seed": [0.6, .7]},
          {"experiment": "meta", "small": True},
          {"stage": "result", "model": "a", "k": 1, "federated_test_accuracy_per_seed": [0.9]}]
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  got = tb.results_by_model_k(path)
  # rows of the last full-size run only; a later --small run's rows are not mixed in
  np.testing.assert_allclose(got[("a", 1)], [0.5])
  assert sorted(got) == [("a", 1), ("b", 5)]
  np.testing.assert_allclose(got[("b", 5)], [0.6, 0.7])
  assert tb.results_by_model_k(tmp_path / "missing.jsonl") == {}


def test_scarce_results_complete_a_partial_rerun_with_its_protocol_only(tmp_path):
  """A rerun of some models replaces their rows and keeps the others' from earlier runs of the
  same protocol (the same ``data`` row), never rows of another protocol."""
  tb = _transfer_benchmark()
  small_p, big_p = {"stage": "data", "rounds": 15}, {"stage": "data", "rounds": 30}
  res = lambda m, acc: {"stage": "result", "model": m, "k": 1,  # noqa: E731
                        "federated_test_accuracy_per_seed": [acc]}
  rows = [{"experiment": "meta", "small": False}, small_p, res("a", 0.1), res("c", 0.2),
          {"experiment": "meta", "small": False}, big_p, res("a", 0.3), res("b", 0.4),
          {"experiment": "meta", "small": False}, big_p, res("b", 0.5)]
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  got = tb.results_by_model_k(path)
  assert sorted(got) == [("a", 1), ("b", 1)]            # c ran under the other protocol only
  np.testing.assert_allclose(got[("a", 1)], [0.3])      # kept from the earlier run
  np.testing.assert_allclose(got[("b", 1)], [0.5])      # replaced by the rerun


@pytest.mark.slow
def test_data_quality_smoke(tmp_path):
  out = tmp_path / "dq"
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_quality.py"), "--small",
                        "--only", "breast_cancer", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  recs = [json.loads(l) for l in (tmp_path / "dq.jsonl").read_text().splitlines()]
  runs = {r["arm"]: r for r in recs if "summary" not in r}
  assert set(runs) == {"clean", "dirty", "cleaned", "cleaned+gce", "cleaned+weights"}
  # cleaning drops the flagged outlier examples; the quality scores rank dirty clients lower
  assert runs["cleaned"]["train_examples"] < runs["dirty"]["train_examples"]
  assert runs["cleaned+weights"]["mean_score_dirty"] < runs["cleaned+weights"]["mean_score_clean"]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs.values())
  assert (tmp_path / "dq.png").stat().st_size > 0
