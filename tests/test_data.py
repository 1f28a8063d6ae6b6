"""Data layer: partitions, ragged storage, batching/masking, the IDX reader, built-in datasets."""

import gzip
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_sim as fs
from fedjax_sim.data import batch_indices, datasets, federated, partition

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)

# name -> extra parameters, for the seeded partitions
SEEDED = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "shards": {"shards_per_client": 2},
    "quantity_skew": {"exponent": 1.5},
}


def _labels(n=2000, k=10, seed=0):
  return np.random.default_rng(seed).integers(0, k, n)


def _assert_exact_cover(parts, n):
  """Every example in [0, n) is in exactly one part, and no part is empty."""
  assert all(len(p) > 0 for p in parts), [len(p) for p in parts]
  allidx = np.sort(np.concatenate(parts))
  np.testing.assert_array_equal(allidx, np.arange(n))


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# --- partitions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SEEDED))
def test_partition_exact_cover_and_deterministic(name):
  labels = _labels()
  parts = partition.make(name, labels, 40, seed=3, **SEEDED[name])
  assert len(parts) == 40
  _assert_exact_cover(parts, len(labels))
  assert _same(parts, partition.make(name, labels, 40, seed=3, **SEEDED[name]))
  assert not _same(parts, partition.make(name, labels, 40, seed=4, **SEEDED[name]))
  # the named function and make() agree
  assert _same(parts, getattr(partition, name)(labels, 40, seed=3, **SEEDED[name]))


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_partition_small_population_no_empty_client(name):
  """Many clients for few examples: still a non-empty exact cover."""
  labels = _labels(n=60, k=3, seed=1)
  # 2 shards each need 2 examples per client; Dirichlet(0.5) over 3 classes rarely fills 30
  num_clients = {"shards": 15, "dirichlet": 8}.get(name, 30)
  for seed in range(3):
    _assert_exact_cover(partition.make(name, labels, num_clients, seed=seed, **SEEDED[name]), 60)


def test_natural_partition():
  keys = np.random.default_rng(0).integers(0, 37, 1000) * 7 + 100     # 37 writers, odd ids
  parts = partition.natural(keys)
  assert len(parts) == len(np.unique(keys))
  _assert_exact_cover(parts, len(keys))
  client_keys = [np.unique(keys[p]) for p in parts]
  assert all(k.size == 1 for k in client_keys)                       # one writer per client
  np.testing.assert_array_equal([k[0] for k in client_keys], np.unique(keys))   # sorted order
  assert _same(parts, partition.natural(keys))
  # string keys
  skeys = np.array(["bob", "alice", "bob", "carol", "alice"])
  sp = partition.natural(skeys)
  assert [sorted(p.tolist()) for p in sp] == [[1, 4], [0, 2], [3]]


def _mean_tv(labels, parts, k):
  glob = np.bincount(labels, minlength=k) / len(labels)
  tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum() for p in parts]
  return float(np.mean(tvs))


def test_dirichlet_skew_grows_as_alpha_falls():
  labels = np.repeat(np.arange(10), 500)
  tv = {a: _mean_tv(labels, partition.dirichlet(labels, 20, a, seed=0), 10)
        for a in (0.1, 1.0, 100.0)}
  assert tv[0.1] > tv[1.0] > tv[100.0], tv
  assert tv[100.0] < 0.1 and tv[0.1] > 0.5, tv


def test_dirichlet_min_size_respected():
  labels = _labels(1000)
  parts = partition.dirichlet(labels, 20, 0.3, seed=1, min_size=10)
  assert min(len(p) for p in parts) >= 10
  _assert_exact_cover(parts, 1000)


def test_shards_few_labels_per_client():
  labels = np.sort(np.random.default_rng(0).integers(0, 10, 6000))      # label-sorted, ~600/class
  parts = partition.shards(labels, 100, shards_per_client=2, seed=0)
  distinct = np.array([np.unique(labels[p]).size for p in parts])
  assert np.mean(distinct <= 2) >= 0.9, np.bincount(distinct)
  assert distinct.max() <= 4
  assert {len(p) for p in parts} <= {60, 61, 62}                      # equal shards
  # and the IID split of the same labels is far more mixed
  iid_distinct = [np.unique(labels[p]).size for p in partition.iid(labels, 100, seed=0)]
  assert np.mean(iid_distinct) > 8


def test_quantity_skew_unequal_sizes():
  labels = _labels(10000)
  parts = partition.quantity_skew(labels, 50, exponent=1.5, seed=0)
  sizes = np.array([len(p) for p in parts])
  assert sizes.sum() == 10000
  assert sizes.min() >= 1
  assert sizes.max() / sizes.min() > 5, sizes
  iid_sizes = [len(p) for p in partition.iid(labels, 50)]
  assert max(iid_sizes) - min(iid_sizes) <= 1


# --- batching (properties) ------------------------------------------------------------------------
# Every distinct (cohort size, batch size, epochs/steps, max client size) is a new XLA compile
# (~1 s on 2 cores), so the static configuration comes from a short list; Hypothesis varies the
# client sizes (ragged, any value up to the bound), the client ids and the key freely.
_batch_indices = jax.jit(batch_indices, static_argnames=("work", "max_client_size"))
COHORT = 4
EPOCH_CONFIGS = [(1, 1, 6), (4, 2, 23), (7, 1, 20), (5, 3, 10)]      # (batch, epochs, max size)
STEP_CONFIGS = [(1, 5, 6), (4, 3, 23), (7, 6, 20), (3, 11, 9)]       # (batch, steps, max size)


@st.composite
def _cohort(draw, configs):
  batch, amount, max_size = draw(st.sampled_from(configs))
  sizes = draw(st.lists(st.integers(1, max_size), min_size=COHORT, max_size=COHORT))
  ids = draw(st.lists(st.integers(0, 10**6), min_size=COHORT, max_size=COHORT, unique=True))
  seed = draw(st.integers(0, 2**31 - 1))
  return batch, amount, max_size, np.array(sizes), np.array(ids), seed


def _rows(sizes, ids, work, max_size, seed):
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  rows, mask = _batch_indices(jax.random.key(seed), ids, offsets, sizes, work=work,
                              max_client_size=max_size)
  return np.asarray(rows), np.asarray(mask), offsets


@pytest.mark.slow
@PROPERTY
@given(_cohort(EPOCH_CONFIGS))
def test_epoch_mode_each_example_once_per_epoch(cohort):
  batch, epochs, max_size, sizes, ids, seed = cohort
  work = fs.LocalWork(batch, local_epochs=epochs)
  rows, mask, offsets = _rows(sizes, ids, work, max_size, seed)
  steps = work.num_steps(max_size)
  assert steps == epochs * -(-max_size // batch)
  assert rows.shape == mask.shape == (COHORT, steps, batch)
  assert rows.dtype == np.int32 and mask.dtype == np.bool_
  span = steps // epochs * batch                      # padded slots per pass
  for c, (off, n) in enumerate(zip(offsets, sizes)):
    r = rows[c].reshape(epochs, span)
    m = mask[c].reshape(epochs, span)
    for e in range(epochs):
      # the valid slots of each pass are the client's own rows, each exactly once
      np.testing.assert_array_equal(np.sort(r[e][m[e]]), np.arange(off, off + n))
    assert (~m).sum() == epochs * (span - n)           # masked slots are exactly the padding
    # padding sits at the end of each pass: valid slots come first
    assert all(m[e][:n].all() for e in range(epochs))


@pytest.mark.slow
@PROPERTY
@given(_cohort(STEP_CONFIGS))
def test_step_mode_rows_belong_to_client(cohort):
  batch, steps, max_size, sizes, ids, seed = cohort
  work = fs.LocalWork(batch, local_epochs=None, local_steps=steps)
  rows, mask, offsets = _rows(sizes, ids, work, max_size, seed)
  assert work.num_steps(max_size) == steps
  assert rows.shape == mask.shape == (COHORT, steps, batch)
  assert mask.all()
  for c, (off, n) in enumerate(zip(offsets, sizes)):
    r = rows[c].reshape(-1)
    assert r.min() >= off and r.max() < off + n
    # passes are reshuffled but complete: every example used floor or ceil of (slots / n) times
    counts = np.bincount(r - off, minlength=n)
    assert counts.max() - counts.min() <= 1, counts


@PROPERTY
@given(st.integers(1, 60), st.data())
def test_from_partition_random_partitions(n, data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  num_clients = data.draw(st.integers(1, n))
  keep = data.draw(st.integers(num_clients, n))      # the other examples belong to no client
  perm = rng.permutation(n)[:keep]
  cuts = np.sort(rng.choice(np.arange(1, keep), num_clients - 1, replace=False)) if keep > 1 else []
  parts = np.split(perm, cuts)
  x = np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32)
  y = (np.arange(n) % 3).astype(np.int32)
  d = fs.FederatedData.from_partition({"x": x, "y": y}, parts, num_classes=3)
  assert d.num_clients == num_clients and d.num_examples == keep
  np.testing.assert_array_equal(d.sizes, [len(p) for p in parts])
  for p, idx in enumerate(parts):
    c = d.client(p)
    np.testing.assert_array_equal(c["x"][:, 0], idx)     # the client's own rows, in order
    np.testing.assert_array_equal(c["y"], idx % 3)
  got = np.sort(d.arrays["x"][:, 0]).astype(np.int64)
  np.testing.assert_array_equal(got, np.sort(perm))        # each kept example exactly once
  # the full pipeline: one epoch of cohort batches covers each client's examples once (fixed
  # shapes, so one compile: 3 positions drawn with replacement, batch 8, size bound 60)
  cohort = rng.integers(0, num_clients, 3)
  b = d.cohort_batches(jax.random.key(data.draw(st.integers(0, 99))), cohort,
                       fs.LocalWork(8, local_epochs=1), max_client_size=60)
  assert b.x.shape == (3, 8, 8, 2)
  for i, p in enumerate(cohort):
    np.testing.assert_array_equal(np.sort(b.x[i][b.mask[i]][:, 0]), np.sort(parts[p]))
    np.testing.assert_array_equal(b.y[i][b.mask[i]], b.x[i][b.mask[i]][:, 0].astype(int) % 3)


def test_shuffles_depend_on_key_not_cohort_position(ragged_data):
  work = fs.LocalWork(16, local_epochs=2)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a = ragged_data.cohort_batches(k1, [3, 5, 11], work)
  b = ragged_data.cohort_batches(k1, [3, 5, 11], work)
  c = ragged_data.cohort_batches(k2, [3, 5, 11], work)
  for f in ("x", "y", "mask"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert not np.array_equal(a.x, c.x)
  np.testing.assert_array_equal(a.mask, c.mask)     # masks depend only on sizes
  # the two epochs within one round are shuffled differently (client 11 has 200 examples)
  spe = fs.LocalWork(16).steps_per_epoch(ragged_data.max_client_size)
  assert not np.array_equal(a.x[2, :spe], a.x[2, spe:])
  # client 5's rows do not depend on its place in the cohort or on its companions
  for cohort, i in (([3, 5], 1), ([5, 3], 0), ([11, 0, 5], 2)):
    o = ragged_data.cohort_batches(k1, cohort, work)
    np.testing.assert_array_equal(o.x[i], a.x[1])
    np.testing.assert_array_equal(o.mask[i], a.mask[1])


def test_step_mode_reshuffles_each_pass(ragged_data):
  """Client 3 has 20 examples; 10 steps of 4 are two full passes, in different orders."""
  b = ragged_data.cohort_batches(jax.random.key(0), [3], fs.LocalWork(4, None, 10))
  ids = b.x[0].reshape(40, 8)[:, 0]
  first, second = ids[:20], ids[20:]
  np.testing.assert_array_equal(np.sort(first), np.sort(second))    # each pass is complete
  assert np.unique(first).size == 20
  assert not np.array_equal(first, second)


def test_cohort_batches_shapes_and_bad_positions(ragged_data):
  work = fs.LocalWork(16, local_epochs=1)
  b = ragged_data.cohort_batches(jax.random.key(0), [0, 11], work)
  steps = work.num_steps(200)
  assert b.x.shape == (2, steps, 16, 8) and b.y.shape == b.mask.shape == (2, steps, 16)
  assert b.mask[0].sum() == 1 and b.mask[1].sum() == 200
  with pytest.raises(ValueError, match="positions"):
    ragged_data.cohort_batches(jax.random.key(0), [12], work)
  with pytest.raises(ValueError, match="positions"):
    ragged_data.cohort_batches(jax.random.key(0), [], work)


def test_local_work_num_steps():
  assert fs.LocalWork(10, 1).num_steps(25) == 3
  assert fs.LocalWork(10, 2).num_steps(25) == 6
  assert fs.LocalWork(10, 1).num_steps(30) == 3
  assert fs.LocalWork(100, 1).num_steps(5) == 1
  assert fs.LocalWork(10, None, 7).num_steps(1000) == 7


def test_federated_data_views():
  clients = [{"x": np.full((n, 2), i, np.float32), "y": np.full(n, i % 3, np.int32)}
             for i, n in enumerate([4, 1, 6])]
  d = fs.FederatedData.from_clients(clients, client_ids=["a", "b", "c"], num_classes=3)
  assert d.num_clients == 3 and d.num_examples == 11 and d.max_client_size == 6
  np.testing.assert_array_equal(d.offsets, [0, 4, 5, 11])
  np.testing.assert_array_equal(d.client(2)["x"], np.full((6, 2), 2))
  s = d.subset([2, 0])
  assert list(s.client_ids) == ["c", "a"]
  np.testing.assert_array_equal(s.sizes, [6, 4])
  np.testing.assert_array_equal(s.client(1)["x"], np.zeros((4, 2)))
  np.testing.assert_array_equal(d.label_histogram(), [[4, 0, 0], [0, 1, 0], [0, 0, 6]])
  assert "3 clients" in repr(d)


# --- IDX reader and Fashion-MNIST -----------------------------------------------------------------
def _idx_bytes(arr):
  header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  return header + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
  arr = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
  path = tmp_path / ("a-idx3-ubyte" + (".gz" if gz else ""))
  (gzip.open if gz else open)(path, "wb").write(_idx_bytes(arr))
  out = datasets.read_idx(path)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, arr)
  labels = np.arange(9, dtype=np.uint8)
  (tmp_path / "l").write_bytes(_idx_bytes(labels))
  np.testing.assert_array_equal(datasets.read_idx(str(tmp_path / "l")), labels)


def test_read_idx_other_dtype(tmp_path):
  arr = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
  (tmp_path / "f").write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 3) + arr.tobytes())
  np.testing.assert_array_equal(datasets.read_idx(tmp_path / "f"), arr)


@pytest.mark.parametrize("keep", [-1, -30, 7, 10])
def test_read_idx_truncated_raises(tmp_path, keep):
  """Truncated in the body (keep=-1, -30) or inside the header's dimensions (keep=7, 10 of 16)."""
  data = _idx_bytes(np.zeros((4, 5, 6), np.uint8))
  path = tmp_path / "t-idx3-ubyte"
  path.write_bytes(data[:keep])
  with pytest.raises(ValueError, match="t-idx3-ubyte.*truncated"):
    datasets.read_idx(path)


def test_read_idx_truncated_multibyte_and_trailing(tmp_path):
  arr = np.arange(6, dtype=">i4")
  data = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 6) + arr.tobytes()
  (tmp_path / "cut").write_bytes(data[:-1])            # mid-element
  with pytest.raises(ValueError, match="cut.*truncated"):
    datasets.read_idx(tmp_path / "cut")
  (tmp_path / "long").write_bytes(data + b"\0" * 4)    # one value too many
  with pytest.raises(ValueError, match="long.*expected 6 values"):
    datasets.read_idx(tmp_path / "long")


def test_read_idx_truncated_gz_raises(tmp_path):
  raw = gzip.compress(_idx_bytes(np.arange(200, dtype=np.uint8).reshape(10, 20)))
  path = tmp_path / "t.gz"
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match=r"t\.gz.*truncated"):
    datasets.read_idx(path)


def test_read_idx_bad_magic(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="magic"):
    datasets.read_idx(tmp_path / "bad")
  (tmp_path / "bad2").write_bytes(b"\x00\x00\x42\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="element type"):
    datasets.read_idx(tmp_path / "bad2")


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", ())
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
  with pytest.raises(datasets.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
    datasets.fashion_mnist(data_dir=tmp_path)
  assert issubclass(datasets.DatasetNotFoundError, FileNotFoundError)
  # the env var is looked at too (and named in the message)
  monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(datasets.DatasetNotFoundError, match="nowhere"):
    datasets.fashion_mnist()


def test_fashion_mnist_from_folder(tmp_path, monkeypatch):
  """A folder with the four files (mixed gz / plain) is found via the env var."""
  monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", ())
  rng = np.random.default_rng(0)
  files = {"train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)).astype(np.uint8),
           "train-labels-idx1-ubyte": rng.integers(0, 10, 6).astype(np.uint8),
           "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)).astype(np.uint8),
           "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3).astype(np.uint8)}
  for i, (name, arr) in enumerate(files.items()):
    if i % 2:
      gzip.open(tmp_path / (name + ".gz"), "wb").write(_idx_bytes(arr))
    else:
      (tmp_path / name).write_bytes(_idx_bytes(arr))
  monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
  train, test = datasets.fashion_mnist()
  assert train["x"].shape == (6, 784) and test["x"].shape == (3, 784)
  assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
  np.testing.assert_array_equal(   # the same float32 values as astype(float32) / 255
      train["x"], files["train-images-idx3-ubyte"].reshape(6, -1).astype(np.float32) / 255.0)
  assert all(a.ctypes.data % 64 == 0 for d in (train, test) for a in d.values())
  np.testing.assert_array_equal(test["y"], files["t10k-labels-idx1-ubyte"])
  train, _ = datasets.fashion_mnist(flatten=False)
  assert train["x"].shape == (6, 28, 28, 1)
  # mismatched image / label counts
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
  with pytest.raises(ValueError, match="disagree"):
    datasets.fashion_mnist()


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIRS[0]),
                    reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_installed(monkeypatch):
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
  train, test = datasets.fashion_mnist()
  assert train["x"].shape == (60000, 784) and test["x"].shape == (10000, 784)
  assert train["y"].shape == (60000,) and test["y"].shape == (10000,)
  for d in (train, test):
    assert d["x"].dtype == np.float32
    assert d["x"].min() >= 0.0 and d["x"].max() <= 1.0 and d["x"].max() > 0.99
    np.testing.assert_array_equal(np.unique(d["y"]), np.arange(10))
  assert np.all(np.bincount(train["y"]) == 6000)


def test_digits():
  pytest.importorskip("sklearn")
  train, test = datasets.digits()
  assert train["x"].shape[1] == 64 and len(train["y"]) + len(test["y"]) == 1797
  assert 0 <= train["x"].min() and train["x"].max() <= 1
  np.testing.assert_array_equal(np.unique(train["y"]), np.arange(10))
  assert all(a.ctypes.data % 64 == 0 for d in (train, test) for a in d.values())


# --- synthetic ------------------------------------------------------------------------------------
def test_synthetic():
  train, test = datasets.synthetic(1, 1, seed=0)
  assert train.num_clients == test.num_clients == 30
  assert train.num_classes == test.num_classes == 10
  assert train.arrays["x"].shape[1:] == (60,) and test.arrays["x"].shape[1:] == (60,)
  assert train.arrays["x"].dtype == np.float32
  for d in (train, test):
    y = d.arrays["y"]
    assert y.min() >= 0 and y.max() < 10
  assert np.all(train.sizes + test.sizes >= 50)
  assert np.all(test.sizes >= 1) and np.all(train.sizes > test.sizes)
  np.testing.assert_array_equal(train.client_ids, test.client_ids)
  # sizes are log-normal: very unequal
  assert train.sizes.max() > 5 * train.sizes.min()
  # label histogram: one row per client, counts add up
  h = train.label_histogram()
  assert h.shape == (30, 10)
  np.testing.assert_array_equal(h.sum(1), train.sizes)
  # deterministic per seed
  again, _ = datasets.synthetic(1, 1, seed=0)
  np.testing.assert_array_equal(again.arrays["x"], train.arrays["x"])
  np.testing.assert_array_equal(again.offsets, train.offsets)
  other, _ = datasets.synthetic(1, 1, seed=1)
  assert (other.num_examples != train.num_examples
          or not np.array_equal(other.arrays["x"], train.arrays["x"]))


def test_synthetic_iid_and_heterogeneity():
  train, test = datasets.synthetic(0, 0, iid=True, num_clients=10, seed=0)
  assert train.num_clients == 10 and train.arrays["x"].shape[1] == 60
  assert train.label_histogram().shape == (10, 10)
  # Synthetic(1,1) clients have their own models -> label distributions differ more than IID's
  het, _ = datasets.synthetic(1, 1, num_clients=10, seed=0)

  def mean_tv(d):
    h = d.label_histogram().astype(float)
    glob = h.sum(0) / h.sum()
    return np.mean(0.5 * np.abs(h / h.sum(1, keepdims=True) - glob).sum(1))

  assert mean_tv(het) > mean_tv(train)
  with pytest.raises(ValueError, match="alpha"):
    datasets.synthetic(-1, 1)


def test_fixed_batch_order_reads_the_stored_order():
  """shuffle=False: FedJAX-style fixed order, independent of the key."""
  import jax.numpy as jnp
  offsets, sizes = jnp.asarray([0, 5]), jnp.asarray([5, 3])
  ids = jnp.asarray([0, 1])
  epochs = fs.LocalWork(batch_size=2, local_epochs=2, shuffle=False)
  rows, mask = batch_indices(jax.random.key(0), ids, offsets, sizes, epochs, 5)
  again, _ = batch_indices(jax.random.key(1), ids, offsets, sizes, epochs, 5)
  np.testing.assert_array_equal(rows, again)
  valid = [np.asarray(r)[np.asarray(m)].tolist() for r, m in zip(rows, mask)]
  assert valid == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [5, 6, 7, 5, 6, 7]]
  assert mask.shape == (2, 6, 2)   # 3 steps per pass (5 examples, B=2), 2 passes
  steps = fs.LocalWork(batch_size=2, local_epochs=None, local_steps=4, shuffle=False)
  rows, mask = batch_indices(jax.random.key(0), ids, offsets, sizes, steps, 5)
  assert np.asarray(mask).all()
  assert np.asarray(rows).reshape(2, -1).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2],
                                                       [5, 6, 7, 5, 6, 7, 5, 6]]


def test_population_exists_once_on_a_cpu():
  """from_partition copies only when the partition reorders rows, into an aligned buffer that the
  CPU device then uses in place; the population keeps no second host copy after to_device."""
  from fedjax_sim import engine
  x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
  y = np.arange(300, dtype=np.int32) % 3
  parts = [np.arange(i * 30, (i + 1) * 30) for i in range(10)]
  same = fs.FederatedData.from_partition({"x": x, "y": y}, parts, num_classes=3)
  assert np.shares_memory(same.arrays["x"], x)                 # rows already in client order
  data = fs.FederatedData.from_partition({"x": x, "y": y}, parts[::-1], num_classes=3)
  host = data.arrays["x"]
  assert not np.shares_memory(host, x) and host.ctypes.data % 64 == 0
  np.testing.assert_array_equal(data.client(0)["x"], x[270:])
  dev = engine.to_device(data)
  assert dev.x.unsafe_buffer_pointer() == host.ctypes.data     # no copy to the device
  assert data.device_arrays["x"] is dev.x and np.shares_memory(data.arrays["x"], host)
  assert engine.to_device(data).x is dev.x                     # reused, not copied again
  with pytest.raises(ValueError, match="more than one client"):
    fs.FederatedData.from_partition({"x": x, "y": y}, [np.arange(10), np.arange(5, 15)])


def _unaligned_owned(shape, dtype=np.float32, seed=0):
  """A random array that owns its data and does not start on a 64-byte boundary."""
  rng, taken = np.random.default_rng(seed), []
  for _ in range(64):
    a = np.empty(shape, dtype)
    if a.ctypes.data % 64:
      a[...] = rng.normal(size=shape)
      return a
    taken.append(a)   # held, so the next one lands elsewhere
  pytest.skip("the allocator returned only 64-byte aligned arrays")


def _rss_peak_growth(fn):
  """(fn(), growth of the process's peak RSS in bytes during fn) on Linux, after resetting the
  peak (``clear_refs``); None where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return fn(), None
  kb = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0])  # noqa
  before = kb("VmRSS")
  out = fn()
  return out, (kb("VmHWM") - before) * 1024


def test_move_to_aligned_releases_a_sole_array_as_it_copies(monkeypatch):
  """An array nobody else holds is moved block by block (peak about one block over the data);
  one the caller still holds is copied whole and left as it was."""
  monkeypatch.setattr(federated, "_MOVE_BLOCK_BYTES", 1 << 20)
  shape = (1 << 16, 128)                                         # 32 MB of float32
  a = _unaligned_owned(shape)
  expect = a.copy()
  out, growth = _rss_peak_growth(lambda: federated._move_to_aligned([a]))
  np.testing.assert_array_equal(out, expect)
  assert out.ctypes.data % 64 == 0
  # `a` was still bound here, so this was a copy: the original is intact.
  assert a.shape == shape and np.array_equal(a, expect)
  if growth is not None:
    assert growth > 0.9 * a.nbytes
  box = [a]
  del a
  out, growth = _rss_peak_growth(lambda: federated._move_to_aligned(box))
  assert box == []
  np.testing.assert_array_equal(out, expect)
  assert out.ctypes.data % 64 == 0
  if growth is not None:
    assert growth < 0.25 * expect.nbytes, growth
  view = expect[1:]                                               # views are copied, not moved
  np.testing.assert_array_equal(federated._move_to_aligned([view]), expect[1:])


def test_reordering_partition_copies_the_data_once():
  """A partition that reorders rows costs one copy of the features at the peak, not two."""
  x = np.random.default_rng(0).normal(size=(1 << 16, 128)).astype(np.float32)   # 32 MB
  y = np.zeros(x.shape[0], np.int32)
  parts = np.array_split(np.random.default_rng(1).permutation(x.shape[0]), 64)
  data, growth = _rss_peak_growth(lambda: fs.FederatedData.from_partition({"x": x, "y": y},
                                                                          parts))
  np.testing.assert_array_equal(data.client(5)["x"], x[parts[5]])
  if growth is not None:
    assert growth < 1.5 * x.nbytes, growth / x.nbytes


def test_device_array_keeps_one_copy_of_unaligned_numpy_input():
  """The README path with plain NumPy arrays (16-byte aligned) on a CPU: the population moves
  its features into aligned memory that the device then uses in place, and the batches are the
  ones the stored order gives."""
  x = _unaligned_owned((600, 6))
  y = (np.arange(600) % 3).astype(np.int32)
  expect_x, expect_y = x.copy(), y.copy()
  parts = [np.arange(i * 20, (i + 1) * 20) for i in range(30)]
  data = fs.FederatedData.from_partition({"x": x, "y": y}, parts, num_classes=3)
  del x
  dev_x = data.device_array("x")
  np.testing.assert_array_equal(np.asarray(dev_x), expect_x)
  if jax.local_devices()[0].platform == "cpu":
    assert dev_x.unsafe_buffer_pointer() == data.arrays["x"].ctypes.data     # one copy in all
    assert dev_x.unsafe_buffer_pointer() % 64 == 0
  assert data.device_array("x") is dev_x and data.device_arrays["x"] is dev_x
  np.testing.assert_array_equal(data.client(3)["x"], expect_x[60:80])
  dev_y = data.device_array("y", np.int16)
  np.testing.assert_array_equal(np.asarray(dev_y), expect_y)
  assert "y" not in data.device_arrays          # a cast is not kept in place of the feature
  # The caller still holds its array: it is left untouched, the device gets equal values.
  x2 = _unaligned_owned((600, 6), seed=1)
  data2 = fs.FederatedData.from_partition({"x": x2, "y": y}, parts, num_classes=3)
  before = x2.copy()
  np.testing.assert_array_equal(np.asarray(data2.device_array("x")), before)
  assert x2.shape == before.shape and np.array_equal(x2, before)
  # Same batches as before the move.
  work = fs.LocalWork(batch_size=8, local_epochs=1)
  b = data.cohort_batches(jax.random.key(0), [0, 5, 29], work)
  ref = fs.FederatedData.from_partition({"x": expect_x, "y": expect_y}, parts, num_classes=3)
  r = ref.cohort_batches(jax.random.key(0), [0, 5, 29], work)
  np.testing.assert_array_equal(b.x, r.x)
  np.testing.assert_array_equal(b.y, r.y)


def test_from_clients_is_aligned():
  rng = np.random.default_rng(0)
  clients = [{"x": rng.normal(size=(n, 3)).astype(np.float32), "y": np.zeros(n, np.int64)}
             for n in (3, 5, 2)]
  data = fs.FederatedData.from_clients(clients)
  assert all(a.ctypes.data % 64 == 0 for a in data.arrays.values())
  np.testing.assert_array_equal(data.arrays["x"], np.concatenate([c["x"] for c in clients]))
  assert data.arrays["y"].dtype == np.int64
  objects = np.array([[None] * 3] * 4, dtype=object)   # still the feature check's clear message
  for build in (lambda: fs.FederatedData.from_clients([{"x": objects, "y": np.zeros(4, int)}]),
                lambda: fs.FederatedData.from_partition({"x": objects, "y": np.zeros(4, int)},
                                                        [[1, 0], [2, 3]])):
    with pytest.raises(ValueError, match="feature 'x' has dtype object"):
      build()


def test_fortunes_missing_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.delenv(datasets.FORTUNES_ENV, raising=False)
  with pytest.raises(datasets.DatasetNotFoundError, match=r"apt-get install fortunes.*"
                     r"FEDJAX_SIM_FORTUNES_DIR") as e:
    datasets.fortunes(folder=tmp_path)
  assert "'computers'" in str(e.value) and str(tmp_path) in str(e.value)
  monkeypatch.setenv(datasets.FORTUNES_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(datasets.DatasetNotFoundError, match="nowhere"):
    datasets.fortunes()


def test_fortunes_reads_topic_files(tmp_path, monkeypatch):
  """Fortunes are separated by lines holding only %; whitespace collapses; empty ones are
  dropped; labels follow the order of ``topics``."""
  (tmp_path / "food").write_text("Eat\n  your  greens.\n%\nPie.\n%\n%\nSoup is\ngood\n")
  (tmp_path / "law").write_text("%\nObjection!\n%\n")
  monkeypatch.setenv(datasets.FORTUNES_ENV, str(tmp_path))
  texts, labels = datasets.fortunes(("law", "food"))
  assert texts == ["Objection!", "Eat your greens.", "Pie.", "Soup is good"]
  assert labels.dtype == np.int32 and labels.tolist() == [0, 1, 1, 1]
  texts, labels = datasets.fortunes(("food",), max_per_topic=2, seed=3, folder=tmp_path)
  assert len(texts) == 2 and set(texts) <= {"Eat your greens.", "Pie.", "Soup is good"}
  assert texts == datasets.fortunes(("food",), max_per_topic=2, seed=3, folder=tmp_path)[0]


@pytest.mark.skipif(not os.path.isfile(os.path.join(datasets.FORTUNES_DIR, "computers")),
                    reason="Debian's fortunes package is not installed")
def test_fortunes_installed(monkeypatch):
  monkeypatch.delenv(datasets.FORTUNES_ENV, raising=False)
  texts, labels = datasets.fortunes(max_per_topic=50)
  assert len(texts) == 250 and np.bincount(labels).tolist() == [50] * 5
  assert all(t and "\n" not in t for t in texts)


@pytest.mark.parametrize("work", [
    fs.data.federated.LocalWork(8, local_epochs=2),
    fs.data.federated.LocalWork(8, local_epochs=None, local_steps=5),
    fs.data.federated.LocalWork(8, local_epochs=3, shuffle=False)])
def test_batch_indices_cost_follows_the_largest_client_of_the_call(work):
  """Tables are computed at the smallest bound holding the call's largest client, and equal the
  tables at the population's bound in every unmasked entry (same rows, same mask, same steps)."""
  from fedjax_sim.data import federated as fd
  key = jax.random.key(4)
  sizes = jnp.asarray([13, 1, 0, 40, 7], jnp.int32)
  offsets = jnp.asarray([0, 13, 14, 14, 54], jnp.int32)
  ids = jnp.asarray([3, 0, 9, 2, 5], jnp.int32)
  rows, mask = fd.batch_indices(key, ids, offsets, sizes, work, 5000)
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(ids)
  ref_rows, ref_mask = jax.vmap(lambda k, o, n: fd._client_indices(k, o, n, work, 5000))(
      keys, offsets, sizes)
  assert rows.shape == ref_rows.shape and rows.dtype == jnp.int32
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_array_equal(np.where(mask, rows, -1), np.where(ref_mask, ref_rows, -1))
  # and the shuffle is a permutation of each client's own rows, once per epoch
  m, r = np.asarray(mask), np.asarray(rows)
  for i, (o, n) in enumerate(zip(np.asarray(offsets), np.asarray(sizes))):
    got = np.sort(r[i][m[i]])
    if work.local_steps is None:
      np.testing.assert_array_equal(got, np.sort(np.tile(np.arange(o, o + n), work.local_epochs)))


@pytest.mark.parametrize("work", [
    fs.data.federated.LocalWork(8, local_epochs=2),
    fs.data.federated.LocalWork(8, local_epochs=None, local_steps=5)])
def test_batch_indices_min_client_size_only_prunes_bounds(work):
  """A population's smallest size prunes the shuffle bounds no call can pick: the tables equal
  those of an unknown minimum in every unmasked entry, for clients of that size and above and
  for an all-padding call."""
  from fedjax_sim.data import federated as fd
  key = jax.random.key(7)
  for sizes in ([600, 0, 450, 800], [450, 450, 0, 0], [0, 0, 0, 0]):
    sizes = jnp.asarray(sizes, jnp.int32)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)[:-1]])
    ids = jnp.asarray([2, 0, 5, 1], jnp.int32)
    ref_rows, ref_mask = fd.batch_indices(key, ids, offsets, sizes, work, 5000)
    rows, mask = fd.batch_indices(key, ids, offsets, sizes, work, 5000, min_client_size=450)
    assert rows.shape == ref_rows.shape
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(np.where(mask, rows, -1), np.where(ref_mask, ref_rows, -1))
