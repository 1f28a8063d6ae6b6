"""Config files: TOML (stdlib ``tomllib``) or YAML (PyYAML), read strictly.

A key given twice is an error in both formats (PyYAML would silently keep the last one; tomllib
only says "Cannot overwrite a value"), and YAML numbers follow YAML 1.2 (``1e-3`` is a number).
"""

from __future__ import annotations

from pathlib import Path

from fedjax_sim.cli.schema import ConfigError


def _yaml_loader():
  import yaml
  # PyYAML follows YAML 1.1, where 1e-3 is a string; read it as the number it is (YAML 1.2).
  class Loader(yaml.SafeLoader):
    pass
  import re
  def mapping(loader, node, deep=False):
    # PyYAML silently keeps the last of duplicated keys; a config file must not say two things.
    seen = set()
    for key_node, _ in node.value:
      key = loader.construct_object(key_node, deep=deep)
      if key in seen:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicated key {key!r}", key_node.start_mark)
      seen.add(key)
    return loader.construct_mapping(node, deep=deep)
  Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
  Loader.add_implicit_resolver(
      "tag:yaml.org,2002:float",
      re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                      |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                      |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                      |[-+]?\.(?:inf|Inf|INF)
                      |\.(?:nan|NaN|NAN))$""", re.X),
      list("-+0123456789."))
  return Loader


def _toml_duplicate(path: Path) -> str | None:
  """Names a key set twice in one table of a TOML file (tomllib only says "Cannot overwrite a
  value"), or ``None``. A line-based scan: enough for the flat files this command reads."""
  import re
  seen: dict[str, int] = {}
  table = ""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError):
    return None
  for i, line in enumerate(lines, 1):
    if m := re.match(r"\s*\[\[\s*([^\]]+?)\s*\]\]\s*(#.*)?$", line):   # one more [[table]]
      table = f"{m.group(1)}[line {i}]."
    elif m := re.match(r"\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$", line):
      table = m.group(1) + "."
      if table in seen:
        return f"table [{m.group(1)}] is defined twice (lines {seen[table]} and {i})"
      seen[table] = i
    elif m := re.match(r"\s*([A-Za-z0-9_.\-]+)\s*=", line):
      key = table + m.group(1)
      if key in seen:
        return f"duplicated key {key!r} (lines {seen[key]} and {i})"
      seen[key] = i
  return None


def read_config_file(path: str | Path) -> dict:
  """Parses a ``.toml`` (stdlib ``tomllib``) or ``.yaml``/``.yml`` (PyYAML) file."""
  p = Path(path)
  if not p.is_file():
    raise ConfigError(f"config file {str(p)!r} not found" if not p.exists() else
                      f"config file {str(p)!r} is not a file")
  suffix = p.suffix.lower()
  if suffix == ".toml":
    import tomllib
    try:
      with open(p, "rb") as f:
        return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
      dup = _toml_duplicate(p)
      raise ConfigError(f"{p}: invalid TOML: {dup or e}") from None
    except UnicodeDecodeError as e:
      raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
  if suffix in (".yaml", ".yml"):
    try:
      import yaml
    except ImportError:
      raise ConfigError(f"{p}: reading YAML needs PyYAML: pip install pyyaml (or "
                        "'fedjax_sim[yaml]'), or write the config as TOML") from None
    try:
      data = yaml.load(p.read_text(encoding="utf-8"),  # noqa: S506 -- a SafeLoader
                       Loader=_yaml_loader())
    except UnicodeDecodeError as e:
      raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
      raise ConfigError(f"{p}: invalid YAML: {' '.join(str(e).split())}") from None
    return {} if data is None else data
  raise ConfigError(f"config file {str(p)!r}: unknown format {p.suffix!r}; use .toml, .yaml "
                    "or .yml")


