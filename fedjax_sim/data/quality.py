"""Dirty client data: a corruption model and federated cleaning (issue 17).

**Corruption** (:func:`corrupt`): a chosen fraction of clients get missing features (missing at
random, *declared* by a boolean mask: the stored value is 0 and the mask says it is missing;
undeclared NaN stays a bad-input error of :class:`~fedjax_sim.data.FederatedData`), outliers
(whole examples scaled by a factor), label noise (symmetric: a uniformly random other class;
pair-flip: class c becomes c + 1 mod K) and duplicated examples (an example replaced by a copy of
another of the same client, so client sizes stay as they were). Deterministic in ``seed``.

**Cleaning, federated**: each client computes statistics of its own rows; only their SUM over
clients is used, which is exactly what an aggregation round reveals (and what secure
aggregation computes: :mod:`fedjax_sim.aggregators.secure`). :func:`federated_mean` imputes
missing values with the per-feature mean of the observed values; :func:`federated_quantiles`
gives per-feature quantiles from summed per-client histograms (outlier clipping:
:func:`clip_features`). The statistics round runs once, before training, on the host: it is
data preparation, as the label priors of :mod:`fedjax_sim.remedies` are.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_sim.data.federated import FederatedData

NOISE_KINDS = ("symmetric", "pair")


@dataclasses.dataclass(frozen=True)
class Corruption:
  """What :func:`corrupt` does to the rows of the dirty clients.

  Attributes:
    client_fraction: fraction of clients that are dirty (rounded to whole clients).
    missing_rate: probability that a feature value is missing (declared in the mask).
    outlier_rate: probability that an example is an outlier: its features times
      ``outlier_scale``.
    outlier_scale: the outliers' scale factor.
    label_noise: probability that an example's label is replaced.
    label_noise_kind: ``"symmetric"`` (a uniformly random other class) or ``"pair"``
      (``(y + 1) mod K``).
    duplicate_rate: probability that an example is replaced by a copy of another example of
      the same client.
  """
  client_fraction: float = 0.3
  missing_rate: float = 0.0
  outlier_rate: float = 0.0
  outlier_scale: float = 10.0
  label_noise: float = 0.0
  label_noise_kind: str = "symmetric"
  duplicate_rate: float = 0.0

  def __post_init__(self):
    for name in ("client_fraction", "missing_rate", "outlier_rate", "label_noise",
                 "duplicate_rate"):
      v = getattr(self, name)
      if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
        raise ValueError(f"Corruption.{name} must be a probability in [0, 1], got {v!r}")
    if isinstance(self.outlier_scale, bool) or not (
        isinstance(self.outlier_scale, (int, float)) and np.isfinite(self.outlier_scale)):
      raise ValueError(f"Corruption.outlier_scale must be a finite number, got "
                       f"{self.outlier_scale!r}")
    if self.label_noise_kind not in NOISE_KINDS:
      raise ValueError(f"Corruption.label_noise_kind must be one of {NOISE_KINDS}, got "
                       f"{self.label_noise_kind!r}")


def _check_data(data, where):
  if not isinstance(data, FederatedData):
    raise ValueError(f"{where} needs a FederatedData, got {type(data).__name__}")
  if not np.issubdtype(np.asarray(data.arrays["x"]).dtype, np.floating):
    raise ValueError(f"{where}: features x must be floating point")


def _check_missing(data, missing, where):
  x = data.arrays["x"]
  if missing is None:
    return np.zeros(x.shape, bool)
  m = np.asarray(missing)
  if m.shape != x.shape or m.dtype != bool:
    raise ValueError(f"{where}: missing must be a bool mask of the features' shape {x.shape}, "
                     f"got {m.dtype} {m.shape}")
  return m


def _replace(data: FederatedData, **arrays) -> FederatedData:
  return FederatedData(dict(data.arrays, **arrays), data.offsets, data.client_ids,
                       data.num_classes)


def corrupt(data: FederatedData, spec: Corruption, seed: int = 0):
  """``data`` with ``spec`` applied to a random ``spec.client_fraction`` of its clients.

  Returns ``(dirty data, missing, info)``: ``missing`` is a bool mask of ``x``'s shape (True:
  the value is missing; it is stored as 0), ``info`` a dict with ``dirty_clients`` (positions),
  and boolean row masks ``outlier``, ``noisy_label``, ``duplicate`` over all examples.
  """
  _check_data(data, "corrupt")
  if not isinstance(spec, Corruption):
    raise ValueError(f"corrupt: spec must be a Corruption, got {type(spec).__name__}")
  k = data.num_classes
  if spec.label_noise > 0 and (k is None or k < 2):
    raise ValueError("corrupt: label noise needs a FederatedData with num_classes >= 2")
  rng = np.random.default_rng(seed)
  p = data.num_clients
  n_dirty = int(round(spec.client_fraction * p))
  dirty = np.sort(rng.choice(p, n_dirty, replace=False))
  owner = np.repeat(np.arange(p), data.sizes)
  row_dirty = np.isin(owner, dirty)
  x = np.array(data.arrays["x"], copy=True)
  y = np.array(data.arrays["y"], copy=True)
  n = x.shape[0]
  # duplicates first, so a duplicated example is then corrupted like any other
  duplicate = row_dirty & (rng.random(n) < spec.duplicate_rate)
  offsets = np.asarray(data.offsets)
  for i in np.flatnonzero(duplicate):
    c = owner[i]
    if data.sizes[c] > 1:
      j = offsets[c] + rng.integers(data.sizes[c] - 1)
      j = j + (j >= i)              # another example of the same client
      x[i], y[i] = x[j], y[j]
    else:
      duplicate[i] = False
  outlier = row_dirty & (rng.random(n) < spec.outlier_rate)
  x[outlier] = x[outlier] * np.asarray(spec.outlier_scale, x.dtype)
  noisy = row_dirty & (rng.random(n) < spec.label_noise)
  if spec.label_noise_kind == "pair":
    y[noisy] = (y[noisy] + 1) % k
  else:
    y[noisy] = (y[noisy] + rng.integers(1, k, noisy.sum())) % k   # never the true class
  row_shape = (n,) + (1,) * (x.ndim - 1)
  missing = row_dirty.reshape(row_shape) & (rng.random(x.shape) < spec.missing_rate)
  x[missing] = 0
  info = {"dirty_clients": dirty, "outlier": outlier, "noisy_label": noisy,
          "duplicate": duplicate}
  return _replace(data, x=x, y=y), missing, info


def client_feature_sums(data: FederatedData, missing=None):
  """What each client uploads for the mean: ``(sums [P, ...], counts [P, ...])`` of its
  observed feature values (missing ones left out)."""
  _check_data(data, "client_feature_sums")
  m = _check_missing(data, missing, "client_feature_sums")
  x = np.asarray(data.arrays["x"], np.float64)
  obs = ~m
  owner = np.repeat(np.arange(data.num_clients), data.sizes)
  sums = np.zeros((data.num_clients,) + x.shape[1:])
  counts = np.zeros_like(sums)
  np.add.at(sums, owner, np.where(obs, x, 0.0))
  np.add.at(counts, owner, obs.astype(np.float64))
  return sums, counts


def federated_mean(data: FederatedData, missing=None) -> np.ndarray:
  """Per-feature mean of the observed values over all clients, from the SUM over clients of
  :func:`client_feature_sums` (an aggregation round; secure aggregation reveals only that
  sum). Equals the centralized mean of the observed values. A feature never observed gets 0."""
  sums, counts = client_feature_sums(data, missing)
  s, c = sums.sum(0), counts.sum(0)
  return (s / np.maximum(c, 1.0)).astype(np.float32)


def federated_quantiles(data: FederatedData, qs, low: float, high: float, bins: int = 1024,
                        missing=None) -> np.ndarray:
  """Per-feature quantiles ``[len(qs), ...]`` of the observed values from the summed per-client
  histograms over ``bins`` equal bins of ``[low, high]`` (values outside count in the end
  bins): each quantile is the upper edge of the bin where the cumulative count reaches it, so
  it is within one bin width ``(high - low) / bins`` of the exact inverse-CDF quantile
  (``np.quantile(..., method="inverted_cdf")``) of the values clipped to ``[low, high]``."""
  _check_data(data, "federated_quantiles")
  qs = np.atleast_1d(np.asarray(qs, np.float64))
  if np.any((qs < 0) | (qs > 1)) or not (np.isfinite(low) and np.isfinite(high) and low < high):
    raise ValueError(f"federated_quantiles: qs must lie in [0, 1] and low < high, got qs={qs}, "
                     f"low={low}, high={high}")
  m = _check_missing(data, missing, "federated_quantiles")
  x = np.asarray(data.arrays["x"], np.float64)
  b = np.clip(((x - low) / (high - low) * bins).astype(np.int64), 0, bins - 1)
  d = int(np.prod(x.shape[1:]))
  feat = np.broadcast_to(np.arange(d).reshape(x.shape[1:]), x.shape)
  obs = ~m
  # The sum over clients of their [D, bins] histograms is the histogram of all observed rows:
  # computed directly, without holding P of them.
  total = np.bincount((feat[obs] * bins + b[obs]).ravel(), minlength=d * bins)
  total = total.reshape(d, bins).astype(np.float64)
  cum = np.cumsum(total, 1) / np.maximum(total.sum(1, keepdims=True), 1.0)
  edges = low + (np.arange(bins) + 1) * (high - low) / bins
  idx = np.stack([np.argmax(cum >= q - 1e-12, 1) for q in qs])
  return edges[idx].reshape((len(qs),) + x.shape[1:]).astype(np.float32)


def impute(data: FederatedData, missing, fill) -> FederatedData:
  """``data`` with each missing value replaced by ``fill`` (per feature, e.g.
  :func:`federated_mean`)."""
  _check_data(data, "impute")
  m = _check_missing(data, missing, "impute")
  x = np.asarray(data.arrays["x"])
  fill = np.broadcast_to(np.asarray(fill, x.dtype), x.shape)
  return _replace(data, x=np.where(m, fill, x))


def clip_features(data: FederatedData, low, high) -> FederatedData:
  """``data`` with features clipped to ``[low, high]`` (per feature; e.g. federated 1% and 99%
  quantiles)."""
  _check_data(data, "clip_features")
  x = np.asarray(data.arrays["x"])
  return _replace(data, x=np.clip(x, np.asarray(low, x.dtype), np.asarray(high, x.dtype)))
