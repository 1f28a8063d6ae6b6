"""The commands: ``run`` (flags over a config file) and ``list`` (the registry tables), and
``main``, which turns every bad input into one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tomllib
import typing
from typing import Any

from fedjax_sim.cli.config import apply_mapping, set_value
from fedjax_sim.cli.files import read_config_file
from fedjax_sim.cli.output import make_out_folder
from fedjax_sim.cli.resolve import resolve, to_dict, to_toml
from fedjax_sim.cli.run import run_seeds
from fedjax_sim.cli.schema import (ALGORITHM_TABLE, LEAF, LEAVES, TABLES, Config, ConfigError,
                                   config_type)

# Every registry table a config file can hold, by its key.
ALL_TABLES = {"algorithm": ALGORITHM_TABLE, **TABLES}


class _Parser(argparse.ArgumentParser):
  """argparse, but a bad flag is one ``error:`` line (exit 2) like every other bad input."""

  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _tables_epilog() -> str:
  import textwrap
  lines = ["registry tables of a config file (`python -m fedjax_sim list TABLE [NAME]` shows",
           "their options; `--set TABLE.OPTION=VALUE` sets one):"]
  for key, t in ALL_TABLES.items():
    head = f"[[{key}]]" if t.many else f"[{key}]"
    lines += textwrap.wrap(f"name = {' | '.join(t.registry)}", 90, initial_indent=f"  {head:19s} ",
                           subsequent_indent=" " * 29)
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  import fedjax_sim.cli as package
  p = _Parser(prog="python -m fedjax_sim", description=package.__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  r = sub.add_parser("run", help="run one federated experiment (or one per seed)",
                     description="Flags override the values of --config; unset values take the "
                                 "defaults shown.", epilog=_tables_epilog(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  r.add_argument("--config", default=None, help="TOML or YAML file describing the experiment")
  r.add_argument("--print-config", action="store_true",
                 help="print the resolved configuration (TOML) and exit without running")
  r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                 help="set any config key, e.g. aggregator.name=krum, aggregator.num_byzantine=2 "
                      "(VALUE in TOML syntax; a bare word is a string); over the file, under "
                      "the flags")
  # Every flag defaults to "not given" so that only what the user typed overrides the file.
  for key, field, tp in LEAVES:
    md = field.metadata
    kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS}
    shown = field.default if field.default is not None else "none"
    help_ = f"{md['help']} [{key}; default: {shown}]"
    if tp is bool:
      r.add_argument(md["flag"], action=argparse.BooleanOptionalAction, help=help_, **kw)
      continue
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    scalar = base[0] if typing.get_origin(base[0]) is not list else typing.get_args(base[0])[0]
    if key == "seed":
      kw["nargs"] = "+"
    r.add_argument(md["flag"], type=scalar, choices=md["choices"], help=help_,
                   metavar=None if md["choices"] else key.rsplit(".", 1)[-1].upper(), **kw)
  ls = sub.add_parser("list", help="list the registry tables, their entries and options",
                      description=_tables_epilog(),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  ls.add_argument("table", nargs="?", choices=list(ALL_TABLES), help="a table")
  ls.add_argument("name", nargs="?", help="an entry of the table: show its options")
  return p


def _set_mapping(items: list[str]) -> dict:
  """``--set KEY=VALUE`` items as a nested mapping (dotted keys -> tables)."""
  out: dict = {}
  for item in items:
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
      raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
      value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
      value = text   # a bare word: a string
    *tables, leaf = key.strip().split(".")
    d = out
    for t in tables:
      d = d.setdefault(t, {})
      if not isinstance(d, dict):
        raise ConfigError(f"--set {item!r}: {t} is not a table")
    d[leaf] = value
  return out


def _merge(base: dict, more: dict) -> dict:
  out = dict(base)
  for k, v in more.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def config_from_args(args: argparse.Namespace) -> tuple[Config, list[str]]:
  """File values, then ``--set`` values, then flags on top; checked and resolved."""
  cfg, explicit = Config(), {}
  data, source = {}, None
  if args.config:
    data, source = read_config_file(args.config), str(args.config)
  sets = getattr(args, "set_values", [])
  if sets:
    if not isinstance(data, dict):
      apply_mapping(cfg, data, source, explicit)   # the error for a non-table top level
    data = _merge(data, _set_mapping(sets))
    source = f"{source} and --set" if source else "--set"
  if source:
    apply_mapping(cfg, data, source, explicit)
  given = {k: v for k, v in vars(args).items() if k in LEAF}
  # a flag for local epochs/steps replaces the file's choice of the other
  for a, b in (("local.epochs", "local.steps"), ("local.steps", "local.epochs")):
    if a in given and b not in given and b in explicit:
      set_value(cfg, b, None, "flags")
      del explicit[b]
  for key, v in given.items():
    if key == "seed" and len(v) == 1:
      v = v[0]
    set_value(cfg, key, v, LEAF[key][0].metadata["flag"])
    explicit[key] = LEAF[key][0].metadata["flag"]
  return resolve(cfg, explicit)


def cmd_run(args) -> int:
  cfg, warnings = config_from_args(args)
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  header = (f"resolved configuration of `python -m fedjax_sim run` "
            f"({datetime.datetime.now().isoformat(timespec='seconds')}"
            f"{', from ' + str(args.config) if args.config else ''}); "
            "rerun with --config this-file")
  if args.print_config:
    print(to_toml(to_dict(cfg)), end="")
    return 0
  # Before any JAX computation; the resolved config records the count actually used.
  from fedjax_sim import distributed
  cfg.cpu_devices = distributed.cpu_devices(cfg.cpu_devices)
  if cfg.chunk_size is None:   # per backend, so only now (this starts JAX's backends)
    from fedjax_sim import engine
    cfg.chunk_size = engine.default_chunk_size()
  out, lock = make_out_folder(cfg.out, cfg.overwrite)
  try:
    cfg.out = str(out)
    return run_seeds(cfg, out, header)
  finally:
    os.close(lock)


def cmd_list(args) -> int:
  """Prints the tables; a table's entries; or an entry's options."""
  if args.table is None:
    print(_tables_epilog())
    return 0
  t = ALL_TABLES[args.table]
  if args.name is None:
    for name in t.registry:
      print(f"{name:22s} {t.registry.describe(name)}")
    return 0
  t.registry.get_entry(args.name)   # ValueError naming the valid ones
  print(f"[{args.table}] name = {args.name!r}: {t.registry.describe(args.name)}")
  for o in t.registry.schema(args.name).values():
    if o.name in t.set_by:
      continue
    tp = config_type(o)
    default = "required" if o.required else f"default {o.default!r}"
    kind = "not settable in a config file" if tp is None else str(tp).replace("<class '", "")
    print(f"  {o.name} ({kind.rstrip(chr(39) + '>')}; {default}): {o.doc}")
  return 0


# Loggers of libraries that log a failure (with its traceback, from their worker threads) and
# then raise it: orbax logs a failed checkpoint write through absl at ERROR level, ~100 lines of
# asyncio traceback, before the exception reaches `main`. The command line reports the exception
# itself as its one `error:` line, so these loggers are muted while it runs.
QUIET_LOGGERS = ("absl", "orbax")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  import logging
  saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    return _main(args)
  finally:
    for name, level in saved.items():
      logging.getLogger(name).setLevel(level)


def _main(args) -> int:
  try:
    if args.command == "run":
      return cmd_run(args)
    if args.command == "list":
      return cmd_list(args)
  except (ValueError, OSError, ImportError) as e:
    # one line, whatever the message (YAML and OS errors can span several)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except MemoryError:
    print("error: out of memory (MemoryError); use a smaller population, model or cohort "
          "(chunk_size bounds the memory of a round)", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 1
