"""Command line: ``python -m fedjax_sim run [options]``.

The defaults are the reference experiment of ``make run``: FedAvg with the 2NN MLP on
Fashion-MNIST, 100 clients from a Dirichlet(0.5) label split, 10 clients per round, 100 rounds,
evaluation every 10 rounds on the 10k test set. Writes ``history.json``, ``config.json`` and
``history.png`` to the output folder. Bad input gives one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

DATASETS = ("fashion_mnist", "digits", "synthetic")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m fedjax_sim", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="run one federated experiment",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  r.add_argument("--dataset", choices=DATASETS, default="fashion_mnist")
  r.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
  r.add_argument("--partition", default="dirichlet",
                 choices=("iid", "dirichlet", "shards", "quantity_skew"),
                 help="how to split a centralized dataset into clients (not for synthetic)")
  r.add_argument("--alpha", type=float, default=0.5,
                 help="Dirichlet concentration; for synthetic, FedProx's alpha")
  r.add_argument("--beta", type=float, default=0.5, help="synthetic only: FedProx's beta")
  r.add_argument("--shards-per-client", type=int, default=2)
  r.add_argument("--num-clients", type=int, default=100)
  r.add_argument("--model", default="mlp_2nn", choices=("mlp_2nn", "cnn", "logistic_regression"))
  r.add_argument("--rounds", type=int, default=100)
  r.add_argument("--cohort-size", type=int, default=10)
  r.add_argument("--client-lr", type=float, default=0.05)
  r.add_argument("--client-momentum", type=float, default=0.0)
  r.add_argument("--server-lr", type=float, default=1.0)
  r.add_argument("--server-optimizer", default="sgd", choices=("sgd", "momentum", "adam", "yogi",
                                                               "adagrad"))
  r.add_argument("--local-epochs", type=int, default=1)
  r.add_argument("--local-steps", type=int, default=None, help="fixed steps instead of epochs")
  r.add_argument("--batch-size", type=int, default=20)
  r.add_argument("--eval-every", type=int, default=10)
  r.add_argument("--chunk-size", type=int, default=None)
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
  r.add_argument("--no-progress", action="store_true")
  return p


def server_optimizer(name: str, lr: float):
  import optax
  if not lr > 0:
    raise ValueError(f"--server-lr must be > 0, got {lr}")
  return {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=0.9),
          "adam": lambda: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3),
          "yogi": lambda: optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3),
          "adagrad": lambda: optax.adagrad(lr, eps=1e-3)}[name]()


def load_data(args):
  """Returns (train FederatedData, test arrays or FederatedData, input_shape)."""
  from fedjax_sim.data import datasets, partition
  from fedjax_sim.data.federated import FederatedData
  if args.dataset == "synthetic":
    train, test = datasets.synthetic(args.alpha, args.beta, num_clients=args.num_clients,
                                     seed=args.seed)
    return train, test, train.arrays["x"].shape[1:]
  flatten = args.model != "cnn"
  train, test = (datasets.fashion_mnist(args.data_dir, flatten=flatten)
                 if args.dataset == "fashion_mnist" else datasets.digits(flatten=flatten))
  params = {"dirichlet": {"alpha": args.alpha}, "shards": {"shards_per_client":
                                                           args.shards_per_client}}
  parts = partition.make(args.partition, train["y"], args.num_clients, seed=args.seed,
                         **params.get(args.partition, {}))
  return FederatedData.from_partition(train, parts, num_classes=10), test, train["x"].shape[1:]


def cmd_run(args) -> int:
  import optax

  import fedjax_sim as fs

  out = Path(args.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"cannot write to output folder {str(out)!r}: {e.strerror or e}") from None
  if not args.client_lr > 0:
    raise ValueError(f"--client-lr must be > 0, got {args.client_lr}")
  train, test, input_shape = load_data(args)
  model = fs.models.make(args.model, tuple(input_shape), 10)
  algo = fs.algorithms.fedavg(
      optax.sgd(args.client_lr, momentum=args.client_momentum or None),
      server_optimizer(args.server_optimizer, args.server_lr),
      local_epochs=None if args.local_steps else args.local_epochs,
      local_steps=args.local_steps, batch_size=args.batch_size)
  config = {k: v for k, v in vars(args).items() if k != "command"}
  print(f"{train!r}\nmodel {model.name}, {args.rounds} rounds x {args.cohort_size} clients -> {out}")
  res = fs.run(algo, model, train, rounds=args.rounds, cohort_size=args.cohort_size,
               eval_data=test, eval_every=args.eval_every, seed=args.seed,
               chunk_size=args.chunk_size, progress=not args.no_progress)
  h = res.history
  config["compile_seconds"] = res.compile_seconds
  (out / "config.json").write_text(json.dumps(config, indent=2))
  h.to_json(out / "history.json")
  h.plot(out / "history.png", label=f"fedavg {args.model} {args.dataset}")
  acc = h.last("test_accuracy")
  print(f"final test accuracy {acc:.4f} (test loss {h.last('test_loss'):.4f}) after "
        f"{args.rounds} rounds; {float(h['seconds'][1:].mean() if args.rounds > 1 else h['seconds'][0]):.3f} s/round, "
        f"compile {res.compile_seconds:.1f} s")
  print(f"wrote {out / 'history.json'}, {out / 'history.png'}, {out / 'config.json'}")
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "run":
      return cmd_run(args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 1


if __name__ == "__main__":
  sys.exit(main())
