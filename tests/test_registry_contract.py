"""One contract for every registered algorithm, aggregator and update transform.

Each entry (an algorithm on its own; an aggregator or a transform plugged into FedAvg) runs on a
tiny ragged population and must:
- equal the sequential reference :func:`fedjax_sim.testing.sequential_run` where one is defined
  (every synchronous algorithm, every transform, the mean aggregator);
- trace once: the model's ``apply`` is traced while the first round compiles, never again;
- run inside ``lax.scan``: ``rounds_per_call=3`` gives the result of three single rounds;
- be chunk-size invariant: ``chunk_size`` 1, 3 and the default give the same model;
- keep the params' dtype (float32 and bfloat16);
- be device-count invariant: 1 vs 2 devices (in a 2-CPU-device process, see
  ``test_device_count_invariance_in_a_two_device_process``);
and every registered algorithm runs from a TOML config through the command line.
Each check costs a compile (~1 s per entry on a quiet CPU): the first two run in the fast suite,
the others are marked slow.

A new registry entry with required options needs its example options in ``EXAMPLES``
(``test_every_entry_has_an_example`` says which).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli, testing

ROUNDS, COHORT = 3, 5
LOCAL = dict(batch_size=4, local_steps=3)
# Small options for entries that need some (a new entry with required options goes here).
EXAMPLES = {
    ("algorithm", "fedprox"): {"mu": 0.1},
    ("algorithm", "fedbuff"): {"concurrency": 4, "buffer_size": 2, "max_staleness": 4},
    ("aggregator", "trimmed_mean"): {"beta": 0.2},
    ("aggregator", "krum"): {"num_byzantine": 1},
    ("aggregator", "norm_bounded_mean"): {"max_norm": 0.5},
    ("aggregator", "secure_sum"): {"clip": 1.0},
    ("transform", "clip_by_norm"): {"max_norm": 0.5},
    ("transform", "top_k"): {"fraction": 0.3},
    ("transform", "stochastic_quantize"): {"bits": 4},
    ("transform", "hadamard_quantize"): {"bits": 4},
    ("transform", "sign_flip_attack"): {"fraction": 0.4, "seed": 1},
    ("transform", "scale_attack"): {"fraction": 0.4, "factor": 3.0, "seed": 1},
    ("transform", "gaussian_attack"): {"fraction": 0.4, "std": 0.1, "seed": 1},
    ("transform", "local_gaussian_noise"): {"noise_multiplier": 0.1, "clip_norm": 1.0},
}
REGISTRIES = {"algorithm": fs.algorithms.REGISTRY, "aggregator": fs.aggregators.REGISTRY,
              "transform": fs.transforms.REGISTRY}
ENTRIES = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg]
IDS = [f"{kind}-{name}" for kind, name in ENTRIES]
# No sequential reference: asynchronous algorithms, aggregators other than the mean.
NO_REFERENCE = {("algorithm", "fedbuff")} | {
    ("aggregator", n) for n in fs.aggregators.REGISTRY if n != "mean"}


def _data():
  return testing.ragged_clients(sizes=(1, 3, 7, 12, 20, 5, 9, 2))


def _counted_model(dtype=None):
  """A logistic regression whose ``apply`` counts its traces; params cast to ``dtype``."""
  base = fs.models.logistic_regression(8, 4)
  traces = []

  def apply(params, x):
    traces.append(1)   # a Python side effect: runs when traced, not when a compiled call runs
    return base.apply(params, x)

  init = base.init if dtype is None else (
      lambda k: jax.tree.map(lambda p: p.astype(dtype), base.init(k)))
  return dataclasses.replace(base, apply=apply, init=init), traces


def _algorithm_with(name: str, **options):
  """Algorithm ``name`` from the registry with an SGD(0.1) client (every factory takes
  ``client_optimizer`` first)."""
  return fs.algorithms.REGISTRY.make(name, client_optimizer=optax.sgd(0.1), **LOCAL, **options)


def _plugged(part: str, value):
  """FedAvg with ``part`` (aggregator / update_transform) set through its keyword."""
  return _algorithm_with("fedavg", **{part: value})


def build(kind: str, name: str):
  options = EXAMPLES.get((kind, name), {})
  if kind == "algorithm":
    return _algorithm_with(name, **options)
  if kind == "aggregator":
    if name == "ckks_mean":
      pytest.importorskip("tenseal", reason="ckks_mean needs the 'he' extra (TenSEAL)")
    return _plugged("aggregator", fs.aggregators.REGISTRY.make(name, **options))
  return _plugged("update_transform", fs.transforms.REGISTRY.make(name, **options))


def _is_async(algo) -> bool:
  return isinstance(algo, fs.asynchronous.AsyncConfig)


def _run(algo, model, *, rounds_per_call=1, chunk_size=None, num_devices=None, callback=None):
  if _is_async(algo):
    return fs.run_async(algo, model, _data(), server_steps=ROUNDS, steps_per_call=rounds_per_call,
                        chunk_size=chunk_size, seed=1, progress=False, callback=callback)
  return fs.run(algo, model, _data(), rounds=ROUNDS, cohort_size=COHORT, seed=1,
                rounds_per_call=rounds_per_call, chunk_size=chunk_size, num_devices=num_devices,
                progress=False, callback=callback)


def _dtypes(tree):
  return [jnp.asarray(a).dtype for a in jax.tree.leaves(tree)]


_BASE: dict = {}


def _base(kind: str, name: str):
  """``(algorithm, model, result, traces seen after each round)`` of the reference run: 3 rounds
  of one round per call, chunks of 3 (the cohort of 5 ends in a partial chunk). Cached: the
  slow invariance tests compare against it."""
  if (kind, name) not in _BASE:
    algo = build(kind, name)
    model, traces = _counted_model()
    seen = []
    res = _run(algo, model, chunk_size=3,
               callback=lambda r, state, out: seen.append(len(traces)))
    _BASE[kind, name] = algo, model, res, seen
  return _BASE[kind, name]


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
def test_contract(kind, name):
  """Traces once, finite, learns something, keeps float32, equals the sequential reference."""
  algo, model, base, seen = _base(kind, name)
  assert len(seen) == ROUNDS and seen[0] > 0
  assert seen[-1] == seen[0], f"{name}: model traced again after round 1 ({seen})"
  assert np.all(np.isfinite(np.asarray(base.history["train_loss"])))
  assert _dtypes(base.params) == _dtypes(model.init(jax.random.key(0)))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), base.params,
                       model.init(jax.random.split(jax.random.key(1))[0]))
  assert max(jax.tree.leaves(moved)) > 0, f"{name}: the model did not change"
  if (kind, name) not in NO_REFERENCE:
    ref, _ = testing.sequential_run(algo, model, _data(), rounds=ROUNDS, cohort_size=COHORT,
                                    seed=1)
    testing.assert_trees_close(base.params, ref.params, atol=1e-5)


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
@pytest.mark.slow
def test_scan_and_chunk_size_invariance(kind, name):
  """Rounds inside ``lax.scan`` (3 per call) with chunks of 1 give the reference run's model
  (one run checks both: the reference runs one round per call in chunks of 3)."""
  algo, model, base, _ = _base(kind, name)
  scanned = _run(algo, model, rounds_per_call=ROUNDS, chunk_size=1)
  testing.assert_trees_close(scanned.params, base.params, atol=1e-5)


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
@pytest.mark.slow
def test_bfloat16_params_stay_bfloat16(kind, name):
  model, _ = _counted_model(jnp.bfloat16)
  res = _run(build(kind, name), model)
  assert set(_dtypes(res.params)) == {jnp.dtype(jnp.bfloat16)}
  assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree.leaves(res.params))


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (run by the test below)")
def test_device_count_invariance(kind, name):
  algo = build(kind, name)
  if _is_async(algo):
    pytest.skip("fs.run_async runs on one device")
  if kind == "transform":
    pytest.skip("transforms are per client: the devices only split the cohort")
  model, _ = _counted_model()
  one = _run(algo, model, num_devices=1, chunk_size=3)
  two = _run(algo, model, num_devices=2, chunk_size=3)
  testing.assert_trees_close(two.params, one.params, atol=1e-5)


@pytest.mark.slow
def test_device_count_invariance_in_a_two_device_process():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:randomly",
                        "-p", "no:cacheprovider", "-n", "0", "-k", "test_device_count_invariance "
                        "and not process"], env=env, capture_output=True, text=True)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  synchronous = sum(not _is_async(build(k, n)) and k != "transform" for k, n in ENTRIES)
  assert f"{synchronous} passed" in res.stdout, res.stdout[-2000:]


def test_every_entry_has_an_example():
  """Entries with required options need example options above; no stale examples."""
  def required(kind, name):
    return [o.name for o in REGISTRIES[kind].schema(name).values() if o.required]
  missing = [f"{kind} {name} ({', '.join(required(kind, name))})" for kind, name in ENTRIES
             if (kind, name) not in EXAMPLES and required(kind, name)]
  assert not missing, f"add example options to EXAMPLES for {missing}"
  assert set(EXAMPLES) <= set(ENTRIES), set(EXAMPLES) - set(ENTRIES)


# ------------------------------------------------------------------ every algorithm from TOML

def _toml_value(v):
  return json.dumps(v) if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) \
      else repr(v)


@pytest.mark.parametrize("name", list(fs.algorithms.REGISTRY))
@pytest.mark.slow
def test_algorithm_runs_from_a_toml_config(tmp_path, name):
  options = "".join(f"{k} = {_toml_value(v)}\n"
                    for k, v in EXAMPLES.get(("algorithm", name), {}).items())
  (tmp_path / "exp.toml").write_text(f"""
dataset = "digits"
num_clients = 10
model = "logistic_regression"
rounds = 2
cohort_size = 4
eval_every = 2
progress = false

[algorithm]
name = "{name}"
{options}
[local]
steps = 2
batch_size = 8
""")
  out = tmp_path / "run"
  assert cli.main(["run", "--config", str(tmp_path / "exp.toml"), "--out", str(out)]) == 0
  resolved = tomllib.loads((out / "config.toml").read_text())
  assert resolved["algorithm"]["name"] == name
  for k, v in EXAMPLES.get(("algorithm", name), {}).items():
    assert resolved["algorithm"][k] == v
  h = json.loads((out / "history.json").read_text())
  assert len(h["round"]) == 2 and h["test_accuracy"][-1] is not None
