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

  [algorithm]                   # fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad | ...
  name = "fedprox"              # fedadam/fedyogi/fedadagrad: Reddi et al. (2021), Algorithm 2
                                # (server_lr = eta, tau, beta1, beta2; uniform weighting)
  mu = 0.01
  client_lr = 0.1
  server_lr = 1.0

  [local]
  epochs = 1                    # or steps = 10 (not both)
  batch_size = 16

Everything registered is reached through a registry table that names an entry and gives its
options (``python -m fedjax_sim list`` shows them all; ``--set KEY=VALUE`` sets any key)::

  [algorithm]                   # any registered algorithm, with any option of its factory
  name = "scaffold"
  [client_optimizer]            # any optax optimizer (instead of client_lr / client_momentum)
  name = "sgd"
  learning_rate = 0.05
  momentum = 0.9
  [aggregator]                  # robust / secure aggregation
  name = "krum"
  num_byzantine = 2
  [[transforms]]                # per-client update transforms, in order
  name = "clip_by_norm"
  max_norm = 1.0
  [heterogeneity]               # stragglers, drop-outs, per-client work (lists of P values)
  straggler_fraction = 0.3
  [privacy]                     # DP-FedAvg around the algorithm
  noise_multiplier = 1.0
  clip_norm = 0.5

``python -m fedjax_sim run --config exp.toml --print-config`` shows the resolved configuration
without running.
"""

# The package, one concern per module: schema (keys, registry tables, types), config (parsing a
# mapping), files (TOML/YAML), resolve (cross checks, defaults, resolved TOML), build (data,
# optimizers, algorithm from a config), output (output folders), run (one run per seed), main
# (commands). The names below are the command line's API (tests, scripts).
import datetime  # noqa: F401 -- tests freeze cli.datetime.datetime

from fedjax_sim.cli.build import (factory_options, load_data, make_algorithm, make_heterogeneity,
                                  make_table, run_title, server_optimizer)
from fedjax_sim.cli.config import apply_mapping, check_options, parse_table
from fedjax_sim.cli.files import read_config_file
from fedjax_sim.cli.main import (QUIET_LOGGERS, build_parser, cmd_list, cmd_run, config_from_args,
                                 main)
from fedjax_sim.cli.output import make_out_folder
from fedjax_sim.cli.resolve import (NOT_IDENTITY, experiment_identity, resolve, to_dict,
                                    to_toml)
from fedjax_sim.cli.run import final_value, run_one, run_seeds, train_algorithm
from fedjax_sim.cli.schema import (ALGORITHMS, DATASETS, LEAF, LEAVES, MODELS, PARTITIONS,
                                   SECTIONS, SERVER_OPTIMIZERS, TABLES, AlgorithmConfig,
                                   CheckpointConfig, Config, ConfigError, LocalConfig,
                                   PartitionConfig, Table)

__all__ = ["ALGORITHMS", "AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError",
           "DATASETS", "LEAF", "LEAVES", "LocalConfig", "MODELS", "NOT_IDENTITY", "PARTITIONS",
           "PartitionConfig", "QUIET_LOGGERS", "SECTIONS", "SERVER_OPTIMIZERS", "TABLES", "Table",
           "apply_mapping", "build_parser", "check_options", "cmd_list", "cmd_run",
           "config_from_args", "experiment_identity", "factory_options", "load_data", "main",
           "make_algorithm", "make_heterogeneity", "make_out_folder", "make_table", "parse_table",
           "read_config_file", "resolve", "run_one", "run_seeds", "run_title", "server_optimizer",
           "to_dict", "to_toml", "train_algorithm"]
