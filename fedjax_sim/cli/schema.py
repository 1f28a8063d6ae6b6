"""The configuration schema: fixed keys (dataclasses below) and tables derived from registries.

Fixed keys are the experiment's frame (data, model, rounds, output, the FedAvg-family knobs of
``[algorithm]`` and ``[local]``), each with a help text, a command-line flag and value checks.
Everything registered somewhere is reached through a registry table (:data:`TABLES`): the table
names an entry (``name = "krum"``) and gives its options, checked against the entry's factory
signature; the ``[algorithm]`` table also takes any option of the named algorithm, and
``[dataset]`` (a table instead of a string) any option of the named loader.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim import aggregators, algorithms, heterogeneity, optimizers, privacy, transforms
from fedjax_sim.data import datasets
from fedjax_sim.registry import Option, Registry

DATASETS = ("fashion_mnist", "digits", "synthetic", "diabetes")   # loaders the CLI can split
PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")
MODELS = ("mlp_2nn", "cnn", "logistic_regression", "regression_mlp")
# regression data sets (float targets), their models, and the partitions that ignore labels
REGRESSION_DATASETS = ("diabetes",)
REGRESSION_MODELS = ("regression_mlp",)
LABEL_FREE_PARTITIONS = ("iid", "quantity_skew")
ALGORITHMS = tuple(algorithms.REGISTRY)
# adam / yogi / adagrad are Reddi et al. (2021), Algorithm 2 (fedjax_sim.algorithms.fedopt);
# optax_* are optax's own optimizers of those names (bias correction etc.: other algorithms).
ADAPTIVE_SERVERS = ("adam", "yogi", "adagrad")
SERVER_OPTIMIZERS = ("sgd", "momentum", *ADAPTIVE_SERVERS, "optax_adam", "optax_yogi",
                     "optax_adagrad")
WEIGHTINGS = ("examples", "uniform")
# the server optimizer each named algorithm implies (the others take algorithm.server_optimizer)
IMPLIED_SERVER_OPTIMIZER = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi",
                            "fedadagrad": "adagrad"}
DEFAULT_SERVER_LR = {"sgd": 1.0, "momentum": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-1,
                     "optax_adam": 1e-2, "optax_yogi": 1e-2, "optax_adagrad": 1e-1}


class ConfigError(ValueError):
  """A configuration value (from a file or a flag) is unknown, of the wrong type or invalid."""


def _field(default, help: str, *, flag: str | None = None, choices=None,  # noqa: A002
           minimum: float | None = None, positive: bool = False):
  """A schema field: its help text, command-line flag and value checks (``positive``: > 0)."""
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "choices": choices, "minimum": minimum, "positive": positive})


@dataclasses.dataclass
class PartitionConfig:
  """How a centralized dataset is split into clients (the synthetic dataset has its own)."""
  name: str = _field("dirichlet", "how to split a centralized dataset into clients (not for "
                     "synthetic)", flag="--partition", choices=PARTITIONS)
  alpha: float = _field(0.5, "Dirichlet concentration; for synthetic, FedProx's alpha",
                        flag="--alpha", minimum=0.0)
  beta: float = _field(0.5, "synthetic only: FedProx's beta", flag="--beta", minimum=0.0)
  shards_per_client: int = _field(2, "shards only: label shards per client",
                                  flag="--shards-per-client", positive=True)
  exponent: float = _field(1.5, "quantity_skew only: Pareto exponent of client sizes",
                           flag="--exponent", minimum=0.0)


@dataclasses.dataclass
class AlgorithmConfig:
  """The federated algorithm, its client optimizer (SGD) and server optimizer. ``options``: any
  other option of the named algorithm's factory (``fedjax_sim.algorithms.REGISTRY``)."""
  # The registry itself, not a snapshot of its names: an algorithm registered after this module
  # was imported (a user's own, see notebooks/06) is a valid choice too.
  name: str = _field("fedavg", "federated algorithm", flag="--algorithm",
                     choices=algorithms.REGISTRY)
  client_lr: float = _field(0.05, "client SGD learning rate", flag="--client-lr", positive=True)
  client_momentum: float = _field(0.0, "client SGD momentum (0 = none)",
                                  flag="--client-momentum", minimum=0.0)
  server_optimizer: str = _field("sgd", "optimizer on the averaged update, for algorithms that "
                                 "take one (fedavgm/fedadam/fedyogi/fedadagrad imply theirs)",
                                 flag="--server-optimizer", choices=SERVER_OPTIMIZERS)
  server_lr: float | None = _field(None, "server learning rate (default: 1 for sgd/momentum, "
                                   "0.01 for adam/yogi, 0.1 for adagrad)", flag="--server-lr",
                                   positive=True)
  server_momentum: float = _field(0.9, "server momentum (fedavgm, server_optimizer momentum)",
                                  flag="--server-momentum", minimum=0.0)
  tau: float = _field(1e-3, "adaptivity tau of adam/yogi/adagrad servers (Reddi et al. 2021, "
                      "Algorithm 2; optax's eps for optax_*)", flag="--tau", positive=True)
  beta1: float = _field(0.9, "first-moment decay of adam/yogi/adagrad servers (0: adagrad "
                        "without momentum)", flag="--beta1", minimum=0.0)
  beta2: float = _field(0.99, "second-moment decay of adam/yogi servers", flag="--beta2",
                        minimum=0.0)
  mu: float = _field(0.01, "fedprox only: proximal coefficient", flag="--mu", minimum=0.0)
  weighting: str | None = _field(None, "client weights in the average (default: the "
                                 "algorithm's: uniform for fedadam/fedyogi/fedadagrad/scaffold/"
                                 "fedbuff, examples otherwise)", flag="--weighting",
                                 choices=WEIGHTINGS)
  options: dict = dataclasses.field(default_factory=dict, metadata={"options": True})


@dataclasses.dataclass
class LocalConfig:
  """Local work of one client in one round."""
  epochs: int | None = _field(None, "local epochs per round (default 1 unless steps is given)",
                              flag="--local-epochs", positive=True)
  steps: int | None = _field(None, "fixed local steps per round instead of epochs",
                             flag="--local-steps", positive=True)
  batch_size: int = _field(20, "local batch size", flag="--batch-size", positive=True)


@dataclasses.dataclass
class CheckpointConfig:
  """Checkpoint/resume of the server state (off unless ``dir`` is given)."""
  dir: str | None = _field(None, "checkpoint folder (one sub-folder per seed with several seeds)",
                           flag="--checkpoint-dir")
  every: int = _field(10, "rounds between checkpoints", flag="--checkpoint-every", positive=True)
  resume: bool = _field(False, "continue from the newest intact checkpoint in dir (refused if "
                        "the experiment changed)", flag="--resume")
  override: bool = _field(False, "resume even though the experiment changed (deliberately: the "
                          "changes are recorded in the history and config.json)",
                          flag="--resume-override")


@dataclasses.dataclass
class Config:
  """One experiment (several if ``seed`` is a list). ``tables``: the registry tables given
  (:data:`TABLES`, plus ``"dataset"`` for loader options), each ``{"name": ..., **options}``
  (a list of them for ``transforms``)."""
  dataset: str = _field("fashion_mnist", "dataset", flag="--dataset", choices=DATASETS)
  data_dir: str | None = _field(None, "folder with the Fashion-MNIST IDX files",
                                flag="--data-dir")
  num_clients: int = _field(100, "number of clients (population)", flag="--num-clients",
                            positive=True)
  model: str = _field("mlp_2nn", "model", flag="--model", choices=MODELS)
  rounds: int = _field(100, "federated rounds (server steps of an asynchronous algorithm)",
                       flag="--rounds", positive=True)
  cohort_size: int = _field(10, "clients sampled per round", flag="--cohort-size", positive=True)
  eval_every: int = _field(10, "rounds between test-set evaluations", flag="--eval-every",
                           positive=True)
  client_eval: bool = _field(False, "also evaluate on every client at evaluation rounds "
                             "(accuracy percentiles over clients in the history and plot)",
                             flag="--client-eval")
  seed: int | list[int] = _field(0, "seed, or a list of seeds (one run each)", flag="--seed")
  chunk_size: int | None = _field(None, "clients per vmapped chunk (default: the engine's)",
                                  flag="--chunk-size", positive=True)
  rounds_per_call: int = _field(1, "rounds per compiled call", flag="--rounds-per-call",
                                positive=True)
  cpu_devices: int | None = _field(None, "CPU devices to split each cohort over (default: one "
                                   "per core; see fedjax_sim.distributed.cpu_devices)",
                                   flag="--cpu-devices", positive=True)
  out: str | None = _field(None, "output folder, which must be empty or new unless --overwrite "
                           "(default: a new runs/<timestamp>[-N])", flag="--out")
  overwrite: bool = _field(False, "write into a non-empty --out folder, replacing its files",
                           flag="--overwrite")
  progress: bool = _field(True, "show a progress bar", flag="--progress")
  partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)
  algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
  local: LocalConfig = dataclasses.field(default_factory=LocalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  tables: dict = dataclasses.field(default_factory=dict, metadata={"tables": True})

  @property
  def seeds(self) -> list[int]:
    return list(self.seed) if isinstance(self.seed, list) else [self.seed]


SECTIONS = {"partition": PartitionConfig, "algorithm": AlgorithmConfig, "local": LocalConfig,
            "checkpoint": CheckpointConfig}


def _is_leaf(f: dataclasses.Field) -> bool:
  return not (f.metadata.get("options") or f.metadata.get("tables"))


def _leaf_fields():
  """``(dotted key, dataclasses.Field, type)`` for every fixed value of the schema."""
  out = []
  for f in dataclasses.fields(Config):
    if f.name in SECTIONS:
      hints = typing.get_type_hints(SECTIONS[f.name])
      out += [(f"{f.name}.{g.name}", g, hints[g.name])
              for g in dataclasses.fields(SECTIONS[f.name]) if _is_leaf(g)]
    elif _is_leaf(f):
      out.append((f.name, f, typing.get_type_hints(Config)[f.name]))
  return out


LEAVES = _leaf_fields()
LEAF = {k: (f, t) for k, f, t in LEAVES}


# ---------------------------------------------------------------------------- registry tables

class Table(NamedTuple):
  """A config table that names an entry of ``registry`` and gives its options.

  Attributes:
    registry: where the entries come from.
    default: the entry used when the table names none (``None``: ``name`` is required).
    many: a list of tables (``[[transforms]]``), applied in order.
    set_by: factory options the command line sets itself, ``{option: what sets it}``.
    help: one line for ``--help``.
  """
  registry: Registry
  default: str | None
  many: bool = False
  set_by: dict = {}
  help: str = ""


TABLES = {
    "client_optimizer": Table(optimizers.REGISTRY, "sgd", help="the client optimizer (default: "
                              "sgd at algorithm.client_lr, algorithm.client_momentum)"),
    "server_optimizer": Table(optimizers.REGISTRY, None, help="the server optimizer of "
                              "algorithms that take one (instead of algorithm.server_optimizer)"),
    "aggregator": Table(aggregators.REGISTRY, None, help="robust or secure aggregation "
                        "(default: the algorithm's weighted mean)"),
    "transforms": Table(transforms.REGISTRY, None, many=True, help="per-client update "
                        "transforms (clipping, compression, attacks, local DP), in order"),
    "heterogeneity": Table(heterogeneity.REGISTRY, "default", help="simulated systems "
                           "heterogeneity (stragglers, drop-outs, per-client work as lists)"),
    "privacy": Table(privacy.REGISTRY, "dp_fedavg", set_by={"base": "[algorithm]"},
                     help="differential privacy wrapping the algorithm"),
}
# Options of algorithm factories set from other keys, not in [algorithm].
ALGORITHM_SET_BY = {"client_optimizer": "[client_optimizer] or algorithm.client_lr",
                    "server_optimizer": "[server_optimizer] or algorithm.server_optimizer",
                    "aggregator": "[aggregator]", "update_transform": "[[transforms]]",
                    "local_epochs": "local.epochs", "local_steps": "local.steps",
                    "batch_size": "local.batch_size"}
ALGORITHM_TABLE = Table(algorithms.REGISTRY, "fedavg", set_by=ALGORITHM_SET_BY)
# Options of dataset loaders set from other keys, not in [dataset].
DATASET_TABLE = Table(datasets.REGISTRY, "fashion_mnist", set_by={
    "flatten": "model", "num_clients": "num_clients", "seed": "seed", "data_dir": "data_dir",
    "alpha": "partition.alpha", "beta": "partition.beta"})


def config_type(option: Option):
  """The config-file type of a factory option (``bool``, ``int``, ``float``, ``str``,
  ``list[float]``, ``list[str]``, ``X | None``), or ``None`` when no config value can give it
  (an optimizer, a callable, ...). Unions of numbers (optax's ``ArrayLike``) read as ``float``;
  arrays (``np.ndarray``: per-client values) as lists of numbers."""
  ann = option.annotation
  args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, type(int | None)) \
      else (ann,)
  args = tuple(a for a in args if a is not type(None))
  base = None
  for scalar in (float, int, str, bool):   # the widest scalar the annotation admits
    if scalar in args:
      base = scalar
      break
  if base is None:
    if np.ndarray in args:
      base = list[int] | list[float]   # integers stay integers (steps, batch sizes)
    elif any(typing.get_origin(a) in (tuple, list) and typing.get_args(a)[:1] == (str,)
             for a in args):
      base = list[str]
    elif ann is None and isinstance(option.default, (bool, int, float, str)):
      base = type(option.default)   # unannotated: the default's type
  if base is None:
    return None
  optional = option.default is None or type(None) in typing.get_args(ann)
  return typing.Optional[base] if optional else base


def type_name(tp) -> str:
  """``tp`` in words, for error messages."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) is list:
    return {int: "a list of integers", float: "a list of numbers",
            str: "a list of strings"}.get(args[0], f"a list of {args[0].__name__}")
  if args:   # a union
    return " or ".join(type_name(a) for a in args if a is not type(None))
  return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def coerce(value, tp):
  """``value`` converted to ``tp``, or raises TypeError. Strict: no str -> number, no bool ->
  int, no float -> int; an int is accepted as a float."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if args and origin is not list:   # a union: X | None, int | list[int]
    if value is None and type(None) in args:
      return None
    for a in args:
      if a is type(None):
        continue
      try:
        return coerce(value, a)
      except TypeError:
        pass
    raise TypeError
  if origin is list:
    if not isinstance(value, (list, tuple)) or not value:
      raise TypeError
    return [coerce(v, args[0]) for v in value]
  if tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  raise TypeError


def describe_value(v) -> str:
  """``v`` and its kind in words, for error messages."""
  kind = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
          list: "a list", dict: "a table"}.get(type(v), type(v).__name__)
  return f"{v!r} ({kind})" if not isinstance(v, dict) else "a table"
