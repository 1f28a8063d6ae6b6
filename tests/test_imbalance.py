"""Remedies for label skew (issue 17): logit-adjusted losses, class metrics, per-class plots."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import evaluation, remedies


def skewed_clients(seed=0, dim=6, k=4, sizes=(30, 12, 25, 7, 40, 18)):
  """A learnable population whose clients each favour one class (label skew)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, k))
  clients = []
  for i, n in enumerate(sizes):
    x = rng.normal(size=(4 * n, dim)).astype(np.float32)
    y = np.argmax(x @ w, 1)
    keep = np.concatenate([np.flatnonzero(y == i % k), np.flatnonzero(y != i % k)[:n // 3]])
    clients.append({"x": x[keep], "y": y[keep].astype(np.int32)})
  return fs.FederatedData.from_clients(clients, num_classes=k)


def test_label_counts_and_offsets_match_numpy():
  data = skewed_clients()
  counts = remedies.label_counts(data)
  for p in range(data.num_clients):
    np.testing.assert_array_equal(counts[p], np.bincount(data.client(p)["y"], minlength=4))
  off = remedies.logit_adjustment(data, tau=0.7, smoothing=0.5)
  ref = 0.7 * np.log((counts + 0.5) / (counts + 0.5).sum(1, keepdims=True))
  np.testing.assert_allclose(off, ref, rtol=1e-6)
  g = remedies.logit_adjustment(data, prior="global")
  tot = counts.sum(0) + 1.0
  np.testing.assert_allclose(g, np.log(tot / tot.sum()), rtol=1e-6)
  lc = remedies.fedlc_calibration(data, tau=2.0)
  np.testing.assert_allclose(lc, -2.0 * (counts + 1.0) ** -0.25, rtol=1e-6)


def test_adjusted_cross_entropy_against_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3)).astype(np.float32)
  y = np.array([0, 2, 1, 1, 0])
  off = np.log(np.array([0.7, 0.2, 0.1], np.float32))
  z = logits + off
  ref = np.log(np.exp(z).sum(1)) - z[np.arange(5), y]
  got = remedies.adjusted_cross_entropy(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(off))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_remedied_step_uses_the_clients_own_row():
  """One local SGD step of the wrapped program equals SGD on CE(logits + offsets[client])."""
  data = skewed_clients()
  model = fs.models.logistic_regression(6, 4)
  params = model.init(jax.random.key(0))
  off = remedies.logit_adjustment(data)
  prog = remedies.remedied(fs.client.local_training(), logit_offsets=off)(model, optax.sgd(0.5))
  c = data.client(3)
  x, y = jnp.asarray(c["x"][:6]), jnp.asarray(c["y"][:6])
  ctx = fs.client.ClientContext(jnp.int32(3), params, hparams={}, key=jax.random.key(1))
  carry = prog.step(prog.init(ctx), fs.client.Batch(x, y, jnp.ones(6, bool)), ctx,
                    jax.random.key(2))

  def ref_loss(p):
    return jnp.mean(remedies.adjusted_cross_entropy(model.apply(p, x), y, jnp.asarray(off[3])))
  g = jax.grad(ref_loss)(params)
  fs.testing.assert_trees_close(carry.params, jax.tree.map(lambda p, d: p - 0.5 * d, params, g),
                                atol=1e-6)
  # and differs from plain training (the offsets do something)
  plain = fs.client.local_training()(model, optax.sgd(0.5))
  c2 = plain.step(plain.init(ctx), fs.client.Batch(x, y, jnp.ones(6, bool)), ctx,
                  jax.random.key(2))
  assert not np.allclose(np.asarray(c2.params["Dense_0"]["bias"]),
                         np.asarray(carry.params["Dense_0"]["bias"]))


@pytest.mark.parametrize("prior", ["client", "global"])
def test_run_equals_sequential_reference(prior):
  data = skewed_clients()
  model = fs.models.logistic_regression(6, 4)
  algo = fs.algorithms.fedprox(optax.sgd(0.3), batch_size=8, mu=0.01)
  algo = algo.replace(client=remedies.remedied(
      algo.client, logit_offsets=remedies.logit_adjustment(data, prior=prior)))
  res = fs.run(algo, model, data, rounds=3, cohort_size=4, seed=5, progress=False)
  state, hist = fs.testing.sequential_run(algo, model, data, rounds=3, cohort_size=4, seed=5)
  fs.testing.assert_trees_close(res.params, state.params, atol=2e-5)
  np.testing.assert_allclose(res.history["train_loss"], [h["train_loss"] for h in hist],
                             rtol=1e-4)


def test_logit_adjustment_learns_and_lifts_the_rare_class():
  """Globally long-tailed data: logit adjustment raises the rare class's test accuracy."""
  rng = np.random.default_rng(0)
  k, dim = 3, 2
  means = np.array([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])
  per_class = (600, 60, 12)
  x = np.concatenate([rng.normal(means[c], 0.8, (n, dim)) for c, n in enumerate(per_class)])
  y = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int32)
  parts = fs.partition.iid(y, 6, seed=0)
  data = fs.FederatedData.from_partition({"x": x.astype(np.float32), "y": y}, parts,
                                         num_classes=k)
  xt = np.concatenate([rng.normal(means[c], 0.8, (300, dim)) for c in range(k)]).astype(np.float32)
  yt = np.repeat(np.arange(k), 300).astype(np.int32)
  model = fs.models.logistic_regression(dim, k)
  ev = evaluation.make_evaluate(model, 256, evaluation.class_metrics(k))
  out = {}
  for name, off in [("plain", None), ("la", remedies.logit_adjustment(data, prior="global"))]:
    algo = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=16, local_epochs=2)
    if off is not None:
      algo = algo.replace(client=remedies.remedied(algo.client, logit_offsets=off))
    res = fs.run(algo, model, data, rounds=8, cohort_size=6, progress=False)
    out[name] = jax.device_get(ev(res.params, jnp.asarray(xt), jnp.asarray(yt)))
  # plain FedAvg learns the head class and sacrifices the tail; the adjusted loss balances them
  assert out["plain"]["per_class_accuracy"][0] > 0.9
  assert out["la"]["balanced_accuracy"] > 0.6
  assert out["la"]["balanced_accuracy"] > out["plain"]["balanced_accuracy"] + 0.1
  assert out["la"]["worst_class_accuracy"] > out["plain"]["worst_class_accuracy"] + 0.2


def test_class_metrics_on_a_hand_example():
  # 3 classes; logits whose argmax is the prediction
  y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2], np.int32)
  pred = np.array([0, 0, 1, 0, 1, 0, 2, 2, 0, 0, 0])
  logits = np.eye(3, dtype=np.float32)[pred] * 5.0
  model = fs.models.Model(lambda k: {}, lambda p, x: x, (3,), 3, name="identity")
  ev = evaluation.make_evaluate(model, batch_size=4, metrics=evaluation.class_metrics(3))
  out = jax.device_get(ev({}, jnp.asarray(logits), jnp.asarray(y)))
  per = np.array([3 / 4, 1 / 2, 2 / 5])
  np.testing.assert_allclose(out["per_class_accuracy"], per, rtol=1e-6)
  np.testing.assert_allclose(out["balanced_accuracy"], per.mean(), rtol=1e-6)
  np.testing.assert_allclose(out["worst_class_accuracy"], 0.4, rtol=1e-6)
  np.testing.assert_allclose(out["accuracy"], 6 / 11, rtol=1e-6)
  ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(11), y]
  np.testing.assert_allclose(out["loss"], ce.mean(), rtol=1e-5)
  # a class absent from the evaluation data is NaN and left out of the summaries
  pad = fs.models.Model(lambda k: {}, lambda p, x: jnp.pad(x, ((0, 0), (0, 1))), (3,), 4)
  ev4 = evaluation.make_evaluate(pad, 4, evaluation.class_metrics(4))
  out4 = jax.device_get(ev4({}, jnp.asarray(logits), jnp.asarray(y)))
  assert np.isnan(out4["per_class_accuracy"][3])
  np.testing.assert_allclose(out4["balanced_accuracy"], per.mean(), rtol=1e-6)


def test_a_custom_metric_and_the_history_callback():
  data = skewed_clients()
  model = fs.models.logistic_regression(6, 4)
  test = data.centralized()
  mean_logit = evaluation.Metric(
      sums=lambda out, y, m: (jnp.sum(out * m[:, None].astype(out.dtype)), jnp.sum(m)),
      result=lambda s: s[0] / (4 * s[1]))
  metrics = dict(evaluation.class_metrics(4), mean_logit=mean_logit)
  cb = evaluation.metrics_callback(model, test, metrics, every=2, rounds=3, batch_size=16)
  algo = fs.algorithms.fedavg(optax.sgd(0.2), batch_size=8)
  res = fs.run(algo, model, data, rounds=3, cohort_size=3, progress=False, callback=cb,
               eval_data=test)
  h = res.history
  assert np.isnan(h["test_balanced_accuracy"][0]) and not np.isnan(h["test_balanced_accuracy"][1])
  per = np.array([h.last(f"test_per_class_accuracy_{i}") for i in range(4)])
  logits = np.asarray(model.apply(res.params, test["x"]))
  pred = logits.argmax(1)
  ref = np.array([np.mean(pred[test["y"] == c] == c) for c in range(4)])
  np.testing.assert_allclose(per, ref, rtol=1e-6)
  np.testing.assert_allclose(h.last("test_worst_class_accuracy"), ref.min(), rtol=1e-6)
  np.testing.assert_allclose(h.last("test_mean_logit"), logits.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h.last("test_accuracy"), np.mean(pred == test["y"]), rtol=1e-6)


def test_plot_class_accuracy(tmp_path):
  path = tmp_path / "per_class.png"
  fig = fs.history.plot_class_accuracy({"a": [0.1, 0.5, 0.9], "b": [0.3, 0.3, 0.3]}, path,
                                       class_names=["x", "y", "z"], title="t")
  assert path.stat().st_size > 1000 and len(fig.axes[0].patches) == 6
  with pytest.raises(ValueError, match="different numbers of classes"):
    fs.history.plot_class_accuracy({"a": [0.1, 0.5], "b": [0.3, 0.3, 0.3]})


def test_bad_input_raises():
  data = skewed_clients()
  model = fs.models.logistic_regression(6, 4)
  with pytest.raises(ValueError, match="prior must be one of"):
    remedies.logit_adjustment(data, prior="local")
  with pytest.raises(ValueError, match="tau must be"):
    remedies.logit_adjustment(data, tau=-1.0)
  with pytest.raises(ValueError, match="smoothing must be"):
    remedies.fedlc_calibration(data, smoothing=0.0)
  with pytest.raises(ValueError, match="num_classes"):
    remedies.label_counts(fs.FederatedData.from_clients([{"x": np.zeros((2, 1)),
                                                          "y": np.zeros(2, np.int32)}]))
  with pytest.raises(ValueError, match=r"shape \[num_classes\]"):
    remedies.remedied(fs.client.local_training(),
                      logit_offsets=np.zeros((6, 5)))(model, optax.sgd(0.1))
  with pytest.raises(ValueError, match="finite"):
    remedies.remedied(fs.client.local_training(),
                      logit_offsets=np.full(4, -np.inf))(model, optax.sgd(0.1))
  with pytest.raises(ValueError, match="augment must be"):
    remedies.remedied(fs.client.local_training(), augment=3)
  with pytest.raises(ValueError, match="must be a fedjax_sim.evaluation.Metric"):
    evaluation.make_evaluate(model, 8, {"x": lambda: 0})
  with pytest.raises(ValueError, match="other than 'loss'"):
    evaluation.make_evaluate(model, 8, {"accuracy": evaluation.balanced_accuracy(4)})
  with pytest.raises(ValueError, match="num_classes must be"):
    evaluation.class_metrics(0)


# --- augmentation and minority generation (fedjax_sim.augment) ------------------------------------

from fedjax_sim import augment  # noqa: E402
from fedjax_sim.client import Batch  # noqa: E402


def _batch(seed=0, b=12, shape=(4, 5, 1), k=3, valid=10):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b,) + (int(np.prod(shape)),)).astype(np.float32)
  y = rng.integers(0, k, b).astype(np.int32)
  return Batch(jnp.asarray(x), jnp.asarray(y), jnp.arange(b) < valid)


def test_smote_points_lie_on_same_class_segments():
  b = _batch()
  out = jax.jit(augment.smote())(b, jax.random.key(3))
  x, y, m = np.asarray(b.x), np.asarray(b.y), np.asarray(b.mask)
  xo = np.asarray(out.x)
  np.testing.assert_array_equal(np.asarray(out.y), y)
  moved = 0
  for i in np.flatnonzero(m):
    ok = False
    for j in np.flatnonzero(m & (y == y[i])):
      d = x[j] - x[i]
      u = float(d @ (xo[i] - x[i]) / max(d @ d, 1e-12)) if d @ d > 0 else 0.0
      if -1e-6 <= u <= 1 + 1e-6 and np.allclose(x[i] + u * d, xo[i], atol=1e-5):
        ok = True
        moved += u > 1e-3
    assert ok, f"row {i} is not on a segment to a same-class example"
  assert moved >= 3


def test_balanced_resample_equalises_classes():
  y = np.array([0] * 12 + [1] * 3 + [2] * 1 + [0, 0], np.int32)
  mask = np.arange(18) < 16
  x = np.arange(18, dtype=np.float32)[:, None] + 100 * y[:, None]
  b = Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
  f = jax.jit(jax.vmap(augment.balanced_resample(), in_axes=(None, 0)))
  out = f(b, jax.random.split(jax.random.key(0), 2000))
  ys, xs = np.asarray(out.y)[:, :16], np.asarray(out.x)[:, :16, 0]
  freq = np.bincount(ys.reshape(-1), minlength=3) / ys.size
  np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.02)
  # rows are real valid examples with their own labels; padded rows untouched
  assert set(xs.reshape(-1).tolist()) <= set(x[:16, 0].tolist())
  np.testing.assert_array_equal(xs - 100 * ys, xs % 100)
  np.testing.assert_array_equal(np.asarray(out.x)[:, 16:, 0], np.broadcast_to(x[16:, 0], (2000, 2)))


def test_image_augmentations_compute_what_they_say():
  shape = (4, 5, 1)
  b = _batch(shape=shape)
  img = np.asarray(b.x).reshape((-1,) + shape)
  key = jax.random.key(7)
  # flip with prob 1 mirrors every image
  fl = np.asarray(augment.random_flip(shape, 1.0)(b, key).x).reshape(img.shape)
  np.testing.assert_array_equal(fl, img[:, :, ::-1])
  # shift: each output is the input translated by one (dy, dx), zeros elsewhere
  sh = np.asarray(jax.jit(augment.random_shift(shape, 1))(b, key).x).reshape(img.shape)
  for i in range(img.shape[0]):
    pad = np.pad(img[i], ((1, 1), (1, 1), (0, 0)))
    assert any(np.array_equal(sh[i], pad[dy:dy + 4, dx:dx + 5])
               for dy in range(3) for dx in range(3))
  # erasing with prob 1: exactly one 2x3 zero box per image, the rest unchanged
  er = np.asarray(augment.random_erasing(shape, (2, 3), 1.0)(b, key).x).reshape(img.shape)
  changed = er != img
  assert np.all(er[changed] == 0)
  assert np.all((er == 0).reshape(img.shape[0], -1).sum(1) >= 6)
  # masking: about the asked rate of features zeroed
  big = Batch(jnp.ones((64, 100)), jnp.zeros(64, jnp.int32), jnp.ones(64, bool))
  mk = np.asarray(augment.random_masking(0.3)(big, key).x)
  assert abs(np.mean(mk == 0) - 0.3) < 0.03
  nz = np.asarray(augment.gaussian_noise(0.5)(big, key).x) - 1.0
  assert abs(nz.std() - 0.5) < 0.03 and abs(nz.mean()) < 0.03
  # compose is keyed: same key, same output; another key, another output
  c = augment.compose(augment.random_shift(shape, 1), augment.gaussian_noise(0.1))
  np.testing.assert_array_equal(np.asarray(c(b, key).x), np.asarray(c(b, key).x))
  assert not np.array_equal(np.asarray(c(b, key).x), np.asarray(c(b, jax.random.key(8)).x))


def test_augmented_and_mixup_programs_equal_the_sequential_reference_and_learn():
  data = skewed_clients()
  model = fs.models.logistic_regression(6, 4)
  aug = augment.compose(augment.balanced_resample(), augment.smote(0.5),
                        augment.gaussian_noise(0.05))
  algo = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=8)
  algo = algo.replace(client=remedies.remedied(
      algo.client, logit_offsets=remedies.logit_adjustment(data), augment=aug, mixup=0.4))
  res = fs.run(algo, model, data, rounds=4, cohort_size=4, seed=2, progress=False)
  state, hist = fs.testing.sequential_run(algo, model, data, rounds=4, cohort_size=4, seed=2)
  fs.testing.assert_trees_close(res.params, state.params, atol=2e-5)
  test = data.centralized()
  acc = np.mean(np.argmax(np.asarray(model.apply(res.params, test["x"])), 1) == test["y"])
  assert acc > 0.6


def test_mixup_loss_is_the_soft_label_loss():
  model = fs.models.logistic_regression(6, 4)
  params = model.init(jax.random.key(0))
  b = _batch(b=8, shape=(6, 1, 1), k=4, valid=8)
  mixed, loss = remedies._mixup(b, model.loss, 0.5, jax.random.key(4))
  logits = model.apply(params, mixed.x)
  got = np.asarray(loss(logits, mixed.y))
  # recover lam and j from the mixed inputs, then compare with CE on the soft label
  x = np.asarray(b.x)
  xm = np.asarray(mixed.x)
  lp = np.asarray(jax.nn.log_softmax(logits))
  for i in range(8):
    for j in range(8):
      d = x[i] - x[j]
      lam = float((xm[i] - x[j]) @ d / (d @ d)) if d @ d > 0 else 1.0
      if np.allclose(lam * x[i] + (1 - lam) * x[j], xm[i], atol=1e-5):
        soft = -(lam * lp[i, b.y[i]] + (1 - lam) * lp[i, b.y[j]])
        np.testing.assert_allclose(got[i], soft, rtol=1e-4)
        break
    else:
      raise AssertionError(f"row {i} is not a mix of two rows")


def test_augment_bad_input_raises():
  with pytest.raises(ValueError, match="image_shape"):
    augment.random_flip((28, 28))
  with pytest.raises(ValueError, match="must fit"):
    augment.random_erasing((4, 4, 1), (5, 2))
  with pytest.raises(ValueError, match="probability"):
    augment.smote(1.5)
  with pytest.raises(ValueError, match="max_shift"):
    augment.random_shift((4, 4, 1), -1)
  with pytest.raises(ValueError, match="do not hold"):
    augment.random_flip((4, 4, 1))(_batch(shape=(4, 5, 1)), jax.random.key(0))
  with pytest.raises(ValueError, match="not a function"):
    augment.compose(augment.smote(), 3)
  with pytest.raises(ValueError, match="mixup must be"):
    remedies.remedied(fs.client.local_training(), mixup=0.0)


@pytest.mark.slow
def test_imbalance_benchmark_small(tmp_path):
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).resolve().parent.parent
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "imb"
  res = subprocess.run([sys.executable, str(root / "benchmarks" / "imbalance.py"), "--small",
                        "--only", "longtail", "--methods", "fedavg,la_global+augment",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  recs = [json.loads(line) for line in res.stdout.splitlines()]
  assert [r["method"] for r in recs if "summary" not in r] == ["fedavg", "la_global+augment"]
  summ = [r for r in recs if "summary" in r][-1]
  assert "gain_balanced_accuracy_points" in summ and len(recs[0]["per_class_accuracy"]) == 10
  assert (tmp_path / "imb_longtail.png").stat().st_size > 0
  # --from re-summarises the saved records
  res2 = subprocess.run([sys.executable, str(root / "benchmarks" / "imbalance.py"), "--from",
                         f"{out}.jsonl", "--out", str(tmp_path / "again")], capture_output=True,
                        text=True, env=env, timeout=300)
  assert res2.returncode == 0, res2.stderr[-3000:]
  assert res2.stdout.splitlines()[-1] == res.stdout.splitlines()[-1]


def test_declared_metrics_per_client_and_their_percentiles_in_the_history():
  """Declared metrics per client equal a per-client NumPy loop; the callback puts their
  percentiles over clients in the history (``client_<name>_p10`` ...)."""
  data = skewed_clients()
  model = fs.models.logistic_regression(6, 4)
  metrics = evaluation.class_metrics(4)
  params = model.init(jax.random.key(2))
  out = evaluation.evaluate_clients(model, params, data, batch_size=8, chunk_size=3,
                                    metrics=metrics)
  bal = []
  for p in range(data.num_clients):
    c = data.client(p)
    pred = np.asarray(model.apply(params, c["x"])).argmax(1)
    per = [np.mean(pred[c["y"] == k] == k) if np.any(c["y"] == k) else np.nan for k in range(4)]
    np.testing.assert_allclose(out["per_class_accuracy"][p], per, rtol=1e-6)
    bal.append(np.nanmean(per))
  np.testing.assert_allclose(out["balanced_accuracy"], bal, rtol=1e-6)
  np.testing.assert_allclose(out["summary"]["balanced_accuracy_p50"], np.median(bal), rtol=1e-6)
  cb = evaluation.client_metrics_callback(model, data, metrics, every=2, rounds=3, batch_size=8)
  res = fs.run(fs.algorithms.fedavg(optax.sgd(0.2), batch_size=8), model, data, rounds=3,
               cohort_size=3, progress=False, callback=cb)
  h = res.history
  pct = h.client_percentiles("balanced_accuracy")
  assert sorted(pct) == [10, 50, 90] and np.isnan(pct[10][0]) and not np.isnan(pct[10][1])
  assert pct[10][2] <= pct[50][2] <= pct[90][2]
  final = evaluation.evaluate_clients(model, res.params, data, batch_size=8, metrics=metrics)
  np.testing.assert_allclose(h.last("client_worst_class_accuracy_p50"),
                             final["summary"]["worst_class_accuracy_p50"], rtol=1e-6)
