"""Dirty client data and federated cleaning (issue 17): clean vs dirty vs cleaned, 3 seeds.

Data sets (no download):

* ``fmnist``: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), 100 IID clients of 600
  images, 100 rounds, 10 clients a round, 2NN 784-200-200-10, SGD 0.05, batch 32, 2 local
  epochs; the 10,000-image test set.
* ``breast_cancer``: scikit-learn's bundled Wisconsin breast-cancer data (569 patients, 30
  real-valued features on very different scales, 2 classes), the only bundled tabular
  classification set with enough rows and features for missing values and outliers to matter
  (``wine`` has 178 rows, ``iris`` 4 features; ``covtype`` needs a download). 75/25 split per
  seed, **20 IID clients** of about 21 patients (100 clients would hold 4 each: a 20% missing
  rate and 5% outliers would then be 0 or 1 example per client), 100 rounds, 10 a round,
  logistic regression, SGD 0.1, batch 8, 2 local epochs. The 142-patient test set makes one
  patient 0.7 points: read its table with the seeds' spread (the committed results use 10 seeds).

Corruption (:func:`fedjax_sim.data.quality.corrupt`): 30% of the clients are dirty: 20% of
their feature values missing (declared by a mask, stored as 0), 5% of their examples outliers
(all features times 10), 30% of their labels replaced by another class (symmetric).

Arms, each with its own preprocessing computed by aggregation rounds
(:mod:`fedjax_sim.data.quality`; the tabular features are standardised by each arm's own
federated statistics, which the server publishes and also applies to the test set):

* ``clean``: the data before corruption (tabular: standardised by the federated mean and
  deviation).
* ``dirty``: the corrupted data as stored (missing values read as 0; tabular: standardised by
  the federated mean and deviation of the stored values, outliers included); cross-entropy.
* ``cleaned``: outlier examples dropped (L2 norm beyond Tukey's far-out fence ``q75 + 3 IQR`` of
  the norms, from federated quantiles), missing values imputed from federated statistics of the
  observed values (Fashion-MNIST: the mean, as most pixels' median is the stored 0; tabular: the
  median, robust to the outliers), tabular features standardised by the federated median and
  IQR and clipped to their Tukey fences; cross-entropy.
* ``cleaned+gce``: as ``cleaned``, trained with the generalized cross-entropy (q = 0.7,
  :func:`fedjax_sim.remedies.generalized_cross_entropy`), robust to the label noise.
* ``cleaned+weights``: as ``cleaned`` for the first 20% of the rounds; then each client scores
  its data (:func:`~fedjax_sim.data.quality.client_quality`: declared-missing share, outlier
  share, disagreement of its labels with that global model;
  :func:`~fedjax_sim.data.quality.quality_scores`) and the rest of the rounds run with
  aggregation weights ``n_i * score_i^2`` (``client_weights``); cross-entropy.

Records: per seed ``{"dataset", "arm", "seed", "accuracy", "loss"}``; summary lines give the mean
over seeds and the gap to ``clean`` in points. Plot: ``results/data_quality.png``.

  python benchmarks/data_quality.py                  # full: both data sets, 3 seeds
  python benchmarks/data_quality.py --only breast_cancer --seeds 10
  python benchmarks/data_quality.py --small          # tiny sizes: checks the script runs
  python benchmarks/data_quality.py --from a.jsonl b.jsonl   # summaries + plot of earlier runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import evaluation, remedies  # noqa: E402
from fedjax_sim.data import quality  # noqa: E402

DATASETS = ("fmnist", "breast_cancer")
ARMS = ("clean", "dirty", "cleaned", "cleaned+gce", "cleaned+weights")
SPEC = quality.Corruption(client_fraction=0.3, missing_rate=0.2, outlier_rate=0.05,
                          outlier_scale=10.0, label_noise=0.3)
# dataset: (clients, cohort, rounds, lr, batch, local epochs)
CONFIG = {"fmnist": (100, 10, 100, 0.05, 32, 2), "breast_cancer": (20, 10, 100, 0.1, 8, 2)}


def load(dataset: str, seed: int, small: bool):
  if dataset == "fmnist":
    train, test = fs.datasets.fashion_mnist()
    if small:
      train = {k: v[:3000] for k, v in train.items()}
      test = {k: v[:1000] for k, v in test.items()}
    return ({"x": np.asarray(train["x"], np.float32).reshape(len(train["y"]), -1),
             "y": np.asarray(train["y"], np.int32)},
            {"x": np.asarray(test["x"], np.float32).reshape(len(test["y"]), -1),
             "y": np.asarray(test["y"], np.int32)}, 10)
  from sklearn.datasets import load_breast_cancer
  d = load_breast_cancer()
  x, y = d.data.astype(np.float32), d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(0.25 * len(y)))
  te, tr = perm[:n_test], perm[n_test:]
  return {"x": x[tr], "y": y[tr]}, {"x": x[te], "y": y[te]}, 2


def federated_moments(data, missing=None):
  """Per-feature mean and deviation of the observed values (sums, squares and counts summed
  by one aggregation round)."""
  s, s2, c = quality.federated_sum(
      data, lambda x, obs, valid, y: (jnp.sum(jnp.where(obs, x, 0.0), 0),
                                      jnp.sum(jnp.where(obs, x * x, 0.0), 0),
                                      jnp.sum(obs, 0)), missing)
  c = np.maximum(np.round(c), 1.0)
  mu = s / c
  return mu, np.sqrt(np.maximum(s2 / c - mu * mu, 1e-12))


def value_range(data, missing):
  """Per-feature [min, max] of the observed values (each client's, then min/max over clients:
  the public histogram range; a deployment would publish it with the schema)."""
  x = np.where(missing, np.nan, data.arrays["x"])
  return np.nanmin(x, 0) - 1e-3, np.nanmax(x, 0) + 1e-3


def standardize(data, test_x, mu, sd):
  x = (data.arrays["x"] - mu) / sd
  return quality._replace(data, x=x.astype(np.float32)), ((test_x - mu) / sd).astype(np.float32)


def prepare(dataset: str, arm: str, clean, dirty, missing, test_x):
  """The arm's training population and test features."""
  tabular = dataset == "breast_cancer"
  if arm == "clean":
    return standardize(clean, test_x, *federated_moments(clean)) if tabular else (clean, test_x)
  if arm == "dirty":
    return standardize(dirty, test_x, *federated_moments(dirty)) if tabular else (dirty, test_x)
  # cleaned: robust scale first (tabular), then drop outlier rows, impute, clip
  data, m = dirty, missing
  if tabular:
    lo, hi = value_range(data, m)
    q = quality.federated_quantiles(data, [0.25, 0.5, 0.75], lo, hi, bins=4096, missing=m)
    iqr = np.maximum(q[2] - q[0], 1e-6)
    data, test_x = standardize(data, test_x, q[1], iqr / 1.349)
  fence = quality.norm_fence(data, m)
  keep = quality.example_norms(data, m) <= fence
  data, m = quality.drop_examples(data, keep), m[keep]
  if tabular:
    lo, hi = value_range(data, m)
    q = quality.federated_quantiles(data, [0.25, 0.5, 0.75], lo, hi, bins=4096, missing=m)
    data = quality.impute(data, m, q[1])
    iqr = q[2] - q[0]
    data = quality.clip_features(data, q[0] - 3 * iqr, q[2] + 3 * iqr)
  else:
    data = quality.impute(data, m, quality.federated_mean(data, m))
  return data, test_x


def train(dataset, arm, data, model, seed, small, dirty=None, missing=None):
  clients, cohort, rounds, lr, batch, epochs = CONFIG[dataset]
  if small:
    rounds, cohort = 4, min(cohort, 5)
  algo = fs.algorithms.fedavg(optax.sgd(lr), batch_size=batch, local_epochs=epochs)
  if arm == "cleaned+gce":
    model = dataclasses.replace(model, loss=remedies.generalized_cross_entropy(0.7))
  if arm != "cleaned+weights":
    return fs.run(algo, model, data, rounds=rounds, cohort_size=cohort, seed=seed,
                  progress=False).params, None
  warm = max(1, rounds // 5)
  params = fs.run(algo, model, data, rounds=warm, cohort_size=cohort, seed=seed,
                  progress=False).params
  # scores: declared-missing and outlier shares of the stored data, label disagreement of the
  # cleaned data with the warm-up global model (clients keep their positions through cleaning)
  q = quality.client_quality(dirty, missing, max_norm=quality.norm_fence(dirty, missing))
  q["disagreement"] = quality.client_quality(data, model=model, params=params)["disagreement"]
  scores = quality.quality_scores(q)
  w = quality.quality_weights(data, scores, power=2.0)
  params = fs.run(algo, model, data, rounds=rounds - warm, cohort_size=cohort, seed=seed + 1000,
                  init_params=params, client_weights=w, progress=False).params
  return params, scores


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", choices=DATASETS, action="append")
  p.add_argument("--arms", default=",".join(ARMS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--first-seed", type=int, default=0,
                 help="run seeds first-seed .. first-seed + seeds - 1 (to add seeds to a run)")
  p.add_argument("--from", dest="from_", nargs="+", metavar="JSONL",
                 help="no training: summarise and plot the per-seed records of these files")
  p.add_argument("--small", action="store_true", help="tiny sizes: checks the script runs")
  p.add_argument("--out", default=os.path.join(RESULTS, "data_quality"),
                 help="prefix of the .jsonl and .png files")
  args = p.parse_args(argv)
  if args.from_:
    return resummarize(args.from_, args.out)
  arms = args.arms.split(",")
  bad = [a for a in arms if a not in ARMS]
  if bad:
    raise SystemExit(f"unknown arm(s) {bad}; choose from {ARMS}")
  if args.small:
    args.seeds = 1
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  lines, results = [], {}

  def emit(rec):
    lines.append(json.dumps(rec))
    print(lines[-1], flush=True)

  for dataset in args.only or DATASETS:
    clients = CONFIG[dataset][0] if not args.small else 10
    for seed in range(args.first_seed, args.first_seed + args.seeds):
      train_set, test, k = load(dataset, seed, args.small)
      parts = fs.partition.iid(train_set["y"], clients, seed=seed)
      clean = fs.FederatedData.from_partition(train_set, parts, num_classes=k)
      dirty, missing, info = quality.corrupt(clean, SPEC, seed=seed)
      d = int(np.prod(train_set["x"].shape[1:]))
      model = (fs.models.mlp_2nn(784, 10) if dataset == "fmnist"
               else fs.models.logistic_regression(d, k))
      ev = evaluation.make_evaluate(model, 1000)
      for arm in arms:
        data, test_x = prepare(dataset, arm, clean, dirty, missing, test["x"])
        params, scores = train(dataset, arm, data, model, seed, args.small, dirty, missing)
        m = jax.device_get(ev(params, jnp.asarray(test_x), jnp.asarray(test["y"])))
        rec = {"dataset": dataset, "arm": arm, "seed": seed, "clients": clients,
               "loss_fn": "gce" if arm == "cleaned+gce" else "ce",
               "train_examples": int(data.num_examples), "accuracy": float(m["accuracy"]),
               "loss": float(m["loss"])}
        if scores is not None:
          dirty_c = np.isin(np.arange(clients), info["dirty_clients"])
          rec["mean_score_dirty"] = float(scores[dirty_c].mean())
          rec["mean_score_clean"] = float(scores[~dirty_c].mean())
        results.setdefault(dataset, {}).setdefault(arm, []).append(rec)
        emit(rec)
    summarize(dataset, results[dataset], emit)
  with open(f"{args.out}.jsonl", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(results, f"{args.out}.png")


def resummarize(paths, out: str) -> None:
  """Summaries and the plot again from the per-seed records of earlier runs (``--from``), e.g.
  when seeds were run by several commands."""
  results: dict = {}
  for path in paths:
    for line in open(path):
      rec = json.loads(line)
      if "summary" in rec:
        continue
      recs = results.setdefault(rec["dataset"], {}).setdefault(rec["arm"], [])
      if any(r["seed"] == rec["seed"] for r in recs):
        raise SystemExit(f"{path}: {rec['dataset']} {rec['arm']} seed {rec['seed']} is in more "
                         "than one record")
      recs.append(rec)
  lines = []

  def emit(rec):
    lines.append(json.dumps(rec))
    print(lines[-1], flush=True)

  ordered = {}
  for dataset in [d for d in DATASETS if d in results]:
    ordered[dataset] = {a: sorted(results[dataset][a], key=lambda r: r["seed"])
                        for a in ARMS if a in results[dataset]}
    for recs in ordered[dataset].values():
      for r in recs:
        emit(r)
    summarize(dataset, ordered[dataset], emit)
  with open(f"{out}.jsonl", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(ordered, f"{out}.png")


def summarize(dataset, results, emit):
  base = results.get("clean")
  for arm, recs in results.items():
    acc = [r["accuracy"] for r in recs]
    rec = {"dataset": dataset, "arm": arm, "summary": "mean over seeds", "seeds": len(recs),
           "accuracy": float(np.mean(acc)), "std_accuracy": float(np.std(acc))}
    if base and arm != "clean":
      rec["gap_to_clean_points"] = round(100 * (np.mean(acc) - np.mean(
          [r["accuracy"] for r in base])), 2)
    emit(rec)


def plot(results, path):
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5 * len(results), 3.8))
  for i, (dataset, arms) in enumerate(results.items()):
    ax = fig.add_subplot(1, len(results), i + 1)
    names = list(arms)
    means = [100 * np.mean([r["accuracy"] for r in arms[a]]) for a in names]
    stds = [100 * np.std([r["accuracy"] for r in arms[a]]) for a in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4,
           color=[{"clean": "tab:green", "dirty": "tab:red", "cleaned": "tab:blue",
                   "cleaned+gce": "tab:cyan"}.get(a, "tab:purple") for a in names])
    ax.set_xticks(range(len(names)), names, rotation=15)
    lo = min(means) - 5
    ax.set_ylim(max(0, lo), min(100, max(means) + 3))
    for j, (v, e) in enumerate(zip(means, stds)):
      ax.text(j + 0.12, v + e + 0.15, f"{v:.1f}", ha="left", fontsize=8)
    seeds = len(next(iter(arms.values())))
    ax.set_title(f"{dataset}: test accuracy (%), {seeds} seeds", fontsize=9)
  fig.suptitle("30% dirty clients: 20% missing, 5% outliers x10, 30% label noise", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
