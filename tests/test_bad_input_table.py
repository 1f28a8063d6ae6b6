"""Table of bad inputs through the API and the command line (issue 15).

Every case must fail before any compilation with the exact error class and a message that names
the offending field (or file). API cases call the library; CLI cases call
``fedjax_sim.cli.main(argv)`` in-process and expect exit status 2 and exactly one ``error:`` line
on stderr. ``test_table_size`` keeps the count honest.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli, distributed, engine, sweep
from fedjax_sim.cli import ConfigError
from fedjax_sim.data import datasets, partition

try:
  import ml_dtypes
  BF16 = ml_dtypes.bfloat16
except ImportError:   # pragma: no cover - ml_dtypes comes with jax
  BF16 = None


# ----------------------------------------------------------------------------------- helpers

def _mlp():
  return fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)


def _algo():
  return fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)


def _clients(sizes=(5, 7, 3), dim=8):
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(n, dim)).astype(np.float32),
           "y": rng.integers(0, 4, n).astype(np.int32)} for n in sizes]


def _data():
  return fs.FederatedData.from_clients(_clients(), client_ids=["a", "b", "c"], num_classes=4)


def _run(**kw):
  kw = {"rounds": 2, "cohort_size": 2, "progress": False, **kw}
  return fs.run(_algo(), _mlp(), _data(), **kw)


def _eval(**change):
  rng = np.random.default_rng(1)
  ev = {"x": rng.normal(size=(10, 8)).astype(np.float32),
        "y": rng.integers(0, 4, 10).astype(np.int32)}
  ev.update(change)
  return ev


def _params(**change):
  p = _mlp().init(__import__("jax").random.key(0))
  p = __import__("jax").tree.map(np.asarray, p)
  for path, value in change.items():
    layer, name = path.split("/")
    p[layer][name] = value(p[layer][name])
  return p


def _first_layer():
  return sorted(_params())[0]


def _with(clients_change):
  def make():
    c = _clients()
    clients_change(c)
    return fs.FederatedData.from_clients(c, client_ids=["a", "b", "c"], num_classes=4)
  return make


def _astype(k, dtype, bad_at=None, bad=np.nan):
  """Every client's feature ``k`` cast to ``dtype``; ``bad`` written at ``(client, index)``."""
  def change(c):
    for d in c:
      d[k] = d[k].astype(dtype)
    if bad_at is not None:
      c[bad_at[0]][k][bad_at[1]] = bad
  return change


def _set(i, k, value):
  def change(c):
    c[i][k] = value(c[i][k]) if callable(value) else value
  return change


# ------------------------------------------------------------------------------- API table
# (id, thunk, exact exception class, text the message must contain: the field it names)

def _init_params_case(fn):
  return lambda: _run(init_params=_params(**{f"{_first_layer()}/kernel": fn}))


API_CASES = [
    # FederatedData.from_clients: sizes, shapes and dtypes of every feature of every client
    ("from_clients_y_shorter", _with(_set(1, "y", lambda y: y[:-1])), ValueError, "'y'"),
    ("from_clients_x_shorter", _with(_set(2, "x", lambda x: x[:-1])), ValueError, "'x'"),
    ("from_clients_ragged_lists", _with(_set(0, "x", [[1.0, 2.0], [3.0]])), ValueError, "'x'"),
    ("from_clients_feature_dims_differ", _with(_set(1, "x", lambda x: x[:, :5])), ValueError,
     "'x'"),
    ("from_clients_scalar_feature", _with(_set(0, "x", 3.0)), ValueError, "'x'"),
    ("from_clients_features_differ", _with(lambda c: c[1].pop("y")), ValueError, "features"),
    ("from_clients_none", lambda: fs.FederatedData.from_clients([]), ValueError, "clients"),
    ("complex_features", _with(_astype("x", np.complex64)), ValueError, "'x'"),
    ("object_features", _with(_astype("x", object)), ValueError, "'x'"),
    ("string_features", _with(_astype("x", str)), ValueError, "'x'"),
    ("float16_inf", _with(_astype("x", np.float16, (2, (1, 1)), np.inf)), ValueError,
     "feature 'x' has non-finite"),
    ("bfloat16_nan", _with(_astype("x", BF16, (1, (0, 3)))), ValueError,
     "feature 'x' has non-finite"),
    ("bfloat16_inf", _with(_astype("x", BF16, (0, (4, 0)), -np.inf)), ValueError,
     "feature 'x' has non-finite"),
    ("float_labels", _with(_astype("y", np.float32)), ValueError, "'y'"),
    ("labels_2d", _with(lambda c: [d.update(y=d["y"][:, None]) for d in c]), ValueError, "'y'"),
    ("label_out_of_range", _with(_set(1, "y", lambda y: y + 4)), ValueError, "client 'b'"),
    ("empty_client", _with(lambda c: c[1].update(x=c[1]["x"][:0], y=c[1]["y"][:0])),
     ValueError, "client 'b'"),
    ("from_partition_lengths", lambda: fs.FederatedData.from_partition(
        {"x": np.zeros((4, 8), np.float32), "y": np.zeros(3, np.int32)}, [[0, 1, 2]]),
     ValueError, "'y'"),
    ("from_partition_twice", lambda: fs.FederatedData.from_partition(
        {"x": np.zeros((4, 8), np.float32)}, [[0, 1], [1, 2]]), ValueError, "client"),
    ("offsets", lambda: fs.FederatedData({"x": np.zeros((4, 2))}, [1, 4], [0]), ValueError,
     "offsets"),
    ("client_ids_shape", lambda: fs.FederatedData({"x": np.zeros((4, 2))}, [0, 2, 4], [0]),
     ValueError, "client_ids"),
    # run(): seed
    ("seed_2**64", lambda: _run(seed=2**64), ValueError, "seed"),
    ("seed_float", lambda: _run(seed=1.5), ValueError, "seed"),
    ("seed_none", lambda: _run(seed=None), ValueError, "seed"),
    ("seed_string", lambda: _run(seed="0"), ValueError, "seed"),
    ("seed_negative", lambda: _run(seed=-1), ValueError, "seed"),
    ("seed_bool", lambda: _run(seed=True), ValueError, "seed"),
    # run(): init_params against model.init
    ("init_params_shape", _init_params_case(lambda k: k[:-1]), ValueError, "init_params"),
    ("init_params_nan", _init_params_case(lambda k: np.where(k == k.flat[0], np.nan, k)),
     ValueError, "init_params"),
    ("init_params_inf", _init_params_case(lambda k: np.full_like(k, np.inf)), ValueError,
     "init_params"),
    ("init_params_dtype", _init_params_case(lambda k: k.astype(BF16)), ValueError,
     "init_params"),
    ("init_params_string", _init_params_case(lambda k: k.astype(str)), ValueError,
     "init_params"),
    ("init_params_structure", lambda: _run(init_params={"w": np.zeros((8, 4), np.float32)}),
     ValueError, "init_params"),
    # run(): evaluation data
    ("eval_y_column", lambda: _run(eval_data=_eval(y=np.zeros((10, 1), np.int32))), ValueError,
     "y"),
    ("eval_x_complex", lambda: _run(eval_data=_eval(x=np.ones((10, 8), np.complex64))),
     ValueError, "'x'"),
    ("eval_x_string", lambda: _run(eval_data=_eval(x=np.full((10, 8), "a"))), ValueError, "'x'"),
    ("eval_x_object", lambda: _run(eval_data=_eval(x=np.ones((10, 8), object))), ValueError,
     "'x'"),
    ("eval_x_bf16_nan", lambda: _run(eval_data=_eval(x=np.full((10, 8), np.nan, BF16))),
     ValueError, "x has non-finite"),
    ("eval_y_float", lambda: _run(eval_data=_eval(y=np.zeros(10, np.float32))), ValueError,
     "labels"),
    ("eval_scalar", lambda: _run(eval_data={"x": np.float32(1), "y": np.int32(0)}), ValueError,
     "eval_data"),
    # run(): sizes and options
    ("rounds_zero", lambda: _run(rounds=0), ValueError, "rounds"),
    ("cohort_zero", lambda: _run(cohort_size=0), ValueError, "cohort_size"),
    ("cohort_too_large", lambda: _run(cohort_size=4), ValueError, "cohort_size"),
    ("eval_every_zero", lambda: _run(eval_every=0), ValueError, "eval_every"),
    ("chunk_size_float", lambda: _run(chunk_size=2.0), ValueError, "chunk_size"),
    ("num_devices_too_many", lambda: _run(num_devices=10_000), ValueError, "num_devices"),
    ("client_weights_shape", lambda: _run(client_weights=[1.0]), ValueError, "client_weights"),
    ("client_weights_nan", lambda: _run(client_weights=[1.0, np.nan, 1.0]), ValueError,
     "client_weights"),
    ("client_weights_huge", lambda: _run(client_weights=[1e38, 1e38, 1e38]), ValueError,
     "client_weights"),
    ("hparams_unknown", lambda: _run(hparams={"lr": 0.1}), ValueError, "'lr'"),
    ("hparams_negative", lambda: _run(hparams={"client_lr_scale": -1.0}), ValueError,
     "client_lr_scale"),
    ("cohort_sampling", lambda: _run(cohort_sampling="biased"), ValueError, "cohort_sampling"),
    ("checkpoint_every_zero", lambda: _run(checkpoint_every=0), ValueError, "checkpoint_every"),
    ("rounds_per_call_zero", lambda: _run(rounds_per_call=0), ValueError, "rounds_per_call"),
    ("sweep_seed_float", lambda: sweep.sweep(_algo(), _mlp(), _data(), rounds=1, cohort_size=2,
                                             seed=[0, 1.5], progress=False), ValueError, "seed"),
    ("local_work_batch", lambda: fs.LocalWork(0), ValueError, "batch_size"),
    # partitions and datasets
    ("quantity_skew_tiny_exponent", lambda: partition.quantity_skew(np.zeros(100), 10,
                                                                    exponent=1e-9),
     ValueError, "exponent"),
    ("dirichlet_alpha_zero", lambda: partition.dirichlet(np.zeros(100), 10, alpha=0), ValueError,
     "alpha"),
    ("partition_seed_negative", lambda: partition.make("iid", np.zeros(100), 10, seed=-1),
     ValueError, "seed"),
    ("partition_too_many_clients", lambda: partition.iid(np.zeros(100), 10**10), ValueError,
     "num_clients"),
    ("synthetic_huge_population", lambda: datasets.synthetic(num_clients=10**10), ValueError,
     "num_clients"),
    ("synthetic_float_population", lambda: datasets.synthetic(num_clients=2.5), ValueError,
     "num_clients"),
    ("fashion_mnist_missing_data_dir", lambda: datasets.fashion_mnist("/nonexistent/fmnist"),
     datasets.DatasetNotFoundError, "data_dir '/nonexistent/fmnist'"),
    ("cpu_devices_beyond_cores", lambda: distributed.cpu_devices(1000), ValueError,
     "cpu_devices"),
]


@pytest.fixture
def no_training(monkeypatch):
  """Building the compiled round fails the test: every check must come before it."""
  def boom(*args, **kwargs):
    raise AssertionError("training started before the input was checked")
  monkeypatch.setattr(engine, "make_round", boom)


@pytest.mark.parametrize("case,thunk,cls,names", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(no_training, case, thunk, cls, names):
  with pytest.raises(Exception) as info:
    thunk()
  assert type(info.value) is cls, f"{case}: {type(info.value).__name__}: {info.value}"
  assert names in str(info.value), f"{case}: {info.value}"


# ------------------------------------------------------------------------------- CLI table
# (id, argv after the base flags, config file (name, text) or None, text the error must contain)

BASE = ["run", "--dataset", "digits", "--num-clients", "10", "--cohort-size", "3",
        "--rounds", "2", "--model", "logistic_regression", "--no-progress"]

CLI_CASES = [
    ("seed_negative", ["--seed", "-1"], None, "seed"),
    ("seed_2**64", ["--seed", str(2**64)], None, "seed"),
    ("seed_float_flag", ["--seed", "1.5"], None, "--seed"),
    ("seed_word_flag", ["--seed", "zero"], None, "--seed"),
    ("seed_in_list_negative", ["--seed", "0", "-3"], None, "seed"),
    ("seed_string_toml", [], ("c.toml", 'seed = "0"'), "seed"),
    ("seed_float_toml", [], ("c.toml", "seed = 1.5"), "seed"),
    ("seed_huge_toml", [], ("c.toml", f"seed = {2**63}"), "seed"),
    ("seed_twice_toml", [], ("c.toml", "seed = [1, 1]"), "seed"),
    ("seed_null_yaml", [], ("c.yaml", "seed: null"), "seed"),
    ("cpu_devices_1000", ["--cpu-devices", "1000"], None, "cpu_devices"),
    ("cpu_devices_zero", ["--cpu-devices", "0"], None, "cpu_devices"),
    ("num_clients_huge_synthetic", ["--dataset", "synthetic", "--num-clients", str(10**10)], None,
     "num_clients"),
    ("num_clients_huge_digits", ["--num-clients", str(10**10)], None, "num_clients"),
    ("num_clients_zero", ["--num-clients", "0"], None, "num_clients"),
    ("quantity_skew_tiny_exponent", ["--partition", "quantity_skew", "--exponent", "1e-9"], None,
     "exponent"),
    ("exponent_zero", ["--partition", "quantity_skew", "--exponent", "-1"], None, "exponent"),
    ("missing_data_dir", ["--dataset", "fashion_mnist", "--data-dir", "/nonexistent/fm"], None,
     "data_dir '/nonexistent/fm'"),
    ("rounds_zero", ["--rounds", "0"], None, "rounds"),
    ("cohort_larger_than_population", ["--cohort-size", "50"], None, "cohort_size"),
    ("client_lr_zero", ["--client-lr", "0"], None, "client_lr"),
    ("client_lr_nan", ["--client-lr", "nan"], None, "client_lr"),
    ("client_lr_inf", ["--client-lr", "inf"], None, "client_lr"),
    ("server_lr_negative", ["--server-lr", "-1"], None, "server_lr"),
    ("alpha_negative", ["--alpha", "-1"], None, "alpha"),
    ("batch_size_zero", ["--batch-size", "0"], None, "batch_size"),
    ("eval_every_zero", ["--eval-every", "0"], None, "eval_every"),
    ("chunk_size_zero", ["--chunk-size", "0"], None, "chunk_size"),
    ("tau_negative", ["--algorithm", "fedadam", "--tau", "-1"], None, "tau"),
    ("mu_negative", ["--algorithm", "fedprox", "--mu", "-1"], None, "mu"),
    ("unknown_dataset", ["--dataset", "cifar"], None, "--dataset"),
    ("epochs_and_steps", ["--local-epochs", "1", "--local-steps", "2"], None, "local.epochs"),
    ("unknown_key_toml", [], ("c.toml", "roundz = 3"), "roundz"),
    ("wrong_type_toml", [], ("c.toml", 'rounds = "ten"'), "rounds"),
    ("duplicate_key_toml", [], ("c.toml", "rounds = 2\nrounds = 3"), "duplicated key 'rounds'"),
    ("duplicate_nested_key_toml", [], ("c.toml", "[local]\nsteps = 2\nsteps = 3"),
     "duplicated key 'local.steps'"),
    ("duplicate_key_yaml", [], ("c.yaml", "rounds: 2\nrounds: 3"), "duplicated key 'rounds'"),
    ("duplicate_nested_key_yaml", [], ("c.yaml", "algorithm:\n  mu: 0.1\n  mu: 0.2"),
     "duplicated key 'mu'"),
    ("non_utf8_yaml", [], ("c.yaml", b"rounds: 2 # \xff\xfe\n"), "c.yaml"),
    ("non_utf8_toml", [], ("c.toml", b"rounds = 2 # \xff\xfe\n"), "c.toml"),
    ("missing_config", ["--config", "/nonexistent/exp.toml"], None, "exp.toml"),
]


def _cli(tmp_path, capsys, argv, config):
  argv = BASE + ["--out", str(tmp_path / "o")] + argv
  if config is not None:
    name, text = config
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv += ["--config", str(p)]
  try:
    rc = cli.main(argv)
  except SystemExit as e:   # argparse: a flag that does not parse
    rc = e.code
  return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case,argv,config,names", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(tmp_path, capsys, no_training, case, argv, config, names):
  rc, err = _cli(tmp_path, capsys, argv, config)
  assert rc == 2, (case, err)
  errors = [line for line in err if line.startswith("error: ")]
  assert len(errors) == 1 and all("Traceback" not in line for line in err), (case, err)
  assert names in errors[0], (case, errors[0])


def test_cli_config_errors_are_config_errors(tmp_path):
  """The configuration checks raise ConfigError (a ValueError): what ``main`` turns into exit 2."""
  parser = cli.build_parser()
  for argv in (["--seed", "-1"], ["--rounds", "0"], ["--client-lr", "nan"]):
    with pytest.raises(ConfigError) as info:
      cli.config_from_args(parser.parse_args(["run"] + argv))
    assert type(info.value) is ConfigError and argv[0].lstrip("-").replace("-", "_") in str(
        info.value)


def test_table_size():
  """The issue asks for at least 60 bad inputs across the API and the command line."""
  assert len(API_CASES) + len(CLI_CASES) >= 60
  assert len(API_CASES) >= 30 and len(CLI_CASES) >= 30
