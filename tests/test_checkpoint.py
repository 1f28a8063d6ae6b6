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
  assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2"]
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
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
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
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item", ["meta", "state", "state/d"])   # state/d: the array data
def test_corrupt_finalized_step_raises(tmp_path, two_rounds, item):
  ckpt = copy_of(two_rounds, tmp_path)
  for f in (ckpt / "2" / item).rglob("*"):
    if f.is_file() and f.name != "commit_success.txt":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match=rf"checkpoint {ckpt / '2'} is corrupt"):
    run(checkpoint_dir=str(ckpt), resume=True)
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
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
  assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]
