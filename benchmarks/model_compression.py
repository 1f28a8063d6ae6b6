"""Model-compression benchmark for weak clients: magnitude pruning and bfloat16 local compute.

Fashion-MNIST over 100 IID clients, McMahan's 2NN (784-200-200-10, 199,210 parameters), FedAvg
with cohorts of 10 and 10 local SGD steps of 20 examples. First ``--dense-rounds`` rounds of
dense float32 training (shared by every variant); then the model is magnitude-pruned (one global
threshold over the three weight matrices, biases kept) to 0 / 50 / 80 / 90% sparsity and
training continues ``--sparse-rounds`` rounds under the mask (``masked_optimizer`` on the
clients, so pruned weights stay exactly 0; checked). Separately, the same schedule runs from
scratch with bfloat16 local compute (``bfloat16_compute``: float32 master params, bfloat16
forward/backward).

Reported per variant: parameters (total and non-zero), FLOPs of one forward pass on a batch of
20 from XLA's cost analysis (dense: XLA runs pruned matrices densely) and the estimate for a
sparse kernel (2 x batch x non-zero weights per matmul, plus the bias adds), bytes accessed
(XLA), the accuracy right after pruning and after fine-tuning, and seconds per round. A markdown
table is printed and saved to benchmarks/results/model_compression.md; every variant is a JSON
line in benchmarks/results/model_compression.jsonl::

  python benchmarks/model_compression.py           # full sizes (~3-5 minutes on 2 busy CPU cores)
  python benchmarks/model_compression.py --small   # smoke run on scikit-learn's digits
"""

from __future__ import annotations

import argparse
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import evaluation  # noqa: E402
from fedjax_sim.models import cost, precision, pruning  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def sparse_flops(params, batch: int) -> float:
  """Forward FLOPs of an MLP of Dense layers with a sparse matmul kernel: ``2 B nnz(W)`` per
  kernel plus ``B`` adds per bias entry (ReLUs not counted, as in XLA's count of max ops)."""
  total = 0.0
  for leaf in jax.tree.leaves(params):
    total += 2.0 * batch * int(jnp.count_nonzero(leaf)) if leaf.ndim >= 2 else batch * leaf.size
  return total


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--small", action="store_true", help="digits, 20 clients, a few rounds (smoke)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--dense-rounds", type=int, default=10)
  p.add_argument("--sparse-rounds", type=int, default=20)
  p.add_argument("--local-steps", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--sparsities", default="0,0.5,0.8,0.9")
  p.add_argument("--scope", choices=pruning.SCOPES, default="global")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None,
                 help="results prefix (default benchmarks/results/model_compression)")
  args = p.parse_args(argv)
  if args.small:
    args.clients, args.cohort = 20, 5
    args.dense_rounds, args.sparse_rounds = min(args.dense_rounds, 3), min(args.sparse_rounds, 4)
  out_prefix = Path(args.out) if args.out else RESULTS / ("model_compression_small" if args.small
                                                          else "model_compression")
  out_prefix.parent.mkdir(parents=True, exist_ok=True)

  train, test = fs.datasets.digits() if args.small else fs.datasets.fashion_mnist(args.data_dir)
  data = fs.FederatedData.from_partition(train, fs.partition.iid(train["y"], args.clients, seed=0),
                                         num_classes=10)
  dim = data.arrays["x"].shape[1]
  model = fs.models.mlp_2nn(dim, 10)
  bf16 = precision.bfloat16_compute(model)
  client_opt = optax.sgd(args.lr)
  make_algo = lambda opt: fs.algorithms.fedavg(opt, optax.sgd(1.0), local_steps=args.local_steps,
                                               batch_size=args.batch_size)
  kw = dict(cohort_size=args.cohort, eval_data=test, progress=False, rounds_per_call=10,
            chunk_size=args.cohort)
  ex, ey = jnp.asarray(test["x"]), jnp.asarray(test["y"], jnp.int32)
  evaluate = evaluation.make_evaluate(model)
  batch = jax.ShapeDtypeStruct((args.batch_size, dim), jnp.float32)
  config = dict(dataset="digits" if args.small else "fashion_mnist", model=model.name,
                clients=data.num_clients, cohort=args.cohort, dense_rounds=args.dense_rounds,
                sparse_rounds=args.sparse_rounds, local_steps=args.local_steps,
                batch_size=args.batch_size, lr=args.lr, scope=args.scope,
                backend=jax.default_backend())
  print(f"# {data}; {config}", flush=True)

  t = time.perf_counter()
  dense = fs.run(make_algo(client_opt), model, data, rounds=args.dense_rounds,
                 eval_every=args.dense_rounds, seed=args.seed, **kw)
  dense_seconds = time.perf_counter() - t
  dense_acc = dense.history.last("test_accuracy")
  print(f"# dense warm-up: {args.dense_rounds} rounds, accuracy {dense_acc:.4f}, "
        f"{dense_seconds:.1f} s", flush=True)

  rows = []
  out = open(out_prefix.with_suffix(".jsonl"), "a")

  def emit(rec):
    rows.append(rec)
    line = json.dumps(rec)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()

  total = int(sum(np.size(x) for x in jax.tree.leaves(dense.params)))
  for sparsity in [float(s) for s in args.sparsities.split(",") if s]:
    pruned, mask = pruning.magnitude_prune(dense.params, sparsity, scope=args.scope)
    acc_pruned = float(evaluate(pruned, ex, ey)["accuracy"])
    opt = client_opt if sparsity == 0 else pruning.masked_optimizer(client_opt, mask)
    t = time.perf_counter()
    # Same seed offset for every sparsity: identical cohorts and shuffles in the fine-tuning.
    res = fs.run(make_algo(opt), model, data, rounds=args.sparse_rounds,
                 eval_every=args.sparse_rounds, seed=args.seed + 1, init_params=pruned, **kw)
    seconds = time.perf_counter() - t
    stay_zero = all(bool(np.all(np.asarray(w)[~np.asarray(m)] == 0))
                    for w, m in zip(jax.tree.leaves(res.params), jax.tree.leaves(mask)))
    c = cost.cost(model, batch, res.params)
    density = {"/".join(str(getattr(k, "key", k)) for k in path): float(np.mean(m))
               for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m.ndim >= 2}
    emit(dict(bench="model_compression", variant=f"prune_{int(round(100 * sparsity))}",
              sparsity=sparsity, compute="float32", params=total,
              nonzero=pruning.num_nonzero(res.params),
              flops_xla=c["flops"], flops_sparse=sparse_flops(res.params, args.batch_size),
              bytes_accessed=c["bytes_accessed"], kernel_density=density,
              accuracy_dense_warmup=dense_acc, accuracy_after_prune=acc_pruned,
              accuracy=res.history.last("test_accuracy"), pruned_stay_zero=stay_zero,
              seconds_per_round=float(np.median(res.history["seconds"])),
              compile_seconds=res.compile_seconds, wall_seconds=seconds, **config))

  # bfloat16 local compute: the same total schedule from scratch, float32 masters.
  t = time.perf_counter()
  rounds = args.dense_rounds + args.sparse_rounds
  res = fs.run(make_algo(client_opt), bf16, data, rounds=rounds, eval_every=rounds,
               seed=args.seed, **kw)
  seconds = time.perf_counter() - t
  c = cost.cost(bf16, batch, res.params)
  f32_acc = next((r["accuracy"] for r in rows if r["sparsity"] == 0), float("nan"))
  emit(dict(bench="model_compression", variant="bf16_compute", sparsity=0.0, compute="bfloat16",
            params=total, nonzero=pruning.num_nonzero(res.params), flops_xla=c["flops"],
            flops_sparse=float("nan"), bytes_accessed=c["bytes_accessed"],
            accuracy=res.history.last("test_accuracy"), accuracy_float32_same_rounds=f32_acc,
            master_dtype=str(jax.tree.leaves(res.params)[0].dtype),
            seconds_per_round=float(np.median(res.history["seconds"])),
            compile_seconds=res.compile_seconds, wall_seconds=seconds, **config))
  out.close()

  lines = [f"{config['dataset']}, {model.name}, {data.num_clients} IID clients, cohort "
           f"{args.cohort}: {args.dense_rounds} dense rounds, then pruning ({args.scope} "
           f"magnitude threshold) and {args.sparse_rounds} rounds under the mask; bf16 runs "
           f"all {rounds} rounds with bfloat16 local compute. FLOPs: one forward pass on a batch "
           f"of {args.batch_size}.", "",
           "| variant | non-zero params | XLA FLOPs | sparse-kernel FLOPs | XLA bytes accessed "
           "| acc. after pruning | final acc. | s/round |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    after = r.get("accuracy_after_prune")
    lines.append(
        f"| {r['variant']} | {r['nonzero']:,} / {r['params']:,} | {r['flops_xla'] / 1e6:.2f} M | "
        + ("-" if np.isnan(r["flops_sparse"]) else f"{r['flops_sparse'] / 1e6:.2f} M")
        + f" | {r['bytes_accessed'] / 1e6:.2f} MB | "
        + ("-" if after is None else f"{100 * after:.1f}")
        + f" | {100 * r['accuracy']:.1f} | {r['seconds_per_round']:.3f} |")
  lines.append("")
  lines.append(f"Dense warm-up accuracy after {args.dense_rounds} rounds: {100 * dense_acc:.1f}. "
               "Pruned weights stayed exactly zero: "
               f"{all(r.get('pruned_stay_zero', True) for r in rows)}.")
  text = "\n".join(lines)
  print("\n" + text)
  out_prefix.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
  main()
