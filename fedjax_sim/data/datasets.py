"""Built-in offline datasets. Nothing here downloads anything.

* :func:`fashion_mnist` reads the IDX files of Debian's ``dataset-fashion-mnist`` package (or any
  folder holding the four standard files, gzipped or not).
* :func:`digits` is scikit-learn's bundled 8x8 digits (1,797 images, no download).
* :func:`diabetes` is scikit-learn's bundled diabetes regression data (442 patients).
* :func:`synthetic` is the Synthetic(alpha, beta) generator of FedProx (Li et al., MLSys 2020,
  section 5.1 and ``data/synthetic_*/generate_synthetic.py`` of their code).
* :func:`fortunes` reads topic files of Debian's ``fortunes`` package as a small text
  classification task (the text part of the transfer-learning notebook and benchmark).

A missing data set raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) whose message
says how to install it; callers with an optional part catch it, print it and skip that part.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData, aligned_copy, take_rows, aligned_empty
from fedjax_sim.registry import Registry

# Dataset loaders by name (fedjax_sim.data registers shakespeare here too).
REGISTRY = Registry("dataset")

FASHION_MNIST_ENV = "FEDJAX_SIM_FASHION_MNIST_DIR"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FORTUNES_ENV = "FEDJAX_SIM_FORTUNES_DIR"
FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_TOPICS = ("computers", "food", "law", "politics", "sports")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


class DatasetNotFoundError(FileNotFoundError):
  """A built-in dataset's files are not on this machine (the message says how to get them)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzipped or not, into a numpy array."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile) as e:   # a truncated or corrupt .gz
    raise ValueError(f"{path}: cannot decompress ({e}); truncated or corrupt file?") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an IDX file (bad magic number)")
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if data[2] not in dtypes:
    raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: header of {header} bytes, file has only {len(data)} (truncated?)")
  shape = struct.unpack(">" + "I" * ndim, data[4:header])
  dtype = np.dtype(dtypes[data[2]])
  expected = int(np.prod(shape))
  if len(data) - header != expected * dtype.itemsize:
    raise ValueError(f"{path}: expected {expected} values ({expected * dtype.itemsize} bytes), "
                     f"found {len(data) - header} bytes (truncated?)")
  arr = np.frombuffer(data, dtype=dtype, offset=header)
  return arr.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
  for name in (stem + ".gz", stem):
    if (folder / name).is_file():
      return folder / name
  return None


@REGISTRY.register()
def fashion_mnist(data_dir: str | os.PathLike | None = None, flatten: bool = True):
  """Fashion-MNIST as ``(train, test)`` dicts of arrays ``{"x": float32 [N, 784] in [0, 1], "y": int32 [N]}``.

  ``flatten=False`` gives ``x`` of shape ``[N, 28, 28, 1]`` (for the CNN).

  The files are looked for in ``data_dir`` if given (only there: a folder given but lacking the
  files is an error, not a reason to read another copy), else in
  ``$FEDJAX_SIM_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist`` (Debian's
  ``dataset-fashion-mnist`` package).
  """
  if data_dir is not None and str(data_dir) == "":
    raise ValueError("data_dir is an empty string; give a folder, or None for the default places")
  candidates = [Path(p) for p in
                ([data_dir] if data_dir is not None else
                 ([os.environ[FASHION_MNIST_ENV]] if os.environ.get(FASHION_MNIST_ENV) else []) +
                 list(FASHION_MNIST_DIRS))]
  stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
           "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
  for folder in candidates:
    files = {k: _find(folder, s) for k, s in stems.items()}
    if all(files.values()):
      break
  else:
    if data_dir is not None:
      what = "does not exist" if not Path(data_dir).exists() else (
          "is not a folder" if not Path(data_dir).is_dir() else "lacks them")
      raise DatasetNotFoundError(
          f"data_dir {str(data_dir)!r} {what}: it must hold the four Fashion-MNIST IDX files "
          "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
          "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); omit it to read "
          f"${FASHION_MNIST_ENV} or the system copy (`sudo apt-get install "
          "dataset-fashion-mnist` on Debian/Ubuntu)")
    raise DatasetNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] and the other three) not found in "
        f"{', '.join(str(c) for c in candidates)}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four files in a "
        f"folder and pass it as data_dir= / --data-dir, or set ${FASHION_MNIST_ENV}.")

  def load(prefix):
    # 64-byte aligned, so that a CPU device uses them in place (see FederatedData.device_array).
    raw = read_idx(files[prefix + "_x"])
    x = np.divide(raw, np.float32(255.0), out=aligned_empty(raw.shape, np.float32))
    y = aligned_copy(read_idx(files[prefix + "_y"]), np.int32)
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"{files[prefix + '_x']} and {files[prefix + '_y']} disagree on the "
                       f"number of examples ({x.shape[0]} vs {y.shape[0]})")
    x = x.reshape(len(x), -1) if flatten else x[..., None]
    return {"x": x, "y": y}

  return load("train"), load("test")


@REGISTRY.register()
def digits(test_fraction: float = 0.25, seed: int = 0, flatten: bool = True):
  """scikit-learn's bundled 8x8 digits as ``(train, test)`` dicts; ``x`` scaled to [0, 1].

  ``x`` is ``[N, 64]`` float32 (``[N, 8, 8, 1]`` with ``flatten=False``), ``y`` int32 in [0, 10).
  """
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:   # pragma: no cover - depends on the environment
    raise ImportError("digits() needs scikit-learn: pip install 'fedjax_sim[datasets]'") from e
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  if not flatten:
    x = x.reshape(-1, 8, 8, 1)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  te, tr = perm[:n_test], perm[n_test:]
  return ({"x": take_rows(x, tr), "y": take_rows(y, tr)},
          {"x": take_rows(x, te), "y": take_rows(y, te)})


@REGISTRY.register()
def diabetes(test_fraction: float = 0.25, seed: int = 0):
  """scikit-learn's bundled diabetes regression data (Efron et al. 2004: 442 patients, 10
  baseline variables, a disease-progression score one year later) as ``(train, test)`` dicts.

  ``x`` is ``[N, 10]`` float32, standardised with the training split's mean and deviation; ``y``
  is the float32 score standardised likewise (train mean 0, deviation 1), so MSE reads as a
  fraction of the training variance and plain SGD's usual learning rates work. Build the population
  with ``FederatedData.from_partition(..., task="regression")``.
  """
  try:
    from sklearn.datasets import load_diabetes
  except ImportError as e:   # pragma: no cover - depends on the environment
    raise ImportError("diabetes() needs scikit-learn: pip install 'fedjax_sim[datasets]'") from e
  d = load_diabetes()
  x, y = np.asarray(d.data, np.float64), np.asarray(d.target, np.float64)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  te, tr = perm[:n_test], perm[n_test:]
  mu, sd = x[tr].mean(0), x[tr].std(0)
  y_mean, y_std = y[tr].mean(), y[tr].std()
  xs = ((x - mu) / sd).astype(np.float32)
  ys = ((y - y_mean) / y_std).astype(np.float32)
  return ({"x": take_rows(xs, tr), "y": take_rows(ys, tr)},
          {"x": take_rows(xs, te), "y": take_rows(ys, te)})


@REGISTRY.register()
def fortunes(topics: tuple[str, ...] = FORTUNES_TOPICS, max_per_topic: int | None = None,
             seed: int = 0, folder: str | os.PathLike | None = None):
  """Fortune cookies of a few topic files as ``(texts, labels)``: a text classification task.

  Each topic file holds fortunes separated by lines holding only ``%``; every fortune becomes one
  string (whitespace collapsed to single spaces) labelled with its topic's position in
  ``topics`` (``labels`` is int32 ``[N]``). With ``max_per_topic``, a random subset (drawn with
  ``seed``) of at most that many fortunes per topic is kept, in random order; without it, all
  of them, in file order.

  The files are looked for in ``folder``, else ``$FEDJAX_SIM_FORTUNES_DIR``, else
  ``/usr/share/games/fortunes`` (Debian's ``fortunes`` package, which the Makefile installs).

  Raises:
    DatasetNotFoundError: a topic file is missing (the message says how to install them).
  """
  folder = Path(folder or os.environ.get(FORTUNES_ENV) or FORTUNES_DIR)
  missing = [t for t in topics if not (folder / t).is_file()]
  if missing:
    raise DatasetNotFoundError(
        f"fortune topic files {missing} not found in {folder}. Install Debian's `fortunes` "
        "package (`sudo apt-get install fortunes`, or `make fortunes` in the repository as root), "
        f"or pass folder= / set ${FORTUNES_ENV} to a folder holding them.")
  rng = np.random.default_rng(seed)
  texts, labels = [], []
  for c, t in enumerate(topics):
    raw = (folder / t).read_text(encoding="utf-8", errors="replace")
    items, cur = [], []
    for line in raw.splitlines() + ["%"]:
      if line.strip() == "%":
        items.append(" ".join(" ".join(cur).split()))
        cur = []
      else:
        cur.append(line)
    items = [s for s in items if s]
    order = rng.permutation(len(items))[:max_per_topic] if max_per_topic is not None else \
        range(len(items))
    texts += [items[i] for i in order]
    labels += [c] * len(order)
  return texts, np.asarray(labels, np.int32)


@REGISTRY.register()
def synthetic(alpha: float = 1.0, beta: float = 1.0, iid: bool = False, num_clients: int = 30,
              seed: int = 0, test_fraction: float = 0.1):
  """FedProx's Synthetic(alpha, beta) federated data, as ``(train, test)`` FederatedData.

  Definition (Li et al. 2020, section 5.1; their generator, reproduced here with a seed): device
  k has ``lognormal(4, 2) + 50`` samples; ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``;
  ``W_k ~ N(u_k, 1)`` of shape [60, 10], ``b_k ~ N(u_k, 1)`` of shape [10]; features
  ``x ~ N(v_k, Sigma)`` with ``v_k ~ N(B_k, 1)`` per coordinate and ``Sigma = diag(j^-1.2)``;
  label ``y = argmax(softmax(W_k^T x + b_k))``. ``iid=True`` is their Synthetic-IID: one shared
  ``W, b ~ N(0, 1)`` and ``v_k = B_k`` (all zero when ``beta = 0``). Each device keeps
  ``test_fraction`` of its samples (the last ones) for its test set.
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or \
      num_clients <= 0:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  # A device holds lognormal(4, 2) + 50 samples: exp(6) + 50 ~ 453 on average, 61 float64 values
  # each while generated. Refuse up front what cannot fit rather than die in a MemoryError.
  need = num_clients * 453 * 61 * 8
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if need > memory // 2:
    raise ValueError(f"num_clients={num_clients}: the synthetic dataset would need about "
                     f"{need / 1e9:.3g} GB, more than half of this machine's "
                     f"{memory / 1e9:.1f} GB; use fewer clients (or "
                     "fedjax_sim.data.procedural for populations generated on demand)")
  rng = np.random.default_rng(seed)
  dim, num_classes = 60, 10
  sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  mean_w = rng.normal(0, alpha, num_clients)
  b_dev = rng.normal(0, beta, num_clients)
  std_x = np.sqrt(np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2))
  if iid:
    w_global = rng.normal(0, 1, (dim, num_classes))
    b_global = rng.normal(0, 1, num_classes)
  train, test = [], []
  for k in range(num_clients):
    mean_x = np.full(dim, b_dev[k]) if iid else rng.normal(b_dev[k], 1, dim)
    if iid:
      w, b = w_global, b_global
    else:
      w = rng.normal(mean_w[k], 1, (dim, num_classes))
      b = rng.normal(mean_w[k], 1, num_classes)
    x = mean_x + std_x * rng.standard_normal((sizes[k], dim))
    y = np.argmax(x @ w + b, axis=1)
    n_train = max(1, int(round((1 - test_fraction) * sizes[k])))
    train.append({"x": x[:n_train].astype(np.float32), "y": y[:n_train].astype(np.int32)})
    test.append({"x": x[n_train:].astype(np.float32), "y": y[n_train:].astype(np.int32)})
  ids = np.arange(num_clients)
  return (FederatedData.from_clients(train, ids, num_classes),
          FederatedData.from_clients(test, ids, num_classes))
