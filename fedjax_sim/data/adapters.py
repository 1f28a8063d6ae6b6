"""Populations from the tables researchers already hold: a Hugging Face ``datasets.Dataset``
(in memory, or read from local Arrow/Parquet files), a pandas ``DataFrame``, a ``pyarrow.Table``
or a plain mapping of columns.

Columns are chosen by name: ``features`` (one column of vectors/arrays, or several scalar
columns stacked into ``x [N, F]``) and ``label`` (``y [N]``). Clients come either from a
``client_column`` (the natural partition: one client per distinct value, client sizes = group
sizes, clients named by the values) or from a ``partitioner`` (one of the flwr-datasets-named
classes of :mod:`fedjax_sim.partition`, e.g. ``DirichletPartitioner(10, "label", alpha=0.5)``)::

  >>> import numpy as np, pandas as pd, fedjax_sim as fs
  >>> df = pd.DataFrame({"age": [30., 41, 52, 29, 60], "bmi": [21., 25, 30, 19, 27],
  ...                    "sick": [0, 1, 1, 0, 1], "hospital": ["a", "b", "b", "a", "b"]})
  >>> data = fs.adapters.from_pandas(df, ["age", "bmi"], "sick", client_column="hospital")
  >>> data.client_ids.tolist(), data.sizes.tolist()
  (['a', 'b'], [2, 3])

Nothing here downloads: a Hugging Face data set is one you loaded (``load_from_disk``,
``Dataset.from_parquet``, ``Dataset.from_pandas``...) or local files read by :func:`read_table`.
Bad input raises a ``ValueError`` naming the column before anything is built: a missing column
(with the ones there are), text or other non-numeric features, missing values, NaN/inf,
non-integer class labels, ragged array columns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedjax_sim.data import partition as _partition
from fedjax_sim.data.federated import FederatedData, aligned_copy

__all__ = ["column", "column_names", "from_huggingface", "from_pandas", "from_table",
           "num_rows", "read_table", "to_arrays"]


def _kind(table) -> str:
  """'hf', 'pandas', 'arrow' or 'mapping' (anything else is a TypeError)."""
  mod = type(table).__module__
  if mod.startswith("datasets") and hasattr(table, "column_names"):
    if not hasattr(table, "num_rows") or isinstance(table.num_rows, dict):   # a DatasetDict
      raise ValueError(f"got a datasets.DatasetDict with splits {list(table)}; pass one split, "
                       f"e.g. ds[{next(iter(table), 'train')!r}]")
    if "Iterable" in type(table).__name__:   # streamed: no length, no random access
      raise ValueError(f"got a {type(table).__name__}; load the data set into memory first "
                       "(streaming=False)")
    return "hf"
  if mod.startswith("pandas") and hasattr(table, "columns"):
    return "pandas"
  if mod.startswith("pyarrow") and hasattr(table, "column_names"):
    return "arrow"
  if isinstance(table, Mapping):
    return "mapping"
  raise TypeError(f"expected a datasets.Dataset, a pandas DataFrame, a pyarrow.Table or a "
                  f"mapping of column name -> array, got {type(table).__name__}")


def column_names(table) -> list[str]:
  """The table's column names."""
  kind = _kind(table)
  if kind == "pandas":
    return [str(c) for c in table.columns]
  if kind in ("hf", "arrow"):
    return list(table.column_names)
  return list(table)


def num_rows(table) -> int:
  """The table's number of rows (a mapping's columns must agree on it)."""
  kind = _kind(table)
  if kind == "mapping":
    lengths = {k: len(v) for k, v in table.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"the columns have different numbers of rows: {lengths}")
    return next(iter(lengths.values()), 0)
  return len(table)


def column(table, name: str, what: str = "column") -> np.ndarray:
  """Column ``name`` of ``table`` as a numpy array ``[N, ...]``: a column of equal-length
  lists/arrays becomes one array with a trailing axis per nesting level.

  Raises:
    ValueError: no such column (the message lists the columns), or a column of lists of
      different lengths.
  """
  names = column_names(table)
  if not isinstance(name, str) or name not in names:
    raise ValueError(f"{what} {name!r} is not a column of the table; its columns are "
                     f"{', '.join(map(repr, names))}")
  kind = _kind(table)
  if kind == "hf":
    a = table.select_columns([name]).with_format("numpy")[:][name]
  elif kind == "pandas":
    a = table[name].to_numpy()
  elif kind == "arrow":
    a = table.column(name).to_numpy(zero_copy_only=False)
  else:
    a = table[name]
  a = np.asarray(a) if not isinstance(a, np.ndarray) else a
  if a.dtype == object and a.size and all(isinstance(v, (list, tuple, np.ndarray)) for v in a):
    shapes = {np.shape(v) for v in a}
    if len(shapes) > 1:
      raise ValueError(f"{what} {name!r} holds arrays of different shapes ({len(shapes)} "
                       f"shapes, e.g. {sorted(shapes)[:3]}); pad or crop them to one shape")
    a = np.stack([np.asarray(v) for v in a])
  return a


def _numeric(name: str, a: np.ndarray, what: str) -> None:
  """ValueError unless ``a`` holds real numbers with no missing or non-finite value."""
  if a.dtype == object:
    flat = a.reshape(len(a), -1)
    bad = [r for r in range(len(flat)) if any(v is None or _is_na(v) for v in flat[r])]
    if bad:
      raise ValueError(f"{what} {name!r} has missing values (None/NA/NaN) in {len(bad)} row(s), "
                       f"first at row {bad[0]}; drop or fill them first")
    try:
      a = a.astype(np.float64)
    except (TypeError, ValueError):
      example = next((v for v in a.ravel() if not isinstance(v, (int, float, np.number))), None)
      raise ValueError(f"{what} {name!r} is not numeric (e.g. {example!r}); encode text or "
                       "categories as numbers first (pandas: pd.get_dummies or "
                       ".astype('category').cat.codes; datasets: ds.class_encode_column)") \
          from None
  if a.dtype.kind in "USO" or a.dtype.kind not in "biuf":
    example = a.ravel()[0] if a.size else None
    raise ValueError(f"{what} {name!r} has dtype {a.dtype} (e.g. {example!r}), not numbers; "
                     "encode text or categories as numbers first (pandas: pd.get_dummies or "
                     ".astype('category').cat.codes; datasets: ds.class_encode_column)")
  if a.dtype.kind == "f":
    finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if not finite.all():
      r = int(np.flatnonzero(~finite)[0])
      raise ValueError(f"{what} {name!r} has NaN/inf in {int((~finite).sum())} row(s), first at "
                       f"row {r}; drop or fill them first")


def _is_na(v) -> bool:
  try:
    return bool(v != v)   # NaN, pandas.NA (whose != raises TypeError in bool())
  except TypeError:
    return True


def _as_numbers(name: str, a: np.ndarray, what: str) -> np.ndarray:
  _numeric(name, a, what)
  return a.astype(np.float64) if a.dtype == object else a


def to_arrays(table, features: str | Sequence[str], label: str, *,
              task: str = "classification", dtype=np.float32) -> dict[str, np.ndarray]:
  """``{"x": [N, ...] dtype, "y": [N]}`` from a table (e.g. the test split, for ``eval_data``).

  Args:
    table: a ``datasets.Dataset``, pandas ``DataFrame``, ``pyarrow.Table`` or mapping of columns.
    features: one column name (its values scalars, vectors or fixed-shape arrays: ``x`` is
      ``[N]`` -> ``[N, 1]``, else ``[N, ...]``) or a list of columns of scalars or vectors,
      concatenated into ``x [N, F]``. Booleans and integers are cast to ``dtype`` as they are
      (a Hugging Face ``Image`` column gives its uint8 pixels, 0..255: rescale them yourself).
    label: the label column: integer classes (``task="classification"``; int32, bools as 0/1)
      or real targets (``task="regression"``; float32).
    task: ``"classification"`` or ``"regression"``.
    dtype: the dtype of ``x``.

  Raises:
    ValueError: a missing column, a non-numeric, missing (None/NA) or non-finite value, a
      label that is not an integer class (classification), the label among the features.
  """
  if task not in ("classification", "regression"):
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
  names = [features] if isinstance(features, str) else list(features)
  if not names:
    raise ValueError("features is empty: name at least one feature column")
  if label in names:
    raise ValueError(f"the label column {label!r} is also among the features {names}")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"feature columns named more than once: {dup}")
  cols = [_as_numbers(n, column(table, n, "feature column"), "feature column") for n in names]
  if isinstance(features, str):
    x = cols[0][:, None] if cols[0].ndim == 1 else cols[0]
  else:
    x = np.concatenate([c.reshape(len(c), -1) for c in cols], axis=1)
  y = column(table, label, "label column")
  if y.ndim != 1:
    raise ValueError(f"label column {label!r} holds arrays of shape {y.shape[1:]}; it must hold "
                     "one value per row")
  y = _as_numbers(label, y, "label column")
  if task == "classification":
    if y.dtype.kind == "f":
      raise ValueError(f"label column {label!r} holds floats ({y.dtype}); class labels must be "
                       "integers (cast the column, or pass task='regression' for real targets)")
    if y.size and y.min() < 0:
      r = int(np.argmin(y))
      raise ValueError(f"label column {label!r} has the negative label {int(y[r])} at row {r}; "
                       "classes must be 0..K-1")
    y = aligned_copy(y, np.int32)
  else:
    y = aligned_copy(y, np.float32)
  return {"x": aligned_copy(x, dtype), "y": y}


def _num_classes(table, label: str, y: np.ndarray) -> int | None:
  """The label column's number of classes: a Hugging Face ``ClassLabel``'s, else max + 1."""
  feat = getattr(table, "features", None)
  k = getattr(feat.get(label), "num_classes", None) if isinstance(feat, Mapping) else None
  return int(k) if k is not None else (int(y.max()) + 1 if y.size else None)


def from_table(table, features: str | Sequence[str], label: str, *,
               client_column: str | None = None, partitioner=None,
               num_classes: int | None = None, task: str = "classification",
               dtype=np.float32) -> FederatedData:
  """A population from a table, split by ``client_column`` or by ``partitioner``.

  Args:
    table: a ``datasets.Dataset``, pandas ``DataFrame``, ``pyarrow.Table`` or mapping of columns.
    features, label, task, dtype: the columns and types, as :func:`to_arrays`.
    client_column: a column of client ids (ints or strings): the natural partition, one client
      per distinct id (sorted), named by it; client sizes are the group sizes.
    partitioner: instead, a partitioner of :mod:`fedjax_sim.partition` (e.g.
      ``DirichletPartitioner(20, partition_by="label", alpha=0.3)``, whose ``partition_by``
      names a column of this table), or any callable from the table to one index array per
      client. A ``NaturalIdPartitioner(col)`` is the same as ``client_column=col``.
    num_classes: default: a Hugging Face ``ClassLabel``'s number of classes, else the largest
      label + 1 (classification only).

  Returns:
    A :class:`FederatedData` with ``x`` and ``y``. Rows the partitioner leaves out (e.g. a
    ``SizePartitioner`` whose sizes sum below N) are not in it.
  """
  if isinstance(partitioner, _partition.NaturalIdPartitioner):
    if client_column is not None:
      raise ValueError("give client_column or a NaturalIdPartitioner, not both")
    client_column, partitioner = partitioner.partition_by, None
  if (client_column is None) == (partitioner is None):
    raise ValueError("give exactly one of client_column= (the natural partition: one client per "
                     "distinct value) and partitioner= (e.g. fs.partition.IidPartitioner(10))")
  arrays = to_arrays(table, features, label, task=task, dtype=dtype)
  client_ids = None
  if client_column is not None:
    if client_column in ([features] if isinstance(features, str) else list(features)):
      raise ValueError(f"client_column {client_column!r} is also a feature column")
    keys = column(table, client_column, "client_column")
    if keys.ndim != 1:
      raise ValueError(f"client_column {client_column!r} must hold one id per row, got arrays "
                       f"of shape {keys.shape[1:]}")
    if keys.dtype == object or keys.dtype.kind == "f":
      bad = [i for i, v in enumerate(keys) if v is None or _is_na(v)]
      if bad:
        raise ValueError(f"client_column {client_column!r} has {len(bad)} missing id(s), first "
                         f"at row {bad[0]}; every row needs a client")
    if keys.dtype == object:
      types = {type(v).__name__ for v in keys}
      if len(types) > 1:
        raise ValueError(f"client_column {client_column!r} mixes id types {sorted(types)}; "
                         "use one (e.g. all strings)")
      keys = keys.astype(str) if types == {"str"} else keys
    parts = _partition.natural(keys)
    client_ids = np.unique(keys)
  else:
    if not callable(partitioner):
      raise TypeError(f"partitioner must be a partitioner (e.g. fs.partition.IidPartitioner(10)) "
                      f"or a callable, got {type(partitioner).__name__}")
    parts = partitioner(table)
  if task == "classification" and num_classes is None:
    num_classes = _num_classes(table, label, arrays["y"])
  return FederatedData.from_partition(arrays, parts, client_ids,
                                      num_classes if task == "classification" else None, task)


def from_huggingface(dataset, features: str | Sequence[str], label: str, **kwargs
                     ) -> FederatedData:
  """:func:`from_table` for a Hugging Face ``datasets.Dataset`` (one split, in memory or
  memory-mapped; never downloaded here). Its ``ClassLabel`` gives ``num_classes``."""
  if not type(dataset).__module__.startswith("datasets"):
    raise TypeError(f"from_huggingface expects a datasets.Dataset, got {type(dataset).__name__} "
                    "(from_table takes any table)")
  return from_table(dataset, features, label, **kwargs)


def from_pandas(frame, features: str | Sequence[str], label: str, **kwargs) -> FederatedData:
  """:func:`from_table` for a pandas ``DataFrame``."""
  if not type(frame).__module__.startswith("pandas") or not hasattr(frame, "columns"):
    raise TypeError(f"from_pandas expects a pandas DataFrame, got {type(frame).__name__} "
                    "(from_table takes any table)")
  return from_table(frame, features, label, **kwargs)


def read_table(path: str | os.PathLike | Sequence[str | os.PathLike]):
  """Local Parquet or Arrow files (``.parquet``; ``.arrow``, as ``Dataset.save_to_disk`` and the
  Hugging Face cache write them) as one ``datasets.Dataset``, memory-mapped where the format
  allows; a folder written by ``Dataset.save_to_disk`` is loaded with ``load_from_disk``.
  Needs the ``hf`` extra (``pip install 'fedjax_sim[hf]'``). Nothing is downloaded.
  """
  try:
    import datasets
  except ImportError as e:
    raise ImportError("read_table needs the Hugging Face datasets package: pip install "
                      "'fedjax_sim[hf]'") from e
  paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
  if not paths:
    raise ValueError("read_table: no path given")
  missing = [str(p) for p in paths if not p.exists()]
  if missing:
    raise FileNotFoundError(f"read_table: no such file or folder: {', '.join(missing)}")
  if len(paths) == 1 and paths[0].is_dir():
    ds = datasets.load_from_disk(str(paths[0]))
    return ds
  suffixes = {p.suffix for p in paths}
  if suffixes == {".parquet"}:
    import pyarrow as pa
    import pyarrow.parquet as pq
    return datasets.Dataset(pa.concat_tables([pq.read_table(p) for p in paths]))
  if suffixes == {".arrow"}:
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in paths])
  raise ValueError(f"read_table reads .parquet or .arrow files (all of one kind) or a "
                   f"save_to_disk folder; got suffixes {sorted(suffixes)}")
