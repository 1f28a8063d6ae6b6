"""Data adapters (Hugging Face datasets, pandas, Arrow/Parquet), the flwr-datasets-named
partitioners and the per-client label-distribution plot."""

import math

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import adapters, partition


def _table(n=60, k=3, clients=("ann", "bob", "cy", "dee"), seed=0):
  """Columns of a small tabular classification set: two features, a label learnable from
  them, and a client id per row with unequal group sizes."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  f1 = y + 0.3 * rng.standard_normal(n)
  f2 = -y + 0.3 * rng.standard_normal(n)
  # unequal groups: client c gets rows where r % 10 falls in its range
  bounds = np.cumsum([1, 2, 3, 4])[:len(clients)]
  cid = np.array([clients[int(np.searchsorted(bounds, r % 10, side="right"))] for r in range(n)])
  return {"f1": f1, "f2": f2, "label": y, "client": cid}


def _groups(cols):
  keys, counts = np.unique(cols["client"], return_counts=True)
  return keys.tolist(), counts.tolist()


# --- Hugging Face datasets --------------------------------------------------------------------
def test_hf_dataset_with_client_column_is_the_natural_partition():
  datasets = pytest.importorskip("datasets", reason="the Hugging Face adapter needs the 'hf' "
                                 "extra (pip install 'fedjax_sim[hf]')")
  cols = _table()
  ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in cols.items()})
  data = fs.adapters.from_huggingface(ds, ["f1", "f2"], "label", client_column="client")
  keys, counts = _groups(cols)
  assert data.client_ids.tolist() == keys
  assert data.sizes.tolist() == counts
  assert data.num_classes == 3
  # every client holds exactly its own rows: same multiset of (f1, label) as the group
  for p, key in enumerate(keys):
    rows = cols["client"] == key
    got = data.client(p)
    np.testing.assert_allclose(np.sort(got["x"][:, 0]), np.sort(cols["f1"][rows].astype(np.float32)))
    np.testing.assert_array_equal(np.sort(got["y"]), np.sort(cols["label"][rows]))
  assert data.arrays["x"].dtype == np.float32 and data.arrays["y"].dtype == np.int32


def test_hf_class_label_sets_num_classes_and_vector_column():
  datasets = pytest.importorskip("datasets", reason="needs the 'hf' extra")
  feats = datasets.Features({"pixels": datasets.Sequence(datasets.Value("float32"), length=4),
                             "label": datasets.ClassLabel(names=["a", "b", "c", "d", "e"]),
                             "user": datasets.Value("int64")})
  ds = datasets.Dataset.from_dict({"pixels": np.arange(24.0).reshape(6, 4).tolist(),
                                   "label": [0, 1, 1, 0, 2, 1], "user": [7, 7, 3, 3, 3, 9]},
                                  features=feats)
  data = fs.adapters.from_huggingface(ds.select([5, 4, 3, 2, 1, 0]), "pixels", "label",
                                      client_column="user")
  assert data.num_classes == 5   # from the ClassLabel, not max label + 1
  assert data.client_ids.tolist() == [3, 7, 9] and data.sizes.tolist() == [3, 2, 1]
  assert data.arrays["x"].shape == (6, 4)
  # select() reorders rows: client 9 is the original row 5
  np.testing.assert_array_equal(data.client(2)["x"][0], np.arange(20.0, 24.0))


def test_hf_errors():
  datasets = pytest.importorskip("datasets", reason="needs the 'hf' extra")
  ds = datasets.Dataset.from_dict({"a": [1.0, 2.0], "s": ["x", "y"], "label": [0, 1],
                                   "u": [1, 2]})
  with pytest.raises(ValueError, match="'zz' is not a column.*'a', 's', 'label', 'u'"):
    fs.adapters.from_huggingface(ds, ["a", "zz"], "label", client_column="u")
  with pytest.raises(ValueError, match="feature column 's'"):
    fs.adapters.from_huggingface(ds, ["a", "s"], "label", client_column="u")
  with pytest.raises(ValueError, match="DatasetDict with splits"):
    fs.adapters.from_huggingface(datasets.DatasetDict({"train": ds}), ["a"], "label",
                                 client_column="u")
  with pytest.raises(TypeError, match="expects a datasets.Dataset"):
    fs.adapters.from_huggingface({"a": [1.0]}, ["a"], "label", client_column="u")


def test_read_table_parquet_and_arrow(tmp_path):
  datasets = pytest.importorskip("datasets", reason="needs the 'hf' extra")
  cols = _table(n=30)
  ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in cols.items()})
  ds.to_parquet(str(tmp_path / "t.parquet"))
  ds.save_to_disk(str(tmp_path / "saved"))
  arrow = sorted((tmp_path / "saved").glob("*.arrow"))
  keys, counts = _groups(cols)
  for source in (tmp_path / "t.parquet", tmp_path / "saved", arrow):
    data = fs.adapters.from_huggingface(fs.adapters.read_table(source), ["f1", "f2"], "label",
                                        client_column="client")
    assert data.client_ids.tolist() == keys and data.sizes.tolist() == counts
  with pytest.raises(FileNotFoundError, match="no such file"):
    fs.adapters.read_table(tmp_path / "missing.parquet")
  (tmp_path / "t.csv").write_text("a\n1\n")
  with pytest.raises(ValueError, match=r"\.parquet or \.arrow"):
    fs.adapters.read_table(tmp_path / "t.csv")


# --- pandas -----------------------------------------------------------------------------------
def test_dataframe_natural_and_partitioner():
  pd = pytest.importorskip("pandas", reason="the DataFrame adapter needs pandas")
  cols = _table()
  df = pd.DataFrame(cols)
  data = fs.adapters.from_pandas(df, ["f1", "f2"], "label", client_column="client")
  keys, counts = _groups(cols)
  assert data.client_ids.tolist() == keys and data.sizes.tolist() == counts
  # a NaturalIdPartitioner is the same as client_column
  same = fs.adapters.from_pandas(df, ["f1", "f2"], "label",
                                 partitioner=fs.partition.NaturalIdPartitioner("client"))
  np.testing.assert_array_equal(same.arrays["x"], data.arrays["x"])
  # a flwr-named partitioner reading the label column by name
  dirichlet = fs.partition.DirichletPartitioner(4, partition_by="label", alpha=0.5,
                                                min_partition_size=2, seed=3)
  split = fs.adapters.from_pandas(df, ["f1", "f2"], "label", partitioner=dirichlet)
  expected = partition.dirichlet(cols["label"], 4, 0.5, seed=3, min_size=2)
  assert split.sizes.tolist() == [len(p) for p in expected]
  np.testing.assert_array_equal(split.label_histogram(),
                                [np.bincount(cols["label"][p], minlength=3) for p in expected])
  # regression targets
  reg = fs.adapters.from_pandas(df, ["f1"], "f2", client_column="client", task="regression")
  assert reg.task == "regression" and reg.arrays["y"].dtype == np.float32


@pytest.mark.parametrize("change, message", [
    (lambda df: df.assign(f2=df.f2.where(df.index != 5)), "'f2' has NaN/inf in 1 row.*row 5"),
    (lambda df: df.assign(f1=df.f1.astype(object).where(df.index != 2, None)),
     "'f1' has missing values.*row 2"),
    (lambda df: df.assign(f1="text"), "'f1' is not numeric|'f1' has dtype"),
    (lambda df: df.assign(label=df.label + 0.5), "label column 'label' holds floats"),
    (lambda df: df.assign(label=df.label - 1), "negative label -1"),
    (lambda df: df.assign(client=df.client.where(df.index != 7, None)),
     "client_column 'client' has 1 missing id.*row 7"),
    (lambda df: df.assign(client=[1 if i % 2 else "a" for i in range(len(df))]),
     "mixes id types"),
])
def test_dataframe_bad_input(change, message):
  pd = pytest.importorskip("pandas", reason="the DataFrame adapter needs pandas")
  df = change(pd.DataFrame(_table()))
  with pytest.raises(ValueError, match=message):
    fs.adapters.from_pandas(df, ["f1", "f2"], "label", client_column="client")


def test_adapter_argument_errors():
  cols = _table()
  with pytest.raises(ValueError, match="exactly one of client_column"):
    fs.adapters.from_table(cols, ["f1"], "label")
  with pytest.raises(ValueError, match="exactly one of client_column"):
    fs.adapters.from_table(cols, ["f1"], "label", client_column="client",
                           partitioner=fs.partition.IidPartitioner(3))
  with pytest.raises(ValueError, match="label column 'label' is also among the features"):
    fs.adapters.from_table(cols, ["f1", "label"], "label", client_column="client")
  with pytest.raises(ValueError, match="client_column 'f1' is also a feature"):
    fs.adapters.from_table(cols, ["f1"], "label", client_column="f1")
  with pytest.raises(ValueError, match="DirichletPartitioner.partition_by 'nope' is not a column"):
    fs.adapters.from_table(cols, ["f1"], "label",
                           partitioner=fs.partition.DirichletPartitioner(3, "nope", alpha=1.0))
  with pytest.raises(TypeError, match="expected a datasets.Dataset, a pandas DataFrame"):
    fs.adapters.from_table([[1, 2]], ["f1"], "label", client_column="client")
  with pytest.raises(ValueError, match="different shapes"):
    adapters.column({"v": np.array([[1, 2], [3]], dtype=object)}, "v")


def test_round_trip_through_run():
  """A table with a client column trains end to end; the test split comes from to_arrays."""
  pd = pytest.importorskip("pandas", reason="the DataFrame adapter needs pandas")
  cols = _table(n=400, seed=1)
  df = pd.DataFrame(cols)
  train = fs.adapters.from_pandas(df.iloc[:300], ["f1", "f2"], "label", client_column="client")
  test = fs.adapters.to_arrays(df.iloc[300:], ["f1", "f2"], "label")
  res = fs.run(fs.algorithms.fedavg(optax.sgd(0.5), batch_size=16),
               fs.models.logistic_regression(2, 3), train, rounds=15, cohort_size=4,
               eval_data=test, eval_every=15, progress=False)
  assert res.history.last("test_accuracy") > 0.8   # chance is 1/3


# --- flwr-datasets-named partitioners ---------------------------------------------------------
def _labels(n=600, k=10):
  return np.repeat(np.arange(k), n // k)


def _cover(parts, n):
  allidx = np.sort(np.concatenate(parts))
  np.testing.assert_array_equal(allidx, np.arange(n))


def test_registry_lists_the_flwr_names():
  names = {"IidPartitioner", "DirichletPartitioner", "ShardPartitioner",
           "PathologicalPartitioner", "SizePartitioner", "LinearPartitioner",
           "SquarePartitioner", "ExponentialPartitioner", "NaturalIdPartitioner"}
  assert names == set(fs.partition.REGISTRY)
  schema = fs.partition.REGISTRY.schema("DirichletPartitioner")
  assert list(schema)[:4] == ["num_partitions", "partition_by", "alpha", "min_partition_size"]
  assert schema["min_partition_size"].default == 10 and schema["seed"].default == 42
  assert "num_classes_per_partition" in fs.partition.REGISTRY.schema("PathologicalPartitioner")
  p = fs.partition.REGISTRY.make("IidPartitioner", num_partitions=3)
  assert [len(x) for x in p(np.zeros(10))] == [4, 3, 3]


def test_iid_partitioner():
  y = np.zeros(603)
  parts = fs.partition.IidPartitioner(10)(y)
  # flwr: contiguous shards of a shuffled set, sizes of np.array_split (first ones one larger)
  assert [len(p) for p in parts] == [61, 61, 61] + [60] * 7   # as np.array_split / HF shard
  _cover(parts, len(y))


def test_dirichlet_partitioner_wraps_dirichlet():
  y = _labels()
  table = {"label": y}
  got = fs.partition.DirichletPartitioner(8, "label", alpha=0.3, min_partition_size=5, seed=7)(
      table)
  want = partition.dirichlet(y, 8, 0.3, seed=7, min_size=5)
  assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == 8
  _cover(got, len(y))
  # one alpha per partition: the client with a huge alpha gets about 1/sum of every class
  alphas = [1000.0] + [1e-3] * 7
  parts = fs.partition.DirichletPartitioner(8, "label", alphas, min_partition_size=0)(table)
  assert len(parts[0]) > 0.9 * len(y)
  with pytest.raises(ValueError, match="one per client"):
    fs.partition.DirichletPartitioner(8, "label", [1.0, 2.0])(table)


def test_dirichlet_self_balancing():
  """flwr's balancing: a client above N/P gets nothing of the classes split after that."""
  y = _labels(1000, 10)
  for seed in range(5):
    parts = fs.partition.DirichletPartitioner(5, "label", 0.1, min_partition_size=0,
                                              self_balancing=True, seed=seed)(y)
    sizes = np.array([len(p) for p in parts])
    # a client can exceed N/P = 200 only with the last class it accepted (100 examples)
    assert sizes.max() <= 200 + 100, sizes
    _cover(parts, len(y))
  unbalanced = [max(len(p) for p in partition.dirichlet(y, 5, 0.1, seed=s)) for s in range(5)]
  assert max(unbalanced) > 300   # without balancing such a Dirichlet(0.1) is far off


def test_shard_partitioner_matches_flwr_examples():
  # flwr's docstring examples on MNIST (60,000), scaled down 100x: 10 classes of 60
  y = _labels(600)
  parts = fs.partition.ShardPartitioner(10, "label", num_shards_per_partition=2,
                                        shard_size=30)(y)
  assert [len(p) for p in parts] == [60] * 10
  assert all(len(np.unique(y[p])) <= 2 for p in parts)   # shards of 30 are single-class
  parts = fs.partition.ShardPartitioner(9, "label", shard_size=10)(y)
  assert [len(p) for p in parts] == [70] * 6 + [60] * 3
  # all the data with an incomplete shard (flwr's 3rd example scaled 10x down: 6,000 rows)
  y6 = _labels(6000)
  parts = fs.partition.ShardPartitioner(10, "label", shard_size=99, keep_incomplete_shard=True)(
      y6)
  sizes = sorted(len(p) for p in parts)
  assert sizes in ([555] + [594] * 8 + [693], [594] * 9 + [654])
  _cover(parts, len(y6))
  # num_shards_per_partition alone: equal shards covering every example (McMahan et al.)
  parts = fs.partition.ShardPartitioner(20, "label", num_shards_per_partition=2)(y)
  assert [len(p) for p in parts] == [30] * 20 and all(len(np.unique(y[p])) <= 2 for p in parts)
  with pytest.raises(ValueError, match="num_shards_per_partition, shard_size"):
    fs.partition.ShardPartitioner(10, "label")


def test_pathological_partitioner():
  y = _labels(600)
  # deterministic: partition p holds classes (p + i) % K, each class split evenly among holders
  with pytest.warns(UserWarning, match=r"classes \[7, 8, 9\] are held by no client"):
    parts = fs.partition.PathologicalPartitioner(5, "label", 3, "deterministic")(y)
  for p, idx in enumerate(parts):
    assert set(y[idx].tolist()) == {(p + i) % 10 for i in range(3)}
  holders = np.zeros(10, int)
  for p in range(5):
    holders[[(p + i) % 10 for i in range(3)]] += 1
  for p, idx in enumerate(parts):
    counts = np.bincount(y[idx], minlength=10)
    for c in np.flatnonzero(counts):
      assert counts[c] in (60 // holders[c], -(-60 // holders[c]))
  # random: exactly k classes per client; unused classes are left out with a warning
  with pytest.warns(UserWarning, match="held by no client and left out"):
    parts = fs.partition.PathologicalPartitioner(3, "label", 2, seed=0)(y)
  assert all(len(np.unique(y[p])) == 2 for p in parts)
  used = set(np.concatenate([np.unique(y[p]) for p in parts]).tolist())
  assert len(used) < 10
  assert sum(len(p) for p in parts) == 60 * len(used)
  # first-deterministic: client p holds class p % K
  parts = fs.partition.PathologicalPartitioner(12, "label", 2, "first-deterministic")(y)
  assert all(p % 10 in set(y[idx].tolist()) and len(np.unique(y[idx])) == 2
             for p, idx in enumerate(parts))
  with pytest.raises(ValueError, match=r"classes_per_client must be an integer in \[1, 10\]"):
    fs.partition.PathologicalPartitioner(3, "label", 11)(y)
  with pytest.raises(ValueError, match="split among 2 clients but has only 1 example"):
    fs.partition.PathologicalPartitioner(4, "label", 1, "deterministic")(np.array([0] + [1] * 7))


def test_size_partitioners():
  y = np.zeros(100)
  parts = fs.partition.SizePartitioner([10, 30, 5])(y)
  assert [len(p) for p in parts] == [10, 30, 5]
  assert len(np.unique(np.concatenate(parts))) == 45
  # flwr: shares fn(i) / sum fn(j) for i = 1..P, rounded down, remainder to the last
  assert [len(p) for p in fs.partition.LinearPartitioner(4)(y)] == [10, 20, 30, 40]
  assert [len(p) for p in fs.partition.SquarePartitioner(4)(y)] == [3, 13, 30, 54]
  e = np.exp(np.arange(1, 5))
  want = np.floor(100 * e / e.sum()).astype(int)
  want[-1] += 100 - want.sum()
  assert [len(p) for p in fs.partition.ExponentialPartitioner(4)(y)] == want.tolist() == \
      [3, 8, 23, 66]
  for cls in (fs.partition.LinearPartitioner, fs.partition.SquarePartitioner,
              fs.partition.ExponentialPartitioner):
    _cover(cls(4)(y), 100)
  with pytest.raises(ValueError, match="without an example"):
    fs.partition.ExponentialPartitioner(20)(y)
  with pytest.raises(ValueError, match="add up to 120"):
    fs.partition.SizePartitioner([60, 60])(y)


def test_natural_id_partitioner():
  keys = np.array(["b", "a", "b", "c", "a", "b"])
  parts = fs.partition.NaturalIdPartitioner("user")({"user": keys})
  assert [keys[p].tolist() for p in parts] == [["a", "a"], ["b", "b", "b"], ["c"]]


def test_partitioners_take_labels_or_tables():
  """The label column of a table, or the labels themselves (array, list, pandas Series)."""
  pd = pytest.importorskip("pandas", reason="the Series case needs pandas")
  y = _labels(100, 5)
  p = fs.partition.DirichletPartitioner(4, "label", 0.5, min_partition_size=1, seed=1)
  want = p(y)
  for data in ({"label": y}, pd.DataFrame({"label": y, "other": 0}), pd.Series(y), y.tolist()):
    assert all(np.array_equal(a, b) for a, b in zip(p(data), want))


# --- label-distribution plot ------------------------------------------------------------------
def test_plot_label_distribution_one_bar_per_client(tmp_path):
  y = _labels(300, 5)
  data = fs.FederatedData.from_partition(
      {"x": np.zeros((300, 2), np.float32), "y": y.astype(np.int32)},
      fs.partition.DirichletPartitioner(7, "y", 0.5, min_partition_size=1)(y), num_classes=5)
  fig = fs.plot_label_distribution(data, tmp_path / "labels.png", title="Dirichlet(0.5)")
  ax = fig.axes[0]
  bars = [b for b in ax.patches]
  xs = sorted({round(b.get_x() + b.get_width() / 2, 6) for b in bars})
  assert xs == list(range(7))                       # one bar per client
  tops = {}
  for b in bars:
    x = round(b.get_x() + b.get_width() / 2)
    tops[x] = max(tops.get(x, 0.0), b.get_y() + b.get_height())
  np.testing.assert_allclose([tops[i] for i in range(7)], data.sizes)   # stacks = client sizes
  assert (tmp_path / "labels.png").stat().st_size > 0
  norm = fs.plot_label_distribution(data.label_histogram(), normalize=True, kind="heatmap")
  assert norm.axes[0].images[0].get_array().shape == (5, 7)
  assert len(norm.axes) == 2   # the heat map and its colour bar
  assert len(fs.plot_label_distribution(data, kind="heatmap", colorbar=False).axes) == 1
  with pytest.raises(ValueError, match="kind must be"):
    fs.plot_label_distribution(data, kind="pie")
  with pytest.raises(ValueError, match="2 class names for 5 classes"):
    fs.plot_label_distribution(data, class_names=["a", "b"])
  assert math.isclose(sum(b.get_height() for b in fs.plot_label_distribution(
      data, normalize=True).axes[0].patches), 7.0)


def test_pyarrow_table_and_mapping_give_the_same_population():
  pa = pytest.importorskip("pyarrow", reason="comes with the 'hf' extra")
  cols = _table()
  table = pa.table({"f1": cols["f1"], "f2": cols["f2"], "label": cols["label"],
                    "client": cols["client"].tolist()})
  a = fs.adapters.from_table(table, ["f1", "f2"], "label", client_column="client")
  b = fs.adapters.from_table(cols, ["f1", "f2"], "label", client_column="client")
  np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
  np.testing.assert_array_equal(a.sizes, b.sizes)
  assert a.client_ids.tolist() == b.client_ids.tolist() == _groups(cols)[0]
