"""Checkpoint and resume of :func:`fedjax_sim.run` (orbax-checkpoint).

A checkpoint of round ``r`` is the directory ``<checkpoint_dir>/<r>/`` holding two items:

* ``state``: the :class:`~fedjax_sim.server.ServerState` (params, server optimizer state, round),
  written with orbax's ``StandardSave``;
* ``meta``: JSON with the history records of rounds ``1..r``, the round number and a
  :func:`fingerprint` of the experiment (model, algorithm, data, seed).

Orbax writes a step into ``<r>.orbax-checkpoint-tmp-<timestamp>/`` and renames it to ``<r>/`` only
once every file is written (an atomic rename on local file systems), so a process killed in the
middle of a save leaves a temporary directory, never a ``<r>/`` that looks valid. Only finalized
steps are listed and restored; stale temporary directories are deleted when a
:class:`Checkpointer` is opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import server

FORMAT_VERSION = 1


def _tree_signature(tree: Any) -> list[str]:
  """``["<path> <shape> <dtype>", ...]``: the structure, shapes and dtypes of a pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, leaf in leaves:
    shape = tuple(int(d) for d in np.shape(leaf))
    dtype = str(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    out.append(f"{jax.tree_util.keystr(path)} {shape} {dtype}")
  return out


def fingerprint(state: server.ServerState, *, algorithm: str, population: int,
                num_examples: int, cohort_size: int, seed: int) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed: model params and server optimizer state
  (tree structure, shapes, dtypes), algorithm name, population, examples, cohort size, seed."""
  return {"params": _tree_signature(state.params),
          "opt_state": _tree_signature(state.opt_state),
          "opt_state_treedef": str(jax.tree_util.tree_structure(state.opt_state)),
          "algorithm": str(algorithm), "population": int(population),
          "num_examples": int(num_examples), "cohort_size": int(cohort_size), "seed": int(seed)}


def _describe(v: Any) -> str:
  s = json.dumps(v) if not isinstance(v, str) else v
  return s if len(s) <= 120 else s[:117] + "..."


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  diffs = []
  for k in list(current) + [k for k in saved if k not in current]:
    a, b = saved.get(k), current.get(k)
    if a == b:
      continue
    if isinstance(a, list) and isinstance(b, list):
      extra_a = [x for x in a if x not in b]
      extra_b = [x for x in b if x not in a]
      detail = "; ".join(filter(None, [
          f"checkpoint has {', '.join(extra_a[:3])}" if extra_a else "",
          f"this run has {', '.join(extra_b[:3])}" if extra_b else ""])) or "order differs"
      diffs.append(f"{k}: {detail}")
    else:
      diffs.append(f"{k}: checkpoint has {_describe(a)}, this run has {_describe(b)}")
  return diffs


class Checkpointer:
  """Saves and restores ``(ServerState, history records, metadata)`` under ``directory``.

  Saving is synchronous (the round loop waits ~tens of ms per checkpoint); at most
  ``max_to_keep`` finalized steps are kept.
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = Path(directory).absolute()
    if self.directory.exists() and not self.directory.is_dir():
      raise ValueError(f"checkpoint_dir {self.directory} exists and is not a directory")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

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
            "records": [dict(r) for r in records]}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, like: server.ServerState, fp: Mapping[str, Any] | None = None):
    """Restores the latest finalized step as ``(state, records, metadata)``, or ``None`` if
    there is none.

    ``like`` gives the structure, shapes and dtypes of the state. If ``fp`` is given
    and differs from the checkpoint's fingerprint, raises ``ValueError`` naming what differs.
    A finalized step whose files are unreadable raises ``ValueError`` naming its path.
    """
    ocp = self._ocp
    step = self.latest_step()
    if step is None:
      return None
    path = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(meta["meta"])
      records = meta.pop("records")
    except Exception as e:  # noqa: BLE001 -- any failure to read is a corrupt checkpoint
      raise ValueError(f"checkpoint {path} is corrupt or unreadable (metadata): "
                       f"{type(e).__name__}: {e}") from e
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}, expected "
                       f"{FORMAT_VERSION}")
    if fp is not None:
      diffs = _differences(meta.get("fingerprint", {}), json.loads(json.dumps(dict(fp))))
      if diffs:
        raise ValueError(f"checkpoint in {self.directory} was written for a different "
                         f"experiment: {'; '.join(diffs)}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"checkpoint {path} is corrupt or unreadable (state): "
                       f"{type(e).__name__}: {e}") from e
    # uncommitted arrays on the default device, like server.init's (orbax commits them to one
    # device, which a jit over a multi-device mesh rejects); the values are unchanged
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    if int(restored.round) != step or len(records) != step:
      raise ValueError(f"checkpoint {path} is inconsistent: state is at round "
                       f"{int(restored.round)} with {len(records)} history records")
    return restored, records, meta

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_for_run(directory: str | Path, state: server.ServerState, fp: Mapping[str, Any], *,
                 resume: bool, rounds: int):
  """What :func:`fedjax_sim.run` does before training: returns ``(checkpointer, state, records)``,
  restored from the latest finalized step if ``resume`` and there is one, else unchanged and
  ``[]``. Raises ``ValueError`` for a checkpoint of another experiment, a corrupt latest step, one
  past ``rounds``, or (without ``resume``) a directory that already holds checkpoints."""
  ckpt = Checkpointer(directory)
  try:
    if not resume:
      if ckpt.steps():
        raise ValueError(f"checkpoint_dir {directory} already holds checkpoints (rounds "
                         f"{ckpt.steps()}): pass resume=True to continue, or use another directory")
      return ckpt, state, []
    restored = ckpt.restore(state, fp)
    if restored is None:
      return ckpt, state, []
    state, records, _ = restored
    if len(records) > rounds:
      raise ValueError(f"checkpoint in {directory} is at round {len(records)}, past "
                       f"rounds={rounds}")
    return ckpt, state, records
  except BaseException:
    ckpt.close()
    raise
