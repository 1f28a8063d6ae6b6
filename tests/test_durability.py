"""Nothing lost, nothing silently wrong: a fault matrix run in subprocesses with a tiny model.

* kills: a run (API and CLI, with ``--client-eval``) is SIGKILLed at a chosen point (between
  rounds, in the middle of writing a checkpoint, just before orbax's final rename, just after a
  checkpoint, while writing the final model), then resumed; the resumed params and history equal
  an uninterrupted run's bit for bit;
* corruptions: a byte flipped in, the truncation of, or the deletion of every file of a saved
  step is detected (the step falls back to the older intact one) or provably harmless (the state
  and history read back are identical), never silently wrong;
* concurrent writers: a second run on a live run's checkpoint folder or output folder gets a clear
  error and leaves the first one's files alone.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint, cli, engine

import test_checkpoint as t   # the tiny experiment: 12 ragged clients, MLP, 6 rounds

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import asyncio, json, os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    spec = json.loads({spec!r})
    kill, k = spec["kill"], spec["round"]

    def die():
      Path(spec["marker"]).write_text(kill)
      os.kill(os.getpid(), signal.SIGKILL)

    from orbax.checkpoint._src.path import async_path
    import fedjax_sim as fs
    if kill == "mid_save":          # orbax has written part of step k's temporary directory
      write_text = async_path.write_text
      async def patched(path, text, *a, **kw):
        if f"/{{k}}.orbax-checkpoint-tmp" in str(path):
          die()
        return await write_text(path, text, *a, **kw)
      async_path.write_text = patched
    elif kill == "before_rename":   # every file of step k written, not yet renamed into place
      rename = async_path.rename
      async def patched(src, dst, *a, **kw):
        if Path(str(dst)).name == str(k):
          die()
        return await rename(src, dst, *a, **kw)
      async_path.rename = patched
    elif kill == "after_save":      # step k finalized
      save = fs.checkpoint.Checkpointer.save
      def patched(self, step, *a, **kw):
        save(self, step, *a, **kw)
        if step == k:
          die()
      fs.checkpoint.Checkpointer.save = patched
    elif kill == "final_params":    # the run is over; writing its outputs
      def patched(*a, **kw):
        die()
      fs.checkpoint.save_params = patched
    elif kill == "hang":            # stays alive (holding its locks) at round k
      pass

    def callback(r, state, out):
      if kill == "round" and r == k:   # round k trained, its checkpoint not written
        die()
      if kill == "hang" and r == k:
        Path(spec["marker"]).write_text("hang")
        time.sleep(600)

    if spec.get("cli"):
      from fedjax_sim import cli
      sys.exit(cli.main(spec["cli"]))
    import test_checkpoint as t
    t.run(checkpoint_dir=spec["ckpt"], checkpoint_every=1, callback=callback)
    print("FINISHED")
    """)


def same_devices(env):
  """``env`` for a child with as many CPU devices as this process (results are bit-identical
  only on the same device count; an earlier in-process CLI run may have split the CPU)."""
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**env, "XLA_FLAGS": " ".join(
      flags + [f"--xla_force_host_platform_device_count={jax.device_count()}"])}


def start_child(tmp_path, kill, k, *, ckpt=None, cli_args=None, name="child"):
  marker = tmp_path / f"{name}.marker"
  spec = json.dumps({"kill": kill, "round": k, "ckpt": str(ckpt), "cli": cli_args,
                     "marker": str(marker)})
  script = tmp_path / f"{name}.py"
  script.write_text(CHILD.format(tests=str(REPO / "tests"), spec=spec))
  env = same_devices({**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
  log = tmp_path / f"{name}.log"
  with open(log, "wb") as out:
    child = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, stdout=out,
                             stderr=subprocess.STDOUT)
  return child, marker, log


def run_killed_child(tmp_path, kill, k, **kw):
  """Runs the child until it kills itself at ``kill``/``k``; asserts it did."""
  child, marker, log = start_child(tmp_path, kill, k, **kw)
  try:
    rc = child.wait(300)
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert rc == -signal.SIGKILL and marker.read_text() == kill, (rc, log.read_text()[-3000:])


def step_dirs(ckpt):
  return sorted(int(p.name) for p in Path(ckpt).iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted():
  return t.run()


# kill point, round, finalized steps expected on disk afterwards (max_to_keep=2)
API_KILLS = [("round", 1, []), ("round", 4, [2, 3]), ("mid_save", 3, [1, 2]),
             ("before_rename", 4, [2, 3]), ("after_save", 6, [5, 6])]


@pytest.mark.slow   # test_concurrent_writers_get_a_clear_error kills and resumes a run too
@pytest.mark.parametrize("kill, k, steps", API_KILLS)
def test_api_kill_then_resume_is_bit_identical(tmp_path, uninterrupted, kill, k, steps):
  ckpt = tmp_path / "ckpt"
  run_killed_child(tmp_path, kill, k, ckpt=ckpt)
  assert step_dirs(ckpt) == steps
  seen = []
  res = t.run(checkpoint_dir=str(ckpt), checkpoint_every=1, resume=True,
              callback=lambda r, s, o: seen.append(r))
  assert seen == list(range((steps or [0])[-1] + 1, t.ROUNDS + 1))
  t.assert_same(res, uninterrupted)


def cli_args(out, ckpt, *extra):
  return ["run", "--dataset", "digits", "--num-clients", "12", "--cohort-size", "4",
          "--rounds", "4", "--eval-every", "2", "--model", "logistic_regression",
          "--batch-size", "16", "--client-lr", "0.1", "--client-eval", "--no-progress",
          "--cpu-devices", str(jax.device_count()),
          "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--out", str(out), *extra]


def read_outputs(out):
  h = json.loads((out / "history.json").read_text())
  h.pop("seconds")
  params = checkpoint.load_params(out / "final_params.msgpack")
  return h, params


@pytest.fixture(scope="module")
def cli_uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli_ref")
  assert cli.main(cli_args(d / "out", d / "ckpt")) == 0
  return read_outputs(d / "out")


@pytest.mark.parametrize("kill, k", [("after_save", 3), pytest.param("mid_save", 2,
                                                                     marks=pytest.mark.slow),
                                     pytest.param("final_params", 0, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_cli_client_eval_kill_then_resume_is_bit_identical(tmp_path, cli_uninterrupted, kill, k):
  """--client-eval columns of rounds before the kill come back from the checkpoint."""
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  run_killed_child(tmp_path, kill, k, cli_args=cli_args(out, ckpt))
  assert not (out / "history.json").exists()
  assert cli.main(cli_args(out, ckpt, "--resume", "--overwrite")) == 0
  h, params = read_outputs(out)
  ref_h, ref_params = cli_uninterrupted
  assert h == ref_h
  assert h["client_accuracy_p50"][1] is not None and h["client_accuracy_p50"][0] is None
  fs.testing.assert_trees_close(params, ref_params, atol=0)
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_concurrent_writers_get_a_clear_error(tmp_path, uninterrupted, capsys):
  """A live run holds its checkpoint folder: a second run there is refused (its half-written
  step is left alone); once the first is killed, the folder resumes bit-identical. A second CLI
  run into a live run's --out folder is refused too, even with --overwrite."""
  ckpt = tmp_path / "ckpt"
  child, marker, log = start_child(tmp_path, "hang", 3, ckpt=ckpt)
  try:
    deadline = time.monotonic() + 300
    while not marker.exists():
      assert child.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.05)
    fake_tmp = ckpt / "3.orbax-checkpoint-tmp-1700000000000000"   # as if mid-save
    fake_tmp.mkdir()
    with pytest.raises(checkpoint.CheckpointInUse, match=rf"checkpoint_dir {ckpt} is in use by "
                                                         rf"another run \(process {child.pid} "):
      t.run(checkpoint_dir=str(ckpt), checkpoint_every=1, resume=True)
    assert fake_tmp.is_dir() and step_dirs(ckpt) == [1, 2]
  finally:
    child.kill()
    child.wait()
  res = t.run(checkpoint_dir=str(ckpt), checkpoint_every=1, resume=True)
  t.assert_same(res, uninterrupted)
  assert not fake_tmp.exists()   # stale now: cleaned up by the run that holds the lock

  out = tmp_path / "out"
  folder, fd = cli.make_out_folder(str(out), overwrite=False)
  try:
    assert cli.main(cli_args(out, tmp_path / "ck2", "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"output folder {str(out)!r} is in use by another run" in err[0]
  finally:
    os.close(fd)


# ------------------------------------------------------------------------------ corruptions

def _corrupt(path: Path, how: str):
  if how == "delete":
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  elif how == "digit":   # a digit past the middle changed: still valid JSON, another value
    b = bytearray(path.read_bytes())
    i = next(i for i in range(len(b) // 2, len(b)) if chr(b[i]).isdigit())
    b[i] = ord("0") + (b[i] - ord("0") + 1) % 10
    path.write_bytes(bytes(b))
  elif how == "truncate":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  else:   # flip one byte in the middle
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def corruption_outcomes(src: Path, tmp_path: Path, cases):
  """For each ``(relative path in step 2, how)``: ``"fell back"`` (step 1 restored with a
  warning), ``"harmless"`` (step 2 restored, identical to the pristine read) or a failure."""
  like = engine.init_state(t.algo(), t.model(HIDDEN).init(jax.random.key(0)), 12)
  with checkpoint.Checkpointer(src) as c:
    ref_state, ref_records, _ = c.restore(like)
  outcomes = {}
  for i, (rel, how) in enumerate(cases):
    d = Path(shutil.copytree(src, tmp_path / f"c{i}"))
    _corrupt(d / "2" / rel, how)
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter("always")
      try:
        with checkpoint.Checkpointer(d) as c:
          state, records, _ = c.restore(like)
      except Exception as e:  # noqa: BLE001
        outcomes[(rel, how)] = f"crashed: {type(e).__name__}: {e}"
        continue
    fell_back = [str(x.message) for x in w if "newest intact step, round 1" in str(x.message)]
    if fell_back and int(state.round) == 1 and len(records) == 1 and step_dirs(d) == [1]:
      by_digest = "match its digest" in fell_back[0] or "match their digest" in fell_back[0]
      outcomes[(rel, how)] = "fell back (digest)" if by_digest else "fell back"
    elif not fell_back and records == ref_records and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state))):
      outcomes[(rel, how)] = "harmless"
    else:
      outcomes[(rel, how)] = "silently wrong"
  time.sleep(0.3)   # let orbax's pending reads of failed restores finish inside this test
  gc.collect()
  return outcomes


# hidden units of the corrupted checkpoints' MLP: large enough for orbax to write the arrays as
# raw compressed chunks outside its checksummed b-tree (a flipped byte there decodes fine)
HIDDEN = 256


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("two_steps") / "ckpt"
  t.run(rounds=2, hidden=HIDDEN, checkpoint_dir=str(ckpt), checkpoint_every=1)
  return ckpt


def _largest_file(step: Path) -> str:
  return str(max((p for p in (step / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size).relative_to(step))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_state_and_meta_fall_back(tmp_path, two_steps):
  """A flipped byte in the arrays' data decodes without error: only the digest catches it."""
  cases = [(_largest_file(two_steps / "2"), "flip"), ("meta/metadata", "digit"),
           ("state/manifest.ocdbt", "delete")]
  outcomes = corruption_outcomes(two_steps, tmp_path, cases)
  assert list(outcomes.values()) == ["fell back (digest)", "fell back (digest)", "fell back"], \
      outcomes


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corruption_matrix(tmp_path, two_steps):
  """Every file of a step flipped, truncated or deleted, and each item folder deleted: each
  falls back or is harmless; none is silently wrong or crashes. Prints the figure."""
  step = two_steps / "2"
  files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
  cases = [(f, how) for f in files for how in ("flip", "truncate", "delete")]
  cases += [("state", "delete"), ("meta", "delete"), ("meta/metadata", "digit")]
  outcomes = corruption_outcomes(two_steps, tmp_path, cases)
  counts = {v: sum(o == v for o in outcomes.values()) for v in set(outcomes.values())}
  print(f"\ncorruptions: {len(cases)}; {counts}")
  bad = {k: v for k, v in outcomes.items() if not v.startswith(("fell back", "harmless"))}
  assert not bad, bad
  for (rel, how), v in sorted(outcomes.items()):
    print(f"{v:10s} {how:8s} {rel}")
  # the files the arrays and the history are read from are never harmless to damage (orbax
  # merges the per-process ocdbt.process_0/ data into state/d/ and state/manifest.ocdbt)
  for (rel, how), v in outcomes.items():
    if rel.startswith(("meta/metadata", "state/d/", "state/manifest.ocdbt")) or how == "delete" \
        and rel in ("state", "meta"):
      assert v.startswith("fell back"), (rel, how, v)
  assert outcomes[(_largest_file(step), "flip")] == "fell back (digest)"
  assert outcomes[("meta/metadata", "digit")] == "fell back (digest)"


# ------------------------------------------------------------------------ output folders/files

def test_default_out_folders_are_unique(tmp_path, monkeypatch):
  """Runs started in the same second get runs/<stamp>, <stamp>-2, ...; created exclusively, so
  8 threads racing get 8 different folders."""
  import datetime as dt
  import threading

  class Frozen(dt.datetime):
    @classmethod
    def now(cls, tz=None):
      return dt.datetime(2026, 1, 2, 3, 4, 5)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(cli.datetime, "datetime", Frozen)
  got, lock = [], threading.Lock()

  def make():
    try:
      folder, fd = cli.make_out_folder(None, overwrite=False)
    except Exception as e:  # noqa: BLE001 -- reported by the assertion below
      folder, fd = e, None
    with lock:
      got.append((folder, fd))
  threads = [threading.Thread(target=make) for _ in range(8)]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  assert not [f for f, fd in got if fd is None], got
  names = sorted(f.name for f, _ in got)
  assert names == sorted(["20260102-030405"] + [f"20260102-030405-{i}" for i in range(2, 9)])
  for _, fd in got:
    os.close(fd)


@pytest.mark.slow
def test_cli_out_folder_final_params_and_resume_override(tmp_path, capsys):
  """A non-empty --out is refused (its files untouched) unless --overwrite; the final model is
  saved and reads back to the reported accuracy; --resume with another learning rate is refused
  naming it, --resume-override accepts it and records the change."""
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  args = ["run", "--dataset", "digits", "--num-clients", "12", "--cohort-size", "4",
          "--rounds", "2", "--eval-every", "2", "--model", "logistic_regression", "--no-progress",
          "--cpu-devices", str(jax.device_count()), "--checkpoint-dir", str(ckpt),
          "--out", str(out)]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"output folder {str(out)!r} is not empty (holds notes.txt)" in err[0]
  assert "--overwrite" in err[0] and not ckpt.exists()
  assert cli.main(args + ["--overwrite"]) == 0
  assert (out / "notes.txt").read_text() == "mine"
  h = json.loads((out / "history.json").read_text())
  model = fs.models.make("logistic_regression", (64,), 10)
  params = checkpoint.load_params(out / "final_params.msgpack", like=model.init(jax.random.key(0)))
  test = fs.datasets.digits()[1]
  acc = fs.evaluation.make_evaluate(model, 1000)(params, test["x"], test["y"])["accuracy"]
  assert float(acc) == pytest.approx(h["test_accuracy"][-1], abs=1e-6)
  capsys.readouterr()

  more = ["--rounds", "3", "--client-lr", "0.2", "--overwrite", "--resume"]
  assert cli.main(args + more) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "different experiment" in err[0], err
  assert "experiment.algorithm.client_lr: checkpoint has 0.05, this run has 0.2" in err[0]
  # The command line reports warnings as `warning:` lines on stderr (one each).
  assert cli.main(args + more + ["--resume-override"]) == 0
  err = capsys.readouterr().err
  assert any(line.startswith("warning:") and "changed experiment" in line
             for line in err.splitlines()), err
  h = json.loads((out / "history.json").read_text())
  assert h["resumed_with_changes"] == [None, None, 1.0]
  (o,) = json.loads((out / "config.json").read_text())["resume_overrides"]
  assert o["round"] == 2 and any("client_lr" in c for c in o["changes"])


def test_atomic_write_keeps_the_old_file_and_names_the_new(tmp_path):
  """A write that fails part-way (file size limit standing in for a full disk) leaves the old
  file whole and no temporary file; the error names the file."""
  import resource

  from fedjax_sim import files
  p = tmp_path / "history.json"
  files.write_text(p, "old")
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))   # Python ignores SIGXFSZ: EFBIG
  try:
    with pytest.raises(OSError, match=rf"cannot write {p}: File too large"):
      files.write_text(p, "x" * 5000)
    with pytest.raises(OSError, match=rf"cannot write {p}"):
      fs.History.from_records([{"round": r, "loss": 0.5} for r in range(1, 200)]).to_json(p)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == [p.name]
  assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~files._umask())   # as open() gives


@pytest.mark.slow   # a subprocess; test_atomic_write_keeps_the_old_file_and_names_the_new is fast
def test_cli_full_disk_is_one_line_naming_the_file(tmp_path):
  """The CLI on a 'full disk' (a 6 kB file size limit): exit 2, one error line naming the file
  it could not write, and every file in the folder complete (no 0-byte history.json)."""
  import resource
  out = tmp_path / "out"

  def limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  res = subprocess.run(
      [sys.executable, "-m", "fedjax_sim", "run", "--dataset", "digits", "--num-clients", "12",
       "--cohort-size", "4", "--rounds", "2", "--model", "logistic_regression", "--no-progress",
       "--cpu-devices", "1", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}, preexec_fn=limit,
      timeout=300)
  err = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(err) == 1, res.stderr[-3000:]
  assert err[0].startswith(f"error: [Errno 27] cannot write {out}/") and "File too large" in err[0]
  written = {p.name: p for p in out.iterdir() if p.name != checkpoint.LOCK_FILE}
  assert "config.toml" in written and not [n for n in written if n.endswith(".tmp")]
  assert all(p.stat().st_size > 0 for p in written.values())
  for name in ("config.json", "history.json"):
    if name in written:
      json.loads(written[name].read_text())
