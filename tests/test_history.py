"""History: per-client percentile columns and their band in the plots (matplotlib Agg)."""

import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

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
  line_c = [ln for ln in fig.axes[1].lines if ln.get_label() == "c test"][0]
  assert np.allclose(bands[1].get_facecolor()[0][:3], matplotlib.colors.to_rgb(line_c.get_color()))
  matplotlib.pyplot.close("all")
