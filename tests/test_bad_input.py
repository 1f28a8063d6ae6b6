"""Bad inputs fail early with a ValueError naming the field or client, before any training."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import engine
from fedjax_sim.data import partition


def _mlp():
  return fs.models.mlp(input_dim=8, hidden=(16,), num_classes=4)


def _algo(**kw):
  return fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16, **kw)


def _clients(sizes=(5, 7, 3), dim=8):
  """Three small clients (rows 0-4, 5-11, 12-14) with labels in [0, 4)."""
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(n, dim)).astype(np.float32),
           "y": rng.integers(0, 4, n).astype(np.int32)} for n in sizes]


@pytest.fixture
def no_training(monkeypatch):
  """Any attempt to build the compiled round fails: run-level checks must come first."""
  def boom(*args, **kwargs):
    raise AssertionError("should not be reached: training started before the input was checked")
  monkeypatch.setattr(engine, "make_round", boom)


def _run(data, model=None, algo=None, **kw):
  kw = {"rounds": 2, "cohort_size": 3, "progress": False, **kw}
  return fs.run(algo or _algo(), model or _mlp(), data, **kw)


def test_no_training_fixture_is_effective(ragged_data, no_training):
  """Sanity: with valid input, run does get to make_round (so the fixture proves ordering)."""
  with pytest.raises(AssertionError, match="should not be reached"):
    _run(ragged_data)


# --- run-level checks (all under no_training) ----------------------------------------------------
def test_wrong_feature_shape(no_training):
  data = fs.FederatedData.from_clients(_clients(dim=5), num_classes=4)
  with pytest.raises(ValueError, match=r"train_data.*\(5,\).*expects \(8,\)"):
    _run(data)


def test_labels_beyond_model_classes(no_training):
  clients = _clients()
  clients[1]["y"][2] = 6
  data = fs.FederatedData.from_clients(clients, client_ids=["a", "b", "c"])   # no num_classes
  with pytest.raises(ValueError, match=r"label 6 \(client 'b'\).*4 classes"):
    _run(data)
  data10 = fs.FederatedData.from_clients(clients, client_ids=["a", "b", "c"], num_classes=10)
  with pytest.raises(ValueError, match=r"label 6 \(client 'b'\)"):
    _run(data10)


def test_model_with_wrong_logits(ragged_data, no_training):
  bad = fs.models.Model(init=lambda k: {"w": jnp.zeros((8, 3))}, apply=lambda p, x: x @ p["w"],
                        input_shape=(8,), num_classes=4, name="three_logits")
  with pytest.raises(ValueError, match=r"'three_logits'.*\(3,\).*\(4,\)"):
    _run(ragged_data, model=bad)


def test_cohort_larger_than_population(ragged_data, no_training):
  with pytest.raises(ValueError, match="cohort_size 13 .* 12 clients"):
    _run(ragged_data, cohort_size=13)


@pytest.mark.parametrize("field,value", [
    ("rounds", 0), ("rounds", -1), ("rounds", 1.5), ("rounds", True), ("rounds", "3"),
    ("cohort_size", 0), ("cohort_size", 2.0), ("eval_every", 0), ("chunk_size", 0),
])
def test_non_positive_or_non_int_run_args(ragged_data, no_training, field, value):
  with pytest.raises(ValueError, match=f"{field} must be a positive integer, got {value!r}"):
    _run(ragged_data, **{field: value})


def test_client_weights(ragged_data, no_training):
  with pytest.raises(ValueError, match="client_weights sum to zero"):
    _run(ragged_data, client_weights=np.zeros(12))
  w = np.ones(12)
  w[4] = -1.0
  with pytest.raises(ValueError, match=r"client_weights.*client 4 has -1"):
    _run(ragged_data, client_weights=w)
  w[4] = np.nan
  with pytest.raises(ValueError, match=r"client_weights.*client 4 has nan"):
    _run(ragged_data, client_weights=w)
  with pytest.raises(ValueError, match=r"client_weights has shape \(11,\), expected \(12,\)"):
    _run(ragged_data, client_weights=np.ones(11))


def test_not_an_algorithm_or_data(ragged_data, no_training):
  with pytest.raises(ValueError, match="algorithm must be an Algorithm"):
    fs.run("fedavg", _mlp(), ragged_data, rounds=1, cohort_size=1, progress=False)
  with pytest.raises(ValueError, match="train_data must be a FederatedData"):
    fs.run(_algo(), _mlp(), ragged_data.centralized(), rounds=1, cohort_size=1, progress=False)


def _eval(n=10, dim=8, lo=0, hi=4):
  rng = np.random.default_rng(1)
  return {"x": rng.normal(size=(n, dim)).astype(np.float32),
          "y": rng.integers(lo, hi, n).astype(np.int32)}


@pytest.mark.parametrize("case,pattern", [
    ("shape", r"eval_data: examples have shape \(5,\)"),
    ("label_high", r"eval_data: labels must be integers in \[0, 4\)"),
    ("label_negative", r"eval_data: labels must be integers in \[0, 4\)"),
    ("float_labels", r"eval_data: labels must be integers"),
    ("nan", r"eval_data: x has non-finite"),
    ("lengths", r"eval_data: x has 10 examples and y has 9"),
    ("empty", r"eval_data: x has 0 examples"),
    ("not_a_dict", r"eval_data must be a FederatedData or a dict"),
])
def test_bad_eval_data(ragged_data, no_training, case, pattern):
  ev = _eval()
  if case == "shape":
    ev = _eval(dim=5)
  elif case == "label_high":
    ev["y"][3] = 4
  elif case == "label_negative":
    ev["y"][3] = -1
  elif case == "float_labels":
    ev["y"] = ev["y"].astype(np.float32)
  elif case == "nan":
    ev["x"][2, 1] = np.nan
  elif case == "lengths":
    ev["y"] = ev["y"][:9]
  elif case == "empty":
    ev = {"x": np.zeros((0, 8), np.float32), "y": np.zeros(0, np.int32)}
  elif case == "not_a_dict":
    ev = (ev["x"], ev["y"])
  with pytest.raises(ValueError, match=pattern):
    _run(ragged_data, eval_data=ev)


def test_bad_eval_federated_data(ragged_data, no_training):
  ev = fs.FederatedData.from_clients([{"x": np.zeros((3, 5), np.float32),
                                       "y": np.zeros(3, np.int32)}])
  with pytest.raises(ValueError, match=r"eval_data: examples have shape \(5,\)"):
    _run(ragged_data, eval_data=ev)


# --- algorithm / local work ----------------------------------------------------------------------
@pytest.mark.parametrize("kw,pattern", [
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -4}, "batch_size must be a positive integer, got -4"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
    ({"local_epochs": 0}, "local_epochs must be a positive integer, got 0"),
    ({"local_epochs": 1.5}, "local_epochs must be a positive integer, got 1.5"),
    ({"local_steps": 0}, "local_steps must be a positive integer, got 0"),
    ({"local_epochs": 2, "local_steps": 5}, "exactly one of local_epochs and local_steps"),
    ({"local_epochs": 1, "local_steps": 3}, "exactly one of local_epochs and local_steps"),
    ({"weighting": "size"}, "weighting must be one of"),
])
def test_bad_algorithm_args(kw, pattern):
  kw = {"batch_size": 16, **kw}
  with pytest.raises(ValueError, match=pattern):
    fs.algorithms.fedavg(optax.sgd(0.1), **kw)


def test_fedavg_local_work_defaults():
  assert fs.algorithms.fedavg().work == fs.LocalWork(32, 1, None)
  assert fs.algorithms.fedavg(local_steps=4).work == fs.LocalWork(32, None, 4)
  assert fs.algorithms.fedavg(local_epochs=3).work == fs.LocalWork(32, 3, None)


def test_local_work_both_or_neither():
  with pytest.raises(ValueError, match="exactly one of local_epochs and local_steps"):
    fs.LocalWork(16, local_epochs=2, local_steps=5)
  with pytest.raises(ValueError, match="exactly one of local_epochs and local_steps"):
    fs.LocalWork(16, local_epochs=None, local_steps=None)


def test_bad_optimizer_and_unknown_algorithm():
  with pytest.raises(ValueError, match="client_optimizer must be an optax GradientTransformation"):
    fs.algorithms.fedavg(0.1)
  with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'"):
    fs.algorithms.make("fedsgd")


# --- FederatedData construction ------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_client(value):
  clients = _clients()
  clients[2]["x"][1, 4] = value
  with pytest.raises(ValueError, match=r"feature 'x' has non-finite.*client 'c'"):
    fs.FederatedData.from_clients(clients, client_ids=["a", "b", "c"], num_classes=4)
  flat = {k: np.concatenate([c[k] for c in clients]) for k in ("x", "y")}
  parts = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 15)]
  with pytest.raises(ValueError, match=r"non-finite.*row 13 \(client 2\)"):
    fs.FederatedData.from_partition(flat, parts, num_classes=4)


@pytest.mark.parametrize("bad", [4, 9, -1])
def test_labels_out_of_range_name_the_client(bad):
  clients = _clients()
  clients[1]["y"][3] = bad
  if bad >= 0:
    with pytest.raises(ValueError, match=rf"label {bad} at row 8 \(client 'b'\).*\[0, 4\)"):
      fs.FederatedData.from_clients(clients, client_ids=["a", "b", "c"], num_classes=4)
  else:   # negative labels are rejected even without num_classes
    with pytest.raises(ValueError, match=r"label -1 at row 8 \(client 'b'\) is negative"):
      fs.FederatedData.from_clients(clients, client_ids=["a", "b", "c"])


def test_label_dtype_and_shape():
  clients = _clients()
  for c in clients:
    c["y"] = c["y"].astype(np.float32)
  with pytest.raises(ValueError, match="labels 'y' must be integers"):
    fs.FederatedData.from_clients(clients)
  clients = _clients()
  for c in clients:
    c["y"] = c["y"][:, None]
  with pytest.raises(ValueError, match=r"labels 'y' must have shape \[N\]"):
    fs.FederatedData.from_clients(clients)


def test_empty_client_names_it():
  x = np.zeros((10, 8), np.float32)
  y = np.zeros(10, np.int32)
  parts = [np.arange(5), np.array([], np.int64), np.arange(5, 10)]
  with pytest.raises(ValueError, match=r"client 'b' \(index 1\) has no examples"):
    fs.FederatedData.from_partition({"x": x, "y": y}, parts, client_ids=["a", "b", "c"])
  with pytest.raises(ValueError, match=r"client 1 \(index 1\) has no examples"):
    fs.FederatedData.from_partition({"x": x, "y": y}, parts)
  with pytest.raises(ValueError, match="client 'b'"):
    fs.FederatedData.from_clients([{"x": x, "y": y}, {"x": x[:0], "y": y[:0]}],
                                  client_ids=["a", "b"])


def test_partition_assigning_an_example_twice():
  arrays = {"x": np.zeros((6, 8), np.float32), "y": np.zeros(6, np.int32)}
  with pytest.raises(ValueError, match="more than one client"):
    fs.FederatedData.from_partition(arrays, [[0, 1, 2], [2, 3]])
  with pytest.raises(ValueError, match="more than one client"):
    fs.FederatedData.from_partition(arrays, [[0, 1, 1]])
  with pytest.raises(ValueError, match=r"partition indices must lie in \[0, 6\)"):
    fs.FederatedData.from_partition(arrays, [[0, 1], [6]])
  with pytest.raises(ValueError, match=r"partition indices must lie in \[0, 6\)"):
    fs.FederatedData.from_partition(arrays, [[-1, 1]])
  with pytest.raises(ValueError, match="no clients"):
    fs.FederatedData.from_partition(arrays, [])


def test_features_of_different_lengths():
  with pytest.raises(ValueError, match=r"different numbers of examples: \{'x': 10, 'y': 9\}"):
    fs.FederatedData.from_partition({"x": np.zeros((10, 8), np.float32),
                                     "y": np.zeros(9, np.int32)}, [np.arange(9)])
  with pytest.raises(ValueError, match="feature 'y' has shape"):
    fs.FederatedData({"x": np.zeros((4, 8), np.float32), "y": np.zeros(3, np.int32)},
                     [0, 2, 4], [0, 1])


def test_from_clients_feature_mismatch():
  with pytest.raises(ValueError, match=r"client 1 has features \['x'\], expected \['x', 'y'\]"):
    fs.FederatedData.from_clients([{"x": np.zeros((2, 8)), "y": np.zeros(2, np.int32)},
                                   {"x": np.zeros((2, 8))}])


def test_bad_offsets_and_ids():
  x = {"x": np.zeros((4, 2), np.float32)}
  with pytest.raises(ValueError, match="offsets must be a 1-D array"):
    fs.FederatedData(x, [1, 4], [0])
  with pytest.raises(ValueError, match="offsets must be non-decreasing"):
    fs.FederatedData(x, [0, 3, 2, 4], [0, 1, 2])
  with pytest.raises(ValueError, match=r"client_ids has shape \(3,\), expected \(2,\)"):
    fs.FederatedData(x, [0, 2, 4], [0, 1, 2])


# --- partitions ----------------------------------------------------------------------------------
def test_unknown_partition():
  with pytest.raises(ValueError, match=r"unknown partition 'pathological'.*'dirichlet'"):
    partition.make("pathological", np.zeros(10, int), 2)


@pytest.mark.parametrize("alpha", [0, -0.5, float("nan")])
def test_dirichlet_alpha_must_be_positive(alpha):
  with pytest.raises(ValueError, match="dirichlet alpha must be > 0"):
    partition.dirichlet(np.zeros(10, int), 2, alpha)
  with pytest.raises(ValueError, match="dirichlet alpha must be > 0"):
    partition.make("dirichlet", np.zeros(10, int), 2, alpha=alpha)


@pytest.mark.parametrize("name,kw", [("iid", {}), ("dirichlet", {"alpha": 1.0}),
                                     ("shards", {}), ("quantity_skew", {})])
def test_more_clients_than_examples(name, kw):
  with pytest.raises(ValueError, match="cannot split 5 examples into 6 non-empty clients"):
    partition.make(name, np.arange(5) % 2, 6, **kw)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity_skew"])
@pytest.mark.parametrize("num_clients", [0, -3, 2.0])
def test_bad_num_clients(name, num_clients):
  kw = {"alpha": 1.0} if name == "dirichlet" else {}
  with pytest.raises(ValueError, match="num_clients must be a positive integer"):
    partition.make(name, np.arange(20) % 2, num_clients, **kw)


def test_other_partition_params():
  labels = np.arange(20) % 2
  with pytest.raises(ValueError, match="cannot cut 20 examples into 30 shards"):
    partition.shards(labels, 10, shards_per_client=3)
  with pytest.raises(ValueError, match="cannot cut"):
    partition.shards(labels, 10, shards_per_client=0)
  with pytest.raises(ValueError, match="exponent must be > 0"):
    partition.quantity_skew(labels, 4, exponent=0)
  with pytest.raises(ValueError, match=r"4 clients of >= 6 examples need more than 20"):
    partition.quantity_skew(labels, 4, min_size=6)
  with pytest.raises(ValueError, match="could not draw a Dirichlet"):
    partition.dirichlet(np.zeros(20, int), 10, 0.01, min_size=2, max_tries=3)
  with pytest.raises(ValueError, match="client_keys must be a non-empty 1-D array"):
    partition.natural(np.array([]))
