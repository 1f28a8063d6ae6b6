"""Parsing: a nested mapping (a config file, ``--set`` values) onto a :class:`Config`.

Fixed keys are type-checked as they are set; registry tables are checked against their entry's
factory signature (:func:`parse_table`). The ``[algorithm]`` options beyond the fixed keys and the
``[dataset]`` loader options are kept as given and checked by :func:`check_options` once the
algorithm and dataset names are final (a flag may change them).
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from fedjax_sim.cli.schema import (ALGORITHM_TABLE, LEAF, SECTIONS, TABLES, Config, ConfigError,
                                   Table, coerce, config_type, describe_value, type_name)


def unknown_key(key: str, valid, where: str, what: str = "") -> ConfigError:
  """The error for an unknown dotted ``key``: the closest valid key, or all of them."""
  leaf = key.rsplit(".", 1)[-1]
  close = difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1)
  hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
  return ConfigError(f"{where}: unknown key {key!r}{what}{hint}")


def set_value(cfg: Config, key: str, value, where: str):
  """Type-checks ``value`` for the fixed dotted ``key`` and sets it on ``cfg``."""
  tp = LEAF[key][1]
  try:
    value = coerce(value, tp)
  except TypeError:
    raise ConfigError(f"{where}: {key} must be {type_name(tp)}, got {describe_value(value)}"
                      ) from None
  target = cfg
  *sections, name = key.split(".")
  for s in sections:
    target = getattr(target, s)
  setattr(target, name, value)


def check_options(key: str, name: str, options: dict, where, table: Table) -> dict:
  """``options`` of entry ``name`` of ``table.registry``, coerced to their config types.
  ConfigError naming ``key`` for an unknown option, one set elsewhere (``table.set_by``), a
  value of the wrong type, a non-finite number or a missing required option. ``where``: the
  source of every option, or a function ``option -> source``."""
  src = where if callable(where) else (lambda _: where)
  reg = table.registry
  schema = reg.schema(name)
  settable = [o for o in schema if o not in table.set_by]
  out = {}
  for k, v in options.items():
    k = str(k)
    if k in table.set_by:
      raise ConfigError(f"{src(k)}: {key}.{k} is set by {table.set_by[k]}, not in [{key}]")
    if k not in schema:
      if reg.accepts_any(name):
        out[k] = v   # the factory takes **kwargs it does not declare: passed unchecked
        continue
      raise unknown_key(f"{key}.{k}", [f"{key}.{o}" for o in settable], src(k),
                        f" (not an option of {reg.kind} {name!r})")
    tp = config_type(schema[k])
    if tp is None:
      raise ConfigError(f"{src(k)}: {key}.{k} of {reg.kind} {name!r} cannot be given in a "
                        f"config file (it takes {schema[k].annotation}); use the Python API")
    try:
      v = coerce(v, tp)
    except TypeError:
      raise ConfigError(f"{src(k)}: {key}.{k} must be {type_name(tp)}, got "
                        f"{describe_value(v)}") from None
    for x in v if isinstance(v, list) else [v]:
      if isinstance(x, float) and not math.isfinite(x):
        raise ConfigError(f"{src(k)}: {key}.{k} must be finite, got {x}")
    out[k] = v
  missing = [o for o in settable if schema[o].required and o not in out]
  if missing:
    raise ConfigError(f"{src('name')}: [{key}] {name!r} needs {', '.join(missing)} "
                      f"({reg.kind} options: {', '.join(settable)})")
  return out


def parse_table(key: str, value, where: str, table: Table) -> dict:
  """``{"name": entry, **options}`` from the value of registry table ``key``."""
  if not isinstance(value, dict):
    raise ConfigError(f"{where}: {key} must be a table (name = one of "
                      f"{', '.join(table.registry)}, and its options), got "
                      f"{describe_value(value)}")
  options = {str(k): v for k, v in value.items()}
  name = options.pop("name", table.default)
  if name is None:
    raise ConfigError(f"{where}: [{key}] needs name = one of {', '.join(table.registry)}")
  if not isinstance(name, str) or name not in table.registry:
    raise ConfigError(f"{where}: {key}.name must be one of {', '.join(table.registry)}; "
                      f"got {name!r}")
  return {"name": name, **check_options(key, name, options, where, table)}


def _set_table(cfg: Config, key: str, value, where: str):
  table = TABLES[key]
  if table.many:
    items = value if isinstance(value, list) else [value]
    cfg.tables[key] = [parse_table(f"{key}[{i}]", v, where, table) for i, v in enumerate(items)]
  else:
    cfg.tables[key] = parse_table(key, value, where, table)


def apply_mapping(cfg: Config, data: dict, source: str, explicit: dict[str, str]):
  """Sets every key of a parsed config file on ``cfg`` (``explicit``: key -> where it was set)."""
  if not isinstance(data, dict):
    raise ConfigError(f"{source}: the top level must be a table of keys, got "
                      f"{type(data).__name__}")
  top = [f.name for f in dataclasses.fields(Config) if f.name != "tables"] + list(TABLES)
  for k, v in data.items():
    k = str(k)
    if k in TABLES:
      _set_table(cfg, k, v, source)
      explicit[k] = source
    elif k == "dataset" and isinstance(v, dict):   # [dataset] name = ..., loader options
      v = {str(kk): vv for kk, vv in v.items()}
      if "name" in v:
        set_value(cfg, "dataset", v.pop("name"), source)
        explicit["dataset"] = source
      cfg.tables["dataset"] = v
      explicit.update({f"dataset.{kk}": source for kk in v})
    elif k not in top:
      raise unknown_key(k, top, source)
    elif k in SECTIONS:
      fields = [f.name for f in dataclasses.fields(SECTIONS[k]) if f.name != "options"]
      if not isinstance(v, dict):
        raise ConfigError(f"{source}: {k} must be a table ([{k}] with keys "
                          f"{', '.join(fields)}), got {describe_value(v)}")
      for kk, vv in v.items():
        kk = str(kk)
        if k == "algorithm" and kk not in fields:   # an option of the named algorithm
          cfg.algorithm.options[kk] = vv
        elif kk not in fields:
          raise unknown_key(f"{k}.{kk}", [f"{k}.{n}" for n in fields], source)
        else:
          set_value(cfg, f"{k}.{kk}", vv, source)
        explicit[f"{k}.{kk}"] = source
    else:
      set_value(cfg, k, v, source)
      explicit[k] = source


def check_algorithm_options(cfg: Config, explicit: dict[str, str]):
  """Checks the ``[algorithm]`` options beyond the fixed keys against the final algorithm."""
  a = cfg.algorithm
  fixed = [f.name for f in dataclasses.fields(a) if f.name != "options"]
  try:
    a.options = check_options("algorithm", a.name, a.options,
                              lambda k: explicit.get(f"algorithm.{k}", "default"),
                              ALGORITHM_TABLE)
  except ConfigError as e:
    if "unknown key" in str(e):   # name the fixed keys too
      raise ConfigError(f"{e} (or one of the [algorithm] keys {', '.join(fixed)})") from None
    raise
