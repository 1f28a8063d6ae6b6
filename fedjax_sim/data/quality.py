"""Dirty client data: a corruption model and federated cleaning (issue 17).

**Corruption** (:func:`corrupt`): a chosen fraction of clients get missing features (missing at
random, *declared* by a boolean mask: the stored value is 0 and the mask says it is missing;
undeclared NaN stays a bad-input error of :class:`~fedjax_sim.data.FederatedData`), outliers
(whole examples scaled by a factor), label noise (symmetric: a uniformly random other class;
pair-flip: class c becomes c + 1 mod K) and duplicated examples (an example replaced by a copy of
another of the same client, so client sizes stay as they were). Deterministic in ``seed``.

**Cleaning, federated**: each client computes statistics of its own rows; only their SUM over
clients is used, which is exactly what an aggregation round reveals. :func:`federated_sum` runs
that round as one jitted pass (``lax.scan`` over chunks of clients, ``vmap`` within a chunk) whose
per-client statistics are reduced by an :class:`~fedjax_sim.aggregators.Aggregator`'s streaming
``accumulate`` / ``finalize``, as a training round's updates are: pass
:func:`fedjax_sim.aggregators.secure_sum` and the server sees only pairwise-masked vectors and
their sum (equal to the plain round's up to its fixed-point resolution; integer counts come out
exactly). On it: :func:`federated_mean` (mean imputation), :func:`federated_histogram`,
:func:`federated_quantiles` and :func:`federated_median` (median imputation, outlier clipping:
:func:`clip_features`), :func:`norm_fence` (Tukey's fence of the examples' norms: outlier
examples, dropped by :func:`drop_examples`).

**Quality scores**: :func:`client_quality` has every client measure its own data in one jitted,
vmapped pass (:func:`per_client`): declared-missing share, outlier share, and disagreement of its
labels with the current global model's predictions (a label-noise indicator);
:func:`quality_scores` combines them into a score in ``[0, 1]`` and :func:`quality_weights` into
aggregation weights for ``fs.run(..., client_weights=...)``, the weighting every round applies.

The cleaning runs once, before training (data preparation, as the label priors of
:mod:`fedjax_sim.remedies` are); the cleaned population, the quality weights and the noise-robust
losses (:func:`fedjax_sim.remedies.generalized_cross_entropy`,
:func:`fedjax_sim.remedies.symmetric_cross_entropy`) then run inside the compiled rounds
(``lax.scan`` with ``rounds_per_call``) like any population, weighting and loss. Scores from a
global model need one: train some rounds, score, continue with ``init_params=`` and the weights
(``benchmarks/data_quality.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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


def _slots(num_clients: int, chunk_size: int):
  """Client positions ``[num_chunks, K]`` (padded with ``num_clients``: no client) and their
  validity."""
  k = max(1, min(int(chunk_size), num_clients))
  n_chunks = -(-num_clients // k)
  ids = np.arange(n_chunks * k, dtype=np.int32).reshape(n_chunks, k)
  return ids, ids < num_clients


def _gather_client(x, missing, offsets, sizes, cid, max_size: int):
  """One client's rows padded to ``max_size``: ``x [M, ...]``, ``observed [M, ...]`` (valid and
  not declared missing), ``valid [M]``."""
  size = jnp.where(cid < sizes.shape[0], sizes[jnp.minimum(cid, sizes.shape[0] - 1)], 0)
  start = offsets[jnp.minimum(cid, sizes.shape[0] - 1)]
  rows = jnp.clip(start + jnp.arange(max_size), 0, x.shape[0] - 1)
  valid = jnp.arange(max_size) < size
  xs = x[rows]
  obs = ~missing[rows] & valid.reshape((max_size,) + (1,) * (x.ndim - 1))
  return xs, obs, valid


def _device_inputs(data: FederatedData, missing, where: str):
  m = _check_missing(data, missing, where)
  x = jnp.asarray(np.asarray(data.arrays["x"], np.float32))
  return (x, jnp.asarray(m), jnp.asarray(data.offsets[:-1], jnp.int32),
          jnp.asarray(data.sizes, jnp.int32), jnp.asarray(np.asarray(data.arrays["y"]), jnp.int32))


def _default_chunk(data: FederatedData, per_client_floats: int) -> int:
  # bound one chunk's per-client statistics to ~16M floats (64 MB)
  return max(1, min(data.num_clients, (1 << 24) // max(1, per_client_floats)))


def per_client(data: FederatedData, fn, missing=None, chunk_size: int | None = None):
  """``fn`` evaluated on every client's own rows, stacked: one jitted pass, ``lax.map`` over
  chunks of ``chunk_size`` clients and ``vmap`` within a chunk (no Python loop over clients).

  ``fn(x [M, ...], observed [M, ...] bool, valid [M] bool, y [M]) -> pytree`` sees the client's
  rows padded to ``M = data.max_client_size`` (``valid``: real rows; ``observed``: real and not
  declared ``missing``). Returns the pytree with a leading client axis ``[P, ...]``.
  """
  _check_data(data, "per_client")
  x, m, offsets, sizes, y = _device_inputs(data, missing, "per_client")
  ids, _ = _slots(data.num_clients, chunk_size or _default_chunk(
      data, data.max_client_size * int(np.prod(x.shape[1:]))))
  max_size = data.max_client_size

  def one(cid):
    xs, obs, valid = _gather_client(x, m, offsets, sizes, cid, max_size)
    ys = y[jnp.clip(offsets[jnp.minimum(cid, sizes.shape[0] - 1)] + jnp.arange(max_size), 0,
                    y.shape[0] - 1)]
    return fn(xs, obs, valid, ys)

  out = jax.jit(lambda ids: jax.lax.map(jax.vmap(one), ids))(jnp.asarray(ids))
  return jax.tree.map(lambda a: np.asarray(a).reshape((-1,) + a.shape[2:])[:data.num_clients],
                      out)


def federated_sum(data: FederatedData, fn, missing=None, aggregator=None,
                  chunk_size: int | None = None):
  """``sum_p fn(client p's rows)``, computed as an aggregation round would: each client computes
  its statistic on its own rows (``fn`` as in :func:`per_client`), and ``aggregator``
  (:class:`fedjax_sim.aggregators.Aggregator`, default the plain weighted mean) reduces them
  with weight 1 per client; the sum is the aggregate times the total weight (the number of
  clients). With :func:`fedjax_sim.aggregators.secure_sum` the server sees only masked vectors
  and the revealed sum, up to the fixed-point resolution ``clip / (2**(bits-1) - 1)`` per client
  (its ``clip`` must bound every entry of a client's statistic).

  One jitted pass: ``lax.scan`` over chunks of clients, ``vmap`` within a chunk, the
  aggregator's ``accumulate`` once per chunk (its streaming interface, as in a training round).
  Returns the pytree of sums (float32).
  """
  from fedjax_sim import aggregators as aggs   # aggregators import the training stack
  _check_data(data, "federated_sum")
  agg = aggs.mean() if aggregator is None else aggregator
  if not isinstance(agg, aggs.Aggregator):
    raise ValueError(f"federated_sum: aggregator must be a fedjax_sim.aggregators.Aggregator, "
                     f"got {type(agg).__name__}")
  x, m, offsets, sizes, y = _device_inputs(data, missing, "federated_sum")
  max_size = data.max_client_size

  def one(cid):
    xs, obs, valid = _gather_client(x, m, offsets, sizes, cid, max_size)
    ys = y[jnp.clip(offsets[jnp.minimum(cid, sizes.shape[0] - 1)] + jnp.arange(max_size), 0,
                    y.shape[0] - 1)]
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), fn(xs, obs, valid, ys))

  template = jax.eval_shape(one, jnp.int32(0))
  floats = sum(int(np.prod(t.shape)) for t in jax.tree.leaves(template))
  ids, valid = _slots(data.num_clients, chunk_size or _default_chunk(data, floats + max_size *
                                                                       int(np.prod(x.shape[1:]))))
  agg.validate(data.num_clients)

  def run(ids, valid):
    zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), template)

    def chunk(state, inp):
      cids, ok = inp
      stats = jax.vmap(one)(cids)
      stats = jax.tree.map(lambda a: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0),
                           stats)
      return agg.accumulate(state, stats, ok.astype(jnp.float32)), None

    state, _ = jax.lax.scan(chunk, agg.init(zeros, ids.size), (ids, valid))
    mean, total = agg.finalize(state, jax.random.key(0), ids.reshape(-1))
    return jax.tree.map(lambda a: a * total, mean)

  return jax.tree.map(np.asarray, jax.jit(run)(jnp.asarray(ids), jnp.asarray(valid)))


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


def _sum_and_count(x, obs, valid, y):
  del valid, y
  return jnp.sum(jnp.where(obs, x, 0.0), 0), jnp.sum(obs.astype(jnp.float32), 0)


def federated_mean(data: FederatedData, missing=None, aggregator=None) -> np.ndarray:
  """Per-feature mean of the observed values over all clients: each client uploads the sums and
  counts of its observed values (:func:`client_feature_sums`), one aggregation round
  (:func:`federated_sum`, through ``aggregator``, e.g. secure aggregation) adds them up. Equals
  the centralized mean of the observed values (float32 sums; with secure aggregation, to its
  fixed-point resolution). A feature never observed gets 0."""
  _check_data(data, "federated_mean")
  s, c = federated_sum(data, _sum_and_count, missing, aggregator)
  c = np.round(c)   # counts are integers; a fixed-point sum may be off by a rounding error
  return (s / np.maximum(c, 1.0)).astype(np.float32)


def _bounds(data, low, high, where):
  shape = np.asarray(data.arrays["x"]).shape[1:]
  try:
    lo = np.broadcast_to(np.asarray(low, np.float64), shape)
    hi = np.broadcast_to(np.asarray(high, np.float64), shape)
  except ValueError:
    raise ValueError(f"{where}: low and high must be scalars or of the features' shape {shape}, "
                     f"got {np.shape(low)} and {np.shape(high)}") from None
  if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
    raise ValueError(f"{where}: need finite low < high (per feature), got low={low}, high={high}")
  return lo.reshape(-1), hi.reshape(-1)


def federated_histogram(data: FederatedData, low, high, bins: int = 1024,
                        missing=None, aggregator=None) -> np.ndarray:
  """``[D, bins]`` counts of the observed values of each of the ``D`` (flattened) features over
  ``bins`` equal bins of ``[low, high]`` (scalars, or per feature of the features' shape; values
  outside count in the end bins), summed over clients by one aggregation round
  (:func:`federated_sum`; counts rounded to integers)."""
  _check_data(data, "federated_histogram")
  lo64, hi64 = _bounds(data, low, high, "federated_histogram")
  if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
    raise ValueError(f"federated_histogram: bins must be an integer >= 1, got {bins!r}")
  d = lo64.size
  bins = int(bins)
  lo, width = jnp.asarray(lo64, jnp.float32), jnp.asarray((hi64 - lo64) / bins, jnp.float32)

  def hist(x, obs, valid, y):
    del valid, y
    xf, of = x.reshape(x.shape[0], d), obs.reshape(x.shape[0], d)
    b = jnp.clip(jnp.floor((xf - lo[None]) / width[None]), 0, bins - 1).astype(jnp.int32)
    feat = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), b.shape)
    return jnp.zeros((d, bins), jnp.float32).at[feat, b].add(of.astype(jnp.float32))

  return np.round(federated_sum(data, hist, missing, aggregator)).astype(np.float64)


def federated_quantiles(data: FederatedData, qs, low, high, bins: int = 1024,
                        missing=None, aggregator=None) -> np.ndarray:
  """Per-feature quantiles ``[len(qs), ...]`` of the observed values from the summed per-client
  histograms over ``bins`` equal bins of ``[low, high]`` (scalars or per feature;
  :func:`federated_histogram`; through ``aggregator``, e.g. secure aggregation): each quantile
  is the upper edge of the bin where the cumulative count reaches it, so it is within one bin
  width ``(high - low) / bins`` of the exact inverse-CDF quantile (``np.quantile(...,
  method="inverted_cdf")``) of the values clipped to ``[low, high]``."""
  _check_data(data, "federated_quantiles")
  qs = np.atleast_1d(np.asarray(qs, np.float64))
  if np.any((qs < 0) | (qs > 1)):
    raise ValueError(f"federated_quantiles: qs must lie in [0, 1], got qs={qs}")
  lo, hi = _bounds(data, low, high, "federated_quantiles")
  _check_missing(data, missing, "federated_quantiles")
  total = federated_histogram(data, low, high, bins, missing, aggregator)
  cum = np.cumsum(total, 1) / np.maximum(total.sum(1, keepdims=True), 1.0)
  edges = lo[:, None] + (np.arange(bins) + 1)[None] * ((hi - lo) / bins)[:, None]
  idx = np.stack([np.argmax(cum >= q - 1e-12, 1) for q in qs])        # [len(qs), D]
  vals = np.take_along_axis(edges[None], idx[..., None], 2)[..., 0]
  shape = np.asarray(data.arrays["x"]).shape[1:]
  return vals.reshape((len(qs),) + shape).astype(np.float32)


def federated_median(data: FederatedData, low, high, bins: int = 1024,
                     missing=None, aggregator=None) -> np.ndarray:
  """Per-feature median of the observed values (``[...]``, the features' shape): the 0.5
  quantile of :func:`federated_quantiles`, within one bin width ``(high - low) / bins`` of the
  centralized (inverse-CDF) median. For median imputation: ``impute(data, missing,
  federated_median(...))``."""
  return federated_quantiles(data, [0.5], low, high, bins, missing, aggregator)[0]


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


def drop_examples(data: FederatedData, keep) -> FederatedData:
  """``data`` without the rows where ``keep [N]`` (bool) is False (e.g. flagged outliers);
  every client keeps its other rows in order. ValueError if a client would keep none."""
  _check_data(data, "drop_examples")
  keep = np.asarray(keep)
  if keep.shape != (data.num_examples,) or keep.dtype != bool:
    raise ValueError(f"drop_examples: keep must be a bool mask [{data.num_examples}], got "
                     f"{keep.dtype} {keep.shape}")
  owner = np.repeat(np.arange(data.num_clients), data.sizes)
  kept = np.bincount(owner[keep], minlength=data.num_clients)
  if np.any(kept == 0):
    p = int(np.flatnonzero(kept == 0)[0])
    raise ValueError(f"drop_examples would leave client {data.client_name(p)!r} with no example")
  offsets = np.concatenate([[0], np.cumsum(kept)])
  return FederatedData({k: v[keep] for k, v in data.arrays.items()}, offsets, data.client_ids,
                       data.num_classes)


def example_norms(data: FederatedData, missing=None) -> np.ndarray:
  """``[N]`` L2 norm of each example's observed features (each client computes its own)."""
  _check_data(data, "example_norms")
  m = _check_missing(data, missing, "example_norms")
  x = np.asarray(data.arrays["x"], np.float64).reshape(data.num_examples, -1)
  return np.sqrt(np.sum(np.where(m.reshape(x.shape), 0.0, x) ** 2, 1)).astype(np.float32)


def norm_fence(data: FederatedData, missing=None, *, k: float = 3.0, high: float | None = None,
               bins: int = 4096, aggregator=None) -> float:
  """Tukey's far-out fence ``q75 + k (q75 - q25)`` of the examples' L2 norms
  (:func:`example_norms`), from federated quantiles (:func:`federated_quantiles` of the norms as
  a one-feature population: one aggregation round). The quartiles have a 25% breakdown point,
  so a few percent of scaled examples do not move the fence. ``high`` is the public upper end
  of the norms' histogram (default: the largest norm; values above it count in the last bin).
  An example whose norm exceeds the fence is an outlier (:func:`client_quality`)."""
  norms = example_norms(data, missing)
  top = float(norms.max()) if high is None else float(high)
  q = federated_quantiles(_replace(data, x=norms[:, None]), [0.25, 0.75], 0.0,
                          max(top, 1e-6), bins, aggregator=aggregator)[:, 0]
  return float(q[1] + k * (q[1] - q[0]))


def client_quality(data: FederatedData, missing=None, *, max_norm: float | None = None,
                   model=None, params=None, chunk_size: int | None = None) -> dict:
  """Per-client data-quality indicators, each ``[P]`` float32, computed by every client on its
  own rows (:func:`per_client`: one jitted, vmapped pass; only these P numbers go to the server):

  * ``missing_fraction``: share of the client's feature values declared missing;
  * ``outlier_fraction``: share of its examples whose L2 norm (observed values) exceeds
    ``max_norm`` (e.g. :func:`norm_fence`); 0 without ``max_norm``;
  * ``disagreement``: share of its examples whose label differs from the prediction (argmax) of
    ``model`` at ``params`` (the current global model); 0 without a model. Label noise raises
    it above what the model's own error gives every client.
  """
  _check_data(data, "client_quality")
  if (model is None) != (params is None):
    raise ValueError("client_quality: give both model and params (the global model), or neither")
  lim = np.float32(np.inf if max_norm is None else max_norm)
  if not lim > 0:
    raise ValueError(f"client_quality: max_norm must be > 0, got {max_norm!r}")

  def fn(x, obs, valid, y):
    n = jnp.maximum(jnp.sum(valid), 1)
    per_row = int(np.prod(x.shape[1:]))
    xf, of = x.reshape(x.shape[0], per_row), obs.reshape(x.shape[0], per_row)
    miss = jnp.sum(valid[:, None] & ~of) / (n * per_row)
    norm = jnp.sqrt(jnp.sum(jnp.where(of, xf, 0.0) ** 2, 1))
    out = jnp.sum(valid & (norm > lim)) / n
    if model is None:
      dis = jnp.zeros(())
    else:
      pred = jnp.argmax(model.apply(params, jnp.where(obs, x, 0.0)), -1)
      dis = jnp.sum(valid & (pred != y)) / n
    return {"missing_fraction": miss, "outlier_fraction": out, "disagreement": dis}

  out = per_client(data, fn, missing, chunk_size)
  return {k: v.astype(np.float32) for k, v in out.items()}


def quality_scores(quality: dict, *, reference: str = "median") -> np.ndarray:
  """``[P]`` scores in ``[0, 1]`` from :func:`client_quality`:
  ``(1 - missing_fraction) (1 - outlier_fraction) (1 - excess)`` with ``excess = max(0,
  disagreement - median disagreement) / (1 - median disagreement)``: the label-noise estimate is
  a client's disagreement beyond the typical client's (the median client is the reference,
  valid while fewer than half the clients are dirty), rescaled so that a client whose every
  label disagrees scores 0. A clean client scores about 1."""
  if reference != "median":
    raise ValueError(f"quality_scores: reference must be 'median', got {reference!r}")
  missing = {"missing_fraction", "outlier_fraction", "disagreement"} - set(quality)
  if missing:
    raise ValueError(f"quality_scores: quality lacks {sorted(missing)} (use client_quality)")
  d = np.asarray(quality["disagreement"], np.float64)
  ref = float(np.median(d))
  excess = np.clip((d - ref) / max(1.0 - ref, 1e-6), 0.0, 1.0)
  s = ((1 - np.asarray(quality["missing_fraction"], np.float64))
       * (1 - np.asarray(quality["outlier_fraction"], np.float64)) * (1 - excess))
  return np.clip(s, 0.0, 1.0).astype(np.float32)


def quality_weights(data: FederatedData, scores, *, power: float = 1.0,
                    weighting: str = "examples") -> np.ndarray:
  """``[P]`` aggregation weights ``base_i * scores_i ** power`` (``base``: example counts or
  uniform, as :attr:`Algorithm.weighting`), for ``fs.run(..., client_weights=...)``: the
  weighting every round already applies (:func:`fedjax_sim.validation.resolve_client_weights`),
  so a low-quality client's update counts for less in every aggregator. ``power > 1`` sharpens
  the down-weighting."""
  _check_data(data, "quality_weights")
  s = np.asarray(scores, np.float64)
  if s.shape != (data.num_clients,) or not np.all(np.isfinite(s)) or np.any((s < 0) | (s > 1)):
    raise ValueError(f"quality_weights: scores must be [{data.num_clients}] values in [0, 1], "
                     f"got shape {s.shape}")
  if isinstance(power, bool) or not (isinstance(power, (int, float)) and np.isfinite(power)
                                     and power >= 0):
    raise ValueError(f"quality_weights: power must be a finite number >= 0, got {power!r}")
  if weighting not in ("examples", "uniform"):
    raise ValueError(f"quality_weights: weighting must be 'examples' or 'uniform', got "
                     f"{weighting!r}")
  base = data.sizes.astype(np.float64) if weighting == "examples" else np.ones(data.num_clients)
  w = base * s ** power
  if w.sum() <= 0:
    raise ValueError("quality_weights: every client scores 0; no client would count")
  return w.astype(np.float32)
