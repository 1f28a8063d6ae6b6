"""Registries: things of one kind by name, each made from its options with checked keywords.

A :class:`Registry` maps a name to a factory (a function or class returning the thing). It reads
the factory's signature and docstring, so that options are checked before anything is built and
a user interface (the command line, config files) can list every entry with its options::

  >>> from fedjax_sim.registry import Registry
  >>> shapes = Registry("shape")
  >>> @shapes.register("box")
  ... def box(width: float, height: float = 1.0):
  ...   '''A box.
  ...
  ...   Args:
  ...     width: horizontal size.
  ...     height: vertical size.
  ...   '''
  ...   return ("box", width, height)
  >>> shapes.make("box", width=2.0)
  ('box', 2.0, 1.0)
  >>> shapes.schema("box")["height"].doc
  'vertical size.'
  >>> shapes.make("box", colour="red")
  Traceback (most recent call last):
  ...
  ValueError: shape 'box': unknown option 'colour'; valid options: width, height

A factory that forwards ``**kwargs`` to another (FedProx to FedAvg, say) is registered with
``forwards_to=``: the keyword-only parameters of that function become its options too. The
registries of the package live next to what they hold: ``fedjax_sim.algorithms.REGISTRY``,
``fedjax_sim.aggregators.REGISTRY``, ``fedjax_sim.transforms.REGISTRY``,
``fedjax_sim.heterogeneity.REGISTRY``, ``fedjax_sim.data.datasets.REGISTRY``,
``fedjax_sim.data.partition.REGISTRY`` (partitioners by their flwr-datasets names),
``fedjax_sim.privacy.REGISTRY`` and ``fedjax_sim.optimizers.REGISTRY``.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import re
import typing
from typing import Any, Callable, NamedTuple

REQUIRED = inspect.Parameter.empty   # the ``default`` of an option without one


class Option(NamedTuple):
  """One option of a registry entry: a parameter of its factory.

  Attributes:
    name: the keyword.
    default: its default value, or :data:`REQUIRED` when it has none.
    annotation: the resolved type hint (``typing`` object), or the annotation string when it
      cannot be resolved, or ``None`` when the parameter has none.
    doc: its description from the factory docstring's ``Args:``/``Attributes:`` section,
      whitespace collapsed to one line ("" when undocumented).
  """
  name: str
  default: Any
  annotation: Any
  doc: str

  @property
  def required(self) -> bool:
    return self.default is REQUIRED


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes|Parameters|Keyword Args):\s*$")


def arg_docs(obj) -> dict[str, str]:
  """``{name: one-line description}`` from the Google-style ``Args:`` (or ``Attributes:``)
  sections of ``obj``'s docstring."""
  doc = inspect.getdoc(obj) or ""
  out: dict[str, str] = {}
  lines = doc.splitlines()
  i = 0
  while i < len(lines):
    m = _SECTION.match(lines[i])
    i += 1
    if not m:
      continue
    base = len(m.group(1))
    name, indent = None, None
    while i < len(lines):
      line = lines[i]
      if line.strip() and len(line) - len(line.lstrip()) <= base:
        break   # the section ended
      i += 1
      if not line.strip():
        continue
      ind = len(line) - len(line.lstrip())
      item = re.match(r"\s*\**([A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?:\s*(.*)$", line)
      if item and (indent is None or ind <= indent):
        indent, name = ind, item.group(1)
        out[name] = item.group(3).strip()
      elif name is not None:
        out[name] = (out[name] + " " + line.strip()).strip()
  return out


def _hints(factory) -> dict[str, Any]:
  target = factory.__init__ if inspect.isclass(factory) else factory
  try:
    return typing.get_type_hints(target)
  except Exception:   # a hint naming something only imported under TYPE_CHECKING, say
    return {}


class UnknownEntryError(KeyError, ValueError):
  """A name that is not registered: a ValueError (bad input) and a KeyError (a missing key of the
  registry mapping)."""

  def __str__(self):
    return str(self.args[0])


class _Entry(NamedTuple):
  factory: Callable[..., Any]
  forwards_to: Callable[..., Any] | None


class Registry(collections.abc.Mapping):
  """Factories of one ``kind`` by name. A read-only mapping ``name -> factory`` (so
  ``name in reg``, ``reg[name]``, ``sorted(reg)`` work) with registration, checked construction
  (:meth:`make`) and option descriptions (:meth:`schema`)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, _Entry] = {}

  # ------------------------------------------------------------------------- registration
  def register(self, name: str | None = None, *, forwards_to: Callable[..., Any] | None = None):
    """Decorator registering a factory under ``name`` (default: its ``__name__``).

    ``forwards_to``: the function the factory passes its ``**kwargs`` to; its keyword-only
    parameters become options of this entry. Registering a name twice is an error."""
    def decorate(factory):
      key = name or factory.__name__
      if key in self._entries and self._entries[key].factory is not factory:
        raise ValueError(f"{self.kind} {key!r} is already registered "
                         f"({self._entries[key].factory.__qualname__})")
      self._entries[key] = _Entry(factory, forwards_to)
      return factory
    return decorate

  # ------------------------------------------------------------------------------ mapping
  def __getitem__(self, name: str):
    return self.get_entry(name).factory

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __iter__(self):
    return iter(self._entries)

  def __len__(self):
    return len(self._entries)

  def names(self) -> list[str]:
    """The registered names, in registration order."""
    return list(self._entries)

  def get_entry(self, name: str) -> _Entry:
    """The entry of ``name``; :class:`UnknownEntryError` (a ValueError) naming the valid ones
    otherwise."""
    if not isinstance(name, str) or name not in self._entries:
      close = difflib.get_close_matches(str(name), self._entries, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise UnknownEntryError(f"unknown {self.kind} {name!r}{hint}; choose from "
                       f"{', '.join(self._entries)}")
    return self._entries[name]

  # ------------------------------------------------------------------------------ options
  def schema(self, name: str) -> dict[str, Option]:
    """``{option: Option}`` of entry ``name``, in signature order: its factory's parameters
    (``*args``/``**kwargs`` left out) then, with ``forwards_to``, the keyword-only parameters
    of that function that the factory does not name itself."""
    entry = self.get_entry(name)
    out = _options(entry.factory)
    if entry.forwards_to is not None:
      out.update({k: o for k, o in _options(entry.forwards_to, keyword_only=True).items()
                  if k not in out})
    return out

  def accepts_any(self, name: str) -> bool:
    """Whether entry ``name`` takes ``**kwargs`` it does not declare (options not checked)."""
    entry = self.get_entry(name)
    return entry.forwards_to is None and any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(entry.factory).parameters.values())

  def check(self, name: str, options: dict[str, Any]):
    """ValueError, before anything is built, for an unknown option or a missing required one
    of entry ``name`` (the message names the entry and the valid options)."""
    schema = self.schema(name)
    if not self.accepts_any(name):
      unknown = [k for k in options if k not in schema]
      if unknown:
        close = difflib.get_close_matches(unknown[0], schema, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{self.kind} {name!r}: unknown option{'s' * (len(unknown) > 1)} "
                         f"{', '.join(map(repr, unknown))}{hint}; valid options: "
                         f"{', '.join(schema) or 'none'}")
    missing = [k for k, o in schema.items() if o.required and k not in options]
    if missing:
      raise ValueError(f"{self.kind} {name!r}: missing required option"
                       f"{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}; "
                       f"options: {', '.join(schema)}")

  def make(self, name: str, **options):
    """``factory(**options)`` of entry ``name``, after :meth:`check`."""
    self.check(name, options)
    return self.get_entry(name).factory(**options)

  def describe(self, name: str) -> str:
    """The first sentence of the factory's docstring ("" when it has none)."""
    doc = inspect.getdoc(self.get_entry(name).factory) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    end = re.search(r"\.(\s+[A-Z]|$)", first)
    return first[:end.start() + 1] if end else first

  def __repr__(self):
    return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def _options(factory, keyword_only: bool = False) -> dict[str, Option]:
  docs, hints = arg_docs(factory), _hints(factory)
  out = {}
  for p in inspect.signature(factory).parameters.values():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    if keyword_only and p.kind is not p.KEYWORD_ONLY:
      continue
    ann = hints.get(p.name, None if p.annotation is p.empty else p.annotation)
    out[p.name] = Option(p.name, p.default, ann, " ".join(docs.get(p.name, "").split()))
  return out
