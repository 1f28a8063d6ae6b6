"""Resolution: checks across keys, derived defaults, and the resolved configuration as TOML.

The resolved configuration (:func:`to_dict`) holds every value the run used and leaves out
values that have no effect (another dataset's options, a server learning rate the named
algorithm does not take, ...); written as ``config.toml`` it reproduces the run.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fedjax_sim.cli.config import check_algorithm_options, check_options, set_value
from fedjax_sim.cli.schema import (ADAPTIVE_SERVERS, ALGORITHM_TABLE, DATASET_TABLE,
                                   DEFAULT_SERVER_LR, IMPLIED_SERVER_OPTIMIZER, LABEL_FREE_PARTITIONS,
                                   LEAF, LEAVES, MODELS, REGRESSION_DATASETS, REGRESSION_MODELS,
                                   TABLES, Config, ConfigError)


def algorithm_options(name: str) -> dict:
  """The options of algorithm ``name``'s factory (its registry schema)."""
  return ALGORITHM_TABLE.registry.schema(name)


def server_kind(cfg: Config) -> str | None:
  """The legacy server optimizer in effect: implied by the algorithm, ``algorithm.
  server_optimizer``, or ``None`` (a ``[server_optimizer]`` table, or none taken)."""
  a = cfg.algorithm
  if a.name in IMPLIED_SERVER_OPTIMIZER:
    return IMPLIED_SERVER_OPTIMIZER[a.name]
  if "server_optimizer" in cfg.tables or "server_optimizer" not in algorithm_options(a.name):
    return None
  return a.server_optimizer


def _applies(key: str, cfg: Config) -> bool:
  """Whether ``key`` has any effect in ``cfg`` (inapplicable values are left out of the
  resolved configuration)."""
  a, p = cfg.algorithm, cfg.partition
  options = algorithm_options(a.name)
  server = server_kind(cfg) or ""
  synthetic = cfg.dataset == "synthetic"
  client_table = "client_optimizer" in cfg.tables
  return {
      "data_dir": cfg.dataset == "fashion_mnist",
      "partition.name": not synthetic,
      "partition.alpha": synthetic or p.name == "dirichlet",
      "partition.beta": synthetic,
      "partition.shards_per_client": not synthetic and p.name == "shards",
      "partition.exponent": not synthetic and p.name == "quantity_skew",
      "algorithm.client_lr": not client_table,
      "algorithm.client_momentum": not client_table,
      "algorithm.server_optimizer": a.name not in IMPLIED_SERVER_OPTIMIZER and bool(server),
      "algorithm.server_lr": bool(server),
      "algorithm.server_momentum": server == "momentum",
      "algorithm.tau": server in ADAPTIVE_SERVERS or server.startswith("optax_"),
      "algorithm.beta1": server in ADAPTIVE_SERVERS or server in ("optax_adam", "optax_yogi"),
      "algorithm.beta2": server in ("adam", "yogi", "optax_adam", "optax_yogi"),
      "algorithm.mu": "mu" in options,
      "algorithm.weighting": "weighting" in options,
      "checkpoint.every": cfg.checkpoint.dir is not None,
      "checkpoint.resume": cfg.checkpoint.dir is not None,
      "checkpoint.override": cfg.checkpoint.dir is not None,
  }.get(key, True)


def get(cfg: Config, key: str):
  v = cfg
  for part in key.split("."):
    v = getattr(v, part)
  return v


def _check_fixed(cfg: Config, explicit: dict[str, str]):
  for key, (field, _) in LEAF.items():
    v, md = get(cfg, key), field.metadata
    where = explicit.get(key, "default")
    if v is None:
      continue
    if md["choices"] and v not in md["choices"]:
      raise ConfigError(f"{where}: {key} must be one of {', '.join(md['choices'])}; got {v!r}")
    for x in v if isinstance(v, list) else [v]:
      if isinstance(x, float) and not math.isfinite(x):
        raise ConfigError(f"{where}: {key} must be finite, got {x}")
      if md["positive"] and not x > 0:
        what = "a positive integer" if isinstance(x, int) else "> 0"
        raise ConfigError(f"{where}: {key} must be {what}, got {x!r}")
      if md["minimum"] is not None and x < md["minimum"]:
        raise ConfigError(f"{where}: {key} must be >= {md['minimum']}, got {x!r}")


def resolve(cfg: Config, explicit: dict[str, str]) -> tuple[Config, list[str]]:
  """Checks values and fills in derived defaults. Returns ``(cfg, warnings)``."""
  _check_fixed(cfg, explicit)
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
  check_algorithm_options(cfg, explicit)
  if "dataset" in cfg.tables:
    cfg.tables["dataset"] = check_options(
        "dataset", cfg.dataset, cfg.tables["dataset"],
        lambda k: explicit.get(f"dataset.{k}", "default"), DATASET_TABLE)
  _check_cross(cfg, explicit)
  warnings = [f"{explicit[k]}: {k} = {get(cfg, k)!r} has no effect here (dataset "
              f"{cfg.dataset!r}, partition {cfg.partition.name!r}, algorithm {a.name!r}); ignored"
              for k in explicit if k in LEAF and not _applies(k, cfg)]
  server = server_kind(cfg)
  if a.server_lr is None and server:
    a.server_lr = DEFAULT_SERVER_LR[server]
  if a.weighting is None:   # the algorithm's own default
    a.weighting = algorithm_options(a.name)["weighting"].default
  for b in ("beta1", "beta2"):
    if not getattr(a, b) < 1:
      raise ConfigError(f"{explicit.get('algorithm.' + b, 'default')}: algorithm.{b} must lie in "
                        f"[0, 1), got {getattr(a, b)!r}")
  if loc.epochs is None and loc.steps is None:
    loc.epochs = 1
  # cfg.chunk_size None: per backend, resolved in cmd_run (engine.default_chunk_size).
  # cfg.out None: a new runs/<timestamp>[-N] folder, created when the run starts (make_out_folder)
  return cfg, warnings


def _check_cross(cfg: Config, explicit: dict[str, str]):
  """Keys that contradict each other or the named algorithm."""
  a = cfg.algorithm
  options = algorithm_options(a.name)
  takes_server = "server_optimizer" in options and a.name not in IMPLIED_SERVER_OPTIMIZER
  if "algorithm.server_optimizer" in explicit and not takes_server:
    raise ConfigError(f"{explicit['algorithm.server_optimizer']}: algorithm.server_optimizer is "
                      f"for algorithms that take a server optimizer; {a.name} implies "
                      f"{IMPLIED_SERVER_OPTIMIZER.get(a.name, 'its own')!r}")
  if "server_optimizer" in cfg.tables and not takes_server:
    raise ConfigError(f"{explicit['server_optimizer']}: [server_optimizer] is for algorithms "
                      f"that take a server optimizer; {a.name} implies its own")
  for table, keys in (("client_optimizer", ("client_lr", "client_momentum")),
                      ("server_optimizer", ("server_optimizer", "server_lr", "server_momentum"))):
    both = [f"algorithm.{k}" for k in keys if f"algorithm.{k}" in explicit]
    if table in cfg.tables and both:
      raise ConfigError(f"{explicit[table]}, {explicit[both[0]]}: [{table}] and {both[0]} "
                        "both give the optimizer: give one")
  regression = cfg.dataset in REGRESSION_DATASETS
  if regression != (cfg.model in REGRESSION_MODELS):
    want = ", ".join(REGRESSION_MODELS if regression else
                     [m for m in MODELS if m not in REGRESSION_MODELS])
    raise ConfigError(f"{explicit.get('model', 'default')}: dataset {cfg.dataset!r} is a "
                      f"{'regression' if regression else 'classification'} task: model must be "
                      f"one of {want}, got {cfg.model!r}")
  if regression and cfg.partition.name not in LABEL_FREE_PARTITIONS:
    raise ConfigError(f"{explicit.get('partition.name', 'default')}: the regression dataset "
                      f"{cfg.dataset!r} has no classes to split by: partition.name must be one "
                      f"of {', '.join(LABEL_FREE_PARTITIONS)}, got {cfg.partition.name!r}")
  if a.name == "fedbuff":   # asynchronous: fedjax_sim.run_async
    for key in ("heterogeneity", "privacy"):
      if key in cfg.tables:
        raise ConfigError(f"{explicit[key]}: [{key}] is not supported with the asynchronous "
                          "fedbuff")
    if cfg.checkpoint.dir is not None:
      raise ConfigError(f"{explicit.get('checkpoint.dir')}: checkpoints are not supported with "
                        "the asynchronous fedbuff")


def to_dict(cfg: Config) -> dict[str, Any]:
  """The configuration as a nested dict, leaving out values that have no effect and Nones."""
  out: dict[str, Any] = {}
  for key, _, _ in LEAVES:
    v = get(cfg, key)
    if v is None or not _applies(key, cfg):
      continue
    *sections, name = key.split(".")
    d = out
    for s in sections:
      d = d.setdefault(s, {})
    d[name] = v
  if cfg.algorithm.options:
    out.setdefault("algorithm", {}).update(cfg.algorithm.options)
  if cfg.tables.get("dataset"):
    out["dataset"] = {"name": cfg.dataset, **cfg.tables["dataset"]}
  out.update({k: cfg.tables[k] for k in TABLES if k in cfg.tables})
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
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"
  raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_tables(v) -> bool:
  return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(d: dict[str, Any], header: str = "") -> str:
  """TOML text of a dict of scalars/lists, one level of tables and arrays of tables."""
  lines = [f"# {line}" for line in header.splitlines()]
  lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()
            if not isinstance(v, dict) and not _is_tables(v)]
  for k, v in d.items():
    for table, head in ([(v, f"[{k}]")] if isinstance(v, dict) else
                        [(t, f"[[{k}]]") for t in v] if _is_tables(v) else []):
      lines += ["", head] + [f"{kk} = {_toml_value(vv)}" for kk, vv in table.items()]
  return "\n".join(lines) + "\n"


__all__ = ["NOT_IDENTITY", "experiment_identity", "get", "resolve", "set_value", "to_dict",
           "to_toml"]
