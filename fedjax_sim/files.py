"""Writing output files so that nothing half-written is ever left under the final name.

Every result file (history, configuration, summary, plots, final params) is written to a
temporary file in the same folder, flushed to disk, and renamed over the destination
(``os.replace``: atomic on POSIX file systems). A process killed mid-write, or a full disk, leaves
the previous version (or no file), never a truncated one; the error names the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
  mask = os.umask(0o022)   # reading the umask means setting it; set it straight back
  os.umask(mask)
  return mask


def _error(path: Path, e: OSError) -> OSError:
  return OSError(e.errno, f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
  """A file object for ``path`` that only replaces ``path`` once the ``with`` block succeeds.

  ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text). On any error the temporary file is removed and
  ``path`` is left as it was; an ``OSError`` names ``path``.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
  path = Path(path)
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  except OSError as e:
    raise _error(path, e) from None
  try:
    with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())   # what a plain open() would give, not mkstemp's 0600
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise _error(path, e) from None
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_bytes(path: str | Path, data: bytes) -> Path:
  """Writes ``data`` to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
  with atomic_open(path, "wb") as f:
    f.write(data)
  return Path(path)


def write_text(path: str | Path, text: str) -> Path:
  """Writes UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
  return write_bytes(path, text.encode("utf-8"))
