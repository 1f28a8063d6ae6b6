"""Runs notebooks top to bottom the way Jupyter does, and saves them with their outputs.

    python notebooks/execute.py [--small] [--no-save] notebooks/*.ipynb      (or `make notebooks`)

Each notebook runs in a fresh ``python3`` kernel whose working directory is the notebook's own
folder (as in Jupyter; notebook 04 finds ``benchmarks/`` from there), with matplotlib's inline
backend, so the saved plots are what a reader sees. ``--small`` sets ``FEDJAX_SIM_SMALL=1`` (the
sizes of the test suite, ``tests/test_notebooks.py``, which runs notebooks with :func:`execute`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: str | os.PathLike, small: bool, timeout: int = 3600):
  """The notebook at ``path`` after running every cell (an ``nbformat`` node; not saved).

  Raises ``nbclient.exceptions.CellExecutionError`` at the first cell that fails.
  """
  path = Path(path)
  nb = nbformat.read(path, as_version=4)
  # No MPLBACKEND: the kernel's default backend draws figures inline, as in Jupyter.
  env = {k: v for k, v in os.environ.items() if k not in ("FEDJAX_SIM_SMALL", "MPLBACKEND")}
  if small:
    env["FEDJAX_SIM_SMALL"] = "1"
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": str(path.resolve().parent)}}).execute(env=env)
  return nb


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("notebooks", nargs="+")
  p.add_argument("--small", action="store_true", help="FEDJAX_SIM_SMALL=1: the test sizes")
  p.add_argument("--no-save", action="store_true", help="run only; leave the files unchanged")
  a = p.parse_args(argv)
  for path in a.notebooks:
    t = time.perf_counter()
    nb = execute(path, a.small)
    if not a.no_save:
      nbformat.write(nb, path)
    print(f"{path}: ran in {time.perf_counter() - t:.0f} s{'' if a.no_save else ', saved'}",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
