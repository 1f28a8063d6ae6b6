"""Secure aggregation: masked sums equal plain sums exactly (drop-outs too), a masked update is
uniform and independent of the true one, the aggregator's mean is the quantized mean and runs
inside the vectorized round, bad parameters are rejected."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.aggregators import secure as sa
from fedjax_sim import testing, transforms
from fedjax_sim.transforms import compression

CLIP, BITS = 1.0, 16


def _cohort(c=7, n=50, seed=0, ring_bits=32):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.choice(1000, c, replace=False), jnp.int32)
  x = jnp.asarray(rng.normal(scale=0.4, size=(c, n)), jnp.float32)
  return ids, sa.encode(x, CLIP, BITS, ring_bits)


def _signed_sum(encoded, alive, ring_bits=32):
  q = np.asarray(sa.to_signed(encoded, ring_bits), np.int64)
  return q[np.asarray(alive)].sum(axis=0)


@pytest.mark.parametrize("ring_bits", [32, 20])
@pytest.mark.parametrize("self_mask", [True, False])
@pytest.mark.parametrize("alive", [[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0],
                                   [0, 0, 0, 1, 0, 0, 0], [0] * 7],
                         ids=["all", "3-drop", "1-left", "none"])
def test_unmasked_sum_equals_plain_sum_exactly(ring_bits, self_mask, alive):
  ids, enc = _cohort(ring_bits=ring_bits)
  alive = jnp.asarray(alive, bool)
  key = jax.random.key(42)
  masked = jax.jit(sa.mask_updates, static_argnums=(4, 5))(key, ids, enc, alive, ring_bits,
                                                          self_mask)
  assert masked.dtype == jnp.uint32 and int(masked.max()) < 2 ** ring_bits
  np.testing.assert_array_equal(np.asarray(masked)[~np.asarray(alive)], 0)   # never received
  total = jax.jit(sa.unmask_sum, static_argnums=(4, 5))(key, ids, masked, alive, ring_bits,
                                                        self_mask)
  np.testing.assert_array_equal(np.asarray(sa.to_signed(total, ring_bits), np.int64),
                                _signed_sum(enc, alive, ring_bits))
  plain = jnp.sum(jnp.where(alive[:, None], enc, jnp.uint32(0)), 0, dtype=jnp.uint32)
  np.testing.assert_array_equal(total, plain & jnp.uint32(2 ** ring_bits - 1))


def test_recovery_is_needed_and_masks_are_reproducible():
  ids, enc = _cohort()
  alive = jnp.asarray([1, 0, 1, 1, 1, 1, 1], bool)
  key = jax.random.key(7)
  mask_updates = jax.jit(sa.mask_updates, static_argnames=("ring_bits", "self_mask"))
  masked = mask_updates(key, ids, enc, alive)
  naive = jnp.sum(masked, 0, dtype=jnp.uint32)          # the sum without the recovery step
  assert not np.array_equal(np.asarray(sa.to_signed(naive)), _signed_sum(enc, alive))
  np.testing.assert_array_equal(masked, mask_updates(key, ids, enc, alive))
  assert not np.array_equal(masked, mask_updates(jax.random.key(8), ids, enc, alive))
  # Without drop-outs and self masks, the pairwise masks alone cancel in the plain sum.
  everyone = jnp.ones(7, bool)
  m = mask_updates(key, ids, enc, everyone, self_mask=False)
  np.testing.assert_array_equal(sa.to_signed(jnp.sum(m, 0, dtype=jnp.uint32)),
                                _signed_sum(enc, everyone))
  # The order of the cohort does not matter: client a's mask depends on ids only.
  perm = np.array([3, 0, 6, 1, 5, 2, 4])
  m_perm = mask_updates(key, ids[perm], enc[perm], alive[perm])
  np.testing.assert_array_equal(m_perm, masked[perm])


def _chi2_uniform(values, bins, value_bits):
  counts = np.bincount((values >> np.uint64(value_bits - int(np.log2(bins)))).astype(np.int64),
                       minlength=bins)
  expected = values.size / bins
  return float(((counts - expected) ** 2 / expected).sum())


def _ks_uniform(u):
  u = np.sort(u)
  i = np.arange(1, u.size + 1)
  return float(max(np.max(i / u.size - u), np.max(u - (i - 1) / u.size)))


@pytest.mark.parametrize("ring_bits", [32, 20])
@pytest.mark.slow
def test_single_masked_update_is_uniform_and_independent_of_the_true_update(ring_bits):
  num_keys, c, n = 1000, 3, 64
  rng = np.random.default_rng(1)
  ids = jnp.asarray([11, 4, 25], jnp.int32)
  alive = jnp.ones(c, bool)
  # Client 0's true update: random per key (for the correlation) or fixed extremes.
  x_rand = jnp.asarray(rng.uniform(-CLIP, CLIP, size=(num_keys, n)), jnp.float32)
  others = jnp.asarray(rng.normal(scale=0.3, size=(c - 1, n)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), num_keys)

  @jax.jit
  def client0_view(key, x0):
    enc = sa.encode(jnp.concatenate([x0[None], others]), CLIP, BITS, ring_bits)
    return sa.mask_updates(key, ids, enc, alive, ring_bits, False)[0]   # pairwise masks only

  view = jax.vmap(client0_view)
  masked = np.asarray(view(keys, x_rand), np.uint64).ravel()
  lo = np.asarray(view(keys, jnp.full((num_keys, n), -CLIP)), np.uint64).ravel()
  hi = np.asarray(view(keys, jnp.full((num_keys, n), CLIP)), np.uint64).ravel()
  m = masked.size                                   # 64,000 samples
  for v in (masked, lo, hi):
    # Uniform over the ring: chi-square of the top 4 bits (15 dof, 0.1% critical value 37.7)
    # and Kolmogorov-Smirnov against U[0, 1) (0.1% critical value 1.95 / sqrt(m)).
    assert _chi2_uniform(v, 16, ring_bits) < 37.7
    assert _ks_uniform(v.astype(np.float64) / 2.0 ** ring_bits) < 1.95 / np.sqrt(m)
  # The same distribution whatever the true update (two-sample KS between the extremes).
  a, b = np.sort(lo.astype(np.float64)), np.sort(hi.astype(np.float64))
  grid = np.linspace(0, 2.0 ** ring_bits, 513)
  d = np.max(np.abs(np.searchsorted(a, grid) - np.searchsorted(b, grid))) / m
  assert d < 1.95 * np.sqrt(2.0 / m)
  # No correlation between the true coordinate and its masked value across keys.
  true = np.asarray(x_rand, np.float64).ravel()
  r = np.corrcoef(true, masked.astype(np.float64))[0, 1]
  assert abs(r) < 4.0 / np.sqrt(m)
  # Whereas the plain encoding is (of course) perfectly informative.
  enc = sa.to_signed(sa.encode(x_rand, CLIP, BITS, ring_bits), ring_bits)
  enc = np.asarray(enc, np.float64).ravel()
  assert np.corrcoef(true, enc)[0, 1] > 0.999


def test_encode_decode_error_and_stochastic_rounding():
  x = jnp.linspace(-1.5, 1.5, 301)
  for ring_bits in (32, 18):
    back = sa.decode(sa.encode(x, CLIP, BITS, ring_bits), CLIP, BITS, ring_bits)
    inside = np.abs(np.asarray(x)) <= CLIP
    step = 1.0 / sa.scale_for(CLIP, BITS)
    assert np.max(np.abs(back - x)[inside]) <= 0.5 * step * (1 + 1e-4)
    np.testing.assert_allclose(back[~inside], np.sign(x[~inside]) * CLIP, atol=1e-6)
  # Stochastic rounding (with a key) is unbiased; 4 value bits make the grid coarse.
  y = jnp.asarray([0.01, -0.33, 0.5, 0.9])
  draws = jax.vmap(lambda k: sa.decode(sa.encode(y, CLIP, 4, key=k), CLIP, 4))(
      jax.random.split(jax.random.key(0), 20000))
  np.testing.assert_allclose(np.mean(np.asarray(draws), 0), y, atol=4 * (1 / 7) / np.sqrt(20000))


def _feed(agg, ups, w, k=4):
  template = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), ups)
  cap = w.shape[0]
  state = agg.init(template, cap)
  for i in range(0, cap, k):
    d = jax.tree.map(lambda a: jnp.asarray(a[i:i + k]), ups)
    state = agg.accumulate(state, d, jnp.asarray(w[i:i + k]))
  return state


def test_secure_sum_is_the_quantized_mean_in_integer_space():
  rng = np.random.default_rng(3)
  cap = 12
  ups = {"w": rng.normal(scale=0.3, size=(cap, 5, 3)).astype(np.float32),
         "b": rng.normal(scale=0.3, size=(cap, 3)).astype(np.float32)}
  w = rng.uniform(1, 50, size=cap).astype(np.float32)
  w[[2, 7, 11]] = 0.0                                   # dropped / padding slots
  for name in ups:
    ups[name][[2, 7, 11]] = 0.0
  agg = sa.secure_sum(CLIP, BITS, ring_bits=24)
  agg.validate(cap)
  update, total_w = jax.jit(agg.finalize)(_feed(agg, ups, w))
  assert float(total_w) == pytest.approx(float(w.sum()), rel=1e-6)
  # The plain (unmasked) quantized sum, in integers.
  flat = np.concatenate([ups[k].reshape(cap, -1) for k in sorted(ups)], axis=1)   # leaf order
  w_ref = w.max()
  weighted = jnp.asarray(flat) * jnp.asarray(w / w_ref)[:, None]
  q = np.asarray(sa.to_signed(sa.encode(weighted, CLIP, BITS, 24), 24), np.int64).sum(0)
  got = np.asarray(compression.flatten(update), np.float64)
  scale = sa.scale_for(CLIP, BITS)
  back = got * float(w.sum()) / float(w_ref) * scale
  np.testing.assert_array_equal(np.round(back).astype(np.int64), q)
  assert np.max(np.abs(back - q)) < 0.01
  # Close to the float mean: each client's rounding is at most half a step.
  mean = (w[:, None] * flat).sum(0) / w.sum()
  bound = 0.5 / scale * (w > 0).sum() * w_ref / w.sum()
  assert np.max(np.abs(got - mean)) <= bound * (1 + 1e-3)


def test_weights_above_weight_bound_are_exact_not_clipped():
  rng = np.random.default_rng(5)
  ups = {"v": rng.uniform(-0.5, 0.5, size=(6, 8)).astype(np.float32)}
  w = np.array([1.0, 2.0, 50.0, 3.0, 1.0, 120.0], np.float32)   # two above the bound
  agg = sa.secure_sum(CLIP, BITS, weight_bound=10.0)
  update, total_w = jax.jit(agg.finalize)(_feed(agg, ups, w, k=3))   # equal chunks, as the engine
  mean = (w[:, None] * ups["v"]).sum(0) / w.sum()
  scale = sa.scale_for(CLIP, BITS)
  # Each client's rounding costs at most half a step of the reference weight max(w) = 120.
  bound = 0.5 / scale * len(w) * w.max() / w.sum()
  np.testing.assert_allclose(np.asarray(update["v"]), mean, rtol=0, atol=bound * (1 + 1e-3))
  assert float(total_w) == pytest.approx(float(w.sum()))
  # Weights within the bound keep the public reference weight_bound (finer than max w here).
  small = np.minimum(w, 10.0)
  update, _ = jax.jit(agg.finalize)(_feed(agg, ups, small, k=3))
  np.testing.assert_allclose(np.asarray(update["v"]),
                             (small[:, None] * ups["v"]).sum(0) / small.sum(), rtol=0,
                             atol=0.5 / scale * len(w) * 10.0 / small.sum() * (1 + 1e-3))


def test_secure_sum_combines_device_states():
  rng = np.random.default_rng(4)
  ups = {"v": rng.normal(scale=0.3, size=(8, 6)).astype(np.float32)}
  w = rng.uniform(1, 5, size=8).astype(np.float32)
  agg = sa.secure_sum(CLIP, BITS)
  finalize = jax.jit(agg.finalize)
  whole, _ = finalize(_feed(agg, ups, w))
  parts = [_feed(agg, {"v": ups["v"][i:i + 4]}, w[i:i + 4]) for i in (0, 4)]
  split, _ = finalize(agg.combine(jax.tree.map(lambda *a: jnp.stack(a), *parts)))
  testing.assert_trees_close(split, whole, atol=0)


def test_cost_and_ring_size():
  c = sa.cost(7850, 10, 16, 1.0)
  assert (c.value_bits, c.ring_bits, c.extra_bits, c.min_ring_bits) == (16, 20, 4, 20)
  assert c.bytes_up == 7850 * 20 // 8 and c.float32_bytes == 31400
  assert c.max_quantization_error == pytest.approx(0.5 / 32767)
  assert sa.cost(100, 100, 8, 1.0, ring_bits=32).extra_bits == 24
  assert sa.bits_needed(16, 1) == 16 and sa.bits_needed(16, 1000) == 26


def test_bad_parameters():
  for bits in (1, 25, 2.5, True):
    with pytest.raises(ValueError, match="value bits"):
      sa.secure_sum(CLIP, bits)
  with pytest.raises(ValueError, match="value bits"):
    sa.secure_sum(CLIP, 20, ring_bits=16)
  for ring in (1, 33, 8.0):
    with pytest.raises(ValueError, match="ring_bits"):
      sa.secure_sum(CLIP, 4, ring_bits=ring)
  for clip in (0.0, -1.0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="clip"):
      sa.secure_sum(clip)
  with pytest.raises(ValueError, match="weight_bound"):
    sa.secure_sum(CLIP, weight_bound=0.0)
  agg = sa.secure_sum(CLIP, 16, ring_bits=20)
  agg.validate(16)
  with pytest.raises(ValueError, match="needs bits \\+ ceil\\(log2 C\\) = 21 ring bits"):
    agg.validate(17)
  with pytest.raises(ValueError, match="ring bits"):
    sa.cost(10, 2 ** 17, 16, 1.0)


@pytest.mark.slow
def test_secure_sum_inside_run_matches_the_plain_mean(ragged_data):
  """With drop-outs (recovered by the server) and a compressed, clipped update."""
  model = fs.models.mlp(8, (16,), 4)
  het = fs.Heterogeneity(dropout_fraction=0.3)
  base = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
  clip = transforms.chain(transforms.clip_by_norm(CLIP), compression.stochastic_quantize(8))
  plain = dataclasses.replace(base, update_transform=clip)
  secure = dataclasses.replace(plain, aggregator=sa.secure_sum(CLIP, BITS, ring_bits=20))
  r_plain = fs.run(plain, model, ragged_data, rounds=2, cohort_size=10, chunk_size=3,
                   heterogeneity=het, progress=False)
  r_sec = fs.run(secure, model, ragged_data, rounds=2, cohort_size=10, chunk_size=3,
                 heterogeneity=het, progress=False)
  assert r_sec.history["num_dropped"].sum() > 0
  np.testing.assert_array_equal(r_sec.history["num_counted"], r_plain.history["num_counted"])
  # Quantization error only: a few 1e-5 per round.
  testing.assert_trees_close(r_sec.params, r_plain.params, atol=3e-4)
  assert fs.tree.max_abs_diff(r_sec.params, r_plain.params) > 0
  with pytest.raises(ValueError, match="ring bits"):
    fs.run(dataclasses.replace(base, aggregator=sa.secure_sum(CLIP, 16, ring_bits=18)), model,
           ragged_data, rounds=1, cohort_size=5, progress=False)


def test_keyed_aggregators_get_a_fresh_key_and_the_cohort_ids(ragged_data):
  """The engine hands a keyed aggregator's finalize a new key every round and the population
  ids of its slots (distinct; empty slots outside the population), which is what secure_sum
  derives its pairwise masks from."""
  seen = []

  def record(key_data, ids, weights):
    seen.append((np.asarray(key_data).copy(), np.asarray(ids).copy(), np.asarray(weights).copy()))

  inner = fs.aggregators.robust.buffered(lambda ups, valid: jax.tree.map(lambda u: u[0], ups))

  def finalize(state, key, client_ids):
    jax.debug.callback(record, jax.random.key_data(key), client_ids, state.weights)
    return inner.finalize(state)

  spy = inner._replace(finalize=finalize)
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16), aggregator=spy)
  fs.run(algo, fs.models.mlp(8, (16,), 4), ragged_data, rounds=3, cohort_size=5, chunk_size=2,
         progress=False)
  assert len(seen) == 3
  keys = [k.tobytes() for k, _, _ in seen]
  assert len(set(keys)) == 3                       # a fresh key every round
  P = ragged_data.num_clients
  for _, ids, w in seen:
    assert len(set(ids.tolist())) == ids.size      # every slot its own id
    real = ids[ids < P]
    assert real.size == 5 and np.all(real >= 0)    # the 5 sampled clients ...
    assert np.all(w[ids >= P] == 0)                # ... and weightless padding (6 slots: 3 x 2)
  assert len({tuple(sorted(ids[ids < P].tolist())) for _, ids, _ in seen}) > 1


@jax.jit
def _known_view(key, ids, alive, edges):
  """A view masked the old way (from ``key``), of the known update 0.25 everywhere."""
  enc = sa.encode(jnp.full((ids.shape[0], 40), 0.25), CLIP, BITS)
  return enc, sa.mask_updates(key, ids, enc, alive, edges=edges)


@jax.jit
def _probe_edges(key, ids, view, edges):
  return _probe_masks(key, ids, view, 32, True, edges)


def _probe_masks(key, ids, view, ring_bits, self_mask, edges):
  """The attack: the server's view minus the masks recomputed from ``key`` (row by row), over
  the mask graph ``edges``."""
  n = view.shape[1]
  masks = sa.pairwise_masks(key, ids, jnp.ones(ids.shape[0], bool), n, ring_bits, edges)
  if self_mask:
    masks = masks + sa.self_masks(key, ids, n, ring_bits)
  return sa.to_signed(view - masks, ring_bits)


def _in_value_range(q, bits=BITS):
  return np.abs(q) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("graph", ["complete", "harary"])
def test_masks_cannot_be_recomputed_from_the_config_and_seed(ragged_data, graph):
  """The probe of issue 19: knowing the config and the seed, derive every key the run derives
  (the round keys, the aggregation key, folded with every small seed) and subtract the masks
  they give from a client's masked vector. With derived masks that recovers the update exactly
  (checked on a view masked the old way); with secret masks the result is noise over the ring.
  The trained model is nonetheless bit-identical from run to run. With SecAgg+'s sparse graph
  the attacker also derives the graph from each candidate key."""
  views = []
  kw = {} if graph == "complete" else {"graph": "harary", "neighbours": 2}
  agg = sa.secure_sum(CLIP, BITS, on_view=lambda m, i, a: views.append((m, i, a)), **kw)
  algo = dataclasses.replace(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16), aggregator=agg,
                             update_transform=transforms.clip_by_norm(CLIP))
  model = fs.models.mlp(8, (16,), 4)
  seed, rounds = 0, 2
  run = lambda: fs.run(algo, model, ragged_data, rounds=rounds, cohort_size=5, chunk_size=3,
                       seed=seed, progress=False)
  first = run()
  assert len(views) == rounds
  _, key_rounds = fs.experiment.seed_keys(seed)
  graph_of = jax.jit(sa.mask_graph, static_argnums=(1, 2))
  for r, (view, ids, alive) in enumerate(views):
    a = int(np.flatnonzero(alive)[0])            # a client whose update the server received
    candidates = [fs.engine.round_keys(jax.random.fold_in(key_rounds, r)).aggregate]
    candidates += [jax.random.fold_in(candidates[0], s) for s in range(4)]
    candidates += [jax.random.fold_in(key_rounds, r), jax.random.key(seed)]
    cap = view.shape[0]
    ids = jnp.asarray(ids)
    for key in candidates:
      edges = graph_of(key, cap, agg.finalize.degree(cap))
      # The attack is sound: on a view masked with this key it recovers the update exactly.
      enc, old_view = _known_view(key, ids, jnp.asarray(alive), edges)
      np.testing.assert_array_equal(np.asarray(_probe_edges(key, ids, old_view, edges))[a],
                                    np.asarray(sa.to_signed(enc[a]), np.int64))
      # On the real view it yields uniform ring elements, not a quantized update (each of the
      # |q| <= 2^15 - 1 levels has probability ~2^-16 per coordinate).
      got = np.asarray(_probe_edges(key, ids, jnp.asarray(view), edges))[a]
      assert np.mean(_in_value_range(got)) < 0.05, f"round {r}: update recovered"
  # Fresh masks each run, the same model (masks cancel exactly).
  second = run()
  assert not np.array_equal(views[0][0], views[rounds][0])
  testing.assert_trees_close(second.params, first.params, atol=0)


def test_secret_masks_keep_the_sum_exact_and_differ_every_call():
  rng = np.random.default_rng(6)
  ups = {"v": rng.normal(scale=0.3, size=(6, 40)).astype(np.float32)}
  w = np.array([3.0, 0.0, 1.0, 7.0, 2.0, 0.0], np.float32)   # two drop-outs
  views = []
  agg = sa.secure_sum(CLIP, BITS, ring_bits=24, on_view=lambda m, i, a: views.append(m))
  finalize = jax.jit(agg.finalize)
  state = _feed(agg, ups, w, k=3)
  ids = jnp.asarray([5, 9, 2, 40, 7, 11], jnp.int32)
  key = jax.random.key(0)
  one, _ = finalize(state, key, ids)
  two, _ = finalize(state, key, ids)              # same key, same ids: new masks anyway
  jax.effects_barrier()
  assert len(views) == 2 and not np.array_equal(views[0], views[1])
  testing.assert_trees_close(one, two, atol=0)
  # Exactly the plain quantized sum (what the unmasked aggregation reveals).
  w_ref = w.max()
  q = sa.encode(jnp.asarray(ups["v"]) * jnp.asarray(w / w_ref)[:, None], CLIP, BITS, 24)
  total = jnp.sum(jnp.where(jnp.asarray(w > 0)[:, None], q, jnp.uint32(0)), 0, dtype=jnp.uint32)
  back = np.asarray(one["v"], np.float64) * float(w.sum()) / float(w_ref) * sa.scale_for(CLIP, BITS)
  np.testing.assert_array_equal(np.round(back).astype(np.int64),
                                np.asarray(sa.to_signed(total, 24), np.int64))
  # The drop-outs' rows are never received; the others are masked beyond the value range.
  assert np.all(views[0][[1, 5]] == 0)
  signed = np.asarray(sa.to_signed(jnp.asarray(views[0][[0, 2, 3, 4]]), 24))
  assert np.mean(_in_value_range(signed)) < 0.05


# ------------------------------------------------------------------ SecAgg+ (sparse masking)
def _neighbour_sets(edges, c):
  nbrs = [set() for _ in range(c)]
  for a, b in np.asarray(edges).tolist():
    assert a != b
    nbrs[a].add(b)
    nbrs[b].add(a)
  return nbrs


def _connected(nbrs, keep):
  keep = set(keep)
  if not keep:
    return True
  seen, todo = set(), [min(keep)]
  while todo:
    v = todo.pop()
    if v in seen:
      continue
    seen.add(v)
    todo.extend(u for u in nbrs[v] if u in keep and u not in seen)
  return seen == keep


@pytest.mark.parametrize("c,k", [(5, 2), (9, 4), (10, 8), (33, 6), (101, 22)])
def test_harary_graph_has_the_promised_degree(c, k):
  edges = sa.harary_edges(c, k)
  assert edges.shape == (c * k // 2, 2)
  assert len({tuple(sorted(e)) for e in edges.tolist()}) == len(edges)     # no edge twice
  assert all(len(s) == k for s in _neighbour_sets(edges, c))              # k-regular
  # Relabelled by a random permutation (different per key): still k-regular, another graph.
  g1, g2 = (np.asarray(sa.mask_graph(jax.random.key(s), c, k)) for s in (1, 2))
  for g in (g1, g2):
    assert all(len(s) == k for s in _neighbour_sets(g, c))
  assert {tuple(sorted(e)) for e in g1.tolist()} != {tuple(sorted(e)) for e in g2.tolist()}
  # H_{k,C} is k-connected: removing any k - 1 nodes leaves it connected (spot-check).
  rng = np.random.default_rng(c)
  nbrs = _neighbour_sets(edges, c)
  for _ in range(50):
    gone = set(rng.choice(c, k - 1, replace=False).tolist())
    assert _connected(nbrs, set(range(c)) - gone)
  # Degree C - 1 or more is the complete graph.
  np.testing.assert_array_equal(sa.mask_graph(jax.random.key(0), c, c - 1), sa.complete_edges(c))


def test_harary_degree_is_logarithmic_and_keeps_survivors_connected():
  ks = {c: sa.harary_degree(c) for c in (100, 1000, 10000)}
  assert all(k % 2 == 0 for k in ks.values())
  assert ks[100] <= ks[1000] <= ks[10000] < 100          # O(log C): far below C - 1
  assert ks[10000] - ks[1000] <= 2 * (ks[1000] - ks[100]) + 4
  assert sa.harary_degree(10) == 4 and sa.harary_degree(5, 0.3, 0.3) == 4   # = C - 1: complete
  # More adversaries or drop-outs need more neighbours.
  assert sa.harary_degree(1000, 0.2, 0.1) > ks[1000] and sa.harary_degree(1000, 0.1, 0.3) > ks[1000]
  # The honest survivors stay connected when 20% of the clients are removed at random (the
  # defaults: 10% colluding + 10% dropped), whereas a ring (k = 2) falls apart.
  c, rng = 1000, np.random.default_rng(0)
  g = _neighbour_sets(sa.mask_graph(jax.random.key(3), c, ks[c]), c)
  ring = _neighbour_sets(sa.harary_edges(c, 2), c)
  broken_ring = 0
  for _ in range(20):
    keep = set(rng.choice(c, int(0.8 * c), replace=False).tolist())
    assert _connected(g, keep)
    broken_ring += not _connected(ring, keep)
  assert broken_ring == 20
  for bad in ((-0.1, 0.1), (0.1, 1.0), (0.5, 0.5)):
    with pytest.raises(ValueError, match="rate"):
      sa.harary_degree(100, *bad)


@pytest.mark.parametrize("c,k", [(6, 2), (13, 4), (40, 6)])
def test_sparse_masking_sum_is_exact_with_dropouts(c, k):
  rng = np.random.default_rng(c)
  ids = jnp.asarray(rng.choice(5000, c, replace=False), jnp.int32)
  enc = sa.encode(jnp.asarray(rng.normal(scale=0.4, size=(c, 30)), jnp.float32), CLIP, BITS, 24)
  key = jax.random.key(c)
  edges = sa.mask_graph(key, c, k)
  mask = jax.jit(sa.mask_updates, static_argnums=(4, 5))
  unmask = jax.jit(sa.unmask_sum, static_argnums=(4, 5))
  for p_drop in (0.0, 0.3, 0.7):
    alive = jnp.asarray(rng.uniform(size=c) >= p_drop)
    masked = mask(key, ids, enc, alive, 24, True, edges)
    np.testing.assert_array_equal(np.asarray(masked)[~np.asarray(alive)], 0)
    total = unmask(key, ids, masked, alive, 24, True, edges)
    np.testing.assert_array_equal(np.asarray(sa.to_signed(total, 24), np.int64),
                                  _signed_sum(enc, alive, 24))
    # The recovery is needed: the plain sum of the view is not the sum.
    naive = jnp.sum(masked, 0, dtype=jnp.uint32) & jnp.uint32(2 ** 24 - 1)
    assert not np.array_equal(naive, total)
  # Without self masks and drop-outs, the sparse pairwise masks cancel in the plain sum.
  everyone = jnp.ones(c, bool)
  m = mask(key, ids, enc, everyone, 24, False, edges)
  np.testing.assert_array_equal(sa.to_signed(jnp.sum(m, 0, dtype=jnp.uint32), 24),
                                _signed_sum(enc, everyone, 24))


def test_sparse_masks_involve_only_the_neighbours():
  """Row a of the pairwise masks is the signed sum of the PRG vectors of a's k edges only."""
  c, k, n = 11, 4, 16
  ids = jnp.asarray(np.random.default_rng(0).choice(100, c, replace=False), jnp.int32)
  key = jax.random.key(9)
  edges = sa.mask_graph(key, c, k)
  got = np.asarray(sa.pairwise_masks(key, ids, jnp.ones(c, bool), n, 32, edges))
  nbrs = _neighbour_sets(edges, c)
  for a in range(c):
    want = np.zeros(n, np.uint64)
    for b in nbrs[a]:
      p = np.asarray(sa._prg(sa._pair_seed(key, ids[a], ids[b]), n, 32), np.uint64)
      want += p if int(ids[a]) < int(ids[b]) else (2 ** 32 - p)
    np.testing.assert_array_equal(got[a], (want % 2 ** 32).astype(np.uint32))
  # The complete graph's row a involves all C - 1 others: different masks.
  assert not np.array_equal(got, sa.pairwise_masks(key, ids, jnp.ones(c, bool), n, 32))


def test_secure_sum_with_sparse_graph_equals_the_complete_graph():
  rng = np.random.default_rng(8)
  cap = 12
  ups = {"v": rng.normal(scale=0.3, size=(cap, 20)).astype(np.float32)}
  w = rng.uniform(1, 5, size=cap).astype(np.float32)
  w[[1, 4, 9]] = 0.0                                    # drop-outs
  dense = sa.secure_sum(CLIP, BITS, ring_bits=24)
  views = []
  sparse = sa.secure_sum(CLIP, BITS, ring_bits=24, graph="harary", neighbours=4,
                         on_view=lambda m, i, a: views.append(m))
  assert sparse.finalize.degree(cap) == 4 and dense.finalize.degree(cap) == cap - 1
  assert sa.secure_sum(CLIP, graph="harary").finalize.degree(1000) == sa.harary_degree(1000)
  one, w1 = jax.jit(dense.finalize)(_feed(dense, ups, w))
  two, w2 = jax.jit(sparse.finalize)(_feed(sparse, ups, w))
  jax.effects_barrier()
  testing.assert_trees_close(two, one, atol=0)           # the same quantized sum, bit for bit
  assert float(w1) == float(w2)
  signed = np.asarray(sa.to_signed(jnp.asarray(views[0][w > 0]), 24))
  assert np.mean(_in_value_range(signed)) < 0.05          # masked beyond the value range
  # Registered with its options (the command line's [aggregator] table).
  agg = fs.aggregators.REGISTRY.make("secure_sum", clip=1.0, graph="harary", neighbours=4)
  assert agg.finalize.degree(cap) == 4
  c = sa.cost(1000, 1000, 16, 1.0, neighbours=sa.harary_degree(1000))
  assert c.neighbours == sa.harary_degree(1000) and c.prg_words_per_client == (c.neighbours + 1) * 1000
  assert sa.cost(1000, 100, 16, 1.0).neighbours == 99


def test_sparse_graph_bad_parameters():
  with pytest.raises(ValueError, match="graph must be one of"):
    sa.secure_sum(CLIP, graph="ring")
  with pytest.raises(ValueError, match="needs graph='harary'"):
    sa.secure_sum(CLIP, neighbours=4)
  for k in (3, 0, 2.0, True):
    with pytest.raises(ValueError, match="even integer"):
      sa.secure_sum(CLIP, graph="harary", neighbours=k)
  with pytest.raises(ValueError, match="dropout_rate"):
    sa.secure_sum(CLIP, graph="harary", dropout_rate=1.5)
  with pytest.raises(ValueError, match="even number of neighbours"):
    sa.harary_edges(10, 5)
  with pytest.raises(ValueError, match="even number of neighbours"):
    sa.harary_edges(10, 10)


# ------------------------------------------------------------- X25519 pairwise key agreement
def test_x25519_key_agreement_gives_fresh_distinct_seeds():
  pytest.importorskip("cryptography", reason="X25519 key agreement needs the 'secagg' extra")
  edges = sa.harary_edges(9, 4)
  one, cost = sa.x25519_seeds(9, edges, 8)
  two, _ = sa.x25519_seeds(9, edges, 8)
  assert one.shape == (18, 8) and one.dtype == np.uint8
  assert len({row.tobytes() for row in one}) == 18          # every pair its own secret
  assert not np.any(np.all(one == two, axis=1))             # fresh key pairs every call
  assert cost.num_clients == 9 and cost.exchanges == 36 and cost.seconds > 0


@pytest.mark.parametrize("graph", ["complete", "harary"])
def test_x25519_secure_sum_is_exact_and_records_its_cost(graph):
  pytest.importorskip("cryptography", reason="X25519 key agreement needs the 'secagg' extra")
  rng = np.random.default_rng(11)
  cap = 9
  ups = {"v": rng.normal(scale=0.3, size=(cap, 25)).astype(np.float32)}
  w = rng.uniform(1, 5, size=cap).astype(np.float32)
  w[[0, 5]] = 0.0                                           # drop-outs
  kw = {} if graph == "complete" else {"graph": "harary", "neighbours": 4}
  views = []
  agg = sa.secure_sum(CLIP, BITS, ring_bits=24, key_agreement="x25519",
                      on_view=lambda m, i, a: views.append(m), **kw)
  ref = sa.secure_sum(CLIP, BITS, ring_bits=24, **kw)
  got, _ = jax.jit(agg.finalize)(_feed(agg, ups, w, k=3))
  want, _ = jax.jit(ref.finalize)(_feed(ref, ups, w, k=3))
  jax.effects_barrier()
  testing.assert_trees_close(got, want, atol=0)              # the same exact quantized sum
  signed = np.asarray(sa.to_signed(jnp.asarray(views[0][w > 0]), 24))
  assert np.mean(_in_value_range(signed)) < 0.05
  cost, = agg.finalize.key_agreement_costs
  k = cap - 1 if graph == "complete" else 4
  assert cost.num_clients == cap and cost.exchanges == cap * k   # 2 per edge, C k / 2 edges
  with pytest.raises(ValueError, match="key_agreement must be one of"):
    sa.secure_sum(CLIP, key_agreement="rsa")
