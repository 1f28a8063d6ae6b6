"""Privacy accounting for DP-FedAvg with Google's ``dp_accounting`` (RDP or PLD).

One round of central DP-FedAvg with noise multiplier ``z`` (:func:`fedjax_sim.privacy.dp_fedavg`;
with adaptive clipping, ``z`` is the multiplier the round is calibrated to, see its docstring)
is a sampled Gaussian mechanism on the client-level dataset; ``R`` rounds are its ``R``-fold
composition. The analysis must match how cohorts are drawn; two samplers, two analyses:

* ``sampling="fixed"`` (the default; needs ``population=P``): a cohort of exactly
  ``m = round(q P)`` distinct clients drawn uniformly without replacement. **This is the sampler
  of** :func:`fedjax_sim.run` (:func:`fedjax_sim.engine.sample_cohort` with
  ``cohort_sampling="uniform"``), so it is the matching analysis for every run of this library.
  ``SampledWithoutReplacementDpEvent(P, m, GaussianDpEvent(z))``; dp_accounting supports it with
  RDP only and for the replace-one neighbouring relation (one client's data swapped for
  another's), whose epsilon is about twice the add/remove one at the same noise.
* ``sampling="poisson"`` (ask for it explicitly): each client takes part independently with
  probability ``q``, a cohort of random size. The analysis of McMahan et al. (2018) and Andrew et
  al. (2021); neighbouring datasets differ by adding or removing one client.
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, RDP or PLD. fedjax_sim's engine does not
  sample this way, so this epsilon does **not** describe a :func:`fedjax_sim.run`:
  :class:`PrivacyCallback` refuses to be used in a run with it (see
  :meth:`PrivacyCallback.check_run`); :func:`epsilon` computes it for comparisons.

Without ``population`` and without ``sampling="poisson"`` these functions raise a ValueError
rather than guess. Size-weighted cohorts (``cohort_sampling="size"``) and availability-restricted
cohorts (``Heterogeneity(availability=...)``) match neither analysis: a privacy callback refuses
those runs.

Local DP (``dp_fedavg(local=True)``) gets no amplification by sampling: account with ``q = 1``
(every round counted, whatever the sampler: no ``population`` needed) over the rounds.

``dp_accounting`` is imported on first use; install it with ``pip install dp-accounting``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("fixed", "poisson")


@contextlib.contextmanager
def _quiet_absl():
  """Silences dp_accounting's absl warnings while it computes.

  Its RDP accountant logs one warning per Renyi order whose series fails to converge (about 50
  per call at sampling rates near 0.5); those orders are left out of the minimum over orders,
  which can only loosen the epsilon bound, never make it invalid, so the lines carry nothing a
  user can act on. Errors still get through.
  """
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _dpa():
  try:
    import dp_accounting
  except ImportError as e:   # pragma: no cover - depends on the environment
    raise ImportError("privacy accounting needs Google's dp-accounting package: "
                      "pip install dp-accounting") from e
  return dp_accounting


def _resolve_sampling(sampling_probability, population, sampling):
  """The ``population`` argument of the dp_event for ``sampling`` (None: Poisson), or ValueError."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
  if sampling == "poisson":
    if population is not None:
      raise ValueError("sampling='poisson' takes no population (each client takes part with "
                       "probability q); population=P is for sampling='fixed'")
    return None
  if population is None:
    if sampling_probability == 1:
      return None   # every client in every round: no amplification, the Gaussian mechanism
    raise ValueError(
        "give population=P (the number of clients): fedjax_sim.run draws fixed-size cohorts of "
        "round(q P) clients without replacement, and that is the analysis that matches it. "
        "Poisson sampling's epsilon (about half) does not describe such a run; pass "
        "sampling='poisson' to compute it anyway.")
  return population


def _check(noise_multiplier, sampling_probability, delta, accountant, population):
  for name, v in (("noise_multiplier", noise_multiplier),
                  ("sampling_probability", sampling_probability), ("delta", delta)):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"{name} must be a finite number, got {v!r}")
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
  if not 0 <= sampling_probability <= 1:
    raise ValueError(f"sampling_probability must lie in [0, 1], got {sampling_probability!r}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
  if population is not None:
    if isinstance(population, bool) or not isinstance(population, int) or population <= 0:
      raise ValueError(f"population must be a positive integer, got {population!r}")
    if accountant != "rdp":
      raise ValueError("fixed-size sampling without replacement (population=...) is supported by "
                       "dp_accounting's RDP accountant only; use accountant='rdp'")
    m = round(sampling_probability * population)
    if not 1 <= m <= population or abs(m - sampling_probability * population) > 1e-6 * population:
      raise ValueError(f"sampling_probability * population must be a cohort size in "
                       f"[1, {population}], got {sampling_probability * population}")


def _check_rounds(rounds):
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
    raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")


def dp_event(noise_multiplier: float, sampling_probability: float, rounds: int = 1,
             population: int | None = None):
  """The ``dp_accounting`` event of ``rounds`` rounds (see the module docstring): fixed-size
  sampling without replacement from ``population`` clients, or Poisson sampling with probability
  ``sampling_probability`` when ``population`` is None (this low-level builder does not check
  which one a run uses; :func:`epsilon` and :func:`privacy_callback` do)."""
  dpa = _dpa()
  gauss = dpa.GaussianDpEvent(noise_multiplier)
  if population is None:
    one = dpa.PoissonSampledDpEvent(sampling_probability, gauss)
  else:
    one = dpa.SampledWithoutReplacementDpEvent(population,
                                               round(sampling_probability * population), gauss)
  return dpa.SelfComposedDpEvent(one, rounds)


def make_accountant(accountant: str = "rdp", population: int | None = None):
  """A fresh ``dp_accounting`` accountant for the sampling model (default orders / PLD
  discretization)."""
  dpa = _dpa()
  if accountant == "pld":
    return dpa.pld.PLDAccountant()
  rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE if population is None else \
      dpa.NeighboringRelation.REPLACE_ONE
  return dpa.rdp.RdpAccountant(neighboring_relation=rel)


class EpsilonCurve:
  """``epsilon(r)`` for r = 1, 2, ... rounds at fixed ``(z, q, delta)``, computed lazily, cached.

  Arguments as :func:`epsilon` (``sampling="fixed"`` needs ``population``).

  RDP composes additively, so the one-round RDP vector is computed once and ``r`` rounds cost one
  RDP-to-(epsilon, delta) conversion (the same arithmetic as composing
  ``SelfComposedDpEvent(event, r)`` in a fresh accountant). PLD composes ``r`` rounds afresh for
  each new ``r`` (about a second on a CPU for ``q = 0.1``).
  """

  def __init__(self, noise_multiplier: float, sampling_probability: float, delta: float,
               accountant: str = "rdp", population: int | None = None, sampling: str = "fixed"):
    _check(noise_multiplier, sampling_probability, delta, accountant, population)
    population = _resolve_sampling(sampling_probability, population, sampling)
    self.noise_multiplier = float(noise_multiplier)
    self.sampling_probability = float(sampling_probability)
    self.delta = float(delta)
    self.accountant = accountant
    self.population = population
    self.sampling = sampling
    self._cache: dict[int, float] = {0: 0.0}
    self._rdp_one = None

  def _compute(self, rounds: int) -> float:
    with _quiet_absl():
      return self._compute_loud(rounds)

  def _compute_loud(self, rounds: int) -> float:
    z, q = self.noise_multiplier, self.sampling_probability
    if q == 0:
      return 0.0
    if z == 0:
      return math.inf
    if self.accountant == "rdp":
      if self._rdp_one is None:
        acc = make_accountant("rdp", self.population)
        acc.compose(dp_event(z, q, 1, self.population))
        self._rdp_one = (acc._orders, getattr(acc, "_rdp", None))   # noqa: SLF001
      orders, rdp = self._rdp_one
      if rdp is not None:
        from dp_accounting.rdp import rdp_privacy_accountant
        return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, self.delta)[0])
    acc = make_accountant(self.accountant, self.population)
    acc.compose(dp_event(z, q, rounds, self.population))
    return float(acc.get_epsilon(self.delta))

  def __call__(self, rounds: int) -> float:
    _check_rounds(rounds)
    if rounds not in self._cache:
      self._cache[rounds] = self._compute(rounds)
    return self._cache[rounds]

  def max_rounds(self, target_epsilon: float, limit: int = 1_000_000) -> int:
    """The largest ``R <= limit`` with ``epsilon(R) <= target_epsilon`` (0 if even one round
    exceeds it); epsilon grows with R, so a doubling then bisection search."""
    if self(1) > target_epsilon:
      return 0
    lo, hi = 1, 2
    while hi <= limit and self(hi) <= target_epsilon:
      lo, hi = hi, hi * 2
    if hi > limit:
      if self(limit) <= target_epsilon:
        return limit
      hi = limit
    while hi - lo > 1:   # epsilon(lo) <= target < epsilon(hi)
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if self(mid) <= target_epsilon else (lo, mid)
    return lo


def epsilon(noise_multiplier: float, sampling_probability: float, rounds: int, delta: float,
            accountant: str = "rdp", *, population: int | None = None,
            sampling: str = "fixed") -> float:
  """Epsilon of ``rounds`` rounds of the sampled Gaussian mechanism at ``delta``.

  Args:
    noise_multiplier: z (noise std / clip norm); 0 gives ``inf``.
    sampling_probability: q, a client's probability of taking part in a round (cohort size /
      population).
    rounds: number of rounds R >= 0.
    delta: target delta in (0, 1).
    accountant: ``"rdp"`` (Renyi DP, default orders) or ``"pld"`` (privacy loss distributions,
      tighter, slower).
    population: P, the number of clients: fixed-size cohorts of ``q * population`` clients drawn
      without replacement, the sampler of :func:`fedjax_sim.run` (RDP, replace-one neighbours).
      Required with ``sampling="fixed"`` unless ``q == 1``.
    sampling: ``"fixed"`` (default, matches :func:`fedjax_sim.run`) or ``"poisson"`` (each client
      independently with probability q: a different sampler, asked for explicitly; see the
      module docstring).
  """
  _check_rounds(rounds)
  return EpsilonCurve(noise_multiplier, sampling_probability, delta, accountant, population,
                      sampling)(rounds)


def noise_multiplier_for(target_epsilon: float, delta: float, q: float, rounds: int,
                         accountant: str = "rdp", *, population: int | None = None,
                         sampling: str = "fixed", rtol: float = 1e-3) -> float:
  """The smallest noise multiplier (to relative tolerance ``rtol``, rounded up) whose
  ``rounds``-round epsilon is ``<= target_epsilon``: a bracketing then bisection search in z,
  each step one accountant call. Arguments as :func:`epsilon`."""
  if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or \
      not target_epsilon > 0 or not math.isfinite(target_epsilon):
    raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
  _check(1.0, q, delta, accountant, population)
  _resolve_sampling(q, population, sampling)
  _check_rounds(rounds)
  if rounds == 0 or q == 0:
    return 0.0

  def eps(z):
    return epsilon(z, q, rounds, delta, accountant, population=population, sampling=sampling)

  hi = 1.0
  while eps(hi) > target_epsilon:
    hi *= 2
    if hi > 1e6:
      raise ValueError(f"no noise multiplier <= 1e6 reaches epsilon {target_epsilon}")
  lo = hi / 2
  while lo > 1e-3 and eps(lo) <= target_epsilon:
    lo, hi = lo / 2, lo
  while (hi - lo) > rtol * hi:   # eps(lo) > target >= eps(hi)
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
  return hi


class PrivacyCallback:
  """A :func:`fedjax_sim.run` callback recording epsilon each round and stopping at a budget.

  Returned by :func:`privacy_callback`. ``callback(round, state, out)`` returns
  ``{"epsilon": epsilon(round)}`` (plus ``"clip_norm"``, the clip norm of the next round, for
  central :func:`~fedjax_sim.privacy.dp_fedavg` runs) and adds ``"stop": True`` when the NEXT
  round would exceed ``target_epsilon``: the run ends with every completed round within the
  budget, at the last round ``R`` with ``epsilon(R) <= target_epsilon`` (:meth:`max_rounds`).

  ``round`` is the absolute round number, so a resumed run is accounted correctly.
  :func:`fedjax_sim.run` calls :meth:`check_run` (the analysis must match the run's cohort
  sampler) and :meth:`max_rounds` up front and caps ``rounds`` with the latter, so blocks of
  rounds (``rounds_per_call > 1``) never run past the budget either.
  """

  def __init__(self, curve: EpsilonCurve, target_epsilon: float | None):
    self.curve = curve
    self.target_epsilon = target_epsilon

  def epsilon(self, rounds: int) -> float:
    return self.curve(rounds)

  def check_run(self, *, population: int, cohort_size: int, cohort_sampling: str = "uniform",
                heterogeneity: Any = None) -> None:
    """ValueError unless this accountant's sampling model is the one of a run drawing
    ``cohort_size`` of ``population`` clients with ``cohort_sampling`` (called by
    :func:`fedjax_sim.run` before it compiles anything).

    ``q = 1`` (no amplification, e.g. local DP) holds for any sampler. Otherwise the run must
    draw uniform fixed-size cohorts (``cohort_sampling="uniform"``, no availability pattern) of
    ``round(q P)`` clients from the accountant's population.
    """
    c = self.curve
    if c.sampling_probability == 1:
      return
    where = "privacy_callback"
    if c.sampling == "poisson":
      raise ValueError(f"{where}(sampling='poisson') assumes Poisson-sampled cohorts, but "
                       "fedjax_sim.run draws fixed-size cohorts without replacement: pass "
                       f"population={population} (and no sampling) for the matching epsilon")
    if cohort_sampling != "uniform":
      raise ValueError(f"{where}: cohort_sampling={cohort_sampling!r} is not a uniform sample of "
                       "the population; no accountant here covers it (use 'uniform')")
    if heterogeneity is not None and getattr(heterogeneity, "availability", None) is not None:
      raise ValueError(f"{where}: with Heterogeneity(availability=...) cohorts are drawn among the "
                       "online clients only, not uniformly from the population; the fixed-size "
                       "analysis does not cover it")
    if c.population != population or round(c.sampling_probability * population) != cohort_size:
      raise ValueError(f"{where} accounts for cohorts of round(q P) = "
                       f"{round(c.sampling_probability * c.population)} out of P = {c.population} "
                       f"clients, but this run draws {cohort_size} out of {population}: pass "
                       f"q = {cohort_size}/{population} and population={population}")

  def max_rounds(self, limit: int = 1_000_000) -> int:
    """Rounds the budget allows (``limit`` if there is no target)."""
    if self.target_epsilon is None:
      return limit
    return self.curve.max_rounds(self.target_epsilon, limit)

  def max_rounds_reason(self, rounds: int) -> str:
    """Why the run stops after ``rounds`` rounds (said by :func:`fedjax_sim.run` when it caps)."""
    return (f"privacy budget: epsilon after {rounds} rounds is {self.curve(rounds):.3g} and "
            f"{self.curve(rounds + 1):.3g} after {rounds + 1}, target_epsilon "
            f"{self.target_epsilon:g} (delta {self.curve.delta:g}, noise multiplier "
            f"{self.curve.noise_multiplier:g}, q {self.curve.sampling_probability:g})")

  def __call__(self, rnd: int, state: Any = None, out: Any = None) -> dict[str, Any]:
    del out
    from fedjax_sim.privacy.dp import current_clip_norm
    rec: dict[str, Any] = {"epsilon": self.curve(int(rnd))}
    clip = current_clip_norm(state)
    if clip is not None:
      rec["clip_norm"] = clip
    if self.target_epsilon is not None and self.curve(int(rnd) + 1) > self.target_epsilon:
      rec["stop"] = True
    return rec


def privacy_callback(noise_multiplier: float, q: float, delta: float,
                     target_epsilon: float | None = None, accountant: str = "rdp", *,
                     population: int | None = None, sampling: str = "fixed"
                     ) -> Callable[..., dict]:
  """A :class:`PrivacyCallback` for :func:`fedjax_sim.run` (``callback=``): records ``epsilon``
  (at ``delta``, after each round) in the history and, with ``target_epsilon``, stops the run at
  the last round whose epsilon is within the budget. Arguments as :func:`epsilon`: give
  ``q = cohort_size / P`` and ``population=P``, the fixed-size analysis that matches
  :func:`fedjax_sim.run`'s cohorts; ``run`` checks that they match (:meth:`PrivacyCallback.check_run`)
  and refuses a Poisson (``sampling="poisson"``) callback.

  Raises:
    ValueError: on bad arguments, or if a single round already exceeds ``target_epsilon``.
  """
  curve = EpsilonCurve(noise_multiplier, q, delta, accountant, population, sampling)
  if target_epsilon is not None:
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or \
        not target_epsilon > 0:
      raise ValueError(f"target_epsilon must be a number > 0, got {target_epsilon!r}")
    if curve(1) > target_epsilon:
      raise ValueError(f"one round already costs epsilon {curve(1):.4g} > target_epsilon "
                       f"{target_epsilon} (noise_multiplier={noise_multiplier}, q={q}, "
                       f"delta={delta}): increase the noise or lower the sampling rate")
  return PrivacyCallback(curve, target_epsilon)
