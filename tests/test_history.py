"""History: per-client percentile columns and their band in the plots (matplotlib Agg)."""

import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim.history import add_client_summaries  # noqa: E402


def _history(rounds=6, eval_every=2):
  recs = []
  for r in range(1, rounds + 1):
    rec = {"round": r, "train_loss": 2.0 / r, "train_accuracy": 0.1 * r}
    if r % eval_every == 0:
      rec.update(test_loss=2.2 / r, test_accuracy=0.1 * r)
    recs.append(rec)
  return fs.History.from_records(recs)


def _summary(r):
  return {"accuracy_weighted": 0.1 * r, "accuracy_mean": 0.1 * r, "accuracy_p10": 0.05 * r,
          "accuracy_p50": 0.1 * r, "accuracy_p90": 0.15 * r, "worst_clients": [3, 1],
          "worst_accuracy": [0.0, 0.01]}


def _bands(fig):
  return [c for c in fig.axes[1].collections if isinstance(c, PolyCollection)]


def test_add_client_summaries_columns():
  h = add_client_summaries(_history(), {2: _summary(2), 6: _summary(6)})
  assert "worst_clients" not in h and "client_worst_clients" not in h
  p10 = h["client_accuracy_p10"]
  assert math.isnan(p10[0]) and p10[1] == pytest.approx(0.1) and p10[5] == pytest.approx(0.3)
  assert sorted(h.client_percentiles()) == [10.0, 50.0, 90.0]
  assert fs.History.from_json(h.to_json()).client_percentiles()[90.0][5] == pytest.approx(0.9)
  with pytest.raises(ValueError, match="round 9 is not in the history"):
    add_client_summaries(_history(), {9: _summary(9)})


def test_plot_draws_client_band_when_columns_exist(tmp_path):
  h = add_client_summaries(_history(), {r: _summary(r) for r in (2, 4, 6)})
  fig = h.plot(tmp_path / "h.png", label="fedavg")
  bands = _bands(fig)
  assert len(bands) == 1 and "p10-p90" in bands[0].get_label()
  # the band spans p10..p90 at the evaluated rounds only
  ys = bands[0].get_paths()[0].vertices[:, 1]
  assert ys.min() == pytest.approx(0.1) and ys.max() == pytest.approx(0.9)
  assert any("median" in line.get_label() for line in fig.axes[1].lines)
  assert (tmp_path / "h.png").stat().st_size > 1000
  assert not _bands(h.plot(client_band=False))
  assert not _bands(_history().plot())   # no columns, no band
  matplotlib.pyplot.close("all")


def test_plot_histories_compares_runs_with_and_without_bands():
  with_band = add_client_summaries(_history(), {r: _summary(r) for r in (2, 4, 6)})
  fig = fs.plot_histories({"a": with_band, "b": _history(), "c": with_band})
  bands = _bands(fig)
  assert [b.get_label().split()[0] for b in bands] == ["a", "c"]
  # each run keeps its colour for its band
  line_c = [ln for ln in fig.axes[1].lines if ln.get_label() == "c test (global model)"][0]
  assert np.allclose(bands[1].get_facecolor()[0][:3], matplotlib.colors.to_rgb(line_c.get_color()))
  matplotlib.pyplot.close("all")


def test_plot_never_touches_pyplot_or_the_backend(tmp_path):
  """The figure is pyplot-free: the user's backend and open figures are left alone (a notebook
  keeps showing its own plots after saving a history plot), and nothing piles up in a loop."""
  plt = matplotlib.pyplot
  plt.close("all")
  matplotlib.use("pdf")   # any backend other than the Agg the old code forced
  try:
    mine = plt.figure()
    for i in range(3):
      fig = _history().plot(tmp_path / f"h{i}.png", label="fedavg", title="FedAvg, 6 rounds")
      assert (tmp_path / f"h{i}.png").stat().st_size > 1000
    assert matplotlib.get_backend() == "pdf"
    assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
    assert fig.get_suptitle() == "FedAvg, 6 rounds"
    labels = [ln.get_label() for ln in fig.axes[1].lines]
    assert labels == ["fedavg during local training (sampled clients)",
                      "fedavg test (global model)"]
    # drawing on the user's own axes returns their figure
    axes = mine.subplots(1, 2)
    assert _history().plot(axes=axes) is mine and len(axes[0].lines) == 2
  finally:
    plt.close("all")
    matplotlib.use("Agg")


def test_to_pandas_without_pandas_says_which_extra(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_pandas(name, *a, **k):
    if name == "pandas":
      raise ImportError("No module named 'pandas'")
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_pandas)
  with pytest.raises(ImportError, match=r"fedjax_sim\[pandas\]"):
    _history().to_pandas()
