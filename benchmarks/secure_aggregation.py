"""Round time and upload bytes of FedAvg on workload W1 with four aggregations: the plain
weighted mean, pairwise-masking secure aggregation over the complete graph (``secure_sum``,
SecAgg: ``secagg``) and over SecAgg+'s sparse Harary graph (``secure_sum(graph="harary")``,
``secagg_plus``, Bell et al. 2020) and CKKS homomorphic encryption (``ckks_mean``, TenSEAL:
the ``he`` extra).

W1 (benchmarks/README.md): the 784-200-200-10 MLP (199,210 parameters), 100 examples per client,
1 local epoch of SGD; every client of the population takes part in every round (population =
cohort = C). Every variant clips the updates to L2 norm 1 (``transforms.clip_by_norm``) so they
train the same model; secure aggregation quantizes to 16 bits in the smallest ring that cannot
wrap (``16 + ceil(log2 C)`` bits).

What is measured, per (method, C): the median seconds of a compiled round after a warm-up round
(``--repeats`` rounds), the bytes one client uploads (plain: float32; secure aggregation: the
masked vector, :func:`fedjax_sim.aggregators.secure.cost`, key agreement not counted; CKKS: the
serialized ciphertexts, measured), for secure aggregation the pairwise masks per client
(``neighbours``: C - 1, or SecAgg+'s degree for 10% colluding and 10% dropped clients) and the
PRG words a client generates, and for CKKS the host seconds of encryption (all clients one after
another, each client's ciphertexts on TenSEAL's thread pool of ``threads``: a deployment
encrypts in parallel, divide by C), of the server's homomorphic sum and of decryption, from the
aggregator's cost record.

Threat models differ (module docstrings of ``fedjax_sim.aggregators.secure`` and
``.homomorphic``): secure aggregation hides each update from an honest-but-curious server as long
as no client colludes with it; CKKS hides each update from a server that does not hold the
secret key (a separate key holder decrypts the sum only).

Costs. The complete graph's simulation generates ``C (C-1)/2`` PRG vectors of n words a round
(C = 1000 with W1: 1e11 words, ~10 minutes a round on one CPU core), so it is skipped above
``--secagg-max-cohort`` (100); SecAgg+ generates ``C k / 2`` (k = 48 at C = 1000: 5e9 words).
CKKS encrypts ``C * 49`` ciphertexts of N = 8192 a round (C = 1000: ~49,000, a few minutes on
one core, less on TenSEAL's thread pool).

  python benchmarks/secure_aggregation.py --repeats 1        # C = 10, 100, 1000: a quiet machine
  python benchmarks/secure_aggregation.py --smoke            # C = 3, 1 repeat: checks it runs
  python benchmarks/secure_aggregation.py --methods secagg secagg_plus --key-agreement x25519
      # real X25519 pair seeds (the secagg extra): key agreement seconds recorded

Prints JSON lines, writes them to benchmarks/results/secure_aggregation.jsonl (``--out``) and the
plot to the same name with ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# Python puts this folder first on sys.path; a benchmark module here named like a (backported)
# stdlib module would shadow it. Import the libraries first, then make common.py importable.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import transforms  # noqa: E402
from fedjax_sim.aggregators import homomorphic as he  # noqa: E402
from fedjax_sim.aggregators import secure as sa  # noqa: E402

sys.path.append(HERE)
from common import device_info, seconds_per_round, workload  # noqa: E402

RESULTS = os.path.join(HERE, "results", "secure_aggregation.jsonl")
CLIP, BITS = 1.0, 16
METHODS = ("plain", "secagg", "secagg_plus", "ckks")


def aggregator(method: str, cohort: int, he_threads: int | None = None,
               key_agreement: str = "simulated"):
  if method == "plain":
    return fs.aggregators.mean()
  if method in ("secagg", "secagg_plus"):
    graph = "complete" if method == "secagg" else "harary"
    return sa.secure_sum(CLIP, BITS, ring_bits=min(sa.bits_needed(BITS, cohort), 32),
                         graph=graph, key_agreement=key_agreement)
  return he.ckks_mean(threads=he_threads)


def measure(method: str, cohort: int, repeats: int, he_threads: int | None = None,
            key_agreement: str = "simulated") -> dict:
  data, model, base, _ = workload("W1", cohort)
  agg = aggregator(method, cohort, he_threads, key_agreement)
  algo = dataclasses.replace(base, aggregator=agg, update_transform=transforms.clip_by_norm(CLIP))
  n = fs.tree.num_params(model.init(jax.random.key(0)))
  state = fs.engine.init_state(algo, model.init(jax.random.key(0)), cohort)
  dd = fs.engine.to_device(data)
  sec, compile_s = seconds_per_round(algo, model, state, dd, population=cohort, cohort=cohort,
                                     max_client_size=100, repeats=repeats)
  rec = {"bench": "secure_aggregation", "workload": "W1", "method": method, "cohort": cohort,
         "num_params": n, "sec_per_round": sec, "compile_s": compile_s, "repeats": repeats,
         "bytes_up_per_client": 4 * n, **device_info()}
  if method in ("secagg", "secagg_plus"):
    c = sa.cost(n, cohort, BITS, CLIP, neighbours=agg.finalize.degree(cohort))
    rec.update(bytes_up_per_client=c.bytes_up, ring_bits=c.ring_bits, value_bits=BITS,
               neighbours=c.neighbours, prg_words_per_client=c.prg_words_per_client,
               key_agreement=key_agreement)
    if key_agreement == "x25519":
      ka = agg.finalize.key_agreement_costs[-repeats:]   # after the warm-up round's
      rec.update(key_agreement_s=float(np.median([k.seconds for k in ka])),
                 key_exchanges=ka[-1].exchanges)
  if method == "ckks":
    session = he.session_of(agg)
    timed = session.costs[-repeats:]          # the warm-up round's record comes first
    med = lambda f: float(np.median([getattr(c, f) for c in timed]))
    p = session.params
    rec.update(bytes_up_per_client=timed[-1].bytes_up_per_client,
               ciphertexts_per_client=timed[-1].ciphertexts_per_client,
               encrypt_s=med("encrypt_seconds"), encrypt_s_per_client=med("encrypt_seconds") / cohort,
               sum_s=med("sum_seconds"), decrypt_s=med("decrypt_seconds"),
               threads=timed[-1].threads,
               poly_modulus_degree=p.poly_modulus_degree,
               coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes), scale_bits=p.scale_bits)
  return rec


def plot(records: list[dict], path: str):
  import matplotlib   # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # noqa: PLC0415
  fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
  for method in METHODS:
    rs = sorted((r for r in records if r["method"] == method), key=lambda r: r["cohort"])
    if not rs:
      continue
    cs = [r["cohort"] for r in rs]
    ax_t.plot(cs, [r["sec_per_round"] for r in rs], "o-", label=method)
    ax_b.plot(cs, [r["bytes_up_per_client"] / 1e6 for r in rs], "o-", label=method)
  for ax, label in ((ax_t, "seconds per round"), (ax_b, "MB uploaded per client per round")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients per round (C)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle("W1 (784-200-200-10 MLP): plain mean vs pairwise masking (SecAgg, SecAgg+) "
               "vs CKKS")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cohorts", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up)")
  p.add_argument("--secagg-max-cohort", type=int, default=100,
                 help="skip complete-graph secure aggregation (secagg) above this cohort "
                      "(O(C^2 n) simulation); secagg_plus always runs")
  p.add_argument("--key-agreement", default="simulated", choices=sa.KEY_AGREEMENTS,
                 help="pair seeds of secagg / secagg_plus: simulated, or real X25519 "
                      "(the secagg extra; its host seconds are part of the round)")
  p.add_argument("--he-threads", type=int, default=None,
                 help="TenSEAL thread pool size for CKKS (default: the CPU count)")
  p.add_argument("--smoke", action="store_true", help="C = 3, 1 repeat")
  p.add_argument("--out", default=RESULTS, help="JSON lines file (the plot: same name, .png)")
  a = p.parse_args(argv)
  if a.smoke:
    a.cohorts, a.repeats = [3], 1
  records = []
  for cohort in a.cohorts:
    for method in a.methods:
      if method == "secagg" and cohort > a.secagg_max_cohort:
        print(f"# skipping secagg at C={cohort} (> --secagg-max-cohort)", file=sys.stderr)
        continue
      rec = measure(method, cohort, a.repeats, a.he_threads, a.key_agreement)
      print(json.dumps(rec), flush=True)
      records.append(rec)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  plot(records, os.path.splitext(a.out)[0] + ".png")


if __name__ == "__main__":
  main()
