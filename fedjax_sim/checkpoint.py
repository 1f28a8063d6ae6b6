"""Checkpoint and resume of :func:`fedjax_sim.run` (orbax-checkpoint).

A checkpoint of round ``r`` is the directory ``<checkpoint_dir>/<r>/`` holding two items:

* ``state``: the :class:`~fedjax_sim.server.ServerState` (params, server optimizer state, round),
  written with orbax's ``StandardSave``;
* ``meta``: JSON with the history records of rounds ``1..r``, the round number, a
  :func:`fingerprint` of the experiment (model, algorithm and its hyperparameters, data, seed, ...),
  the resume overrides so far, and a sha256 digest of every array of the state and of the
  metadata itself. :meth:`Checkpointer.restore` verifies the digests and falls back to the newest
  intact step (with a warning) when a step is unreadable or does not match them.

Orbax writes a step into ``<r>.orbax-checkpoint-tmp-<timestamp>/`` and renames it to ``<r>/`` only
once every file is written (an atomic rename on local file systems), so a process killed in the
middle of a save leaves a temporary directory, never a ``<r>/`` that looks valid. Only finalized
steps are listed and restored; stale temporary directories are deleted when a
:class:`Checkpointer` is opened. An open Checkpointer holds an exclusive lock on the directory
(``fcntl.flock`` on :data:`LOCK_FILE`, released when it is closed or its process dies): a second
run on the same directory fails at once with :class:`CheckpointInUse` instead of deleting the
first one's half-written step.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import time
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import server

FORMAT_VERSION = 2
# Held (fcntl.flock) by the one run writing a checkpoint directory; see Checkpointer.
LOCK_FILE = ".fedjax_sim.lock"
# A step that fails its integrity check is moved to <directory>/corrupt-<step>-<time>/ when an
# older intact step is resumed, so that the step can be written again.
CORRUPT_PREFIX = "corrupt-"
# Fingerprint keys that fix the structure of the saved state: a resume override cannot change them.
STRUCTURAL_KEYS = ("params", "opt_state", "opt_state_treedef", "state")
# Arrays up to this size are hashed whole for the data digest; larger ones by a sample of rows.
FULL_DIGEST_BYTES = 64 << 20
SAMPLED_ROWS = 4096


def _tree_signature(tree: Any) -> list[str]:
  """``["<path> <shape> <dtype>", ...]``: the structure, shapes and dtypes of a pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, leaf in leaves:
    shape = tuple(int(d) for d in np.shape(leaf))
    dtype = str(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    out.append(f"{jax.tree_util.keystr(path)} {shape} {dtype}")
  return out


def _host(x) -> np.ndarray:
  """A leaf as a host array (PRNG key arrays as their raw key data)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(jax.device_get(x))


def array_digest(x, *, sample: bool = False) -> str:
  """``"<shape> <dtype> <sha256 hex>"`` of an array's bytes.

  With ``sample`` and more than :data:`FULL_DIGEST_BYTES`, only :data:`SAMPLED_ROWS` rows evenly
  spread over the leading axis are hashed (cheap for population-scale data; a change confined to
  rows outside the sample goes unnoticed), marked ``sampled``."""
  shape = tuple(int(d) for d in np.shape(x))
  dtype = str(getattr(x, "dtype", None) or np.asarray(x).dtype)
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize if dtype != "key" else 0
  tag = ""
  if sample and nbytes > FULL_DIGEST_BYTES and shape and shape[0] > SAMPLED_ROWS:
    x = x[np.linspace(0, shape[0] - 1, SAMPLED_ROWS).astype(np.int64)]
    tag = " sampled"
  h = hashlib.sha256(np.ascontiguousarray(_host(x)).tobytes()).hexdigest()
  return f"{shape} {dtype} {h}{tag}"


def tree_digest(tree: Any) -> dict[str, str]:
  """``{leaf path: array_digest}`` of every leaf of a pytree (the checkpoint's integrity check)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): array_digest(x) for p, x in leaves}


_MAX_DEPTH, _MAX_NODES = 12, 5000


def describe(obj: Any) -> Any:
  """A JSON-able, deterministic description of static configuration, for fingerprints.

  Scalars are kept; arrays become :func:`array_digest` strings (sampled when large); sequences,
  mappings, dataclasses and named tuples are described field by field; a Python function by its
  qualified name and the values its closure captured (so ``optax.sgd(0.05)`` and
  ``optax.sgd(0.5)`` differ in the captured ``step_size``), and its default arguments. Other
  objects are described by their type name only. Memory addresses never appear, so the same
  configuration built in another process gives the same description. Deviation: the values
  behind a callable object that is not a plain function (e.g. a compiled jax function) are not
  inspected, only its name.
  """
  count = [0]

  def walk(o, depth, seen):
    count[0] += 1
    if count[0] > _MAX_NODES or depth > _MAX_DEPTH:
      return "..."
    if o is None or isinstance(o, (bool, int, str)):
      return o
    if isinstance(o, float):
      return o if math.isfinite(o) else repr(o)
    if isinstance(o, (np.generic, np.ndarray, jax.Array)):
      if np.ndim(o) == 0 and not (isinstance(o, jax.Array) and
                                  jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key)):
        v = _host(o).item()
        return walk(v, depth, seen) if isinstance(v, (bool, int, float)) else str(v)
      return array_digest(o, sample=True)
    if id(o) in seen:
      return "<cycle>"
    seen = seen | {id(o)}
    d = depth + 1
    if isinstance(o, Mapping):
      return {str(k): walk(v, d, seen) for k, v in sorted(o.items(), key=lambda kv: str(kv[0]))}
    if isinstance(o, tuple) and hasattr(o, "_fields"):   # a NamedTuple
      return {"type": type(o).__qualname__, **{f: walk(getattr(o, f), d, seen) for f in o._fields}}
    if isinstance(o, (list, tuple)):
      return [walk(v, d, seen) for v in o]
    if isinstance(o, (set, frozenset)):
      return sorted((walk(v, d, seen) for v in o), key=json.dumps)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
      return {"type": type(o).__qualname__,
              **{f.name: walk(getattr(o, f.name, None), d, seen) for f in dataclasses.fields(o)}}
    if isinstance(o, functools.partial):
      return {"partial": walk(o.func, d, seen), "args": walk(o.args, d, seen),
              "keywords": walk(o.keywords, d, seen)}
    if isinstance(o, types.MethodType):
      return {"method": o.__func__.__qualname__, "self": walk(o.__self__, d, seen)}
    if isinstance(o, types.FunctionType):
      out: dict[str, Any] = {"fn": o.__qualname__}
      for name, cell in zip(o.__code__.co_freevars, o.__closure__ or ()):
        try:
          out[name] = walk(cell.cell_contents, d, seen)
        except ValueError:   # an empty cell
          out[name] = None
      if o.__defaults__:
        out["defaults"] = walk(o.__defaults__, d, seen)
      if o.__kwdefaults__:
        out["kwdefaults"] = walk(o.__kwdefaults__, d, seen)
      return out
    if isinstance(o, type):
      return f"<class {o.__qualname__}>"
    name = getattr(o, "__qualname__", None) or getattr(o, "__name__", None)
    return f"<{type(o).__name__}{' ' + name if isinstance(name, str) else ''}>"

  return walk(obj, 0, frozenset())


def data_identity(data: Any) -> dict[str, Any]:
  """What identifies a population: client count, a digest of the client sizes and of every
  feature (sampled rows for large features: see :func:`array_digest`), or for a generated
  population its :func:`describe`."""
  from fedjax_sim.data.federated import FederatedData
  if not isinstance(data, FederatedData):
    return {"population": describe(data)}
  return {"sizes": array_digest(np.asarray(data.sizes, np.int64)),
          **{f"feature {k}": array_digest(data.device_arrays.get(k, v), sample=True)
             for k, v in sorted(data.arrays.items())}}


def fingerprint(state: server.ServerState, *, algorithm: Any, population: int,
                num_examples: int, cohort_size: int, seed: int, data: Any = None,
                model: Any = None, eval_data: Mapping[str, Any] | None = None,
                **config: Any) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed (a JSON-able dict).

  The state's structure (model params and server optimizer state: tree, shapes, dtypes); the
  algorithm (its name, or the :class:`~fedjax_sim.algorithms.Algorithm` itself: every field,
  client and server optimizer hyperparameters included, see :func:`describe`); population,
  examples, cohort size, seed; the data (:func:`data_identity`), the model's name and functions,
  the evaluation set's digest; and any further ``config`` (keyword -> value, e.g.
  heterogeneity, hparams, client weights, the CLI's resolved configuration), each described with
  :func:`describe`. How the round is executed (chunk size, devices, rounds per call) is not part
  of it: it does not change the experiment.
  """
  fp = {"params": _tree_signature(state.params),
        "opt_state": _tree_signature(state.opt_state),
        "opt_state_treedef": str(jax.tree_util.tree_structure(state.opt_state)),
        # the whole state (server aux, per-client state, hparams): what a restore reads into
        "state": _tree_signature(state),
        "algorithm": algorithm if isinstance(algorithm, str) else describe(algorithm),
        "population": int(population), "num_examples": int(num_examples),
        "cohort_size": int(cohort_size), "seed": int(seed)}
  if data is not None:
    fp["data"] = data_identity(data)
  if model is not None:
    fp["model"] = {"name": model.name, "apply": describe(model.apply),
                   "loss": describe(model.loss), "input_shape": list(model.input_shape),
                   "num_classes": int(model.num_classes)}
  if eval_data is not None:
    fp["eval_data"] = {k: array_digest(v, sample=True) for k, v in sorted(eval_data.items())}
  fp.update({k: describe(v) for k, v in config.items()})
  return json.loads(json.dumps(fp))


def _flatten(v: Any, prefix: str) -> dict[str, Any]:
  """``{dotted path: scalar}`` of a nested description (lists of strings stay whole)."""
  if isinstance(v, dict):
    out = {}
    for k, x in v.items():
      out.update(_flatten(x, f"{prefix}.{k}"))
    return out or {prefix: {}}
  if isinstance(v, list) and not all(isinstance(x, str) for x in v):
    out = {}
    for i, x in enumerate(v):
      out.update(_flatten(x, f"{prefix}[{i}]"))
    return out or {prefix: []}
  return {prefix: v}


def _describe(v: Any) -> str:
  s = json.dumps(v) if not isinstance(v, str) else v
  return s if len(s) <= 120 else s[:117] + "..."


def differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                limit: int = 3) -> list[str]:
  """One line per top-level key of two fingerprints that differs, naming the key and its first
  ``limit`` differing entries (dotted paths into nested descriptions)."""
  diffs = []
  for k in list(current) + [k for k in saved if k not in current]:
    a, b = saved.get(k), current.get(k)
    if a == b:
      continue
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, str) for x in a + b):
      extra_a = [x for x in a if x not in b]
      extra_b = [x for x in b if x not in a]
      detail = "; ".join(filter(None, [
          f"checkpoint has {', '.join(extra_a[:limit])}" if extra_a else "",
          f"this run has {', '.join(extra_b[:limit])}" if extra_b else ""])) or "order differs"
      diffs.append(f"{k}: {detail}")
    elif isinstance(a, (dict, list)) and isinstance(b, (dict, list)):
      fa, fb = _flatten(a, k), _flatten(b, k)
      paths = [p for p in list(fb) + [p for p in fa if p not in fb] if fa.get(p) != fb.get(p)]
      parts = [f"{p}: checkpoint has {_describe(fa.get(p, '(none)'))}, this run has "
               f"{_describe(fb.get(p, '(none)'))}" for p in paths[:limit]]
      more = f" (and {len(paths) - limit} more)" if len(paths) > limit else ""
      diffs.append("; ".join(parts) + more)
    else:
      diffs.append(f"{k}: checkpoint has {_describe(a if k in saved else '(none)')}, this run "
                   f"has {_describe(b if k in current else '(none)')}")
  return diffs


def _canonical_sha(meta: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


class CorruptCheckpoint(ValueError):
  """A finalized step that cannot be read or fails its integrity check."""


class CheckpointInUse(ValueError):
  """Another live process holds the lock of a checkpoint (or output) directory."""


def lock_directory(directory: Path, what: str | None = None) -> int:
  """Takes the exclusive lock of ``directory`` (an ``fcntl.flock`` on :data:`LOCK_FILE`, released
  when the returned file descriptor is closed, also when the process dies); raises
  :class:`CheckpointInUse` naming ``what`` (default ``checkpoint_dir <directory>``) and the
  holder if another process has it."""
  path = Path(directory) / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    try:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    finally:
      os.close(fd)
    raise CheckpointInUse(
        f"{what or f'checkpoint_dir {directory}'} is in use by another run ({holder}; lock file {path}): "
        "wait for it to finish, or use another directory") from None
  except BaseException:
    os.close(fd)
    raise
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
  return fd


class Checkpointer:
  """Saves and restores ``(ServerState, history records, metadata)`` under ``directory``.

  Saving is synchronous (the round loop waits ~tens of ms per checkpoint); at most
  ``max_to_keep`` finalized steps are kept. Each step's metadata holds a sha256 digest of every
  array of the state and of the metadata itself; :meth:`restore` verifies them and falls back to
  the newest intact step. While open, a Checkpointer holds an exclusive lock on the directory
  (:data:`LOCK_FILE`): a second writer gets :class:`CheckpointInUse` before anything is touched,
  so orbax's clean-up of temporary directories never removes a live writer's step.
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = Path(directory).absolute()
    if self.directory.exists() and not self.directory.is_dir():
      raise ValueError(f"checkpoint_dir {self.directory} exists and is not a directory")
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise OSError(e.errno, f"cannot create checkpoint_dir {self.directory}: "
                             f"{e.strerror or e}") from None
    self._lock_fd = lock_directory(self.directory)
    # resume overrides so far: [{"round": r, "changes": [...]}], carried from step to step
    self.overrides: list[dict[str, Any]] = []
    try:
      # Stale temporary steps (a run killed mid-save) are removed here, synchronously and under
      # the lock: orbax's own clean-up runs in a background thread, which could still be
      # deleting after this constructor returned.
      for stale in self.directory.glob("*.orbax-checkpoint-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
          cleanup_tmp_directories=False)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
    except BaseException:
      self._release()
      raise

  def _release(self):
    if self._lock_fd is not None:
      os.close(self._lock_fd)   # releases the flock
      self._lock_fd = None

  def steps(self) -> list[int]:
    """Finalized steps (rounds), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    s = self.steps()
    return s[-1] if s else None

  def save(self, step: int, state: server.ServerState, records: Sequence[Mapping[str, Any]],
           metadata: Mapping[str, Any]):
    ocp = self._ocp
    meta = {"format": FORMAT_VERSION, "round": int(step), **metadata,
            "overrides": self.overrides, "records": [dict(r) for r in records]}
    meta = json.loads(json.dumps(meta))   # exactly what reads back
    meta["digest"] = {"meta": _canonical_sha(meta), "state": tree_digest(state)}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def _read_step(self, step: int, like: server.ServerState, fp: Mapping[str, Any] | None,
                 allow_changes: bool):
    """``(state, records, meta)`` of one step; raises :class:`CorruptCheckpoint` if it cannot be
    read or fails its digests, ``ValueError`` if it belongs to another experiment."""
    ocp = self._ocp
    path = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(meta["meta"])
    except Exception as e:  # noqa: BLE001 -- any failure to read is a corrupt checkpoint
      raise CorruptCheckpoint(f"checkpoint {path} is corrupt or unreadable (metadata): "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    if "digest" not in meta and meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}, expected "
                       f"{FORMAT_VERSION} (written by another version of fedjax_sim)")
    digest = meta.pop("digest", None)
    if not isinstance(digest, dict) or digest.get("meta") != _canonical_sha(meta):
      raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its metadata does not match its "
                              "digest")
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}, expected "
                       f"{FORMAT_VERSION}")
    records = meta.pop("records")
    changes = []
    if fp is not None:
      changes = differences(meta.get("fingerprint", {}), fp)
      if changes and not allow_changes:
        raise ValueError(f"checkpoint in {self.directory} was written for a different "
                         f"experiment: {'; '.join(changes)}. Resume with the same settings, use "
                         "another checkpoint directory, or override deliberately (run(..., "
                         "resume='override'); CLI --resume-override)")
      structural = [k for k in STRUCTURAL_KEYS if meta.get("fingerprint", {}).get(k) != fp.get(k)]
      if structural:
        raise ValueError(f"checkpoint in {self.directory} has another model or server "
                         f"optimizer state ({', '.join(structural)} differ), which no override "
                         f"can resume: {'; '.join(changes)}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"checkpoint {path} is corrupt or unreadable (state): "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    got = tree_digest(restored)
    bad = [k for k in set(got) | set(digest.get("state", {}))
           if got.get(k) != digest.get("state", {}).get(k)]
    if bad:
      raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {len(bad)} array(s) of the state "
                              f"do not match their digest ({', '.join(sorted(bad)[:3])})")
    # uncommitted arrays on the default device, like server.init's (orbax commits them to one
    # device, which a jit over a multi-device mesh rejects); the values are unchanged
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    if int(restored.round) != step or len(records) != step:
      raise CorruptCheckpoint(f"checkpoint {path} is inconsistent: state is at round "
                              f"{int(restored.round)} with {len(records)} history records")
    meta["changes"] = changes
    return restored, records, meta

  def restore(self, like: server.ServerState, fp: Mapping[str, Any] | None = None, *,
              allow_changes: bool = False):
    """Restores the newest intact finalized step as ``(state, records, metadata)``, or ``None``
    if there is none.

    ``like`` gives the structure, shapes and dtypes of the state. A step that cannot be read or
    whose arrays or metadata do not match the digests stored with it is skipped with a warning
    and the next older step is tried; once one is intact, the skipped steps are moved to
    ``corrupt-<step>-<time>/`` (kept for inspection, and so their rounds can be saved again).
    If every step is corrupt, raises ``ValueError`` naming each and moves nothing.

    If ``fp`` is given and differs from the checkpoint's fingerprint, raises ``ValueError``
    naming what differs, unless ``allow_changes``: then ``metadata["changes"]`` lists the
    differences (the state's structure, :data:`STRUCTURAL_KEYS`, must still match).
    """
    problems = []
    for step in reversed(self.steps()):
      try:
        out = self._read_step(step, like, fp, allow_changes)
      except CorruptCheckpoint as e:
        problems.append((step, str(e)))
        continue
      if problems:
        warnings.warn(f"{'; '.join(p for _, p in problems)}. Resuming from the newest intact "
                      f"step, round {step}, instead", stacklevel=3)
        self._set_aside([s for s, _ in problems])
      self.overrides = list(out[2].get("overrides", []))
      return out
    if problems:   # left in place: nothing is moved unless there is something to resume
      raise ValueError(f"no intact checkpoint in {self.directory}: "
                       f"{'; '.join(p for _, p in problems)}")
    return None

  def _set_aside(self, steps: Sequence[int]):
    """Moves corrupt steps out of orbax's view (so those rounds can be saved again)."""
    for s in steps:
      src = self.directory / str(s)
      if src.exists():
        src.rename(self.directory / f"{CORRUPT_PREFIX}{s}-{time.time_ns()}")
    self._manager.reload()

  def close(self):
    try:
      self._manager.close()
    finally:
      self._release()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_for_run(directory: str | Path, state: server.ServerState, fp: Mapping[str, Any], *,
                 resume: bool | str, rounds: int):
  """What :func:`fedjax_sim.run` does before training: returns ``(checkpointer, state, records,
  changes)``, restored from the newest intact step if ``resume`` and there is one, else
  unchanged, ``[]`` and ``[]``. ``resume="override"`` accepts a checkpoint whose fingerprint
  differs (``changes`` lists how; they are recorded in the checkpointer's ``overrides``).
  Raises ``ValueError`` for a checkpoint of another experiment, no intact step, one past
  ``rounds``, (without ``resume``) a directory that already holds checkpoints, or
  :class:`CheckpointInUse` if another run holds the directory."""
  if resume not in (False, True, "override"):
    raise ValueError(f"resume must be True, False or 'override', got {resume!r}")
  ckpt = Checkpointer(directory)
  try:
    if not resume:
      if ckpt.steps():
        raise ValueError(f"checkpoint_dir {directory} already holds checkpoints (rounds "
                         f"{ckpt.steps()}): pass resume=True to continue, or use another directory")
      return ckpt, state, [], []
    restored = ckpt.restore(state, fp, allow_changes=resume == "override")
    if restored is None:
      return ckpt, state, [], []
    state, records, meta = restored
    if len(records) > rounds:
      raise ValueError(f"checkpoint in {directory} is at round {len(records)}, past "
                       f"rounds={rounds}")
    changes = meta["changes"]
    if changes:
      warnings.warn(f"resuming {directory} at round {len(records)} with a changed experiment "
                    f"(override): {'; '.join(changes)}", stacklevel=3)
      ckpt.overrides.append({"round": len(records), "changes": changes})
    return ckpt, state, records, changes
  except BaseException:
    ckpt.close()
    raise


def save_params(path: str | Path, params: Any) -> Path:
  """Writes a params pytree (e.g. :attr:`fedjax_sim.RunResult.params`) to one Flax msgpack file
  (``flax.serialization``: nested dicts of arrays, no pickle), atomically (see
  :mod:`fedjax_sim.files`). Read it back with :func:`load_params`."""
  from flax import serialization

  from fedjax_sim import files
  state = serialization.to_state_dict(jax.device_get(params))
  return files.write_bytes(path, serialization.msgpack_serialize(state))


def load_params(path: str | Path, like: Any = None) -> Any:
  """Reads params written by :func:`save_params` (the CLI's ``final_params.msgpack``).

  Without ``like``: nested dicts of NumPy arrays (what Flax models take as params). With
  ``like`` (e.g. ``model.init(key)``): the values in ``like``'s tree structure, checked to have
  its leaf shapes and dtypes. Raises ``FileNotFoundError`` if there is no file, ``ValueError``
  naming ``path`` if it is not a params file or does not match ``like``.
  """
  from flax import serialization
  path = Path(path)
  data = path.read_bytes()
  try:
    state = serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001 -- any decoding failure: not a params file
    raise ValueError(f"{path} is not a params file written by save_params (or is truncated): "
                     f"{type(e).__name__}: {e}") from None
  if like is None:
    return state
  try:
    out = serialization.from_state_dict(like, state)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{path} does not have the structure of `like`: {e}") from None
  want, got = _tree_signature(like), _tree_signature(out)
  if want != got:
    bad = next(f"{g} vs {w}" for w, g in zip(want, got) if w != g) if len(want) == len(got) \
        else f"{len(got)} leaves vs {len(want)}"
    raise ValueError(f"{path} does not match `like`: {bad} (file vs expected)")
  return out
