"""The command line: a real (small) run writes its outputs; bad input is one line, exit 2."""

import json
import subprocess
import sys

import pytest

from fedjax_sim import cli


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
    (["--server-lr", "0"], "--server-lr must be > 0"),
    (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent"], None),
])
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
