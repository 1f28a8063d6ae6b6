"""The command line: a real (small) run writes its outputs; bad input is one line, exit 2."""

import json
import subprocess
import sys
import tomllib

import pytest

from fedjax_sim import cli


@pytest.mark.slow
def test_cli_run_digits_writes_outputs(tmp_path, capsys):
  out = tmp_path / "run"
  rc = cli.main(["run", "--dataset", "digits", "--num-clients", "20", "--cohort-size", "5",
                 "--rounds", "12", "--eval-every", "4", "--client-lr", "0.1", "--batch-size", "16",
                 "--model", "logistic_regression", "--out", str(out), "--no-progress"])
  assert rc == 0
  h = json.loads((out / "history.json").read_text())
  assert len(h["round"]) == 12
  assert h["test_accuracy"][3] is not None and h["test_accuracy"][0] is None
  assert h["test_accuracy"][-1] > 0.5   # 10 classes: chance is 0.1
  assert (out / "history.png").stat().st_size > 1000
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["dataset"] == "digits" and cfg["rounds"] == 12
  assert "final test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "rounds must be a positive integer"),
    (["--cohort-size", "50", "--num-clients", "20"], "larger than the population"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--server-lr", "0"], "server_lr must be > 0"),
    (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent"], None),
])
@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path, args, message, monkeypatch):
  base = ["run", "--dataset", "digits", "--num-clients", "20", "--cohort-size", "5",
          "--rounds", "2", "--out", str(tmp_path / "o"), "--no-progress"]
  if "--data-dir" in args:
    # make sure the installed copy is not found either
    monkeypatch.setattr("fedjax_sim.data.datasets.FASHION_MNIST_DIRS", ())
    monkeypatch.delenv("FEDJAX_SIM_FASHION_MNIST_DIR", raising=False)
  res = subprocess.run([sys.executable, "-c", "import sys, fedjax_sim.data.datasets as d;"
                        "d.FASHION_MNIST_DIRS = () if '--data-dir' in sys.argv else "
                        "d.FASHION_MNIST_DIRS; from fedjax_sim.cli import main; "
                        "sys.exit(main(sys.argv[1:]))"] + base + args,
                       capture_output=True, text=True)
  assert res.returncode == 2, res.stderr
  err = res.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), res.stderr
  assert "Traceback" not in res.stderr
  if message:
    assert message in err[0]
  else:
    assert "dataset-fashion-mnist" in err[0]


def test_cli_unwritable_output(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  rc = cli.main(["run", "--dataset", "digits", "--num-clients", "10", "--cohort-size", "2",
                 "--rounds", "1", "--out", str(blocker / "sub"), "--no-progress"])
  assert rc == 2


# ------------------------------------------------------------------------------ config files

TINY = """
dataset = "digits"
num_clients = 10
model = "logistic_regression"
rounds = 2
cohort_size = 3
eval_every = 1
progress = false

[partition]
name = "dirichlet"
alpha = 0.3

[algorithm]
name = "fedprox"
mu = 0.1
client_lr = 0.1

[local]
steps = 2
batch_size = 8
"""


def _write(tmp_path, text, name="exp.toml"):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def _one_error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.slow
def test_cli_toml_config_runs_and_writes_resolved_config(tmp_path):
  out = tmp_path / "run"
  cfg = _write(tmp_path, TINY + "\n[checkpoint]\n")   # an empty table is fine
  assert cli.main(["run", "--config", cfg, "--out", str(out), "--client-eval"]) == 0
  h = json.loads((out / "history.json").read_text())
  assert len(h["round"]) == 2 and h["test_accuracy"][0] is not None
  assert h["client_accuracy_p10"][1] <= h["client_accuracy_p50"][1] <= h["client_accuracy_p90"][1]
  resolved = tomllib.loads((out / "config.toml").read_text())
  assert resolved["dataset"] == "digits" and resolved["rounds"] == 2 and resolved["seed"] == 0
  assert resolved["out"] == str(out) and resolved["client_eval"] is True
  assert resolved["algorithm"] == {"name": "fedprox", "client_lr": 0.1, "client_momentum": 0.0,
                                   "server_optimizer": "sgd", "server_lr": 1.0, "mu": 0.1,
                                   "weighting": "examples"}
  assert resolved["local"] == {"steps": 2, "batch_size": 8}    # no epochs: steps were given
  assert resolved["partition"] == {"name": "dirichlet", "alpha": 0.3}
  assert "checkpoint" not in resolved   # off, so nothing of it applies
  assert json.loads((out / "config.json").read_text())["algorithm"]["mu"] == 0.1
  # the resolved config reproduces the run's configuration exactly
  again = cli.config_from_args(cli.build_parser().parse_args(
      ["run", "--config", str(out / "config.toml")]))[0]
  assert cli.to_dict(again) == resolved


def test_cli_overrides_and_yaml(tmp_path, capsys):
  cfg = _write(tmp_path, TINY)
  rc = cli.main(["run", "--config", cfg, "--rounds", "7", "--mu", "0.5", "--local-epochs", "3",
                 "--partition", "shards", "--seed", "1", "2", "--algorithm", "fedprox",
                 "--print-config"])
  assert rc == 0
  captured = capsys.readouterr()
  resolved = tomllib.loads(captured.out)
  assert resolved["rounds"] == 7 and resolved["algorithm"]["mu"] == 0.5
  assert resolved["seed"] == [1, 2] and resolved["cohort_size"] == 3   # file value kept
  assert resolved["local"] == {"epochs": 3, "batch_size": 8}   # the flag replaced the file's steps
  assert resolved["partition"] == {"name": "shards", "shards_per_client": 2}
  assert "partition.alpha" in captured.err and "no effect" in captured.err   # a warning
  yaml_cfg = _write(tmp_path, "rounds: 4\nalgorithm:\n  name: fedadam\n  tau: 1e-4\n",
                    "exp.yaml")
  assert cli.main(["run", "--config", yaml_cfg, "--print-config"]) == 0
  resolved = tomllib.loads(capsys.readouterr().out)
  assert resolved["rounds"] == 4
  assert resolved["algorithm"]["tau"] == 1e-4 and resolved["algorithm"]["server_lr"] == 0.01
  assert "server_optimizer" not in resolved["algorithm"]
  # Algorithm 2's defaults: uniform weighting, beta1 = 0.9, beta2 = 0.99
  assert resolved["algorithm"]["weighting"] == "uniform"
  assert resolved["algorithm"]["beta1"] == 0.9 and resolved["algorithm"]["beta2"] == 0.99


def test_cli_adaptive_servers_are_algorithm_2():
  import optax

  from fedjax_sim import algorithms
  args = cli.build_parser().parse_args(["run", "--algorithm", "fedadagrad", "--beta1", "0",
                                        "--tau", "0.01"])
  cfg, _ = cli.config_from_args(args)
  algo = cli.make_algorithm(cfg)
  assert algo.name == "fedadagrad" and algo.weighting == "uniform"
  import jax.numpy as jnp
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.asarray([0.5, -0.2])}
  ref = algorithms.adaptive_server_optimizer("adagrad", 0.1, beta1=0.0, tau=0.01)
  got, _ = algo.server_optimizer.update(g, algo.server_optimizer.init(params), params)
  want, _ = ref.update(g, ref.init(params), params)
  assert jnp.allclose(got["w"], want["w"]) and float(got["w"][0]) < 0   # descends along g
  # fedavg with server_optimizer = optax_adam reaches optax's own Adam
  args = cli.build_parser().parse_args(["run", "--server-optimizer", "optax_adam"])
  cfg, _ = cli.config_from_args(args)
  assert cfg.algorithm.weighting == "examples" and cfg.algorithm.server_lr == 0.01
  opt = cli.make_algorithm(cfg).server_optimizer
  got, _ = opt.update(g, opt.init(params), params)
  adam = optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3)
  want, _ = adam.update(g, adam.init(params), params)
  assert jnp.allclose(got["w"], want["w"])


@pytest.mark.parametrize("text, name, message", [
    ('rounds = "ten"', "exp.toml", "rounds must be an integer, got 'ten'"),
    ("rounds = 2.5", "exp.toml", "rounds must be an integer"),
    ("roundz = 3", "exp.toml", "unknown key 'roundz'; did you mean 'rounds'?"),
    ("[algorithm]\nlr = 0.1", "exp.toml", "unknown key 'algorithm.lr'"),
    ('algorithm = "fedprox"', "exp.toml", "algorithm must be a table"),
    ("[algorithm]\nmu = true", "exp.toml", "algorithm.mu must be a number, got True"),
    ('[algorithm]\nname = "fedsgd"', "exp.toml", "algorithm.name must be one of"),
    ("seed = [0, 0.5]", "exp.toml", "seed must be an integer or a list of integers"),
    ("cohort_size = 0", "exp.toml", "cohort_size must be a positive integer"),
    ("[local]\nepochs = 1\nsteps = 2", "exp.toml", "local.epochs and local.steps are exclusive"),
    ("rounds = ", "exp.toml", "invalid TOML"),
    ("rounds: [1", "exp.yaml", "invalid YAML"),
    ("rounds: ten", "exp.yaml", "rounds must be an integer, got 'ten'"),
    ("- 1", "exp.yaml", "top level must be a table"),
    ("rounds = 1", "exp.ini", "unknown format '.ini'"),
])
def test_cli_bad_config_is_one_line(tmp_path, capsys, text, name, message):
  cfg = _write(tmp_path, text, name)
  assert cli.main(["run", "--config", cfg, "--out", str(tmp_path / "o")]) == 2
  line = _one_error_line(capsys)
  assert message in line and name in line, line
  assert not (tmp_path / "o").exists()   # nothing ran


def test_cli_missing_config_and_yaml_without_pyyaml(tmp_path, capsys, monkeypatch):
  assert cli.main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
  assert "nope.toml' not found" in _one_error_line(capsys)
  monkeypatch.setitem(sys.modules, "yaml", None)   # import yaml raises ImportError
  assert cli.main(["run", "--config", _write(tmp_path, "rounds: 2", "e.yml")]) == 2
  assert "pip install pyyaml" in _one_error_line(capsys)


def test_cli_config_missing_dataset_and_unwritable_out(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr("fedjax_sim.data.datasets.FASHION_MNIST_DIRS", ())
  monkeypatch.delenv("FEDJAX_SIM_FASHION_MNIST_DIR", raising=False)
  cfg = _write(tmp_path, f'dataset = "fashion_mnist"\ndata_dir = "{tmp_path / "nodata"}"\n'
               f'out = "{tmp_path / "o"}"\n')
  assert cli.main(["run", "--config", cfg]) == 2
  assert "nodata" in _one_error_line(capsys)
  (tmp_path / "file").write_text("x")
  cfg = _write(tmp_path, TINY, "t.toml")
  assert cli.main(["run", "--config", cfg, "--out", str(tmp_path / "file" / "sub")]) == 2
  assert "cannot write to output folder" in _one_error_line(capsys)


@pytest.mark.slow
def test_cli_incompatible_checkpoint_is_one_line(tmp_path):
  """Resuming from a checkpoint of another model: one line on the real stderr (no orbax logs)."""
  cfg = _write(tmp_path, TINY.replace("rounds = 2", "rounds = 1") +
               f'\n[checkpoint]\ndir = "{tmp_path / "ck"}"\nresume = true\n')
  assert cli.main(["run", "--config", cfg, "--out", str(tmp_path / "a")]) == 0
  res = subprocess.run([sys.executable, "-m", "fedjax_sim", "run", "--config", cfg,
                        "--model", "mlp_2nn", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True)
  assert res.returncode == 2, res.stderr
  err = res.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: checkpoint in "), res.stderr
  assert "different experiment" in err[0] and "params" in err[0]
