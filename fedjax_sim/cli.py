"""Command line: ``python -m fedjax_sim run [--config exp.toml] [options]``.

The defaults are the reference experiment of ``make run``: FedAvg with the 2NN MLP on
Fashion-MNIST, 100 clients from a Dirichlet(0.5) label split, 10 clients per round, 100 rounds,
evaluation every 10 rounds on the 10k test set. Writes ``config.toml`` (the resolved
configuration: every value the run used), ``history.json``, ``config.json`` and ``history.png``
to the output folder. Bad input gives one ``error:`` line and exit status 2.

An experiment can be described in a TOML (or, with PyYAML installed, YAML) file; flags given on
the command line override its values. Every key is optional (the default is used); unknown keys
and values of the wrong type are errors::

  dataset = "digits"            # fashion_mnist | digits | synthetic
  num_clients = 20
  model = "logistic_regression" # mlp_2nn | cnn | logistic_regression
  rounds = 50
  cohort_size = 5
  eval_every = 5
  seed = [0, 1, 2]              # one seed, or a list: one run each, in out/seed-<s>/
  out = "runs/digits-fedprox"

  [partition]                   # iid | dirichlet | shards | quantity_skew
  name = "dirichlet"
  alpha = 0.3

  [algorithm]                   # fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad
  name = "fedprox"
  mu = 0.01
  client_lr = 0.1
  server_lr = 1.0

  [local]
  epochs = 1                    # or steps = 10 (not both)
  batch_size = 16

``python -m fedjax_sim run --config exp.toml --print-config`` shows the resolved configuration
without running.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

DATASETS = ("fashion_mnist", "digits", "synthetic")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")
MODELS = ("mlp_2nn", "cnn", "logistic_regression")
ALGORITHMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")
WEIGHTINGS = ("examples", "uniform")
# the server optimizer each named algorithm implies (fedavg/fedprox take algorithm.server_optimizer)
IMPLIED_SERVER_OPTIMIZER = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi",
                            "fedadagrad": "adagrad"}
DEFAULT_SERVER_LR = {"sgd": 1.0, "momentum": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-1}


class ConfigError(ValueError):
  """A configuration value (from a file or a flag) is unknown, of the wrong type or invalid."""


# ------------------------------------------------------------------------------------ schema

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
  """The federated algorithm, its client optimizer (SGD) and server optimizer."""
  name: str = _field("fedavg", "federated algorithm", flag="--algorithm", choices=ALGORITHMS)
  client_lr: float = _field(0.05, "client SGD learning rate", flag="--client-lr", positive=True)
  client_momentum: float = _field(0.0, "client SGD momentum (0 = none)",
                                  flag="--client-momentum", minimum=0.0)
  server_optimizer: str = _field("sgd", "fedavg/fedprox: optimizer on the averaged update "
                                 "(the other algorithms imply theirs)", flag="--server-optimizer",
                                 choices=SERVER_OPTIMIZERS)
  server_lr: float | None = _field(None, "server learning rate (default: 1 for sgd/momentum, "
                                   "0.01 for adam/yogi, 0.1 for adagrad)", flag="--server-lr",
                                   positive=True)
  server_momentum: float = _field(0.9, "server momentum (fedavgm, server_optimizer momentum)",
                                  flag="--server-momentum", minimum=0.0)
  tau: float = _field(1e-3, "adaptivity of adam/yogi/adagrad servers (optax eps)",
                      flag="--tau", minimum=0.0)
  mu: float = _field(0.01, "fedprox only: proximal coefficient", flag="--mu", minimum=0.0)
  weighting: str = _field("examples", "client weights in the average", flag="--weighting",
                          choices=WEIGHTINGS)


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
  resume: bool = _field(False, "continue from the latest checkpoint in dir", flag="--resume")


@dataclasses.dataclass
class Config:
  """One experiment (several if ``seed`` is a list)."""
  dataset: str = _field("fashion_mnist", "dataset", flag="--dataset", choices=DATASETS)
  data_dir: str | None = _field(None, "folder with the Fashion-MNIST IDX files",
                                flag="--data-dir")
  num_clients: int = _field(100, "number of clients (population)", flag="--num-clients",
                            positive=True)
  model: str = _field("mlp_2nn", "model", flag="--model", choices=MODELS)
  rounds: int = _field(100, "federated rounds", flag="--rounds", positive=True)
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
  out: str | None = _field(None, "output folder (default runs/<timestamp>)", flag="--out")
  progress: bool = _field(True, "show a progress bar", flag="--progress")
  partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)
  algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
  local: LocalConfig = dataclasses.field(default_factory=LocalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

  @property
  def seeds(self) -> list[int]:
    return list(self.seed) if isinstance(self.seed, list) else [self.seed]


SECTIONS = {"partition": PartitionConfig, "algorithm": AlgorithmConfig, "local": LocalConfig,
            "checkpoint": CheckpointConfig}


def _leaf_fields():
  """``(dotted key, dataclasses.Field, type)`` for every value of the schema."""
  out = []
  for f in dataclasses.fields(Config):
    if f.name in SECTIONS:
      hints = typing.get_type_hints(SECTIONS[f.name])
      out += [(f"{f.name}.{g.name}", g, hints[g.name])
              for g in dataclasses.fields(SECTIONS[f.name])]
    else:
      out.append((f.name, f, typing.get_type_hints(Config)[f.name]))
  return out


LEAVES = _leaf_fields()
LEAF = {k: (f, t) for k, f, t in LEAVES}


# --------------------------------------------------------------------------- type checking

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_name(tp) -> str:
  args = typing.get_args(tp)
  if typing.get_origin(tp) is list:
    return {int: "a list of integers"}.get(args[0], f"a list of {args[0].__name__}")
  if args:   # a union
    return " or ".join(_type_name(a) for a in args if a is not type(None))
  return _TYPE_NAMES[tp]


def _coerce(value, tp):
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
        return _coerce(value, a)
      except TypeError:
        pass
    raise TypeError
  if origin is list:
    if not isinstance(value, (list, tuple)) or not value:
      raise TypeError
    return [_coerce(v, args[0]) for v in value]
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


def _describe_value(v) -> str:
  kind = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
          list: "a list", dict: "a table"}.get(type(v), type(v).__name__)
  return f"{v!r} ({kind})" if not isinstance(v, dict) else "a table"


def _unknown(key: str, valid, where: str) -> ConfigError:
  leaf = key.rsplit(".", 1)[-1]
  close = difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1)
  hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
  return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _set(cfg: Config, key: str, value, where: str):
  """Type-checks ``value`` for the dotted ``key`` and sets it on ``cfg``."""
  tp = LEAF[key][1]
  try:
    value = _coerce(value, tp)
  except TypeError:
    raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {_describe_value(value)}"
                      ) from None
  target = cfg
  *sections, name = key.split(".")
  for s in sections:
    target = getattr(target, s)
  setattr(target, name, value)


def apply_mapping(cfg: Config, data: dict, source: str, explicit: dict[str, str]):
  """Sets every key of a parsed config file on ``cfg`` (``explicit``: key -> where it was set)."""
  if not isinstance(data, dict):
    raise ConfigError(f"{source}: the top level must be a table of keys, got "
                      f"{type(data).__name__}")
  top = [f.name for f in dataclasses.fields(Config)]
  for k, v in data.items():
    k = str(k)
    if k not in top:
      raise _unknown(k, top, source)
    if k in SECTIONS:
      if not isinstance(v, dict):
        raise ConfigError(f"{source}: {k} must be a table ([{k}] with keys "
                          f"{', '.join(f.name for f in dataclasses.fields(SECTIONS[k]))}), got "
                          f"{_describe_value(v)}")
      names = [f.name for f in dataclasses.fields(SECTIONS[k])]
      for kk, vv in v.items():
        if str(kk) not in names:
          raise _unknown(f"{k}.{kk}", [f"{k}.{n}" for n in names], source)
        _set(cfg, f"{k}.{kk}", vv, source)
        explicit[f"{k}.{kk}"] = source
    else:
      _set(cfg, k, v, source)
      explicit[k] = source


# ----------------------------------------------------------------------------- file reading

def _yaml_loader():
  import yaml
  # PyYAML follows YAML 1.1, where 1e-3 is a string; read it as the number it is (YAML 1.2).
  class Loader(yaml.SafeLoader):
    pass
  import re
  Loader.add_implicit_resolver(
      "tag:yaml.org,2002:float",
      re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                      |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                      |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                      |[-+]?\.(?:inf|Inf|INF)
                      |\.(?:nan|NaN|NAN))$""", re.X),
      list("-+0123456789."))
  return Loader


def read_config_file(path: str | Path) -> dict:
  """Parses a ``.toml`` (stdlib ``tomllib``) or ``.yaml``/``.yml`` (PyYAML) file."""
  p = Path(path)
  if not p.is_file():
    raise ConfigError(f"config file {str(p)!r} not found" if not p.exists() else
                      f"config file {str(p)!r} is not a file")
  suffix = p.suffix.lower()
  if suffix == ".toml":
    import tomllib
    try:
      with open(p, "rb") as f:
        return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
      raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
      raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
  if suffix in (".yaml", ".yml"):
    try:
      import yaml
    except ImportError:
      raise ConfigError(f"{p}: reading YAML needs PyYAML: pip install pyyaml (or "
                        "'fedjax_sim[yaml]'), or write the config as TOML") from None
    try:
      data = yaml.load(p.read_text(), Loader=_yaml_loader())  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as e:
      raise ConfigError(f"{p}: invalid YAML: {' '.join(str(e).split())}") from None
    return {} if data is None else data
  raise ConfigError(f"config file {str(p)!r}: unknown format {p.suffix!r}; use .toml, .yaml "
                    "or .yml")


# ------------------------------------------------------------------------------- resolution

def _applies(key: str, cfg: Config) -> bool:
  """Whether ``key`` has any effect in ``cfg`` (inapplicable values are left out of the
  resolved configuration)."""
  a, p = cfg.algorithm, cfg.partition
  server = IMPLIED_SERVER_OPTIMIZER.get(a.name, a.server_optimizer)
  synthetic = cfg.dataset == "synthetic"
  return {
      "data_dir": cfg.dataset == "fashion_mnist",
      "partition.name": not synthetic,
      "partition.alpha": synthetic or p.name == "dirichlet",
      "partition.beta": synthetic,
      "partition.shards_per_client": not synthetic and p.name == "shards",
      "partition.exponent": not synthetic and p.name == "quantity_skew",
      "algorithm.server_optimizer": a.name in ("fedavg", "fedprox"),
      "algorithm.server_momentum": server == "momentum",
      "algorithm.tau": server in ("adam", "yogi", "adagrad"),
      "algorithm.mu": a.name == "fedprox",
      "checkpoint.every": cfg.checkpoint.dir is not None,
      "checkpoint.resume": cfg.checkpoint.dir is not None,
  }.get(key, True)


def _get(cfg: Config, key: str):
  v = cfg
  for part in key.split("."):
    v = getattr(v, part)
  return v


def resolve(cfg: Config, explicit: dict[str, str]) -> tuple[Config, list[str]]:
  """Checks values and fills in derived defaults. Returns ``(cfg, warnings)``."""
  for key, (field, _) in LEAF.items():
    v, md = _get(cfg, key), field.metadata
    where = explicit.get(key, "default")
    if v is None:
      continue
    if md["choices"] and v not in md["choices"]:
      raise ConfigError(f"{where}: {key} must be one of {', '.join(md['choices'])}; got {v!r}")
    vals = v if isinstance(v, list) else [v]
    for x in vals:
      if isinstance(x, float) and not math.isfinite(x):
        raise ConfigError(f"{where}: {key} must be finite, got {x}")
      if md["positive"] and not x > 0:
        what = "a positive integer" if isinstance(x, int) else "> 0"
        raise ConfigError(f"{where}: {key} must be {what}, got {x!r}")
      if md["minimum"] is not None and x < md["minimum"]:
        raise ConfigError(f"{where}: {key} must be >= {md['minimum']}, got {x!r}")
  a, loc = cfg.algorithm, cfg.local
  if loc.epochs is not None and loc.steps is not None:
    src_e, src_s = explicit["local.epochs"], explicit["local.steps"]
    where = src_e if src_e == src_s else f"{src_e}, {src_s}"
    raise ConfigError(f"{where}: local.epochs and local.steps are exclusive: give one")
  if isinstance(cfg.seed, list) and len(set(cfg.seed)) != len(cfg.seed):
    raise ConfigError(f"{explicit.get('seed')}: seed lists a seed twice: {cfg.seed}")
  if a.name not in ("fedavg", "fedprox") and "algorithm.server_optimizer" in explicit:
    raise ConfigError(f"{explicit['algorithm.server_optimizer']}: algorithm.server_optimizer is "
                      f"for fedavg/fedprox; {a.name} implies "
                      f"{IMPLIED_SERVER_OPTIMIZER[a.name]!r}")
  warnings = [f"{explicit[k]}: {k} = {_get(cfg, k)!r} has no effect here (dataset "
              f"{cfg.dataset!r}, partition {cfg.partition.name!r}, algorithm {a.name!r}); ignored"
              for k in explicit if not _applies(k, cfg)]
  server = IMPLIED_SERVER_OPTIMIZER.get(a.name, a.server_optimizer)
  if a.server_lr is None:
    a.server_lr = DEFAULT_SERVER_LR[server]
  if loc.epochs is None and loc.steps is None:
    loc.epochs = 1
  if cfg.chunk_size is None:
    from fedjax_sim import engine
    cfg.chunk_size = engine.DEFAULT_CHUNK_SIZE
  if cfg.out is None:
    cfg.out = str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
  return cfg, warnings


def to_dict(cfg: Config) -> dict[str, Any]:
  """The configuration as a nested dict, leaving out values that have no effect and Nones."""
  out: dict[str, Any] = {}
  for key, _, _ in LEAVES:
    v = _get(cfg, key)
    if v is None or not _applies(key, cfg):
      continue
    *sections, name = key.split(".")
    d = out
    for s in sections:
      d = d.setdefault(s, {})
    d[name] = v
  return out


def _toml_value(v) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float)):
    return repr(v)   # Python's repr of int/float/inf/nan is valid TOML
  if isinstance(v, str):
    return json.dumps(v)   # a TOML basic string
  if isinstance(v, list):
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"
  raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(d: dict[str, Any], header: str = "") -> str:
  """TOML text of a dict of scalars/lists and one level of tables."""
  lines = [f"# {line}" for line in header.splitlines()]
  lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
  for k, v in d.items():
    if isinstance(v, dict):
      lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
  """argparse, but a bad flag is one ``error:`` line (exit 2) like every other bad input."""

  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m fedjax_sim", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  r = sub.add_parser("run", help="run one federated experiment (or one per seed)",
                     description="Flags override the values of --config; unset values take the "
                                 "defaults shown.")
  r.add_argument("--config", default=None, help="TOML or YAML file describing the experiment")
  r.add_argument("--print-config", action="store_true",
                 help="print the resolved configuration (TOML) and exit without running")
  # Every flag defaults to "not given" so that only what the user typed overrides the file.
  for key, field, tp in LEAVES:
    md = field.metadata
    kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS}
    shown = field.default if field.default is not None else "none"
    help_ = f"{md['help']} [{key}; default: {shown}]"
    if tp is bool:
      r.add_argument(md["flag"], action=argparse.BooleanOptionalAction, help=help_, **kw)
      continue
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    scalar = base[0] if typing.get_origin(base[0]) is not list else typing.get_args(base[0])[0]
    if key == "seed":
      kw["nargs"] = "+"
    r.add_argument(md["flag"], type=scalar, choices=md["choices"], help=help_,
                   metavar=None if md["choices"] else key.rsplit(".", 1)[-1].upper(), **kw)
  return p


def config_from_args(args: argparse.Namespace) -> tuple[Config, list[str]]:
  """File values, then flags on top; checked and resolved."""
  cfg, explicit = Config(), {}
  if args.config:
    apply_mapping(cfg, read_config_file(args.config), str(args.config), explicit)
  given = {k: v for k, v in vars(args).items() if k in LEAF}
  # a flag for local epochs/steps replaces the file's choice of the other
  for a, b in (("local.epochs", "local.steps"), ("local.steps", "local.epochs")):
    if a in given and b not in given and b in explicit:
      _set(cfg, b, None, "flags")
      del explicit[b]
  for key, v in given.items():
    if key == "seed" and len(v) == 1:
      v = v[0]
    _set(cfg, key, v, LEAF[key][0].metadata["flag"])
    explicit[key] = LEAF[key][0].metadata["flag"]
  return resolve(cfg, explicit)


# ------------------------------------------------------------------------------------ running

def server_optimizer(name: str, lr: float, momentum: float = 0.9, tau: float = 1e-3):
  import optax
  if not lr > 0:
    raise ValueError(f"--server-lr must be > 0, got {lr}")
  return {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=momentum),
          "adam": lambda: optax.adam(lr, b1=0.9, b2=0.99, eps=tau),
          "yogi": lambda: optax.yogi(lr, b1=0.9, b2=0.99, eps=tau),
          "adagrad": lambda: optax.adagrad(lr, eps=tau)}[name]()


def make_algorithm(cfg: Config):
  import optax

  from fedjax_sim import algorithms
  a, loc = cfg.algorithm, cfg.local
  kw = dict(client_optimizer=optax.sgd(a.client_lr, momentum=a.client_momentum or None),
            local_epochs=loc.epochs, local_steps=loc.steps, batch_size=loc.batch_size,
            weighting=a.weighting)
  if a.name in ("fedavg", "fedprox"):
    kw["server_optimizer"] = server_optimizer(a.server_optimizer, a.server_lr,
                                              a.server_momentum, a.tau)
    if a.name == "fedprox":
      kw["mu"] = a.mu
  else:
    kw["server_lr"] = a.server_lr
    kw.update({"momentum": a.server_momentum} if a.name == "fedavgm" else {"tau": a.tau})
  return algorithms.make(a.name, **kw)


def load_data(cfg: Config, seed: int):
  """Returns (train FederatedData, test arrays or FederatedData, input_shape)."""
  from fedjax_sim.data import datasets, partition
  from fedjax_sim.data.federated import FederatedData
  p = cfg.partition
  if cfg.dataset == "synthetic":
    train, test = datasets.synthetic(p.alpha, p.beta, num_clients=cfg.num_clients, seed=seed)
    return train, test, train.arrays["x"].shape[1:]
  flatten = cfg.model != "cnn"
  train, test = (datasets.fashion_mnist(cfg.data_dir, flatten=flatten)
                 if cfg.dataset == "fashion_mnist" else datasets.digits(flatten=flatten))
  params = {"dirichlet": {"alpha": p.alpha}, "shards": {"shards_per_client": p.shards_per_client},
            "quantity_skew": {"exponent": p.exponent}}
  parts = partition.make(p.name, train["y"], cfg.num_clients, seed=seed,
                         **params.get(p.name, {}))
  return FederatedData.from_partition(train, parts, num_classes=10), test, train["x"].shape[1:]


def run_title(cfg: Config, train) -> str:
  """One line describing the run, for the title of its plot."""
  p = cfg.partition
  split = {"dirichlet": f"Dirichlet({p.alpha:g})", "shards": f"{p.shards_per_client} shards each",
           "quantity_skew": f"quantity skew {p.exponent:g}"}.get(p.name, p.name)
  if cfg.dataset == "synthetic":
    split = f"Synthetic({p.alpha:g}, {p.beta:g})"
  n = train.num_clients if train is not None else cfg.num_clients
  return (f"{cfg.algorithm.name} on {cfg.dataset}, model {cfg.model}: {n} clients ({split}), "
          f"{cfg.cohort_size} per round, {cfg.rounds} rounds")


def _check_writable(out: Path):
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"cannot write to output folder {str(out)!r} (out): "
                     f"{e.strerror or e}") from None


def _client_eval_callback(cfg: Config, model, train, records: dict[int, dict]):
  """A ``run`` callback that evaluates the global model on every client at evaluation rounds."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_sim import evaluation
  f = evaluation.make_client_evaluate(model, train.max_client_size)
  arrays = (jnp.asarray(train.arrays["x"]), jnp.asarray(train.arrays["y"], jnp.int32),
            jnp.asarray(train.offsets[:-1], jnp.int32), jnp.asarray(train.sizes, jnp.int32))

  def callback(r, state, _):
    if r % cfg.eval_every and r != cfg.rounds:
      return
    acc = np.asarray(jax.device_get(f(state.params, *arrays))["accuracy"], np.float64)
    records[r] = {"accuracy_mean": float(acc.mean()),
                  **{f"accuracy_p{q}": float(np.percentile(acc, q)) for q in (10, 50, 90)}}

  return callback


def run_one(cfg: Config, seed: int, out: Path, header: str,
            subfolder: str | None = None) -> dict[str, Any]:
  """One run with ``seed`` into ``out`` (checkpoints in ``checkpoint.dir/subfolder``)."""
  import fedjax_sim as fs
  from fedjax_sim.history import add_client_summaries

  cfg = dataclasses.replace(cfg, seed=seed, out=str(out),
                            checkpoint=dataclasses.replace(cfg.checkpoint))
  if subfolder and cfg.checkpoint.dir is not None:
    cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir) / subfolder)
  _check_writable(out)
  resolved = to_dict(cfg)
  (out / "config.toml").write_text(to_toml(resolved, header))
  train, test, input_shape = load_data(cfg, seed)
  model = fs.models.make(cfg.model, tuple(input_shape), 10)
  algo = make_algorithm(cfg)
  import jax
  print(f"{train!r}\nmodel {model.name}, {algo.name}, {cfg.rounds} rounds x {cfg.cohort_size} "
        f"clients, seed {seed}, {jax.device_count()} {jax.default_backend()} device(s) -> {out}")
  client_records: dict[int, dict] = {}
  callback = (_client_eval_callback(cfg, model, train, client_records) if cfg.client_eval
              else None)
  res = fs.run(algo, model, train, rounds=cfg.rounds, cohort_size=cfg.cohort_size,
               eval_data=test, eval_every=cfg.eval_every, seed=seed, chunk_size=cfg.chunk_size,
               rounds_per_call=cfg.rounds_per_call, progress=cfg.progress, callback=callback,
               checkpoint_dir=cfg.checkpoint.dir, checkpoint_every=cfg.checkpoint.every,
               resume=cfg.checkpoint.resume)
  h = res.history
  if client_records:
    h = add_client_summaries(h, client_records)
  (out / "config.json").write_text(json.dumps(
      {**resolved, "compile_seconds": res.compile_seconds}, indent=2))
  h.to_json(out / "history.json")
  h.plot(out / "history.png", label=f"{algo.name} seed {seed}", title=run_title(cfg, train))
  acc = h.last("test_accuracy")
  secs = float(h["seconds"][1:].mean() if cfg.rounds > 1 else h["seconds"][0])
  print(f"final test accuracy {acc:.4f} (test loss {h.last('test_loss'):.4f}) after "
        f"{cfg.rounds} rounds; {secs:.3f} s/round, compile {res.compile_seconds:.1f} s")
  print(f"wrote {out / 'config.toml'}, {out / 'history.json'}, {out / 'history.png'}, "
        f"{out / 'config.json'}")
  return {"seed": seed, "history": h, "test_accuracy": acc}


def cmd_run(args) -> int:
  cfg, warnings = config_from_args(args)
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  header = (f"resolved configuration of `python -m fedjax_sim run` "
            f"({datetime.datetime.now().isoformat(timespec='seconds')}"
            f"{', from ' + str(args.config) if args.config else ''}); "
            "rerun with --config this-file")
  if args.print_config:
    print(to_toml(to_dict(cfg)), end="")
    return 0
  # Before any JAX computation; the resolved config records the count actually used.
  from fedjax_sim import distributed
  cfg.cpu_devices = distributed.cpu_devices(cfg.cpu_devices)
  out = Path(cfg.out)
  seeds = cfg.seeds
  if len(seeds) == 1:
    run_one(cfg, seeds[0], out, header)
    return 0
  _check_writable(out)
  (out / "config.toml").write_text(to_toml(to_dict(cfg), header))
  results = [run_one(cfg, s, out / f"seed-{s}", header, f"seed-{s}") for s in seeds]
  from fedjax_sim.history import plot_histories
  plot_histories({f"seed {r['seed']}": r["history"] for r in results}, path=out / "history.png",
                 title=run_title(cfg, None))
  accs = [r["test_accuracy"] for r in results]
  mean = sum(accs) / len(accs)
  std = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
  (out / "summary.json").write_text(json.dumps(
      {"seeds": seeds, "final_test_accuracy": accs, "mean": mean, "std": std}, indent=2))
  print(f"{len(seeds)} seeds: final test accuracy {mean:.4f} +- {std:.4f}; wrote "
        f"{out / 'summary.json'}, {out / 'history.png'}")
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "run":
      return cmd_run(args)
  except (ValueError, OSError, ImportError) as e:
    # one line, whatever the message (YAML and OS errors can span several)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 1


if __name__ == "__main__":
  sys.exit(main())
