"""Checkpoint / resume of ``fs.run``: a run killed with SIGKILL and resumed equals an uninterrupted
run bit for bit; unfinalized, incompatible and corrupt checkpoints are handled."""

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import testing

ROUNDS = 6
REPO = Path(__file__).resolve().parent.parent


def make_data():
  """The ``ragged_data`` fixture's population (12 ragged clients, 8 features, 4 classes)."""
  return testing.ragged_clients()


def make_eval():
  rng = np.random.default_rng(1)
  return {"x": rng.normal(size=(50, 8)).astype(np.float32), "y": rng.integers(0, 4, 50)}


def algo():
  # momentum on the clients and Adam on the server: the optimizer state has to be restored too
  return fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.9), optax.adam(0.01), batch_size=16)


def model(hidden=16):
  return fs.models.mlp(8, (hidden,), 4)


def run(rounds=ROUNDS, hidden=16, **kw):
  return fs.run(algo(), model(hidden), make_data(), rounds=rounds, cohort_size=5,
                eval_data=make_eval(), eval_every=2, seed=3, progress=False, **kw)


@pytest.fixture(scope="module")
def uninterrupted():
  return run()


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
  """A checkpoint directory after 2 of 6 rounds (steps 1 and 2); tests copy it."""
  ckpt = tmp_path_factory.mktemp("two_rounds") / "ckpt"
  # resume=True on a missing directory starts from scratch
  res = run(rounds=2, checkpoint_dir=str(ckpt), checkpoint_every=1, resume=True)
  assert res.history.num_rounds == 2
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["1", "2"]
  return ckpt


def copy_of(ckpt, tmp_path):
  return Path(shutil.copytree(ckpt, tmp_path / "ckpt"))


def assert_same(res, ref):
  assert int(res.state.round) == int(ref.state.round)
  fs.testing.assert_trees_close(res.params, ref.params, atol=0)
  fs.testing.assert_trees_close(res.state.opt_state, ref.state.opt_state, atol=0)
  assert set(res.history) == set(ref.history)
  for k in ref.history:
    if k != "seconds":
      np.testing.assert_array_equal(res.history[k], ref.history[k], err_msg=k)


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import test_checkpoint as t

    def callback(r, state, out):
      if r == 3:   # the round-2 checkpoint is written; hang until killed
        Path({marker!r}).write_text("3")
        time.sleep(600)

    t.run(checkpoint_dir={ckpt!r}, checkpoint_every=2, callback=callback)
    """)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, uninterrupted):
  ckpt, marker = tmp_path / "ckpt", tmp_path / "at_round_3"
  script = tmp_path / "child.py"
  script.write_text(CHILD.format(tests=str(REPO / "tests"), marker=str(marker), ckpt=str(ckpt)))
  # as many CPU devices as this process: results are bit-identical on the same device count
  # (and the same XLA flags as this process: conftest.py sets the backend optimisation level)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS":
         os.environ.get("XLA_FLAGS", "") +
         f" --xla_force_host_platform_device_count={__import__('jax').device_count()}"}
  log = tmp_path / "child.log"
  with open(log, "wb") as out:
    child = subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO, stdout=out,
                             stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while not (marker.exists() and (ckpt / "2").is_dir()):
      if child.poll() is not None:
        pytest.fail(f"child exited early ({child.returncode}):\n{log.read_text()}")
      assert time.monotonic() < deadline, "child never reached round 3"
      time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
  finally:
    if child.poll() is None:
      os.kill(child.pid, signal.SIGKILL)
      child.wait()
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2"]

  seen = []
  res = run(checkpoint_dir=str(ckpt), checkpoint_every=2, resume=True,
            callback=lambda r, s, o: seen.append(r))
  assert seen == [3, 4, 5, 6]
  assert_same(res, uninterrupted)
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [4, 6]  # keeps 2


@pytest.mark.slow
def test_unfinalized_step_is_ignored(tmp_path, two_rounds, uninterrupted):
  ckpt = copy_of(two_rounds, tmp_path)
  # what a process killed while saving round 4 leaves behind: orbax's temporary directory
  tmp = ckpt / "4.orbax-checkpoint-tmp-1700000000000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage")
  (tmp / "meta").mkdir()
  (tmp / "meta" / "metadata").write_text('{"round": 4, "records": [')
  seen = []
  res = run(checkpoint_dir=str(ckpt), checkpoint_every=2, resume=True,
            callback=lambda r, s, o: seen.append(r))
  assert seen == [3, 4, 5, 6]
  assert_same(res, uninterrupted)
  assert not tmp.exists()   # stale temporary directories are cleaned up on open
  # resuming a finished run trains nothing and returns the same result
  again = run(checkpoint_dir=str(ckpt), resume=True, callback=lambda *a: pytest.fail("trained"))
  assert_same(again, uninterrupted)


def test_incompatible_or_misused_checkpoint_is_rejected(tmp_path, two_rounds):
  ckpt = str(copy_of(two_rounds, tmp_path))
  with pytest.raises(ValueError, match=r"was written for a different experiment: .*params"):
    run(hidden=32, checkpoint_dir=ckpt, resume=True)
  with pytest.raises(ValueError, match=r"different experiment: .*seed: checkpoint has 3, this "
                                       r"run has 4"):
    fs.run(algo(), model(), make_data(), rounds=6, cohort_size=5, seed=4, checkpoint_dir=ckpt,
           resume=True)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    run(checkpoint_dir=ckpt)
  with pytest.raises(ValueError, match="past rounds=1"):
    run(rounds=1, checkpoint_dir=ckpt, resume=True)


# after a failed read orbax leaves reads in flight that later call into its closed event loop
# ("Exception ignored ... Event loop is closed"): harmless, waited for and ignored here
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item", ["meta", "state", "state/d"])   # state/d: the array data
def test_corrupt_finalized_step_falls_back(tmp_path, two_rounds, uninterrupted, item):
  """A truncated newest step is detected; the run resumes from the older intact step (with a
  warning) and still equals the uninterrupted run. With every step corrupt, a clear error."""
  ckpt = copy_of(two_rounds, tmp_path)
  for step in ("2", "1"):
    for f in (ckpt / step / item).rglob("*"):
      if f.is_file() and f.name != "commit_success.txt":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    if step == "2":
      backup = Path(shutil.copytree(ckpt, tmp_path / "one_corrupt"))
  with pytest.raises(ValueError, match=rf"no intact checkpoint in {ckpt}: checkpoint "
                                       rf"{ckpt / '2'} is corrupt.*checkpoint {ckpt / '1'} is "
                                       "corrupt"):
    run(checkpoint_dir=str(ckpt), resume=True)
  seen = []
  with pytest.warns(UserWarning, match=rf"checkpoint {backup / '2'} is corrupt.*newest intact "
                                       "step, round 1"):
    res = run(checkpoint_dir=str(backup), checkpoint_every=1, resume=True,
              callback=lambda r, s, o: seen.append(r))
  assert seen == [2, 3, 4, 5, 6]
  assert_same(res, uninterrupted)
  assert [p.name.split("-")[1] for p in backup.iterdir() if p.name.startswith("corrupt-")] == ["2"]
  time.sleep(0.5)   # let orbax's pending reads finish inside this test
  gc.collect()


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_bad_checkpoint_every(tmp_path, bad):
  with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
    run(checkpoint_dir=str(tmp_path), checkpoint_every=bad)


MESH_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import test_checkpoint as t
    assert jax.device_count() == 2
    ref = t.run(rounds=4, num_devices=2)
    t.run(rounds=2, checkpoint_dir={ckpt!r}, num_devices=2)
    res = t.run(rounds=4, checkpoint_dir={ckpt!r}, resume=True, num_devices=2)
    t.assert_same(res, ref)
    print("OK")
    """)


@pytest.mark.slow
def test_resume_on_a_device_mesh(tmp_path):
  """Restored arrays can feed the round sharded over 2 (forced CPU) devices."""
  script = tmp_path / "child.py"
  script.write_text(MESH_CHILD.format(tests=str(REPO / "tests"), ckpt=str(tmp_path / "ckpt")))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
         " --xla_force_host_platform_device_count=2"}
  res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
  assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def _changed(kind):
  """``run`` keyword arguments of an experiment that differs from ``run()``'s in one way."""
  import dataclasses as dc

  from fedjax_sim.aggregators import robust
  base = algo()
  data = make_data()
  if kind == "client lr":
    return {"algorithm": fs.algorithms.fedavg(optax.sgd(0.2, momentum=0.9), optax.adam(0.01),
                                              batch_size=16)}
  if kind == "client momentum":
    return {"algorithm": fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.5), optax.adam(0.01),
                                              batch_size=16)}
  if kind == "server lr":
    return {"algorithm": fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.9), optax.adam(0.02),
                                              batch_size=16)}
  if kind == "batch size":
    return {"algorithm": fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.9), optax.adam(0.01),
                                              batch_size=8)}
  if kind == "local epochs":
    return {"algorithm": fs.algorithms.fedavg(optax.sgd(0.1, momentum=0.9), optax.adam(0.01),
                                              batch_size=16, local_epochs=2)}
  if kind == "weighting":
    return {"algorithm": dc.replace(base, weighting="uniform")}
  if kind == "aggregator":
    return {"algorithm": dc.replace(base, aggregator=robust.norm_bounded_mean(1.0))}
  if kind == "update transform":
    return {"algorithm": dc.replace(base, update_transform=fs.transforms.clip_by_norm(1.0))}
  if kind == "labels":
    y = data.arrays["y"].copy()
    y[:5] = (y[:5] + 1) % 4
    return {"train_data": fs.FederatedData({**data.arrays, "y": y}, data.offsets,
                                           data.client_ids, 4)}
  if kind == "partition":   # the same examples, one moved to the next client
    off = data.offsets.copy()
    off[1] += 1
    return {"train_data": fs.FederatedData(data.arrays, off, data.client_ids, 4)}
  if kind == "eval data":
    ev = make_eval()
    ev["x"] = ev["x"] * 2
    return {"eval_data": ev}
  if kind == "heterogeneity":
    return {"heterogeneity": fs.Heterogeneity(straggler_fraction=0.5)}
  if kind == "hparams":
    return {"hparams": {"client_lr_scale": 0.5}}
  if kind == "client weights":
    return {"client_weights": np.arange(1, 13, dtype=np.float64)}
  if kind == "cohort sampling":
    return {"cohort_sampling": "size"}
  if kind == "init params":
    return {"init_params": model().init(__import__("jax").random.key(7))}
  raise AssertionError(kind)


# kind -> the fingerprint key the error must name
CHANGES = {"client lr": "algorithm.client_optimizer", "client momentum":
           "algorithm.client_optimizer", "server lr": "algorithm.server_optimizer",
           "batch size": "algorithm.work.batch_size", "local epochs":
           "algorithm.work.local_epochs", "weighting": "algorithm.weighting",
           "aggregator": "algorithm.aggregator", "update transform": "algorithm.update_transform",
           "labels": "data.feature y", "partition": "data.sizes", "eval data": "eval_data.x",
           "heterogeneity": "heterogeneity", "hparams": "hparams",
           "client weights": "client_weights", "cohort sampling": "cohort_sampling",
           "init params": "init_params"}


@pytest.mark.parametrize("kind", list(CHANGES))
def test_resume_refuses_a_changed_experiment(tmp_path, two_rounds, kind):
  ckpt = str(copy_of(two_rounds, tmp_path))
  kw = {"algorithm": algo(), "model": model(), "train_data": make_data(), "rounds": 6,
        "cohort_size": 5, "eval_data": make_eval(), "eval_every": 2, "seed": 3,
        "progress": False, **_changed(kind)}
  with pytest.raises(ValueError, match=r"was written for a different experiment: .*"
                                       + CHANGES[kind].replace(".", r"\.")):
    fs.run(checkpoint_dir=ckpt, resume=True, **kw)


def test_fingerprint_is_stable_and_names_hyperparameters():
  """Two separately built identical experiments give the same fingerprint; the difference of
  a learning rate is named with both values."""
  from fedjax_sim import checkpoint, engine
  state = engine.init_state(algo(), model().init(__import__("jax").random.key(0)), 12)

  def fp(a):
    return checkpoint.fingerprint(state, algorithm=a, population=12, num_examples=1,
                                  cohort_size=5, seed=3, data=make_data(), model=model(),
                                  eval_data=make_eval(), experiment={"client_lr": 0.1})
  assert fp(algo()) == fp(algo())
  other = fs.algorithms.fedavg(optax.sgd(0.3, momentum=0.9), optax.adam(0.01), batch_size=16)
  (diff,) = checkpoint.differences(fp(algo()), fp(other))
  assert "algorithm.client_optimizer" in diff and "-0.1" in diff and "-0.3" in diff, diff


@pytest.mark.slow
def test_resume_override_is_recorded(tmp_path, two_rounds):
  """resume='override' accepts the changed experiment, warns, marks the round in the history
  and keeps the change in later checkpoints; a structural change is refused even then."""
  ckpt = str(copy_of(two_rounds, tmp_path))
  changed = _changed("client lr")["algorithm"]

  def go(rounds, resume, **kw):
    return fs.run(changed, model(), make_data(), rounds=rounds, cohort_size=5,
                  eval_data=make_eval(), eval_every=2, seed=3, progress=False,
                  checkpoint_dir=ckpt, checkpoint_every=2, resume=resume, **kw)
  with pytest.warns(UserWarning, match=r"changed experiment \(override\): "
                                       r"algorithm\.client_optimizer"):
    res = go(4, "override")
  marks = res.history["resumed_with_changes"]   # NaN: not marked
  assert marks[2] == 1.0 and np.isnan(marks[[0, 1, 3]]).all(), marks
  assert [o["round"] for o in res.overrides] == [2]
  assert "algorithm.client_optimizer" in res.overrides[0]["changes"][0]
  # the checkpoint now carries the new experiment: resuming it needs no override, and the
  # override stays on record
  res2 = go(6, True)
  assert [o["round"] for o in res2.overrides] == [2]
  assert res2.history["resumed_with_changes"][2] == 1.0
  with pytest.raises(ValueError, match="which no override can resume"):
    fs.run(changed, model(hidden=32), make_data(), rounds=6, cohort_size=5,
           eval_data=make_eval(), eval_every=2, seed=3, progress=False, checkpoint_dir=ckpt,
           resume="override")
  with pytest.raises(ValueError, match=r"\(state differ\), which no override can resume: .*"
                                       r"hparams"):   # another state tree: nothing to read into
    go(6, "override", hparams={"client_lr_scale": 0.5})
  assert sorted(p.name for p in Path(ckpt).iterdir() if p.name.isdigit()) == ["4", "6"]
  with pytest.raises(ValueError, match="resume must be True, False or 'override'"):
    go(6, "force")


def test_second_writer_on_a_directory_gets_a_clear_error(tmp_path):
  """The directory lock: a second Checkpointer (here in the same process, which flock treats
  like another process) is refused without touching the first one's files, and the lock is
  released on close."""
  from fedjax_sim import checkpoint
  d = tmp_path / "ckpt"
  tmp = d / "5.orbax-checkpoint-tmp-1700000000000000"
  with checkpoint.Checkpointer(d):
    tmp.mkdir(parents=True)   # the first writer's step in progress
    with pytest.raises(checkpoint.CheckpointInUse,
                       match=rf"checkpoint_dir {d} is in use by another run \(process "
                             rf"{os.getpid()} "):
      checkpoint.Checkpointer(d)
    with pytest.raises(ValueError, match="is in use by another run"):
      run(rounds=2, checkpoint_dir=str(d), resume=True)
    assert tmp.is_dir()
  with checkpoint.Checkpointer(d):   # released
    pass
