"""Per-round metric history: a plain dict of equal-length numpy arrays, with export and plots."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedjax_sim import files

# Columns of per-client evaluation: CLIENT_PREFIX + a key of evaluate_clients' summary.
CLIENT_PREFIX = "client_"


class History(dict):
  """``{metric name: np.ndarray [rounds]}``; rounds without a value (e.g. no evaluation) are NaN.

  Always has ``"round"`` (1-based round number).
  """

  @classmethod
  def from_records(cls, records: Sequence[Mapping[str, float]]) -> "History":
    keys: list[str] = []
    for r in records:
      keys += [k for k in r if k not in keys]
    return cls({k: np.asarray([r.get(k, math.nan) for r in records], dtype=np.float64)
                for k in keys})

  @property
  def num_rounds(self) -> int:
    return len(self.get("round", ()))

  def last(self, key: str) -> float:
    """Last non-NaN value of ``key``."""
    v = self[key][~np.isnan(self[key])]
    if v.size == 0:
      raise KeyError(f"no recorded value for {key!r}")
    return float(v[-1])

  def to_dict(self) -> dict[str, list]:
    return {k: [None if (isinstance(x, float) and math.isnan(x)) else x for x in v.tolist()]
            for k, v in self.items()}

  def to_json(self, path: str | Path | None = None) -> str:
    """JSON text (NaN -> null); also written to ``path`` if given (atomically: a temporary file
    renamed into place, see :mod:`fedjax_sim.files`)."""
    text = json.dumps(self.to_dict())
    if path is not None:
      files.write_text(path, text)
    return text

  @classmethod
  def from_json(cls, text_or_path: str | Path) -> "History":
    p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
    d = json.loads(p.read_text() if p else str(text_or_path))
    return cls({k: np.asarray([math.nan if x is None else x for x in v], np.float64)
                for k, v in d.items()})

  def to_pandas(self):
    """A ``pandas.DataFrame`` indexed by round (needs ``pip install 'fedjax_sim[pandas]'``)."""
    try:
      import pandas as pd   # optional dependency
    except ImportError as e:
      raise ImportError("History.to_pandas needs pandas: pip install 'fedjax_sim[pandas]' "
                        "(or pip install pandas)") from e
    return pd.DataFrame(dict(self)).set_index("round")

  def plot(self, path: str | Path | None = None, label: str | None = None, axes=None,
           client_band: bool = True, title: str | None = None):
    """Loss and accuracy by round. Returns the figure.

    Curves: "during local training" (thin, every round; the ``train_*`` columns) is measured on
    the round's sampled clients while they train, each on its own data (on non-IID data it sits
    above the test curve without meaning over-fitting); "test" (markers) is the global model on
    ``eval_data`` where evaluated. ``label`` names the run in the legend; ``title``
    (e.g. a run description) heads the figure. See :func:`plot_histories` for ``path``,
    ``axes`` and how the figure is shown.

    With ``client_band`` and per-client accuracy percentile columns (``client_accuracy_p10`` ...
    ``_p90``, see :func:`add_client_summaries`), the spread over clients is drawn as a shaded
    band on the accuracy axis, with the median dashed.
    """
    return plot_histories({label or "run": self}, path=path, axes=axes, client_band=client_band,
                          title=title)

  def client_percentiles(self, metric: str = "accuracy",
                         prefix: str = CLIENT_PREFIX) -> dict[float, np.ndarray]:
    """``{q: column}`` of the per-client percentile columns ``{prefix}{metric}_p{q}``, by q."""
    head = f"{prefix}{metric}_p"
    out = {}
    for k in self:
      if k.startswith(head):
        try:
          out[float(k[len(head):])] = self[k]
        except ValueError:
          continue
    return dict(sorted(out.items()))


def add_client_summaries(history: History, summaries: Mapping[int, Mapping[str, Any]],
                         prefix: str = CLIENT_PREFIX) -> History:
  """A copy of ``history`` with per-client evaluation columns added.

  ``summaries`` maps a round number to the ``summary`` of
  :func:`fedjax_sim.evaluation.evaluate_clients` at that round (or any dict of scalars); every
  scalar ``key`` becomes a column ``prefix + key`` (e.g. ``client_accuracy_p10``), NaN on rounds
  without a summary. Non-scalar entries (the worst clients' ids) are skipped.
  """
  out = History({k: np.array(v, copy=True) for k, v in history.items()})
  index = {int(r): i for i, r in enumerate(out["round"])}
  for r, summary in summaries.items():
    if int(r) not in index:
      raise ValueError(f"round {r} is not in the history (rounds {int(out['round'][0])}.."
                       f"{int(out['round'][-1])})")
    for k, v in summary.items():
      if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        col = out.setdefault(prefix + k, np.full(out.num_rounds, math.nan))
        col[index[int(r)]] = float(v)
  return out


def _untracked_figure(**kwargs):
  """A matplotlib figure that pyplot does not track: it never changes the backend, is never shown
  by ``plt.show`` or Jupyter's end-of-cell display, and is never left open.

  In IPython it is made through pyplot and released at once: pyplot's first figure loads the
  configured backend, whose IPython hooks show a figure that is a cell's value as an image (a
  bare ``Figure`` would print as text in a session that never used pyplot).
  """
  if "IPython" in sys.modules:
    import matplotlib.pyplot as plt
    fig = plt.figure(**kwargs)
    plt.close(fig)
    return fig
  from matplotlib.figure import Figure
  return Figure(**kwargs)


def plot_histories(histories: Mapping[str, History], path: str | Path | None = None, axes=None,
                   client_band: bool = True, title: str | None = None):
  """Compares several runs on one figure: loss (left) and accuracy (right; R^2 for regression
  runs, whose histories have ``test_r2``) by round.

  Per run: accuracy/loss during local training on the sampled clients (thin) and of the global
  model on the test data (markers); see :meth:`History.plot`. Runs with per-client accuracy
  percentiles get a shaded band (lowest to highest percentile, e.g. p10-p90) in their colour,
  and their median dashed.

  Without ``axes``, the figure is a ``matplotlib.figure.Figure`` of its own, not registered with
  ``pyplot``: plotting never changes the matplotlib backend or pyplot's current figure, and no
  figure is left open in a loop. It is saved to ``path`` if given, and returned: in Jupyter a
  returned figure is shown once, as the cell's value (``fig = h.plot()`` shows it when ``fig``
  is displayed). For a ``pyplot`` window, draw on your own axes: ``fig, axes = plt.subplots(1,
  2); h.plot(axes=axes); plt.show()``. With ``axes`` (two of them), the curves are drawn there
  and their figure is returned (and saved to ``path`` if given).
  """
  if axes is None:
    fig = _untracked_figure(figsize=(11, 4.4 if title else 4))
    axes = fig.subplots(1, 2)
  else:
    fig = axes[0].figure
  # regression runs (test_r2 in the history, no classes) show R^2 where accuracy would be
  metrics = ("loss", "r2" if any("test_r2" in h for h in histories.values()) else "accuracy")
  for i, (name, h) in enumerate(histories.items()):
    color = f"C{i}"
    r = h["round"]
    for ax, metric in zip(axes, metrics):
      if f"train_{metric}" in h:
        ax.plot(r, h[f"train_{metric}"], color=color, alpha=0.35, lw=1,
                label=f"{name} during local training (sampled clients)")
      if f"test_{metric}" in h:
        ok = ~np.isnan(h[f"test_{metric}"])
        ax.plot(r[ok], h[f"test_{metric}"][ok], color=color, marker="o", ms=3, lw=1.8,
                label=f"{name} test (global model)")
    pct = h.client_percentiles("accuracy") if client_band else {}
    if len(pct) >= 2:
      (qlo, lo), (qhi, hi) = next(iter(pct.items())), list(pct.items())[-1]
      ok = ~(np.isnan(lo) | np.isnan(hi))
      axes[1].fill_between(r[ok], lo[ok], hi[ok], color=color, alpha=0.18, lw=0,
                           label=f"{name} clients p{qlo:g}-p{qhi:g}")
      if 50.0 in pct:
        ok50 = ~np.isnan(pct[50.0])
        axes[1].plot(r[ok50], pct[50.0][ok50], color=color, ls="--", lw=1.2,
                     label=f"{name} clients median")
  for ax, metric in zip(axes, metrics):
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=11)
  return _finish(fig, path)


def plot_class_accuracy(per_class: Mapping[str, Any], path: str | Path | None = None,
                        class_names: Sequence[str] | None = None, title: str | None = None,
                        ax=None):
  """Grouped bars of per-class accuracy, one group per class and one bar per run.

  ``per_class``: ``{run label: [K] accuracies}`` (e.g. the ``per_class_accuracy`` of
  :func:`fedjax_sim.evaluation.class_metrics`, or a History's ``test_per_class_accuracy_i``
  columns via :meth:`History.last`). Saved to ``path`` if given; returns the figure (not
  registered with pyplot, as :func:`plot_histories`)."""
  if not per_class:
    raise ValueError("plot_class_accuracy: per_class is empty")
  rows = {k: np.asarray(v, np.float64).reshape(-1) for k, v in per_class.items()}
  k = {len(v) for v in rows.values()}
  if len(k) != 1:
    raise ValueError(f"plot_class_accuracy: runs have different numbers of classes {sorted(k)}")
  k = k.pop()
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"plot_class_accuracy: {len(names)} class names for {k} classes")
  if ax is None:
    fig = _untracked_figure(figsize=(max(6.0, 0.9 * k + 2) + 2.0, 4.2 if title else 3.8))
    ax = fig.subplots(1, 1)
  else:
    fig = ax.figure
  width = 0.8 / len(rows)
  if len(rows) > 10:   # the default cycle repeats after 10 colours
    from matplotlib import colormaps
    colors = [colormaps["tab20"](i % 20) for i in range(len(rows))]
  else:
    colors = [f"C{i}" for i in range(len(rows))]
  for i, (label, acc) in enumerate(rows.items()):
    ax.bar(np.arange(k) + (i - (len(rows) - 1) / 2) * width, acc, width, label=label,
           color=colors[i])
  ax.set_xticks(np.arange(k), names, rotation=30 if max(map(len, names)) > 3 else 0)
  ax.set_ylabel("test accuracy of the class")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3, axis="y")
  # beside the axes: bars reach the top, so a legend inside would hide some
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  if title:
    ax.set_title(title, fontsize=11)
  return _finish(fig, path)


def plot_label_distribution(data, path: str | Path | None = None, kind: str = "bar",
                            normalize: bool = False, class_names: Sequence[str] | None = None,
                            max_clients: int | None = 50, title: str | None = None, ax=None,
                            colorbar: bool = True):
  """Labels per client: one stacked bar per client, a segment per class (``kind="bar"``, the
  plot of flwr-datasets' ``plot_label_distributions``), or a clients x classes heat map
  (``kind="heatmap"``).

  Args:
    data: a :class:`fedjax_sim.FederatedData` (its :meth:`~FederatedData.label_histogram`) or
      label counts ``[P, K]``.
    path: saved there if given (format from the suffix).
    kind: ``"bar"`` or ``"heatmap"``.
    normalize: show each client's label fractions (bars of height 1, heat map in [0, 1]) instead
      of counts.
    class_names: ``K`` names for the legend / axis (default ``0..K-1``).
    max_clients: draw the first this many clients only (None: all of them).
    title: heads the figure.
    ax: draw on these axes (default: a figure of its own, not registered with pyplot, as
      :func:`plot_histories`).
    colorbar: the heat map's colour bar (off for panels side by side on one normalised scale).

  Returns:
    The figure.
  """
  counts = data.label_histogram() if hasattr(data, "label_histogram") else data
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2 or counts.size == 0:
    raise ValueError(f"plot_label_distribution: expected FederatedData or label counts [P, K], "
                     f"got shape {counts.shape}")
  if not np.all(np.isfinite(counts)) or counts.min() < 0:
    raise ValueError("plot_label_distribution: label counts must be finite and >= 0")
  if kind not in ("bar", "heatmap"):
    raise ValueError(f"plot_label_distribution: kind must be 'bar' or 'heatmap', got {kind!r}")
  if max_clients is not None:
    counts = counts[:max_clients]
  p, k = counts.shape
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"plot_label_distribution: {len(names)} class names for {k} classes")
  values = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalize else counts
  if ax is None:
    fig = _untracked_figure(figsize=(min(14.0, max(6.0, 0.18 * p + 3)), 4.2 if title else 3.8))
    ax = fig.subplots(1, 1)
  else:
    fig = ax.figure
  from matplotlib import colormaps
  cmap = colormaps["tab10" if k <= 10 else "tab20"]
  if kind == "bar":
    bottom = np.zeros(p)
    for c in range(k):
      ax.bar(np.arange(p), values[:, c], 0.85, bottom=bottom, label=names[c],
             color=cmap(c % cmap.N))
      bottom += values[:, c]
    ax.set_ylabel("fraction of the client's examples" if normalize else "examples")
    ax.set_xlim(-0.6, p - 0.4)
    ax.set_ylim(0, 1.0 if normalize else max(1.0, float(bottom.max())) * 1.04)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # beside the axes: a legend inside would hide bars
    ax.legend(title="class", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0, ncols=1 if k <= 20 else 2)
  else:
    im = ax.imshow(values.T, aspect="auto", cmap="viridis", interpolation="nearest",
                   vmin=0, vmax=1 if normalize else None)
    ax.set_yticks(np.arange(k), names)
    ax.set_ylabel("class")
    if colorbar:
      fig.colorbar(im, ax=ax, label="fraction" if normalize else "examples")
  ax.set_xlabel(f"client (first {p})" if max_clients is not None and p == max_clients
                else "client")
  if title:
    ax.set_title(title, fontsize=11)
  return _finish(fig, path)


def _finish(fig, path):
  """Lays ``fig`` out, saves it to ``path`` if given (atomically, in the format of the file
  name's suffix) and returns it: the tail of every plot here."""
  fig.tight_layout()
  if path is not None:
    with files.atomic_open(path) as f:
      fig.savefig(f, dpi=120, format=Path(path).suffix[1:] or None)
  return fig
