"""Modules meet at public names only: no private name of another module is imported or patched (issue #25, 3).

A name with a leading underscore is its module's own: the package's other modules and the benchmarks use what
a module makes public and documents (a benchmark that needs a grid's figures calls ``grid.draw_figures``).
Two exceptions: a private module of a package (``aggregators/_gram.py``,
``regularizers/_common.py``) is shared by its package's modules, and a test may look inside the package it
tests (white-box). Tests share helpers through ``tests/helpers.py`` and ``tests/reference.py``, never by
importing another test module. Checked on the source (AST), so nothing is imported or run.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "dtnh_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _shares_privates(user: str, owner: str) -> bool:
  """Whether module ``user`` may use the private names of module ``owner``."""
  if user == owner:
    return True
  package, _, last = owner.rpartition(".")
  # a private module's names are its package's (dtnh_jax.aggregators._gram for dtnh_jax.aggregators._pcgrad)
  if _is_private(last) and (user == package or user.startswith(package + ".")):
    return True
  return False


def crossings(path: pathlib.Path) -> list[str]:
  """Each use in ``path`` of a private name of another module: ``line: module.name``."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  user = _module_name(path)
  is_test = path.parent.name == "tests"
  modules = {}  # local name -> module it names
  found = []

  def check(line: int, owner: str, name: str) -> None:
    # a test may look inside the package (white-box); it shares nothing private with another test
    if not _is_private(name) or _shares_privates(user, owner) or (is_test and owner.startswith(PACKAGE)):
      return
    if not _shares_privates(user, f"{owner}.{name}"):  # a private module, imported by name
      found.append(f"{line}: {owner}.{name}")

  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if is_test and node.module.startswith("test_"):
        found.append(f"{node.lineno}: imports the test module {node.module}")
        continue
      if not node.module.startswith(PACKAGE):
        continue
      for alias in node.names:
        check(node.lineno, node.module, alias.name)
        modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if is_test and alias.name.startswith("test_"):
          found.append(f"{node.lineno}: imports the test module {alias.name}")
        if alias.name.startswith(PACKAGE):
          if alias.asname:
            modules[alias.asname] = alias.name
          else:
            modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
      check(node.lineno, modules[node.value.id], node.attr)
    # monkeypatch.setattr(module, "_name", ...)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
        and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in modules
        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
      check(node.lineno, modules[node.args[0].id], node.args[1].value)
  return found


FILES = sorted(str(path.relative_to(ROOT)) for folder in (PACKAGE, "benchmarks", "tests")
               for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("name", FILES)
def test_no_private_name_of_another_module_is_used(name):
  assert crossings(ROOT / name) == []
