"""The progress bar: tqdm's widget in a Jupyter kernel when ipywidgets is installed, else tqdm's
text bar.

``tqdm.auto`` makes the same choice but prints ``TqdmWarning: IProgress not found`` into every
notebook that lacks ipywidgets; here the text bar is the quiet fallback (``pip install
'fedjax_sim[notebook]'`` gets the widget).
"""

from __future__ import annotations

import functools
import sys


@functools.cache
def bar_class():
  """``tqdm.notebook.tqdm`` inside a Jupyter kernel with ipywidgets, else ``tqdm.std.tqdm``."""
  try:
    if "IPKernelApp" in sys.modules["IPython"].get_ipython().config:   # a Jupyter kernel
      from tqdm.notebook import IProgress, tqdm as notebook_tqdm
      if IProgress is not None:   # ipywidgets is installed
        return notebook_tqdm
  except Exception:  # noqa: BLE001 - no IPython, not a kernel, or no widgets: the text bar
    pass
  from tqdm.std import tqdm as text_tqdm
  return text_tqdm


def tqdm(*args, **kwargs):
  """A progress bar of :func:`bar_class` (same arguments as ``tqdm.tqdm``)."""
  return bar_class()(*args, **kwargs)
