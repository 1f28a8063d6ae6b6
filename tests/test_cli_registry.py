"""The command line's registry tables: every registered thing is reachable from a config file."""

import dataclasses
import json
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli

BASE = """
dataset = "digits"
num_clients = 10
model = "logistic_regression"
rounds = 2
cohort_size = 5
eval_every = 1
progress = false
"""


def _base(text):
  """BASE, without its dataset key when ``text`` gives a [dataset] table."""
  return BASE.replace('dataset = "digits"\n', "") if "[dataset]" in text else BASE


def _config(tmp_path, text, *flags):
  p = tmp_path / "exp.toml"
  p.write_text(_base(text) + text)
  return cli.config_from_args(cli.build_parser().parse_args(["run", "--config", str(p),
                                                             *flags]))


def _update(opt, g):
  params = {"w": jnp.zeros(3)}
  return opt.update(g, opt.init(params), params)[0]["w"]


def test_tables_build_the_registered_objects(tmp_path):
  cfg, warnings = _config(tmp_path, """
[algorithm]
name = "fedprox"
mu = 0.2
drop_stragglers = true

[client_optimizer]
name = "sgd"
learning_rate = 0.1
momentum = 0.9

[server_optimizer]
name = "adam"
learning_rate = 0.01

[aggregator]
name = "krum"
num_byzantine = 1

[[transforms]]
name = "clip_by_norm"
max_norm = 1.0

[[transforms]]
name = "stochastic_quantize"
bits = 8

[heterogeneity]
straggler_fraction = 0.3
local_steps = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
""")
  assert warnings == []
  algo = cli.make_algorithm(cfg)
  assert algo.name == "fedprox" and algo.drop_stragglers
  g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  np.testing.assert_allclose(_update(algo.client_optimizer, g), _update(
      optax.sgd(0.1, momentum=0.9), g))
  np.testing.assert_allclose(_update(algo.server_optimizer, g), _update(optax.adam(0.01), g))
  # krum with f = 1 needs at least 2f + 3 = 5 clients: its own check runs
  algo.aggregator.validate(5)
  with pytest.raises(ValueError):
    algo.aggregator.validate(4)
  # the transforms in order: clip to norm 1, then 8-bit quantization
  delta = {"w": jnp.asarray([3.0, 4.0, 0.0])}
  out, _ = algo.update_transform(delta, jax.random.key(0), jnp.int32(0))
  assert abs(float(jnp.linalg.norm(out["w"])) - 1.0) < 0.02
  het = cli.make_heterogeneity(cfg)
  assert het.straggler_fraction == 0.3 and het.local_steps.dtype.kind == "i"
  resolved = cli.to_dict(cfg)
  assert resolved["aggregator"] == {"name": "krum", "num_byzantine": 1}
  assert [t["name"] for t in resolved["transforms"]] == ["clip_by_norm", "stochastic_quantize"]
  assert "client_lr" not in resolved["algorithm"]    # the [client_optimizer] table replaced it
  assert "server_lr" not in resolved["algorithm"]    # the [server_optimizer] table replaced it
  # the resolved TOML reads back to the same configuration
  text = cli.to_toml(resolved)
  assert "[[transforms]]" in text
  (tmp_path / "again.toml").write_text(text)
  again, _ = cli.config_from_args(cli.build_parser().parse_args(
      ["run", "--config", str(tmp_path / "again.toml")]))
  assert cli.to_dict(again) == resolved


def test_privacy_table_wraps_the_algorithm(tmp_path):
  cfg, _ = _config(tmp_path, """
[algorithm]
weighting = "uniform"

[privacy]
noise_multiplier = 0.5
clip_norm = 1.0
""")
  algo = cli.make_algorithm(cfg)
  assert algo.fixed_weighting and algo.server_finish is not fs.algorithms.base.pass_through


def test_scaffold_and_fednova_take_the_client_optimizer_table(tmp_path):
  cfg, _ = _config(tmp_path, '[algorithm]\nname = "fednova"\n[client_optimizer]\n'
                   "learning_rate = 0.2\nmomentum = 0.5\n")
  algo = cli.make_algorithm(cfg)
  assert algo.name == "fednova"
  g = {"w": jnp.ones(3)}
  np.testing.assert_allclose(_update(algo.client_optimizer, g),
                             _update(optax.sgd(0.2, momentum=0.5), g))
  cfg, _ = _config(tmp_path, '[algorithm]\nname = "scaffold"\n[client_optimizer]\n'
                   'name = "adam"\nlearning_rate = 0.2\n')
  algo = cli.make_algorithm(cfg)   # SCAFFOLD's control variates work with any client optimizer
  np.testing.assert_allclose(_update(algo.client_optimizer, g), _update(optax.adam(0.2), g))


def test_set_flag_and_dataset_table(tmp_path):
  cfg, _ = _config(tmp_path, '[dataset]\nname = "digits"\ntest_fraction = 0.5\n',
                   "--set", "aggregator.name=trimmed_mean", "--set", "aggregator.beta=0.1")
  assert cfg.tables["aggregator"] == {"name": "trimmed_mean", "beta": 0.1}
  train, test, _ = cli.load_data(cfg, 0)
  assert len(test["y"]) == round(0.5 * 1797)
  assert cli.to_dict(cfg)["dataset"] == {"name": "digits", "test_fraction": 0.5}


@pytest.mark.parametrize("text, message", [
    ('[aggregator]\nname = "krumm"', "aggregator.name must be one of"),
    ('[aggregator]\nname = "krum"', "[aggregator] 'krum' needs num_byzantine"),
    ('[aggregator]\nname = "krum"\nnum_byzantine = 1\nf = 2',
     "unknown key 'aggregator.f' (not an option of aggregator 'krum')"),
    ('[aggregator]\nname = "krum"\nnum_byzantine = "one"', "aggregator.num_byzantine must be "
                                                           "an integer"),
    ("[aggregator]\nnum_byzantine = 1", "[aggregator] needs name"),
    ('[[transforms]]\nname = "top_k"\nfraction = true', "transforms[0].fraction must be a number"),
    ("[algorithm]\nlocal_steps = 3", "algorithm.local_steps is set by local.steps"),
    ('[algorithm]\nname = "fedprox"\nbuffer_size = 3', "unknown key 'algorithm.buffer_size'"),
    ("[heterogeneity]\nstraggler_fraction = nan", "heterogeneity.straggler_fraction must be "
                                                  "finite"),
    ('[privacy]\nclip_norm = 1.0', "needs noise_multiplier"),
    ('[client_optimizer]\nlearning_rate = 0.1\n[algorithm]\nclient_lr = 0.2',
     "[client_optimizer] and algorithm.client_lr both give the optimizer"),
    ('[server_optimizer]\nname = "sgd"\nlearning_rate = 1.0\n[algorithm]\nname = "fedadam"',
     "[server_optimizer] is for algorithms that take a server optimizer"),
    ('[dataset]\nname = "digits"\nflatten = false', "dataset.flatten is set by model"),
    ('[client_optimizer]\nname = "sgd"\nlearning_rate = 0.1\naccumulator_dtype = "x"',
     "cannot be given in a config file"),
])
def test_bad_tables_are_one_line(tmp_path, capsys, text, message):
  p = tmp_path / "exp.toml"
  p.write_text(_base(text) + text)
  assert cli.main(["run", "--config", str(p), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "exp.toml" in err[0], err
  assert message in err[0], err[0]
  assert not (tmp_path / "o").exists()


def test_list_command_shows_entries_and_options(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  assert "[aggregator]" in out and "krum" in out and "[[transforms]]" in out
  assert cli.main(["list", "aggregator", "krum"]) == 0
  out = capsys.readouterr().out
  assert "num_byzantine (int; required): f >= 0" in out
  assert cli.main(["list", "aggregator", "krumm"]) == 2
  assert "did you mean 'krum'" in capsys.readouterr().err


@pytest.mark.slow
def test_heterogeneity_and_aggregator_run_from_toml(tmp_path):
  out = tmp_path / "run"
  p = tmp_path / "exp.toml"
  p.write_text(BASE + '[aggregator]\nname = "coordinate_median"\n[heterogeneity]\n'
               "dropout_fraction = 0.3\n[local]\nsteps = 2\nbatch_size = 8\n")
  assert cli.main(["run", "--config", str(p), "--out", str(out)]) == 0
  h = json.loads((out / "history.json").read_text())
  assert len(h["round"]) == 2 and h["test_accuracy"][-1] is not None
  resolved = tomllib.loads((out / "config.toml").read_text())
  assert resolved["heterogeneity"] == {"name": "default", "dropout_fraction": 0.3}
  assert dataclasses.asdict(cli.Config())["tables"] == {}


def test_an_algorithm_registered_after_import_is_a_valid_name(tmp_path):
  """A user's algorithm registered after fedjax_sim.cli was imported (notebook 06) is reached by
  name from a config file and from --algorithm, with its own options checked."""
  @fs.algorithms.REGISTRY.register("user_prox", forwards_to=fs.algorithms.fedavg)
  def user_prox(client_optimizer=None, server_optimizer=None, *, strength: float = 0.1,
                **fedavg_kwargs):
    return fs.algorithms.fedprox(client_optimizer, server_optimizer, mu=strength,
                                 **fedavg_kwargs).replace(name="user_prox")
  try:
    cfg, _ = _config(tmp_path, '[algorithm]\nname = "user_prox"\nstrength = 0.3\n')
    algo = cli.make_algorithm(cfg)
    assert algo.name == "user_prox" and algo.hparams == {"mu": 0.3}
    cfg, _ = _config(tmp_path, "", "--algorithm", "user_prox")
    assert cfg.algorithm.name == "user_prox"
    with pytest.raises(ValueError, match="'algorithm.strenght'.*did you mean 'strength'"):
      _config(tmp_path, '[algorithm]\nname = "user_prox"\nstrenght = 1.0\n')
  finally:
    fs.algorithms.REGISTRY._entries.pop("user_prox")
