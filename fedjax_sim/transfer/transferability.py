"""Federated transferability estimates (LogME, LEEP, H-score) and ``choose_source``.

Which pretrained encoder should a federation fine-tune? Each estimate below scores an encoder on
the target task from the target clients' *sufficient statistics*, so no feature and no label
leaves a client, and the cost is one (LEEP: two) small rounds of communication instead of a
federated fine-tuning run per candidate.

The mechanism is the one FedAvg uses for updates: every client computes a pytree of statistics
*averaged over its own examples* (inside one jitted ``lax.scan`` over chunks of ``vmap``-ed
clients, no Python loop over clients), and the server reduces them with an
:class:`~fedjax_sim.aggregators.Aggregator` (default: the weighted mean, weights = example
counts, the FedAvg weighting). The weighted mean of per-client means times the total weight is
the population sum, so the server then holds exactly the moments a centralized computation would
use and computes the score from them (in float64 NumPy: the evidences and traces are differences
of large terms; the server side is one ``D x D`` eigendecomposition, off the hot path).

What leaves a client (per client, ``n_c`` its example count, ``D`` the feature width, ``K`` the
target classes, ``Z`` the source classes), every entry divided by ``n_c``, plus the weight
``n_c`` itself:

* LogME (You et al., 2021): ``F^T F [D, D]``, ``F^T Y [D, K]`` (``Y`` one-hot labels) and the class
  counts ``[K]`` (``y_k^T y_k`` for one-hot targets).
* H-score (Bao et al., 2019): ``sum f [D]``, ``F^T F [D, D]``, per-class feature sums ``[K, D]`` and
  class counts ``[K]``.
* LEEP (Nguyen et al., 2020), two rounds: first the joint table ``sum_i theta(x_i)_z 1[y_i = y]``
  ``[K, Z]`` of the source model's predicted source-label distribution ``theta`` against the
  target label; the server forms ``P(y | z)`` and broadcasts it (``K x Z`` numbers); second the
  scalar ``sum_i log sum_z P(y_i | z) theta(x_i)_z``.

A secure-aggregation aggregator can replace the mean: the server then sees only the sums.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import Aggregator, mean
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.transfer.encoders import feature_cache

EncoderApply = Callable[[Any, jax.Array], jax.Array]
METRICS = ("logme", "hscore", "leep")


# --- the client side: per-client statistics, aggregated like updates -------------------------------

def client_rows(data: FederatedData) -> tuple[np.ndarray, np.ndarray]:
  """``(rows [P, M], mask [P, M])``: each client's example rows padded to the largest client."""
  sizes, m = data.sizes, data.max_client_size
  pos = np.arange(m)[None, :]
  mask = pos < sizes[:, None]
  rows = np.where(mask, data.offsets[:-1, None] + pos, 0)
  return rows, mask


def aggregate_statistics(stat_fn: Callable[..., Any], data: FederatedData, *,
                         aggregator: Aggregator | None = None, chunk_size: int = 64,
                         extra: Any = None) -> tuple[Any, float]:
  """Population sums of a per-example statistic, computed per client and aggregated like updates.

  Args:
    stat_fn: ``(x [M, ...], y [M], mask [M], extra) -> pytree``: one client's statistic *summed*
      over its unmasked examples (it must ignore masked rows).
    data: the clients (``x`` and integer ``y``).
    aggregator: reduces the per-client *means* (statistic / ``n_c``) with weights ``n_c``;
      default :func:`fedjax_sim.aggregators.mean`, the FedAvg weighting.
    chunk_size: clients per ``vmap`` (memory: ``chunk_size`` statistics at a time).
    extra: a pytree broadcast to every client (e.g. LEEP's ``P(y | z)``).

  Returns:
    ``(sums, n)``: the statistic summed over every example of every client (the aggregated mean
    times the total weight) and the total number of examples ``n``.
  """
  if not isinstance(data, FederatedData):
    raise ValueError(f"data must be a FederatedData, got {type(data).__name__}")
  if "y" not in data.arrays:
    raise ValueError("data has no labels 'y': the transferability estimates need labelled "
                     "target examples")
  agg = mean() if aggregator is None else aggregator
  rows, mask = client_rows(data)
  p = rows.shape[0]
  c = max(1, min(int(chunk_size), p))
  nchunks = math.ceil(p / c)
  pad = nchunks * c - p
  rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)]).reshape(nchunks, c, -1)
  mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)]).reshape(nchunks, c, -1)
  x = jnp.asarray(data.arrays["x"])
  y = jnp.asarray(data.arrays["y"], jnp.int32)

  def one_client(r, m):
    s = stat_fn(x[r], y[r], m, extra)
    n_c = jnp.sum(m).astype(jnp.float32)
    return jax.tree.map(lambda a: a / jnp.maximum(n_c, 1.0), s), n_c

  template = jax.eval_shape(lambda r, m: one_client(r, m)[0], rows[0, 0], mask[0, 0])
  template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)

  @jax.jit
  def run(rows, mask):
    def body(state, inp):
      stats, w = jax.vmap(one_client)(*inp)
      return agg.accumulate(state, stats, w), None

    state, _ = jax.lax.scan(body, agg.init(template, nchunks * c), (rows, mask))
    # the aggregator's one signature: a key and the slots' ids (here the client slots in order)
    return agg.finalize(state, jax.random.key(0), jnp.arange(nchunks * c, dtype=jnp.int32))

  avg, total = run(jnp.asarray(rows), jnp.asarray(mask))
  total = float(total)
  return jax.tree.map(lambda a: np.asarray(a, np.float64) * total, avg), total


def _one_hot(y, mask, k):
  return jax.nn.one_hot(y, k, dtype=jnp.float32) * mask[:, None].astype(jnp.float32)


def _flat(x):
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def logme_statistics(num_classes: int):
  """Per-client LogME statistic: ``{"ff": F^T F, "fy": F^T Y, "count": [K]}`` (sums)."""
  def stat(x, y, mask, extra):
    del extra
    f = _flat(x) * mask[:, None]
    yk = _one_hot(y, mask, num_classes)
    return {"ff": f.T @ f, "fy": f.T @ yk, "count": jnp.sum(yk, 0)}
  return stat


def hscore_statistics(num_classes: int):
  """Per-client H-score statistic: ``{"f", "ff", "class_sum", "count"}`` (sums)."""
  def stat(x, y, mask, extra):
    del extra
    f = _flat(x) * mask[:, None]
    yk = _one_hot(y, mask, num_classes)
    return {"f": jnp.sum(f, 0), "ff": f.T @ f, "class_sum": yk.T @ f, "count": jnp.sum(yk, 0)}
  return stat


def leep_joint_statistics(num_classes: int):
  """LEEP round 1: ``x`` holds source-label probabilities ``theta [M, Z]``; returns the joint
  table ``sum_i 1[y_i = y] theta_i [K, Z]``."""
  def stat(x, y, mask, extra):
    del extra
    return _one_hot(y, mask, num_classes).T @ _flat(x)
  return stat


def leep_log_statistic(x, y, mask, cond):
  """LEEP round 2: ``sum_i log sum_z P(y_i | z) theta_i,z`` given ``cond = P(y | z) [K, Z]``."""
  eep = jnp.sum(cond[y] * _flat(x), axis=1)
  return jnp.sum(jnp.where(mask, jnp.log(jnp.maximum(eep, 1e-30)), 0.0))


# --- the server side: scores from the aggregated statistics ----------------------------------------

def logme_from_statistics(ff, fy, count, n: float, *, tol: float = 1e-2,
                          max_iter: int = 11, rank_rtol: float = 1e-6,
                          eps: float = 1e-5) -> float:
  """LogME (You et al., 2021, Algorithm 2): the mean over classes of the maximum log evidence per
  example of Bayesian linear regression from the features to each one-hot label column.

  Args:
    ff: ``F^T F [D, D]``; fy: ``F^T Y [D, K]``; count: ``[K]`` (``y_k^T y_k``); n: examples.
    tol / max_iter: the fixed-point iteration on ``(alpha, beta)`` stops when ``alpha / beta``
      changes by less than ``tol`` relatively, or after ``max_iter`` steps: the defaults are the
      paper's code's (1%, 11 steps). They matter: with more dimensions than examples the evidence
      keeps growing as ``beta -> inf`` (the features interpolate the labels), so the score is
      the one the paper's stopping rule defines, not a maximum.
    eps: added to ``m^T m`` and ``||F m - y||^2`` as in the paper's code; it bounds ``beta``
      when the features interpolate the labels (more dimensions than examples).
    rank_rtol: eigenvalues of ``F^T F`` below ``rank_rtol`` times the largest are taken as 0
      (float32 sums on the clients carry about 1e-7 relative rounding).
  """
  ff, fy = np.asarray(ff, np.float64), np.asarray(fy, np.float64)
  count = np.asarray(count, np.float64)
  d = ff.shape[0]
  if ff.shape != (d, d) or fy.shape[0] != d or count.shape != (fy.shape[1],):
    raise ValueError(f"LogME statistics have shapes ff {ff.shape}, fy {fy.shape}, count "
                     f"{count.shape}; expected [D, D], [D, K], [K]")
  if n <= 0:
    raise ValueError(f"LogME needs at least one example (n={n})")
  sigma, v = np.linalg.eigh((ff + ff.T) / 2)   # ascending
  # F^T F has rank <= n: with more dimensions than examples its trailing eigenvalues are exactly
  # 0, and what the float32 client sums leave there is rounding noise, which beta (large when
  # the fit is near perfect) would amplify in log(alpha + beta sigma).
  sigma[:max(d - int(n), 0)] = 0.0
  sigma = np.where(sigma > sigma.max(initial=0.0) * rank_rtol, sigma, 0.0)
  evidences = []
  for k in range(fy.shape[1]):
    # F^T y_k in the eigenbasis; it lies in the range of F^T, so it has no component along the
    # null directions (those set to 0 above: what is there is rounding, and alpha, which can
    # become tiny, would blow it up in m)
    t = np.where(sigma > 0, v.T @ fy[:, k], 0.0)
    yy = count[k]
    alpha, beta = 1.0, 1.0
    lam = alpha / beta
    for _ in range(max_iter):
      gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
      m = beta * t / (alpha + beta * sigma)  # posterior mean in the eigenbasis
      mm = float(m @ m)
      res = max(float(sigma @ (m * m) - 2 * m @ t + yy), 0.0)   # ||F m - y||^2
      new_alpha = gamma / (mm + eps)
      new_beta = (n - gamma) / (res + eps)
      if not (np.isfinite(new_alpha) and np.isfinite(new_beta) and new_alpha > 0
              and new_beta > 0):
        break
      alpha, beta = new_alpha, new_beta
      new_lam = alpha / beta
      done = abs(new_lam - lam) / lam < tol
      lam = new_lam
      if done:
        break
    m = beta * t / (alpha + beta * sigma)
    mm = float(m @ m)
    res = max(float(sigma @ (m * m) - 2 * m @ t + yy), 0.0)
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
          - beta / 2 * (res + eps) - alpha / 2 * (mm + eps) - n / 2 * np.log(2 * np.pi))
    evidences.append(ev / n)
  return float(np.mean(evidences))


def hscore_from_statistics(f_sum, ff, class_sum, count, n: float, *,
                           shrinkage: float = 0.0, rcond: float = 1e-10) -> float:
  """H-score (Bao et al., 2019): ``tr(cov(f)^+ cov(E[f | y]))``.

  ``cov(f) = F^T F / n - mu mu^T``; ``cov(E[f|y]) = sum_k (n_k / n) (mu_k - mu)(mu_k - mu)^T``.
  With ``shrinkage`` in (0, 1], ``cov(f)`` is replaced by ``(1 - s) cov + s (tr(cov) / D) I``
  (the regularised H-score of Ibrahim et al., 2022, with a fixed instead of a Ledoit-Wolf
  shrinkage, which would need fourth moments); ``rcond`` is the pseudo-inverse's cut-off
  relative to the largest eigenvalue (the original code uses ``pinv(rcond=1e-15)``).
  """
  f_sum, ff = np.asarray(f_sum, np.float64), np.asarray(ff, np.float64)
  class_sum, count = np.asarray(class_sum, np.float64), np.asarray(count, np.float64)
  if not 0.0 <= shrinkage <= 1.0:
    raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
  if n <= 0:
    raise ValueError(f"H-score needs at least one example (n={n})")
  d = f_sum.shape[0]
  mu = f_sum / n
  cov = (ff + ff.T) / (2 * n) - np.outer(mu, mu)
  if shrinkage:
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
  seen = count > 0
  mk = class_sum[seen] / count[seen, None] - mu[None, :]
  between = (mk * (count[seen] / n)[:, None]).T @ mk
  return float(np.trace(np.linalg.pinv(cov, rcond=rcond, hermitian=True) @ between))


def leep_conditional(joint) -> np.ndarray:
  """``P(y | z) [K, Z]`` from the joint table ``[K, Z]`` (any positive scale)."""
  joint = np.asarray(joint, np.float64)
  pz = joint.sum(0, keepdims=True)
  return np.where(pz > 0, joint / np.maximum(pz, 1e-300), 0.0)


# --- the three estimators on a FederatedData of features ------------------------------------------

class Estimate(NamedTuple):
  """A transferability score and what it cost.

  Attributes:
    score: the estimate (higher = expected to transfer better).
    num_examples: target examples that contributed.
    floats_up_per_client: numbers each client uploads (all rounds of the estimate together).
    rounds: communication rounds used (LEEP: 2).
  """
  score: float
  num_examples: int
  floats_up_per_client: int
  rounds: int


def _k(data: FederatedData, num_classes):
  k = num_classes or data.num_classes
  if k is None:
    raise ValueError("give num_classes (the FederatedData has none)")
  return int(k)


def _width(data):
  return int(np.prod(data.arrays["x"].shape[1:]))


def logme(features: FederatedData, num_classes: int | None = None, *,
          aggregator: Aggregator | None = None, **kw) -> Estimate:
  """Federated LogME of the features ``x [N, D]`` (or ``[N, ...]``, flattened) for labels ``y``."""
  k = _k(features, num_classes)
  s, n = aggregate_statistics(logme_statistics(k), features, aggregator=aggregator)
  d = _width(features)
  return Estimate(logme_from_statistics(s["ff"], s["fy"], s["count"], n, **kw), int(n),
                  d * d + d * k + k + 1, 1)


def hscore(features: FederatedData, num_classes: int | None = None, *,
           aggregator: Aggregator | None = None, **kw) -> Estimate:
  """Federated H-score of the features ``x [N, D]`` for labels ``y`` (see
  :func:`hscore_from_statistics` for ``shrinkage`` / ``rcond``)."""
  k = _k(features, num_classes)
  s, n = aggregate_statistics(hscore_statistics(k), features, aggregator=aggregator)
  d = _width(features)
  return Estimate(hscore_from_statistics(s["f"], s["ff"], s["class_sum"], s["count"], n, **kw),
                  int(n), d + d * d + k * d + k + 1, 1)


def leep(source_probs: FederatedData, num_classes: int | None = None, *,
         aggregator: Aggregator | None = None) -> Estimate:
  """Federated LEEP: ``x [N, Z]`` holds the source model's predicted source-label distribution
  (softmax) on each target example, ``y`` the target label. Two rounds (joint table, then a
  scalar); the result equals ``1/n sum_i log sum_z P(y_i | z) theta(x_i)_z``."""
  k = _k(source_probs, num_classes)
  x = source_probs.arrays["x"]
  if x.ndim != 2:
    raise ValueError(f"LEEP takes source-label probabilities [N, Z], got x of shape {x.shape}")
  if np.any(x < 0) or not np.allclose(x.sum(1), 1.0, atol=1e-3):
    raise ValueError("LEEP's x must be probability rows (non-negative, summing to 1): apply "
                     "softmax to the source model's logits")
  joint, n = aggregate_statistics(leep_joint_statistics(k), source_probs, aggregator=aggregator)
  cond = jnp.asarray(leep_conditional(joint), jnp.float32)
  total, _ = aggregate_statistics(leep_log_statistic, source_probs, aggregator=aggregator,
                                  extra=cond)
  return Estimate(float(total) / n, int(n), k * x.shape[1] + 2, 2)


# --- choosing the source ----------------------------------------------------------------------------

class Candidate(NamedTuple):
  """A pretrained encoder to rank.

  Attributes:
    encoder_apply: ``(encoder_params, x [B, ...]) -> features [B, D]`` (run on each client).
    encoder_params: its params (what the server would broadcast).
    source_logits: optional ``(encoder_params, x [B, ...]) -> source logits [B, Z]`` (the
      encoder's own source classifier), needed for LEEP only.
  """
  encoder_apply: EncoderApply
  encoder_params: Any
  source_logits: Callable[[Any, jax.Array], jax.Array] | None = None


class Ranking(NamedTuple):
  """``choose_source``'s answer: ``best`` (a name), ``order`` (names, best first) and
  ``estimates`` (name -> :class:`Estimate`)."""
  best: str
  order: list[str]
  estimates: dict[str, Estimate]


def choose_source(candidates: Mapping[str, Candidate], target_data: FederatedData, *,
                  metric: str = "logme", num_classes: int | None = None,
                  aggregator: Aggregator | None = None, batch_size: int = 512,
                  **metric_kw) -> Ranking:
  """Ranks candidate encoders for the target clients by a federated transferability estimate.

  Each client runs every candidate encoder on its own examples (the features never leave it) and
  uploads the estimate's sufficient statistics (module docstring); the server ranks by score.
  The cost is one round per candidate with statistics of about ``D^2`` floats per client (two
  rounds and ``K x Z`` floats for LEEP), to be compared with a federated fine-tuning run each.

  Args:
    candidates: name -> :class:`Candidate` (at least 2).
    target_data: the target clients' raw inputs ``x`` and labels ``y``.
    metric: ``"logme"`` (default), ``"hscore"`` or ``"leep"`` (needs ``source_logits``).
    metric_kw: passed to the score (e.g. ``shrinkage`` for the H-score).
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
  if len(candidates) < 2:
    raise ValueError(f"choose_source needs at least 2 candidates, got {len(candidates)}")
  estimates = {}
  for name, c in candidates.items():
    if not isinstance(c, Candidate):
      raise ValueError(f"candidate {name!r} is a {type(c).__name__}, expected a Candidate")
    if metric == "leep":
      if c.source_logits is None:
        raise ValueError(f"candidate {name!r} has no source_logits, which LEEP needs")
      probs = lambda p, x, f=c.source_logits: jax.nn.softmax(f(p, x), axis=-1)
      feats = feature_cache(probs, c.encoder_params, target_data, batch_size)
      estimates[name] = leep(feats, num_classes, aggregator=aggregator)
    else:
      feats = feature_cache(c.encoder_apply, c.encoder_params, target_data, batch_size)
      fn = logme if metric == "logme" else hscore
      estimates[name] = fn(feats, num_classes, aggregator=aggregator, **metric_kw)
  order = sorted(estimates, key=lambda n: -estimates[n].score)
  return Ranking(order[0], order, estimates)


def spearman(a, b) -> float:
  """Spearman's rank correlation of two equal-length sequences (average ranks for ties)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"spearman needs two 1-D sequences of the same length >= 2, got {a.shape} "
                     f"and {b.shape}")

  def ranks(v):
    order = np.argsort(v, kind="stable")
    r = np.empty(v.size)
    r[order] = np.arange(v.size, dtype=np.float64)
    for val in np.unique(v):   # average ranks of ties
      tie = v == val
      r[tie] = r[tie].mean()
    return r

  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  den = np.sqrt((ra @ ra) * (rb @ rb))
  return float(ra @ rb / den) if den > 0 else 0.0
