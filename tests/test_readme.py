"""README.md is executable documentation: every ```python block runs, in order, in one session.

The README says its blocks continue one session (the quickstart defines ``data``, ``model``,
``algo`` for the blocks after it), so they run in order in one namespace, in a temporary working
directory (the quickstart writes history.png / history.json). To keep the test short, every
keyword argument ``rounds=<integer>`` is cut to :data:`ROUNDS` by rewriting the parsed code;
nothing else changes, so what runs is what a reader pastes, bar the number of rounds (the README
says so). A block that needs a data set that is not installed (``make data`` installs them)
skips the test with the loader's message.
"""

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
ROUNDS = 2


def python_blocks(text: str) -> list[str]:
  """The contents of the ```python fenced blocks of a Markdown text, in order."""
  return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```\s*$", text, re.M | re.S)]


class FewerRounds(ast.NodeTransformer):
  """Rewrites ``rounds=N`` (an integer literal N > ROUNDS) in calls to ``rounds=ROUNDS``."""

  def visit_keyword(self, node):
    self.generic_visit(node)
    v = node.value
    if node.arg == "rounds" and isinstance(v, ast.Constant) and type(v.value) is int and \
        v.value > ROUNDS:
      node.value = ast.copy_location(ast.Constant(ROUNDS), v)
    return node


def shrink(block: str, name: str):
  """``block`` compiled with every ``rounds=`` literal cut to ROUNDS."""
  tree = ast.fix_missing_locations(FewerRounds().visit(ast.parse(block, name)))
  return compile(tree, name, "exec")


def test_readme_blocks_are_found_and_only_rounds_shrink():
  blocks = python_blocks(README.read_text())
  assert len(blocks) >= 2 and "fs.run(" in blocks[0] and "import optax" in blocks[0]
  tree = FewerRounds().visit(ast.parse("f(x, rounds=100, cohort_size=10)\ng(rounds=1, r=300)"))
  assert ast.unparse(tree) == f"f(x, rounds={ROUNDS}, cohort_size=10)\ng(rounds=1, r=300)"
  for i, b in enumerate(blocks):
    shrink(b, f"README.md python block {i + 1}")   # every block is valid Python


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted(tmp_path, monkeypatch):
  from fedjax_sim.data.datasets import DatasetNotFoundError
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  for i, block in enumerate(python_blocks(README.read_text())):
    try:
      exec(shrink(block, f"README.md python block {i + 1}"), namespace)
    except DatasetNotFoundError as e:
      pytest.skip(f"README block {i + 1} needs a data set that is not installed: {e}")
  assert (tmp_path / "history.png").stat().st_size > 1000
  assert (tmp_path / "history.json").is_file()
  assert namespace["result"].history.num_rounds == ROUNDS
