"""Output folders: a new ``runs/<timestamp>[-N]`` or a given, empty one, locked for the run."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

from fedjax_sim.cli.schema import ConfigError


def check_writable(out: Path):
  try:
    out.mkdir(parents=True, exist_ok=True)
    # a probe of its own: concurrent runs probing the same folder must not delete each other's
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test."):
      pass
  except OSError as e:
    raise ValueError(f"cannot write to output folder {str(out)!r} (out): "
                     f"{e.strerror or e}") from None


def make_out_folder(out: str | None, overwrite: bool) -> tuple[Path, int]:
  """Creates the output folder and locks it for this run: returns ``(folder, lock fd)``.

  ``out`` None: a new ``runs/<YYYYmmdd-HHMMSS>`` folder, created exclusively
  (``os.mkdir`` fails if it exists), with a ``-2``, ``-3``, ... suffix when another run took that
  second's name, so concurrent runs never share a folder. A given ``out`` must be new or empty
  unless ``overwrite``. Either way the folder is locked (:data:`fedjax_sim.checkpoint.LOCK_FILE`,
  released when the process ends) so a second run writing into it fails at once.
  """
  from fedjax_sim import checkpoint
  if out is None:
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    check_writable(base.parent)
    for i in range(1, 10_000):
      folder = base if i == 1 else base.with_name(f"{base.name}-{i}")
      try:
        folder.mkdir()
        break
      except FileExistsError:
        continue
      except OSError as e:
        raise ValueError(f"cannot create output folder {str(folder)!r} (out): "
                         f"{e.strerror or e}") from None
  else:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
      raise ConfigError(f"out: {str(folder)!r} exists and is not a folder")
    check_writable(folder)
  fd = checkpoint.lock_directory(folder, what=f"out: output folder {str(folder)!r}")
  held = sorted(p.name for p in folder.iterdir() if p.name != checkpoint.LOCK_FILE)
  if out is not None and held and not overwrite:
    os.close(fd)
    shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
    raise ConfigError(f"out: output folder {str(folder)!r} is not empty (holds {shown}): pass "
                      "--overwrite to replace its files, or choose another --out")
  return folder, fd


