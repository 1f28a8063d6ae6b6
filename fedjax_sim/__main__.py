import os
import sys

from fedjax_sim.cli import main

rc = main()
if rc == 2:
  # The one `error:` line is written. Background threads that are still unwinding (orbax's async
  # checkpoint machinery after a failed save or restore) would otherwise print pages of asyncio
  # tracebacks at interpreter exit, burying that line; the process is failing anyway.
  sys.stderr.flush()
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
sys.exit(rc)
