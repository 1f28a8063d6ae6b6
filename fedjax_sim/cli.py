"""Command line: ``python -m fedjax_sim run [--config exp.toml] [options]``.

The defaults are the reference experiment of ``make run``: FedAvg with the 2NN MLP on
Fashion-MNIST, 100 clients from a Dirichlet(0.5) label split, 10 clients per round, 100 rounds,
evaluation every 10 rounds on the 10k test set. Writes ``config.toml`` (the resolved
configuration: every value the run used), ``history.json``, ``config.json``, ``history.png`` and
the trained model ``final_params.msgpack`` (read it with :func:`fedjax_sim.checkpoint.load_params`)
to the output folder: a new ``runs/<timestamp>[-N]``, or ``--out``, which must be empty unless
``--overwrite``. Each file is written to a temporary file and renamed into place, so none is ever
left half-written. Bad input gives one ``error:`` line and exit status 2. A run that diverges
(rounds with no finite client, refused non-finite aggregates, a non-finite test loss) is not an
error: it gets ``warning:`` lines, the other seeds still run, and ``summary.json`` lists it under
``diverged``.

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
  name = "fedprox"              # fedadam/fedyogi/fedadagrad: Reddi et al. (2021), Algorithm 2
                                # (server_lr = eta, tau, beta1, beta2; uniform weighting)
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
import os
import sys
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any

DATASETS = ("fashion_mnist", "digits", "synthetic")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")
MODELS = ("mlp_2nn", "cnn", "logistic_regression")
ALGORITHMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# adam / yogi / adagrad are Reddi et al. (2021), Algorithm 2 (fedjax_sim.algorithms.fedopt);
# optax_* are optax's own optimizers of those names (bias correction etc.: other algorithms).
ADAPTIVE_SERVERS = ("adam", "yogi", "adagrad")
SERVER_OPTIMIZERS = ("sgd", "momentum", *ADAPTIVE_SERVERS, "optax_adam", "optax_yogi",
                     "optax_adagrad")
WEIGHTINGS = ("examples", "uniform")
# the server optimizer each named algorithm implies (fedavg/fedprox take algorithm.server_optimizer)
IMPLIED_SERVER_OPTIMIZER = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi",
                            "fedadagrad": "adagrad"}
DEFAULT_SERVER_LR = {"sgd": 1.0, "momentum": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-1,
                     "optax_adam": 1e-2, "optax_yogi": 1e-2, "optax_adagrad": 1e-1}
# Algorithm 2 of Reddi et al. averages client changes uniformly; the others weight by examples.
DEFAULT_WEIGHTING = {"fedadam": "uniform", "fedyogi": "uniform", "fedadagrad": "uniform"}


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
  tau: float = _field(1e-3, "adaptivity tau of adam/yogi/adagrad servers (Reddi et al. 2021, "
                      "Algorithm 2; optax's eps for optax_*)", flag="--tau", positive=True)
  beta1: float = _field(0.9, "first-moment decay of adam/yogi/adagrad servers (0: adagrad "
                        "without momentum)", flag="--beta1", minimum=0.0)
  beta2: float = _field(0.99, "second-moment decay of adam/yogi servers", flag="--beta2",
                        minimum=0.0)
  mu: float = _field(0.01, "fedprox only: proximal coefficient", flag="--mu", minimum=0.0)
  weighting: str | None = _field(None, "client weights in the average (default: uniform for "
                                 "fedadam/fedyogi/fedadagrad, as in Algorithm 2; examples "
                                 "otherwise)", flag="--weighting", choices=WEIGHTINGS)


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
  out: str | None = _field(None, "output folder, which must be empty or new unless --overwrite "
                           "(default: a new runs/<timestamp>[-N])", flag="--out")
  overwrite: bool = _field(False, "write into a non-empty --out folder, replacing its files",
                           flag="--overwrite")
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
  def mapping(loader, node, deep=False):
    # PyYAML silently keeps the last of duplicated keys; a config file must not say two things.
    seen = set()
    for key_node, _ in node.value:
      key = loader.construct_object(key_node, deep=deep)
      if key in seen:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicated key {key!r}", key_node.start_mark)
      seen.add(key)
    return loader.construct_mapping(node, deep=deep)
  Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
  Loader.add_implicit_resolver(
      "tag:yaml.org,2002:float",
      re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                      |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                      |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                      |[-+]?\.(?:inf|Inf|INF)
                      |\.(?:nan|NaN|NAN))$""", re.X),
      list("-+0123456789."))
  return Loader


def _toml_duplicate(path: Path) -> str | None:
  """Names a key set twice in one table of a TOML file (tomllib only says "Cannot overwrite a
  value"), or ``None``. A line-based scan: enough for the flat files this command reads."""
  import re
  seen: dict[str, int] = {}
  table = ""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError):
    return None
  for i, line in enumerate(lines, 1):
    if m := re.match(r"\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$", line):
      table = m.group(1) + "."
      if table in seen:
        return f"table [{m.group(1)}] is defined twice (lines {seen[table]} and {i})"
      seen[table] = i
    elif m := re.match(r"\s*([A-Za-z0-9_.\-]+)\s*=", line):
      key = table + m.group(1)
      if key in seen:
        return f"duplicated key {key!r} (lines {seen[key]} and {i})"
      seen[key] = i
  return None


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
      dup = _toml_duplicate(p)
      raise ConfigError(f"{p}: invalid TOML: {dup or e}") from None
    except UnicodeDecodeError as e:
      raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
  if suffix in (".yaml", ".yml"):
    try:
      import yaml
    except ImportError:
      raise ConfigError(f"{p}: reading YAML needs PyYAML: pip install pyyaml (or "
                        "'fedjax_sim[yaml]'), or write the config as TOML") from None
    try:
      data = yaml.load(p.read_text(encoding="utf-8"),  # noqa: S506 -- a SafeLoader
                       Loader=_yaml_loader())
    except UnicodeDecodeError as e:
      raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
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
      "algorithm.tau": server in ADAPTIVE_SERVERS or server.startswith("optax_"),
      "algorithm.beta1": server in ADAPTIVE_SERVERS or server in ("optax_adam", "optax_yogi"),
      "algorithm.beta2": server in ("adam", "yogi", "optax_adam", "optax_yogi"),
      "algorithm.mu": a.name == "fedprox",
      "checkpoint.every": cfg.checkpoint.dir is not None,
      "checkpoint.resume": cfg.checkpoint.dir is not None,
      "checkpoint.override": cfg.checkpoint.dir is not None,
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
  from fedjax_sim.validation import check_seed
  for s in cfg.seeds:
    try:
      check_seed(s)
    except ValueError as e:
      raise ConfigError(f"{explicit.get('seed', 'default')}: {e}") from None
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
  if a.weighting is None:
    a.weighting = DEFAULT_WEIGHTING.get(a.name, "examples")
  for b in ("beta1", "beta2"):
    if not getattr(a, b) < 1:
      raise ConfigError(f"{explicit.get('algorithm.' + b, 'default')}: algorithm.{b} must lie in "
                        f"[0, 1), got {getattr(a, b)!r}")
  if loc.epochs is None and loc.steps is None:
    loc.epochs = 1
  # cfg.chunk_size None: per backend, resolved in cmd_run (engine.default_chunk_size).
  # cfg.out None: a new runs/<timestamp>[-N] folder, created when the run starts (make_out_folder)
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


# Configuration keys that do not change the experiment (how it runs, where it writes, how long):
# left out of the checkpoint fingerprint, so a resume may change them.
NOT_IDENTITY = ("out", "overwrite", "progress", "rounds", "eval_every", "client_eval",
                "chunk_size", "rounds_per_call", "cpu_devices", "data_dir", "checkpoint")


def experiment_identity(resolved: dict[str, Any]) -> dict[str, Any]:
  """The resolved configuration without :data:`NOT_IDENTITY` keys: what ``run`` adds to the
  checkpoint fingerprint, so ``--resume`` with another learning rate, partition, ... is refused
  (naming the key, e.g. ``experiment.algorithm.client_lr``)."""
  return {k: v for k, v in resolved.items() if k not in NOT_IDENTITY}


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

def server_optimizer(name: str, lr: float, momentum: float = 0.9, tau: float = 1e-3,
                     beta1: float = 0.9, beta2: float = 0.99):
  """The server optimizer ``name`` (:data:`SERVER_OPTIMIZERS`): adam/yogi/adagrad are Reddi et
  al.'s Algorithm 2 (:func:`fedjax_sim.algorithms.adaptive_server_optimizer`), optax_* optax's."""
  import optax

  from fedjax_sim.algorithms import adaptive_server_optimizer
  if not lr > 0:
    raise ValueError(f"--server-lr must be > 0, got {lr}")
  if name in ADAPTIVE_SERVERS:
    return adaptive_server_optimizer(name, lr, beta1=beta1, beta2=beta2, tau=tau)
  return {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=momentum),
          "optax_adam": lambda: optax.adam(lr, b1=beta1, b2=beta2, eps=tau),
          "optax_yogi": lambda: optax.yogi(lr, b1=beta1, b2=beta2, eps=tau),
          "optax_adagrad": lambda: optax.adagrad(lr, eps=tau)}[name]()


def make_algorithm(cfg: Config):
  import optax

  from fedjax_sim import algorithms
  a, loc = cfg.algorithm, cfg.local
  kw = dict(client_optimizer=optax.sgd(a.client_lr, momentum=a.client_momentum or None),
            local_epochs=loc.epochs, local_steps=loc.steps, batch_size=loc.batch_size,
            weighting=a.weighting)
  if a.name in ("fedavg", "fedprox"):
    kw["server_optimizer"] = server_optimizer(a.server_optimizer, a.server_lr,
                                              a.server_momentum, a.tau, a.beta1, a.beta2)
    if a.name == "fedprox":
      kw["mu"] = a.mu
  else:
    kw["server_lr"] = a.server_lr
    if a.name == "fedavgm":
      kw["momentum"] = a.server_momentum
    else:
      kw.update(tau=a.tau, beta1=a.beta1, **({"beta2": a.beta2} if a.name != "fedadagrad" else {}))
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
    # a probe of its own: concurrent runs probing the same folder must not delete each other's
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test."):
      pass
  except OSError as e:
    raise ValueError(f"cannot write to output folder {str(out)!r} (out): "
                     f"{e.strerror or e}") from None


def make_out_folder(out: str | None, overwrite: bool) -> tuple[Path, int]:
  """Creates the output folder and locks it for this run: returns ``(folder, lock fd)``.

  ``out`` None: a new ``runs/<YYYYmmdd-HHMMSS>`` folder, created exclusively
  (``os.mkdir`` fails if it exists), with a ``-2``, ``-3``, ... suffix when another run took that
  second's name, so concurrent runs never share a folder. A given ``out`` must be new or empty
  unless ``overwrite``. Either way the folder is locked (:data:`fedjax_sim.checkpoint.LOCK_FILE`,
  released when the process ends) so a second run writing into it fails at once.
  """
  from fedjax_sim import checkpoint
  if out is None:
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    _check_writable(base.parent)
    for i in range(1, 10_000):
      folder = base if i == 1 else base.with_name(f"{base.name}-{i}")
      try:
        folder.mkdir()
        break
      except FileExistsError:
        continue
      except OSError as e:
        raise ValueError(f"cannot create output folder {str(folder)!r} (out): "
                         f"{e.strerror or e}") from None
  else:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
      raise ConfigError(f"out: {str(folder)!r} exists and is not a folder")
    _check_writable(folder)
  fd = checkpoint.lock_directory(folder, what=f"out: output folder {str(folder)!r}")
  held = sorted(p.name for p in folder.iterdir() if p.name != checkpoint.LOCK_FILE)
  if out is not None and held and not overwrite:
    os.close(fd)
    shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
    raise ConfigError(f"out: output folder {str(folder)!r} is not empty (holds {shown}): pass "
                      "--overwrite to replace its files, or choose another --out")
  return folder, fd


def _client_eval_callback(cfg: Config, model, train):
  """A ``run`` callback that evaluates the global model on every client at evaluation rounds.

  It returns the summary (``client_accuracy_mean``, ``_p10``, ``_p50``, ``_p90``), which ``run``
  adds to the round's history record, so the columns are checkpointed with the history and
  survive a kill and resume."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_sim import evaluation
  from fedjax_sim.history import CLIENT_PREFIX
  f = evaluation.make_client_evaluate(model, train.max_client_size)
  arrays = (jnp.asarray(train.arrays["x"]), jnp.asarray(train.arrays["y"], jnp.int32),
            jnp.asarray(train.offsets[:-1], jnp.int32), jnp.asarray(train.sizes, jnp.int32))

  def callback(r, state, _):
    if r % cfg.eval_every and r != cfg.rounds:
      return
    acc = np.asarray(jax.device_get(f(state.params, *arrays))["accuracy"], np.float64)
    summary = {"accuracy_mean": float(acc.mean()),
               **{f"accuracy_p{q}": float(np.percentile(acc, q)) for q in (10, 50, 90)}}
    return {CLIENT_PREFIX + k: v for k, v in summary.items()}

  return callback


def run_one(cfg: Config, seed: int, out: Path, header: str,
            subfolder: str | None = None) -> dict[str, Any]:
  """One run with ``seed`` into ``out`` (checkpoints in ``checkpoint.dir/subfolder``)."""
  import fedjax_sim as fs
  from fedjax_sim import files

  cfg = dataclasses.replace(cfg, seed=seed, out=str(out),
                            checkpoint=dataclasses.replace(cfg.checkpoint))
  if subfolder and cfg.checkpoint.dir is not None:
    cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir) / subfolder)
  _check_writable(out)
  resolved = to_dict(cfg)
  files.write_text(out / "config.toml", to_toml(resolved, header))
  train, test, input_shape = load_data(cfg, seed)
  model = fs.models.make(cfg.model, tuple(input_shape), 10)
  algo = make_algorithm(cfg)
  import jax
  print(f"{train!r}\nmodel {model.name}, {algo.name}, {cfg.rounds} rounds x {cfg.cohort_size} "
        f"clients, seed {seed}, {jax.device_count()} {jax.default_backend()} device(s) -> {out}")
  callback = _client_eval_callback(cfg, model, train) if cfg.client_eval else None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    res = fs.run(algo, model, train, rounds=cfg.rounds, cohort_size=cfg.cohort_size,
                 eval_data=test, eval_every=cfg.eval_every, seed=seed, chunk_size=cfg.chunk_size,
                 rounds_per_call=cfg.rounds_per_call, progress=cfg.progress, callback=callback,
                 checkpoint_dir=cfg.checkpoint.dir, checkpoint_every=cfg.checkpoint.every,
                 resume="override" if cfg.checkpoint.override else cfg.checkpoint.resume,
                 experiment=experiment_identity(resolved))
  diverged = False
  for w in caught:   # one line each, like every other message of the command line
    diverged |= str(w.message).startswith("training diverged")
    print(f"warning: seed {seed}: {' '.join(str(w.message).split())}", file=sys.stderr)
  h = res.history
  fs.checkpoint.save_params(out / "final_params.msgpack", res.params)
  files.write_text(out / "config.json", json.dumps(
      {**resolved, "compile_seconds": res.compile_seconds,
       **({"resume_overrides": res.overrides} if res.overrides else {})}, indent=2))
  h.to_json(out / "history.json")
  h.plot(out / "history.png", label=f"{algo.name} seed {seed}", title=run_title(cfg, train))
  acc, loss = _final(h, "test_accuracy"), _final(h, "test_loss")
  if not math.isfinite(loss) and not diverged:
    # not evaluated at all, say (no eval data): the result is unusable all the same
    diverged = True
    print(f"warning: seed {seed}: the final test loss is {loss} (diverged)", file=sys.stderr)
  secs = float(h["seconds"][1:].mean() if cfg.rounds > 1 else h["seconds"][0])
  print(f"final test accuracy {acc:.4f} (test loss {loss:.4f}) after "
        f"{cfg.rounds} rounds; {secs:.3f} s/round, compile {res.compile_seconds:.1f} s"
        f"{' -- DIVERGED' if diverged else ''}")
  print(f"wrote {out / 'config.toml'}, {out / 'history.json'}, {out / 'history.png'}, "
        f"{out / 'config.json'}, {out / 'final_params.msgpack'}")
  return {"seed": seed, "history": h, "test_accuracy": acc, "diverged": diverged}


def _final(h, key: str) -> float:
  """The value of ``key`` at the last evaluation: NaN/inf included (a diverged run's test loss
  is NaN from some round on, and that is its result), NaN if never evaluated."""
  import numpy as np
  if key not in h or "test_accuracy" not in h:
    return math.nan
  evaluated = ~np.isnan(h["test_accuracy"]) | ~np.isnan(h[key])
  return float(h[key][evaluated][-1]) if evaluated.any() else math.nan


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
  if cfg.chunk_size is None:   # per backend, so only now (this starts JAX's backends)
    from fedjax_sim import engine
    cfg.chunk_size = engine.default_chunk_size()
  out, lock = make_out_folder(cfg.out, cfg.overwrite)
  try:
    cfg.out = str(out)
    return _run_seeds(cfg, out, header)
  finally:
    os.close(lock)


def _run_seeds(cfg: Config, out: Path, header: str) -> int:
  from fedjax_sim import files
  seeds = cfg.seeds
  if len(seeds) == 1:
    run_one(cfg, seeds[0], out, header)
    return 0
  files.write_text(out / "config.toml", to_toml(to_dict(cfg), header))
  results = [run_one(cfg, s, out / f"seed-{s}", header, f"seed-{s}") for s in seeds]
  from fedjax_sim.history import plot_histories
  plot_histories({f"seed {r['seed']}": r["history"] for r in results}, path=out / "history.png",
                 title=run_title(cfg, None))
  accs = [r["test_accuracy"] for r in results]
  diverged = [r["seed"] for r in results if r["diverged"]]
  # mean and std over the seeds that have a finite accuracy (a diverged run usually has one:
  # chance level, which belongs in the spread); JSON has no NaN, so missing values are null
  ok = [a for a in accs if math.isfinite(a)]
  mean = sum(ok) / len(ok) if ok else math.nan
  std = (sum((a - mean) ** 2 for a in ok) / max(len(ok) - 1, 1)) ** 0.5 if ok else math.nan
  finite_or_none = lambda v: v if math.isfinite(v) else None  # noqa: E731
  files.write_text(out / "summary.json", json.dumps(
      {"seeds": seeds, "final_test_accuracy": [finite_or_none(a) for a in accs],
       "mean": finite_or_none(mean), "std": finite_or_none(std), "diverged": diverged},
      indent=2))
  print(f"{len(seeds)} seeds: final test accuracy {mean:.4f} +- {std:.4f}"
        f"{f' (diverged: seed {diverged})' if diverged else ''}; wrote "
        f"{out / 'summary.json'}, {out / 'history.png'}")
  return 0


# Loggers of libraries that log a failure (with its traceback, from their worker threads) and
# then raise it: orbax logs a failed checkpoint write through absl at ERROR level, ~100 lines of
# asyncio traceback, before the exception reaches `main`. The command line reports the exception
# itself as its one `error:` line, so these loggers are muted while it runs.
QUIET_LOGGERS = ("absl", "orbax")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  import logging
  saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    return _main(args)
  finally:
    for name, level in saved.items():
      logging.getLogger(name).setLevel(level)


def _main(args) -> int:
  try:
    if args.command == "run":
      return cmd_run(args)
  except (ValueError, OSError, ImportError) as e:
    # one line, whatever the message (YAML and OS errors can span several)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except MemoryError:
    print("error: out of memory (MemoryError); use a smaller population, model or cohort "
          "(chunk_size bounds the memory of a round)", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 1


if __name__ == "__main__":
  sys.exit(main())
