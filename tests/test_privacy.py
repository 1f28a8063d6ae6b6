"""DP-FedAvg (central/local, fixed/adaptive clipping) and its privacy accounting."""

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms, engine, testing, transforms
from fedjax_sim.algorithms.base import ServerContext
from fedjax_sim.client import ClientContext, LocalCarry, zero_sums
from fedjax_sim.privacy import accounting, dp

KW = dict(batch_size=16, local_epochs=1, weighting="uniform")
# The accountant needs Google's dp-accounting (`pip install dp-accounting`); the mechanism does not.
needs_dpa = pytest.mark.skipif(importlib.util.find_spec("dp_accounting") is None,
                               reason="dp-accounting is not installed")


def _model(hidden=16):
  return fs.models.mlp(input_dim=8, hidden=(hidden,), num_classes=4)


def _norms(tree):
  return np.sqrt(sum(np.sum(np.square(np.asarray(x)), axis=tuple(range(1, x.ndim)))
                     for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Clipping

def test_client_finish_clips_every_update_and_reports_unclipped():
  algo = dp.dp_fedavg(algorithms.fedavg(**KW), noise_multiplier=1.0, clip_norm=0.5)
  params = _model().init(jax.random.key(0))
  scales = jnp.asarray([1e-3, 0.1, 1.0, 10.0, 1e4])
  deltas = jax.tree.map(lambda p: scales.reshape((-1,) + (1,) * p.ndim) *
                        jax.random.normal(jax.random.key(1), (5,) + p.shape), params)
  aux = algo.server_state_init(params)
  opt = optax.sgd(0.1)
  program = algo.client(_model(), opt)
  # a carry whose local params are global - delta: the program's result delta is `deltas`
  carry = jax.vmap(lambda d: LocalCarry(jax.tree.map(jnp.subtract, params, d), opt.init(params),
                                        zero_sums()))(deltas)
  ctx = ClientContext(jnp.arange(5), params, server=aux, hparams={}, lr_scale=jnp.ones(5))
  final = jax.vmap(program.final,
                   in_axes=(0, ClientContext(0, None, None, None, None, 0, None, None)))
  res = jax.jit(final)(carry, ctx)
  clipped, up = res.delta, res.upload
  before, after = _norms(deltas), _norms(clipped)
  assert np.all(after <= 0.5 * (1 + 1e-6))
  np.testing.assert_allclose(after, np.minimum(before, 0.5), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(up["unclipped"]), before <= 0.5)
  # The local-DP transform with zero noise is the same clip.
  t = dp.local_gaussian_noise(0.0, 0.5)
  out, _ = jax.jit(jax.vmap(t.apply))(deltas, jax.random.split(jax.random.key(0), 5),
                                      jnp.arange(5), jax.vmap(t.init)(deltas))
  np.testing.assert_allclose(_norms(out), after, rtol=1e-5)


def test_fixed_clip_bounds_every_round_update_in_a_run(ragged_data):
  # One client per round and no noise: the server update IS that client's clipped delta.
  algo = dp.dp_fedavg(algorithms.fedavg(optax.sgd(1.0), **KW), noise_multiplier=0.0,
                      clip_norm=0.05)
  res = fs.run(algo, _model(), ragged_data, rounds=4, cohort_size=1, progress=False)
  norms = np.asarray(res.history["update_norm"])
  assert np.all(norms <= 0.05 * (1 + 1e-5)), norms
  assert np.max(norms) == pytest.approx(0.05, rel=1e-4)   # lr 1.0: the clip is active


# ---------------------------------------------------------------------------------------------
# Noise

@pytest.mark.parametrize("mode", ["central", "adaptive", "local"])
@pytest.mark.slow
def test_noise_std_matches_calibration(ragged_data, mode):
  # Zero client learning rate: every delta is 0, so the round's update is pure noise.
  base = algorithms.fedavg(optax.sgd(0.0), **KW)
  z, c, m = 2.0, 0.5, 4
  if mode == "central":
    algo, std = dp.dp_fedavg(base, noise_multiplier=z, clip_norm=c), z * c / m
  elif mode == "adaptive":
    # Andrew et al.: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 = (1/4 - 1/16)^-1/2 for sigma_b = 2.
    algo = dp.dp_fedavg(base, noise_multiplier=z, clip_norm=c, adaptive=True,
                        clipped_count_stddev=2.0)
    std = (z ** -2 - 4.0 ** -2) ** -0.5 * c / m
  else:
    # Each client adds N(0, (z c)^2); the mean of m of them has std z c / sqrt(m).
    algo, std = dp.dp_fedavg(base, noise_multiplier=z, clip_norm=c, local=True), z * c / m ** 0.5
  model = _model(hidden=512)   # 6,660 parameters
  p0 = model.init(jax.random.key(0))
  res = fs.run(algo, model, ragged_data, rounds=1, cohort_size=m, init_params=p0, progress=False)
  step = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                         for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(p0))])
  assert abs(np.mean(step)) < 4 * std / math.sqrt(step.size)
  assert np.std(step) == pytest.approx(std, rel=0.04)


# ---------------------------------------------------------------------------------------------
# Adaptive clipping

def test_adaptive_server_update_is_the_geometric_rule():
  algo = dp.dp_fedavg(noise_multiplier=0.0, clip_norm=2.0, adaptive=True, target_quantile=0.3,
                      clip_lr=0.2)
  params = {"w": jnp.ones(3)}
  aux = algo.server_state_init(params)
  for frac in (0.0, 0.3, 0.8):
    up = {"base": optax.EmptyState(), "unclipped": jnp.float32(frac)}
    ctx = ServerContext(params, aux, up, jnp.int32(10), jnp.float32(10), 10, 100, {},
                        jax.random.key(0))
    _, new = algo.server_finish(ctx, params)
    assert float(new["clip_norm"]) == pytest.approx(2.0 * math.exp(-0.2 * (frac - 0.3)), rel=1e-6)


@pytest.mark.slow
def test_adaptive_clip_converges_to_target_quantile_of_norms(ragged_data):
  # One full-batch local step and a frozen server model: every client's update norm is the same
  # every round, so C must settle where a fraction target_quantile of the norms is unclipped.
  model, lr, gamma = _model(), 0.5, 0.25
  base = algorithms.fedavg(optax.sgd(lr), optax.sgd(0.0), batch_size=256, local_steps=1,
                           weighting="uniform")
  algo = dp.dp_fedavg(base, noise_multiplier=0.0, clip_norm=1.0, adaptive=True,
                      target_quantile=gamma, clip_lr=0.5)
  p0 = model.init(jax.random.key(0))
  n_max = ragged_data.max_client_size
  xs, ys, ms = [], [], []
  for i in range(ragged_data.num_clients):   # padded to one shape: one compile
    c = ragged_data.client(i)
    pad = n_max - len(c["y"])
    xs.append(np.pad(c["x"], ((0, pad), (0, 0))))
    ys.append(np.pad(c["y"], (0, pad)))
    ms.append(np.arange(n_max) < len(c["y"]))
  grads = jax.jit(jax.vmap(jax.grad(lambda p, x, y, m: model.batch_loss(p, x, y, m)[0]),
                           in_axes=(None, 0, 0, 0)))(p0, np.stack(xs), np.stack(ys),
                                                     np.stack(ms))
  norms = lr * _norms(grads)
  norms = np.sort(norms)
  rf = engine.make_round(algo, model, population=12, cohort_size=12,
                         max_client_size=ragged_data.max_client_size)
  data = engine.to_device(ragged_data, np.ones(12, np.float32))

  def one_round(state, key):
    state = rf(state, data, key)[0]
    return state, state.aux["clip_norm"]

  @jax.jit
  def clip_norms(state):   # 40 rounds -> the clip norm after each
    return jax.lax.scan(one_round, state, jax.random.split(jax.random.key(1), 40))[1]

  for c_start in (0.03, 3.0):   # 10x below / above the norms
    state = engine.init_state(algo, p0, 12)
    state = state.replace(aux={**state.aux, "clip_norm": jnp.float32(c_start)})
    seen = np.asarray(clip_norms(state))
    unclipped = [np.mean(norms <= c) for c in seen[-15:]]
    assert abs(np.mean(unclipped) - gamma) <= 0.1, (c_start, norms, seen[-5:])


# ---------------------------------------------------------------------------------------------
# Equivalence with the sequential reference

@pytest.mark.parametrize("mode", ["fixed", "adaptive_scaffold", "local"])
@pytest.mark.slow
def test_dp_equals_sequential_reference(ragged_data, mode):
  if mode == "fixed":
    algo = dp.dp_fedavg(algorithms.fedavg(optax.sgd(0.1), **KW), noise_multiplier=1.0,
                        clip_norm=0.3)
  elif mode == "adaptive_scaffold":   # base hooks (control variates, regularizer) composed
    algo = dp.dp_fedavg(algorithms.scaffold(optax.sgd(0.05), batch_size=16), noise_multiplier=0.5,
                        clip_norm=0.1, adaptive=True)
  else:
    algo = dp.dp_fedavg(algorithms.fedavg(optax.sgd(0.1), **KW), noise_multiplier=0.5,
                        clip_norm=0.3, local=True)
  res = fs.run(algo, _model(), ragged_data, rounds=2, cohort_size=8, chunk_size=3, seed=2,
               progress=False)
  ref, _ = testing.sequential_run(algo, _model(), ragged_data, rounds=2, cohort_size=8, seed=2)
  testing.assert_trees_close(res.params, ref.params, atol=1e-5)
  testing.assert_trees_close(res.state.aux, ref.aux, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Accounting

def _direct(z, q, rounds, delta, acc, population=None):
  import dp_accounting as dpa
  if acc == "pld":
    a = dpa.pld.PLDAccountant()
  elif population is None:
    a = dpa.rdp.RdpAccountant()
  else:
    a = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
  one = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)) if population is None else \
      dpa.SampledWithoutReplacementDpEvent(population, round(q * population),
                                           dpa.GaussianDpEvent(z))
  a.compose(dpa.SelfComposedDpEvent(one, rounds))
  return a.get_epsilon(delta)


@needs_dpa
@pytest.mark.parametrize("acc, population", [("rdp", None), ("pld", None), ("rdp", 1000)])
def test_epsilon_equals_dp_accounting(acc, population):
  kw = {"population": population} if population else {"sampling": "poisson"}
  got = accounting.epsilon(1.1, 0.1, 37, 1e-5, acc, **kw)
  assert got == pytest.approx(_direct(1.1, 0.1, 37, 1e-5, acc, population), rel=1e-12)
  curve = accounting.EpsilonCurve(1.1, 0.1, 1e-5, acc, **kw)
  eps = [curve(r) for r in (1, 3)]
  assert eps[0] < eps[1] < got
  assert eps[1] == pytest.approx(_direct(1.1, 0.1, 3, 1e-5, acc, population), rel=1e-12)
  assert accounting.epsilon(0.0, 0.1, 3, 1e-5, acc, **kw) == math.inf
  assert accounting.epsilon(1.1, 0.1, 0, 1e-5, acc, **kw) == 0.0


@pytest.mark.slow
@needs_dpa
def test_accounting_needs_the_sampler_of_the_run(ragged_data):
  # No silent default: fedjax_sim.run draws fixed-size cohorts, so the matching analysis needs P.
  for f in (lambda: accounting.epsilon(1.0, 0.1, 10, 1e-5),
            lambda: accounting.privacy_callback(1.0, 0.1, 1e-5),
            lambda: accounting.noise_multiplier_for(3.0, 1e-5, 0.1, 10)):
    with pytest.raises(ValueError, match="population=P"):
      f()
  fixed = accounting.epsilon(1.0, 0.1, 10, 1e-5, population=1000)
  poisson = accounting.epsilon(1.0, 0.1, 10, 1e-5, sampling="poisson")
  assert fixed > 1.2 * poisson   # replace-one vs add/remove: larger (x1.3 here)
  # q = 1 (no amplification, e.g. local DP) needs no population: the Gaussian mechanism.
  assert accounting.epsilon(1.0, 1.0, 10, 1e-5) == pytest.approx(_direct(1.0, 1.0, 10, 1e-5,
                                                                         "rdp"), rel=1e-12)
  algo = dp.dp_fedavg(algorithms.fedavg(**KW), noise_multiplier=1.0, clip_norm=0.5)
  run = functools.partial(fs.run, algo, _model(), ragged_data, rounds=2, cohort_size=4,
                          progress=False)
  # run() refuses an accountant whose sampling model is not the run's, before compiling.
  bad = [(accounting.privacy_callback(1.0, 4 / 12, 1e-5, sampling="poisson"), {}, "poisson"),
         (accounting.privacy_callback(1.0, 4 / 12, 1e-5, population=24), {}, "4 out of 12"),
         (accounting.privacy_callback(1.0, 6 / 12, 1e-5, population=12), {}, "4 out of 12"),
         (accounting.privacy_callback(1.0, 4 / 12, 1e-5, population=12),
          {"cohort_sampling": "size"}, "uniform"),
         (accounting.privacy_callback(1.0, 4 / 12, 1e-5, population=12),
          {"heterogeneity": fs.Heterogeneity(availability=np.full(12, 0.5))}, "availability")]
  for cb, kw, match in bad:
    with pytest.raises(ValueError, match=match):
      run(callback=cb, **kw)
  h = run(callback=accounting.privacy_callback(1.0, 4 / 12, 1e-5, population=12)).history
  np.testing.assert_allclose(h["epsilon"], [accounting.epsilon(1.0, 4 / 12, r, 1e-5,
                                                               population=12) for r in (1, 2)])
  assert run(callback=accounting.privacy_callback(1.0, 1.0, 1e-5)).history["epsilon"][-1] > 0


def test_dp_algorithms_refuse_client_weights(ragged_data):
  for local in (False, True):
    algo = dp.dp_fedavg(algorithms.fedavg(**KW), noise_multiplier=1.0, clip_norm=0.5,
                        local=local)
    with pytest.raises(ValueError, match="does not take client_weights"):
      fs.run(algo, _model(), ragged_data, rounds=1, cohort_size=4, progress=False,
             client_weights=np.ones(12))


@pytest.mark.slow
@needs_dpa
def test_noise_multiplier_for_hits_the_target():
  for kw in ({"population": 2000}, {"sampling": "poisson"}):
    z = accounting.noise_multiplier_for(3.0, 1e-5, 0.05, 200, **kw)
    assert accounting.epsilon(z, 0.05, 200, 1e-5, **kw) <= 3.0
    assert accounting.epsilon(z * 0.995, 0.05, 200, 1e-5, **kw) > 3.0


@pytest.mark.slow
@needs_dpa
def test_run_stops_at_budget_and_records_epsilon(ragged_data):
  z, q, delta = 1.0, 4 / 12, 1e-5
  curve = accounting.EpsilonCurve(z, q, delta, population=12)
  target = 0.5 * (curve(3) + curve(4))   # rounds 1..3 fit, round 4 would not
  cb = accounting.privacy_callback(z, q, delta, target_epsilon=target, population=12)
  assert cb.max_rounds() == 3
  algo = dp.dp_fedavg(algorithms.fedavg(**KW), noise_multiplier=z, clip_norm=0.5, adaptive=True,
                      clipped_count_stddev=1.0)
  with pytest.warns(UserWarning, match="stopping after round 3 of the 10 requested: privacy "
                    "budget: epsilon after 3 rounds is"):
    res = fs.run(algo, _model(), ragged_data, rounds=10, cohort_size=4, callback=cb,
                 progress=False)
  h = res.history
  assert list(h["round"]) == [1, 2, 3] and h["rounds_requested"][-1] == 10
  np.testing.assert_allclose(h["epsilon"], [curve(1), curve(2), curve(3)], rtol=1e-12)
  assert h["epsilon"][-1] <= target < curve(4)
  assert h["stopped_early"][-1] == 1.0
  assert h["clip_norm"][-1] == pytest.approx(float(res.state.aux["clip_norm"]))
  with pytest.raises(ValueError, match="one round already costs"):
    accounting.privacy_callback(z, q, delta, target_epsilon=0.5 * curve(1), population=12)


# ---------------------------------------------------------------------------------------------
# Composition and bad input

def test_composition_keeps_base_hooks_and_chains_transforms():
  sc = algorithms.scaffold(optax.sgd(0.05))
  algo = dp.dp_fedavg(sc, noise_multiplier=1.0, clip_norm=1.0)
  assert algo.name == "dp_scaffold" and algo.client_state_init is sc.client_state_init
  assert algo.client is not sc.client and algo.work == sc.work   # the base program, wrapped
  params = {"w": jnp.ones(3)}
  aux = algo.server_state_init(params)
  assert set(aux) == {"base", "clip_norm"}
  testing.assert_trees_close(aux["base"], sc.server_state_init(params))
  # A fixed clip is re-applied after the base's update transform.
  big = algorithms.fedavg(**KW)
  big = big.__class__(**{**big.__dict__, "update_transform": transforms.scale_attack(0.0, 1.0)})
  t = dp.dp_fedavg(big, noise_multiplier=1.0, clip_norm=1.0).update_transform
  x = {"w": jnp.full(3, 100.0)}
  out, _ = t.apply(x, jax.random.key(0), 0, t.init(x))
  assert float(jnp.linalg.norm(out["w"])) == pytest.approx(1.0, rel=1e-5)
  loc = dp.dp_fedavg(big, noise_multiplier=1.0, clip_norm=1.0, local=True)
  assert loc.name == "ldp_fedavg" and loc.server_finish is algorithms.base.pass_through


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-0.1, clip_norm=1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, clip_norm=0.0), "clip_norm"),
    (dict(noise_multiplier=1.0, clip_norm=-1.0), "clip_norm"),
    (dict(noise_multiplier=float("nan"), clip_norm=1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, clip_norm=1.0, target_quantile=1.5, adaptive=True),
     "target_quantile"),
    (dict(noise_multiplier=1.0, clip_norm=1.0, clip_lr=-0.1, adaptive=True), "clip_lr"),
    (dict(noise_multiplier=3.0, clip_norm=1.0, adaptive=True, clipped_count_stddev=1.0),
     "clipped_count_stddev"),
    (dict(noise_multiplier=1.0, clip_norm=1.0, adaptive=True, local=True), "local"),
    (dict(base=algorithms.fedavg(), noise_multiplier=1.0, clip_norm=1.0), "uniform"),
    (dict(base=algorithms.fedavg(weighting="uniform"), noise_multiplier=1.0, clip_norm=1.0,
          adaptive=True, _transform=True), "update_transform"),
])
def test_dp_fedavg_bad_input(kwargs, match):
  kwargs = dict(kwargs)
  if kwargs.pop("_transform", False):
    b = kwargs["base"]
    kwargs["base"] = b.__class__(**{**b.__dict__, "update_transform": transforms.clip_by_norm(1)})
  with pytest.raises(ValueError, match=match):
    dp.dp_fedavg(**kwargs)
  with pytest.raises(ValueError, match="noise_multiplier|clip_norm"):
    dp.local_gaussian_noise(1.0, 0.0)


def test_dp_fedavg_rejects_robust_aggregator():
  b = algorithms.fedavg(weighting="uniform")
  b = b.__class__(**{**b.__dict__, "aggregator": fs.aggregators.coordinate_median()})
  with pytest.raises(ValueError, match="aggregator"):
    dp.dp_fedavg(b, noise_multiplier=1.0, clip_norm=1.0)


@pytest.mark.parametrize("args, kwargs, match", [
    ((1.0, 1.5, 10, 1e-5), {}, "sampling_probability"),
    ((-1.0, 0.1, 10, 1e-5), {}, "noise_multiplier"),
    ((1.0, 0.1, 10, 0.0), {}, "delta"),
    ((1.0, 0.1, -1, 1e-5), {"population": 100}, "rounds"),
    ((1.0, 0.1, 10, 1e-5, "moments"), {}, "accountant"),
    ((1.0, 0.1, 10, 1e-5), {"sampling": "uniform"}, "sampling"),
    ((1.0, 0.1, 10, 1e-5), {"sampling": "poisson", "population": 100}, "no population"),
    ((1.0, 0.1, 10, 1e-5, "pld"), {"population": 100}, "RDP"),
    ((1.0, 0.105, 10, 1e-5), {"population": 100}, "cohort size"),
])
def test_accounting_bad_input(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    accounting.epsilon(*args, **kwargs)


@needs_dpa
def test_accounting_does_not_spam_absl_warnings(caplog):
  """dp_accounting warns once per non-converging Renyi order (~50 lines per notebook cell at
  q = 0.5); the accountant silences them while it computes, and only then."""
  import logging
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  with caplog.at_level(logging.WARNING):
    eps = accounting.EpsilonCurve(1.0, 0.5, 1e-5, sampling="poisson")(10)
  assert not [r for r in caplog.records if r.name == "absl"]
  assert absl_logger.level == level
  assert eps == pytest.approx(_direct(1.0, 0.5, 10, 1e-5, "rdp", None), rel=1e-12)
