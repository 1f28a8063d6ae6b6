"""Label-skew remedies on Fashion-MNIST (issue 17): plain FedAvg vs each remedy, 3 seeds.

Settings (100 clients, 100 rounds, 10 clients a round, 2NN 784-200-200-10, SGD 0.05, batch 32,
2 local epochs; the balanced 10,000-example test set):

* ``dirichlet``: the whole training set split by Dirichlet(0.1) label skew (Hsu et al. 2019);
  globally balanced, each client sees few classes.
* ``longtail``: a globally long-tailed training set, class c keeping ``6000 * 100^(-c/9)``
  examples (imbalance ratio 100: 6000 of class 0 down to 60 of class 9, 14,886 in all, as
  CIFAR-10-LT), split IID over the clients.

Methods (:mod:`fedjax_sim.remedies`): ``fedavg``; ``la_client`` (logit adjustment by each
client's label prior, FedLC-style per-client calibration); ``la_global`` (logit adjustment by the
global prior, the balanced softmax); ``fedlc`` (FedLC's ``-tau n_y^{-1/4}`` margins by client
counts); on-device data remedies (:mod:`fedjax_sim.augment`, keyed per client and step):
``augment`` (random shifts of up to 2 pixels, then 6x6 random erasing on half the images),
``minority`` (class-balanced resampling of each batch, then in-batch SMOTE on half the
examples), ``smote`` (in-batch SMOTE on half the examples, no resampling), ``mixup`` (alpha
0.2); and the combinations ``la_global+smote``, ``la_global+mixup``, ``la_global+augment`` and
``la_client+augment`` (logit adjustment with a data remedy that does not itself rebalance:
class-balanced resampling and a prior correction would correct the skew twice). Every record
has test ``accuracy``, ``balanced_accuracy`` (macro), ``worst_class_accuracy`` and
``per_class_accuracy``; summary lines give the mean over seeds and the gain over FedAvg (on
the same seeds) in points. The per-class plot of each setting is
``results/imbalance_<setting>.png``.

  python benchmarks/imbalance.py                 # full: both settings, 3 seeds
                                                 # (results/imbalance.jsonl and .png)
  python benchmarks/imbalance.py --only longtail # one setting
  python benchmarks/imbalance.py --small         # tiny sizes: checks the script runs
  python benchmarks/imbalance.py --from a.jsonl b.jsonl   # summaries + plots of earlier runs
"""

from __future__ import annotations

import argparse
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
from fedjax_sim import augment, evaluation, remedies  # noqa: E402

SETTINGS = ("dirichlet", "longtail")
METHODS = ("fedavg", "la_client", "la_global", "fedlc", "augment", "minority", "smote", "mixup",
           "la_global+smote", "la_global+mixup", "la_global+augment", "la_client+augment")
DATA_REMEDIES = ("augment", "minority", "smote", "mixup")
IMAGE = (28, 28, 1)
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Boot")


def long_tailed(labels: np.ndarray, ratio: float, seed: int, per_class: int | None = None):
  """Indices of a long-tailed subset: class c keeps ``n_max * ratio^(-c/(K-1))`` of its
  examples (``n_max`` = the smallest class size, or ``per_class``), chosen at random."""
  rng = np.random.default_rng(seed)
  k = int(labels.max()) + 1
  n_max = per_class or min(int(np.sum(labels == c)) for c in range(k))
  keep = []
  for c in range(k):
    n_c = max(1, int(n_max * ratio ** (-c / (k - 1))))
    keep.append(rng.permutation(np.flatnonzero(labels == c))[:n_c])
  return np.sort(np.concatenate(keep))


def make_data(setting: str, train, num_clients: int, seed: int, subsample: int | None):
  x, y = train["x"], train["y"]
  if subsample:   # --small: a stratified slice, to check the script quickly
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:subsample // 10] for c in range(10)]))
    x, y = x[idx], y[idx]
  if setting == "longtail":
    idx = long_tailed(y, 100.0, seed)
    x, y = x[idx], y[idx]
    parts = fs.partition.iid(y, num_clients, seed=seed)
  else:
    parts = fs.partition.dirichlet(y, num_clients, 0.1, seed=seed)
  return fs.FederatedData.from_partition({"x": x, "y": y}, parts, num_classes=10)


def algorithm(method: str, data, args):
  algo = fs.algorithms.fedavg(optax.sgd(args.lr), batch_size=args.batch_size,
                              local_epochs=args.local_epochs)
  if method == "fedavg":
    return algo
  la, _, aug = method.partition("+")
  augmentation = mixup = offsets = None
  if la in DATA_REMEDIES:
    la, aug = "", la
  if la:
    offsets = {
        "la_client": lambda: remedies.logit_adjustment(data, tau=args.tau, prior="client"),
        "la_global": lambda: remedies.logit_adjustment(data, tau=args.tau, prior="global"),
        "fedlc": lambda: remedies.fedlc_calibration(data, tau=args.fedlc_tau, prior="client"),
    }[la]()
  if aug == "augment":
    augmentation = augment.compose(augment.random_shift(IMAGE, 2),
                                   augment.random_erasing(IMAGE, (6, 6), 0.5))
  elif aug == "minority":
    augmentation = augment.compose(augment.balanced_resample(), augment.smote(0.5))
  elif aug == "smote":
    augmentation = augment.smote(0.5)
  elif aug == "mixup":
    mixup = 0.2
  return algo.replace(name=method, client=remedies.remedied(
      algo.client, logit_offsets=offsets, augment=augmentation, mixup=mixup))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", choices=SETTINGS, action="append")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--first-seed", type=int, default=0,
                 help="run seeds first-seed .. first-seed + seeds - 1 (to add seeds to a run)")
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--local-epochs", type=int, default=2)
  p.add_argument("--tau", type=float, default=1.0)
  p.add_argument("--fedlc-tau", type=float, default=1.0)
  p.add_argument("--small", action="store_true", help="tiny sizes: checks the script runs")
  p.add_argument("--out", default=os.path.join(RESULTS, "imbalance"),
                 help="prefix of the .jsonl and the per-setting .png files")
  p.add_argument("--from", dest="from_", nargs="+", metavar="JSONL",
                 help="no training: summarise and plot the per-seed records of these files")
  args = p.parse_args(argv)
  if args.from_:
    return resummarize(args.from_, args.out, args.rounds)
  subsample = None
  if args.small:
    args.rounds, args.clients, args.cohort, args.seeds = 4, 10, 5, 1
    subsample = 3000
  methods = args.methods.split(",")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
  train, test = fs.datasets.fashion_mnist()
  model = fs.models.mlp_2nn(784, 10)
  ev = evaluation.make_evaluate(model, 1000, evaluation.class_metrics(10))
  tx, ty = jnp.asarray(test["x"]), jnp.asarray(test["y"], jnp.int32)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  out_lines = []

  def emit(rec):
    line = json.dumps(rec)
    print(line, flush=True)
    out_lines.append(line)

  for setting in args.only or SETTINGS:
    results = {m: [] for m in methods}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
      data = make_data(setting, train, args.clients, seed, subsample)
      for method in methods:
        res = fs.run(algorithm(method, data, args), model, data, rounds=args.rounds,
                     cohort_size=args.cohort, seed=seed, progress=False)
        m = jax.device_get(ev(res.params, tx, ty))
        rec = {"setting": setting, "method": method, "seed": seed,
               "train_examples": int(data.num_examples),
               **{k: float(m[k]) for k in ("accuracy", "balanced_accuracy",
                                           "worst_class_accuracy", "loss")},
               "per_class_accuracy": [round(float(a), 4) for a in m["per_class_accuracy"]]}
        results[method].append(rec)
        emit(rec)
    summarize(setting, results, args.rounds, args.out, emit)
  with open(f"{args.out}.jsonl", "w") as f:
    f.write("\n".join(out_lines) + "\n")


def summarize(setting: str, results: dict, rounds: int, out: str, emit) -> None:
  """Emits the mean over seeds of each method (and its gain over FedAvg in points) and saves
  the per-class plot ``<out>_<setting>.png``."""
  per_class = {}
  base = results.get("fedavg")
  for method, recs in results.items():
    mean = {k: float(np.mean([r[k] for r in recs]))
            for k in ("accuracy", "balanced_accuracy", "worst_class_accuracy")}
    per_class[method] = np.mean([r["per_class_accuracy"] for r in recs], 0)
    summ = {"setting": setting, "method": method, "summary": "mean over seeds",
            "seeds": len(recs), **mean,
            "std_balanced_accuracy": float(np.std([r["balanced_accuracy"] for r in recs])),
            "std_worst_class_accuracy": float(np.std([r["worst_class_accuracy"] for r in recs]))}
    if base and method != "fedavg":
      # paired: FedAvg over the same seeds (a method may have fewer seeds than FedAvg)
      seeds = {r["seed"] for r in recs}
      paired = [r for r in base if r["seed"] in seeds] or base
      for k in mean:
        summ[f"gain_{k}_points"] = round(
            100 * (mean[k] - float(np.mean([r[k] for r in paired]))), 2)
    emit(summ)
  seeds = max(len(r) for r in results.values())
  fs.history.plot_class_accuracy(
      per_class, f"{out}_{setting}.png", class_names=CLASSES,
      title=f"Fashion-MNIST {setting}: test accuracy per class (mean of {seeds} seeds, "
            f"{rounds} rounds)")


def resummarize(paths, out: str, rounds: int) -> None:
  """Summaries and plots again from the per-seed records of earlier runs (``--from``), e.g.
  when the methods of one setting were run by several commands."""
  by_setting: dict = {}
  for path in paths:
    for line in open(path):
      rec = json.loads(line)
      if "summary" not in rec:
        recs = by_setting.setdefault(rec["setting"], {}).setdefault(rec["method"], [])
        if any(r["seed"] == rec["seed"] for r in recs):
          raise SystemExit(f"{path}: {rec['setting']} {rec['method']} seed {rec['seed']} is "
                           "in more than one record")
        recs.append(rec)
  lines = []

  def emit(rec):
    lines.append(json.dumps(rec))
    print(lines[-1], flush=True)

  for setting, results in by_setting.items():
    order = sorted(results, key=lambda m: METHODS.index(m))
    results = {m: results[m] for m in order}
    for recs in results.values():
      for r in recs:
        emit(r)
    summarize(setting, results, rounds, out, emit)
  with open(f"{out}.jsonl", "w") as f:
    f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
  main()
