"""Byzantine-robustness benchmark: FedAvg under attacks, with the mean and robust aggregators.

Fashion-MNIST over 100 IID clients (600 examples each; ``--alpha`` for a Dirichlet label skew),
multinomial logistic regression (``--model 2nn`` for McMahan's 2NN), one local epoch of SGD.
20% of the population (exactly 20 clients: the attacker seed is the first one giving
``round(fraction * P)`` attackers, so that every attack hits the same 20 clients) attack with

* ``label_flip``: attackers train honestly on labels ``y -> 9 - y`` (data poisoning),
* ``sign_flip``: attackers send ``-4 x`` their update,
* ``scale``: attackers send ``-50 x`` their update (a boosted sign flip: a large-norm attack),
* ``gaussian``: attackers send ``N(0, 1)`` noise per coordinate,

against the aggregators mean (plain FedAvg), coordinate-wise median, trimmed mean (beta =
``--trim-beta``, default the attacker fraction), Krum (f = the number of attackers per
aggregation), Multi-Krum (same f, m = n - 2f - 2) and the norm-bounded mean (M = 0.5, about the
norm of an honest client's update after the first rounds). ``trimmed_mean:0.4`` in
``--aggregators`` names a trimmed mean with another beta. Every aggregator also runs without
attack.

**Two threat models.** By default every client takes part in every round (cohort = population,
as in Yin et al. 2018 and Fang et al. 2020): each aggregation sees exactly 20% attackers, the
fraction the robust aggregators are configured for. With ``--cohort 20`` (sampled cohorts) the
number of attackers in a cohort is hypergeometric (mean 4, P(> 4) = 0.36 per round), so a
trimmed mean with beta 0.2 lets a ``-50 x`` update through in about every third round and the
model collapses; it needs beta above the tail of that count (``trimmed_mean:0.4`` trims 8 of 20),
(P(> 8) = 0.004 per round) while the median and Krum tolerate the excess. Results go to ``robustness.*`` (full
participation) or ``robustness_sampled.*`` (sampled cohorts).

The final test accuracy is printed as a markdown table; every run is a JSON line in
``<prefix>.jsonl``; the table is also saved to ``<prefix>.md`` and a bar chart to ``<prefix>.png``::

  python benchmarks/robustness.py            # full participation (~10 minutes on 2 CPU cores)
  python benchmarks/robustness.py --cohort 20 --aggregators mean,median,trimmed_mean,trimmed_mean:0.4,krum,multi_krum,norm_bounded
  python benchmarks/robustness.py --small    # smoke run on scikit-learn's digits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0]; drop it so that sibling scripts (e.g.
# benchmarks/compression.py) cannot shadow top-level modules jax imports (``compression``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim.transforms import attacks  # noqa: E402

RESULTS = Path(__file__).parent / "results"

ATTACK_KWARGS = {"label_flip": {}, "sign_flip": {"factor": 4.0}, "scale": {"factor": -50.0},
                 "gaussian": {"std": 1.0}}
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum")   # the target: within 5 points


def aggregators(names, cohort: int, fraction: float, max_norm: float, trim_beta: float) -> dict:
  """The named aggregators; ``trimmed_mean:<beta>`` is a trimmed mean with that beta."""
  f = int(round(fraction * cohort))
  known = {
      "mean": fs.aggregators.mean(),
      "median": fs.aggregators.coordinate_median(),
      "trimmed_mean": fs.aggregators.trimmed_mean(trim_beta),
      "krum": fs.aggregators.krum(f),
      "multi_krum": fs.aggregators.krum(f, multi_m=max(1, cohort - 2 * f - 2)),
      "norm_bounded": fs.aggregators.norm_bounded_mean(max_norm),
  }
  out = {}
  for name in names:
    if name.startswith("trimmed_mean:"):
      out[name] = fs.aggregators.trimmed_mean(float(name.split(":", 1)[1]))
    elif name in known:
      out[name] = known[name]
    else:
      raise ValueError(f"unknown aggregator {name!r}; choose from {sorted(known)} or "
                       "trimmed_mean:<beta>")
  return out


def exact_attacker_seed(num_clients: int, fraction: float) -> int:
  """First seed whose seeded attacker set has exactly ``round(fraction * P)`` clients."""
  want = int(round(fraction * num_clients))
  for seed in range(1000):
    if int(attacks.attackers(num_clients, fraction, seed).sum()) == want:
      return seed
  raise RuntimeError(f"no seed < 1000 gives exactly {want} attackers")


def load(args):
  if args.small:
    train, test = fs.datasets.digits()
  else:
    train, test = fs.datasets.fashion_mnist(args.data_dir)
  if args.alpha is None:
    parts = fs.partition.iid(train["y"], args.clients, seed=0)
  else:
    parts = fs.partition.dirichlet(train["y"], args.clients, alpha=args.alpha, seed=0)
  return fs.FederatedData.from_partition(train, parts, num_classes=10), test


def table(rows: list[dict], attack_names, agg_names) -> str:
  acc = {(r["aggregator"], r["attack"]): r["test_accuracy"] for r in rows}
  cols = ["clean"] + list(attack_names)
  lines = ["| aggregator | " + " | ".join(cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for a in agg_names:
    clean = acc.get((a, "clean"), float("nan"))
    cells = []
    for c in cols:
      v = acc.get((a, c), float("nan"))
      cells.append(f"{100 * v:.1f}" if c == "clean" else f"{100 * v:.1f} ({100 * (v - clean):+.1f})")
    lines.append(f"| {a} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows, attack_names, agg_names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  acc = {(r["aggregator"], r["attack"]): r["test_accuracy"] for r in rows}
  cols = ["clean"] + list(attack_names)
  fig, ax = plt.subplots(figsize=(10, 3.8))
  width = 0.8 / len(agg_names)
  for i, a in enumerate(agg_names):
    ax.bar(np.arange(len(cols)) + (i - (len(agg_names) - 1) / 2) * width,
           [100 * acc.get((a, c), np.nan) for c in cols], width, label=a)
  ax.set_xticks(np.arange(len(cols)), cols)
  ax.set_ylabel("final test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(ncol=len(agg_names), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
  ax.set_title("FedAvg with 20% attackers: mean vs robust aggregators")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def summarize(rows, attack_names, agg_names, out_prefix):
  """Prints and saves (``.md``, ``.png``) the accuracy table of ``rows``."""
  c = rows[0]
  clean = {r["aggregator"]: r["test_accuracy"] for r in rows if r["attack"] == "clean"}
  fedavg_clean = clean.get("mean", float("nan"))
  md = [f"Final test accuracy (%) after {c['rounds']} rounds; in brackets the change from the "
        f"same aggregator's clean run. {c['dataset']}, {c['model']}, {c['clients']} "
        f"{c['partition']} clients, cohort {c['cohort']}, {c['num_attackers']} attackers "
        f"({100 * c['fraction']:.0f}%). Clean FedAvg (mean): {100 * fedavg_clean:.1f}.", "",
        table(rows, attack_names, agg_names), "",
        "Target: robust aggregators (median, trimmed mean, Krum) within 5 points of clean; mean "
        "collapses."]
  for r in rows:
    if r["attack"] == "clean" or r["aggregator"].split(":")[0] not in ROBUST:
      continue
    own = r["test_accuracy"] - clean[r["aggregator"]]
    vs_fedavg = r["test_accuracy"] - fedavg_clean
    if min(own, vs_fedavg) < -0.05:
      md.append(f"* MISSED: {r['aggregator']} under {r['attack']}: {100 * own:+.1f} vs its clean "
                f"run, {100 * vs_fedavg:+.1f} vs clean FedAvg")
  if c["cohort"] < c["clients"]:
    md.append(f"* Sampled cohorts: the number of attackers in a cohort of {c['cohort']} varies "
              "round to round (hypergeometric), so a trimmed mean must trim more than the mean "
              "count to hold against large-norm attacks; compare trimmed_mean:0.4 with "
              "trimmed_mean (beta = the attacker fraction).")
  text = "\n".join(md)
  print("\n" + text)
  out_prefix.with_suffix(".md").write_text(text + "\n")
  try:
    plot(rows, attack_names, agg_names, out_prefix.with_suffix(".png"))
  except ImportError:   # pragma: no cover - matplotlib is optional
    pass


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--small", action="store_true", help="digits, 20 clients, 10 rounds (smoke)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--model", choices=("lr", "2nn"), default="lr")
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--cohort", type=int, default=None,
                 help="clients per round (default: all of them, full participation)")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--fraction", type=float, default=0.2)
  p.add_argument("--alpha", type=float, default=None, help="Dirichlet label skew (default IID)")
  p.add_argument("--max-norm", type=float, default=0.5, help="norm_bounded_mean's bound")
  p.add_argument("--trim-beta", type=float, default=None,
                 help="trimmed_mean's beta (default: --fraction)")
  p.add_argument("--attacks", default=",".join(ATTACK_KWARGS))
  p.add_argument("--aggregators", default="mean,median,trimmed_mean,krum,multi_krum,norm_bounded")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="results prefix (default benchmarks/results/robustness)")
  p.add_argument("--plot-only", action="store_true",
                 help="redraw the table and chart from the JSON lines already saved (last run)")
  args = p.parse_args(argv)
  if args.small:
    args.clients, args.rounds = 20, min(args.rounds, 10)
  if args.cohort is None:
    args.cohort = args.clients
  if args.trim_beta is None:
    args.trim_beta = args.fraction
  sampled = args.cohort < args.clients
  name = "robustness" + ("_sampled" if sampled else "") + ("_small" if args.small else "")
  out_prefix = Path(args.out) if args.out else RESULTS / name
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  attack_names = [a for a in args.attacks.split(",") if a]
  agg_names = [a for a in args.aggregators.split(",") if a]
  if args.plot_only:
    last = {}
    for line in out_prefix.with_suffix(".jsonl").read_text().splitlines():
      r = json.loads(line)
      last[r["aggregator"], r["attack"]] = r
    summarize(list(last.values()), attack_names, agg_names, out_prefix)
    return
  data, test = load(args)
  dim = data.arrays["x"].shape[1]
  model = fs.models.logistic_regression(dim, 10) if args.model == "lr" else fs.models.mlp_2nn(dim, 10)
  steps = int(np.ceil(data.max_client_size / args.batch_size))    # one local epoch
  base = fs.algorithms.fedavg(optax.sgd(args.lr), optax.sgd(1.0), local_steps=steps,
                              batch_size=args.batch_size)
  aggs = aggregators(agg_names, args.cohort, args.fraction, args.max_norm, args.trim_beta)
  attack_seed = exact_attacker_seed(data.num_clients, args.fraction)
  num_attackers = int(attacks.attackers(data.num_clients, args.fraction, attack_seed).sum())
  config = dict(dataset="digits" if args.small else "fashion_mnist", model=model.name,
                clients=data.num_clients, cohort=args.cohort, rounds=args.rounds, lr=args.lr,
                batch_size=args.batch_size, local_steps=steps, fraction=args.fraction,
                trim_beta=args.trim_beta,
                num_attackers=num_attackers, attack_seed=attack_seed,
                partition="iid" if args.alpha is None else f"dirichlet({args.alpha})",
                max_norm=args.max_norm, backend=jax.default_backend())
  print(f"# {data}; {num_attackers} attackers (seed {attack_seed}); {config}", flush=True)

  rows = []
  t_all = time.perf_counter()
  with open(out_prefix.with_suffix(".jsonl"), "a") as out:
    for agg_name in agg_names:
      for attack in ["clean"] + attack_names:
        algo, train = dataclasses.replace(base, aggregator=aggs[agg_name]), data
        kwargs = ATTACK_KWARGS.get(attack, {})
        if attack != "clean":
          algo, train = attacks.apply_attack(attack, algo, data, args.fraction, seed=attack_seed,
                                             **kwargs)
        t = time.perf_counter()
        res = fs.run(algo, model, train, rounds=args.rounds, cohort_size=args.cohort,
                     eval_data=test, eval_every=args.rounds, seed=args.seed, progress=False,
                     rounds_per_call=10, chunk_size=args.cohort)
        h = res.history
        rec = dict(bench="robustness", aggregator=agg_name, attack=attack, attack_kwargs=kwargs,
                   test_accuracy=h.last("test_accuracy"), test_loss=h.last("test_loss"),
                   final_train_loss=float(h["train_loss"][-1]),
                   num_nonfinite=float(np.sum(h["num_nonfinite"])),
                   seconds=time.perf_counter() - t, compile_seconds=res.compile_seconds, **config)
        rows.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

  print(f"\n# total {time.perf_counter() - t_all:.0f} s")
  summarize(rows, attack_names, agg_names, out_prefix)


if __name__ == "__main__":
  main()
