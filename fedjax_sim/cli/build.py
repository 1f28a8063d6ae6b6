"""Building the experiment from a resolved config: data, optimizers, algorithm, heterogeneity.

Every registry table is made through its registry (``REGISTRY.make(name, **options)``); the
fixed ``[algorithm]`` keys map onto the factory's keywords in :func:`factory_options`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedjax_sim.cli.resolve import algorithm_options, server_kind
from fedjax_sim.cli.schema import (ADAPTIVE_SERVERS, IMPLIED_SERVER_OPTIMIZER,
                                   REGRESSION_DATASETS, TABLES, Config, ConfigError)


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


def make_table(cfg: Config, key: str):
  """The object of registry table ``key`` (a list of them for ``transforms``), or ``None``."""
  value = cfg.tables.get(key)
  if value is None:
    return None
  reg = TABLES[key].registry

  def make(t):
    options = {k: np.asarray(v) if isinstance(v, list) else v
               for k, v in t.items() if k != "name"}
    return reg.make(t["name"], **options)
  return [make(t) for t in value] if TABLES[key].many else make(value)


def factory_options(cfg: Config, client_optimizer, server_optimizer) -> dict[str, Any]:
  """Keywords of the named algorithm's factory: the optimizers, ``[local]``, the fixed
  ``[algorithm]`` keys it takes, then the ``[algorithm]`` options (which win).

  Every factory takes ``client_optimizer`` first; fedavgm's ``momentum`` is the server's.
  """
  a, loc = cfg.algorithm, cfg.local
  options = algorithm_options(a.name)
  kw: dict[str, Any] = {"local_epochs": loc.epochs, "local_steps": loc.steps,
                        "batch_size": loc.batch_size}
  if "client_optimizer" in options:
    kw["client_optimizer"] = client_optimizer
  if "server_optimizer" in options and server_optimizer is not None:
    kw["server_optimizer"] = server_optimizer
  for key in ("server_lr", "tau", "beta1", "beta2", "mu", "weighting"):
    if key in options:
      kw[key] = getattr(a, key)
  if a.name in ("fedavgm",):   # its `momentum` is the server's
    kw["momentum"] = a.server_momentum
  return {**kw, **a.options}


def make_algorithm(cfg: Config):
  """The algorithm (an :class:`~fedjax_sim.algorithms.Algorithm`, or fedbuff's asynchronous
  config) with its aggregator, update transforms and privacy wrapper."""
  from fedjax_sim import algorithms, transforms
  client = make_table(cfg, "client_optimizer")
  if client is None:
    import optax
    client = optax.sgd(cfg.algorithm.client_lr, momentum=cfg.algorithm.client_momentum or None)
  server = make_table(cfg, "server_optimizer")
  a = cfg.algorithm
  if server is None and server_kind(cfg) and a.name not in IMPLIED_SERVER_OPTIMIZER:
    server = server_optimizer(server_kind(cfg), a.server_lr, a.server_momentum, a.tau,
                              a.beta1, a.beta2)
  kw = factory_options(cfg, client, server)
  parts = {"aggregator": make_table(cfg, "aggregator")}
  chain = make_table(cfg, "transforms")
  parts["update_transform"] = (None if not chain else chain[0] if len(chain) == 1 else
                               transforms.chain(*chain))
  parts = {k: v for k, v in parts.items() if v is not None}
  options = algorithm_options(a.name)
  algo = algorithms.REGISTRY.make(a.name, **kw, **{k: v for k, v in parts.items()
                                                    if k in options})
  late = {k: v for k, v in parts.items() if k not in options}
  if late:   # fedbuff's factory takes no aggregator= / update_transform= keywords
    if hasattr(algo, "buffer_size"):   # fedbuff's AsyncConfig wraps an Algorithm
      algo = dataclasses.replace(algo, algorithm=dataclasses.replace(algo.algorithm, **late))
    else:
      algo = dataclasses.replace(algo, **late)
  if "privacy" in cfg.tables:
    from fedjax_sim import privacy
    t = cfg.tables["privacy"]
    algo = privacy.REGISTRY.make(t["name"], base=algo,
                                 **{k: v for k, v in t.items() if k != "name"})
  return algo


def make_heterogeneity(cfg: Config):
  """The ``[heterogeneity]`` table's :class:`~fedjax_sim.Heterogeneity`, or ``None``."""
  return make_table(cfg, "heterogeneity")


def load_data(cfg: Config, seed: int):
  """Returns (train FederatedData, test arrays or FederatedData, input_shape)."""
  from fedjax_sim.data import datasets, partition
  from fedjax_sim.data.federated import FederatedData
  p, options = cfg.partition, dict(cfg.tables.get("dataset", {}))
  if cfg.dataset == "synthetic":
    train, test = datasets.synthetic(p.alpha, p.beta, num_clients=cfg.num_clients, seed=seed,
                                     **options)
    return train, test, train.arrays["x"].shape[1:]
  regression = cfg.dataset in REGRESSION_DATASETS
  if cfg.dataset == "fashion_mnist":
    options["data_dir"] = cfg.data_dir
  if not regression:
    options["flatten"] = cfg.model != "cnn"
  train, test = datasets.REGISTRY.make(cfg.dataset, **options)
  params = {"dirichlet": {"alpha": p.alpha}, "shards": {"shards_per_client": p.shards_per_client},
            "quantity_skew": {"exponent": p.exponent}}
  parts = partition.make(p.name, train["y"], cfg.num_clients, seed=seed,
                         **params.get(p.name, {}))
  data = (FederatedData.from_partition(train, parts, task="regression") if regression else
          FederatedData.from_partition(train, parts, num_classes=10))
  return data, test, train["x"].shape[1:]


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
