"""The documentation site's own Sphinx extension: Results from RESULTS.md, the API's module pages, CLI parsers.

Importable without Sphinx (tests/test_docs.py uses it).

* ``benchmarks/RESULTS.md`` stays the one place where measured figures live. The Results page shows its
  current sections and the Archive page its superseded ones (a section whose heading says "superseded", with
  its subsections): each page holds a marker line, ``<!-- RESULTS.md: current -->`` or ``<!-- RESULTS.md:
  superseded -->``, replaced by those sections when Sphinx reads the page.
* The module pages of the API reference are written when Sphinx reads them (a marker line ``<!-- API modules:
  NAME ... -->``): for each module named, or each public module of each package named, its docstring and the
  names of its ``__all__`` that are defined there and not documented on a package page already. A module added
  to a package appears without an edit here.
* A cross-reference to a name that is documented under another name resolves to it: ``dtnh_jax.pcgrad`` (or
  ``pcgrad`` in ``dtnh_jax``'s docstring) links to ``dtnh_jax.aggregators.pcgrad``,
  ``dtnh_jax.projection.Diagnostics`` to ``dtnh_jax.Diagnostics``. A reference to a private name (a part of
  it starts with ``_``), or to one outside every ``__all__``, is shown as code, without a link: the site
  documents the public API. A name that exists nowhere stays a warning (an error with ``-W``).
* Docstrings are written for ``help()``; :func:`_before_napoleon` makes them read the same in the site.
* :func:`train_parser`, :func:`convert_parser` and :func:`data_parser` return the ``argparse`` parsers of
  ``dtnh-train``, ``dtnh-convert`` and ``dtnh-data``, which the CLI reference (sphinx-argparse) renders.
  ``dtnh-convert``'s parser is built inside ``dtnh_jax.cli._convert``; :func:`convert_parser` takes it from
  there instead of keeping a copy of it here.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import pkgutil
import re
import sys
from unittest import mock

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MARKER = re.compile(r"^<!-- RESULTS\.md: (current|superseded) -->$", re.M)
MODULES_MARKER = re.compile(r"^<!-- API modules: ([\w. ]+) -->$", re.M)
#: The packages whose ``__all__`` the API reference's package pages document name by name (tests/test_docs.py).
PACKAGES = ("dtnh_jax", "dtnh_jax.aggregators", "dtnh_jax.corrections", "dtnh_jax.regularizers", "dtnh_jax.models",
            "dtnh_jax.data", "dtnh_jax.train")
_HEADING = re.compile(r"^(#{1,6}) +(.*)$")


def _sections(text: str) -> list[tuple[int, str, list[str]]]:
  """``(level, heading, lines)`` for every ATX heading of ``text`` (not inside a fenced block), in order.

  The lines before the first heading come as level 0. A section's lines are its own, up to the next heading
  of any level.
  """
  sections = [(0, "", [])]
  fence = None
  for line in text.splitlines():
    stripped = line.lstrip()
    if fence is None and stripped.startswith(("```", "~~~")):
      fence = stripped[:3]
    elif fence is not None and stripped.startswith(fence):
      fence = None
    heading = _HEADING.match(line) if fence is None else None
    if heading:
      sections.append((len(heading[1]), heading[2].strip(), [line]))
    else:
      sections[-1][2].append(line)
  return sections


def results_markdown(text: str, kind: str) -> str:
  """The ``current`` or ``superseded`` sections of RESULTS.md's ``text``, as Markdown for a page in ``docs/``.

  A section is superseded when its heading says so; its subsections go with it. RESULTS.md's title is left
  out (the page has its own); the lines under it, before the first section, open the current sections.
  Superseded sections start at level 2 on the Archive page. Relative links to ``figures/`` are rewritten to
  reach ``benchmarks/figures`` from ``docs/``.
  """
  out = []
  superseded_at = None  # the level of the superseded section we are inside, if any
  shift = 0
  for level, heading, lines in _sections(text):
    if level <= 1:  # RESULTS.md's title (the page has its own) and what comes before its first section
      superseded_at = None
      if level == 1 and kind == "current":
        out.extend(lines[1:])
      continue
    if superseded_at is not None and level <= superseded_at:
      superseded_at = None
    if superseded_at is None and "superseded" in heading.lower():
      superseded_at = level
      shift = level - 2
    if (superseded_at is not None) != (kind == "superseded"):
      continue
    if kind == "superseded":
      lines = ["#" * (level - shift) + " " + heading] + lines[1:]
    out.extend(lines)
  body = "\n".join(out) + "\n"
  return re.sub(r"\]\(figures/", "](../benchmarks/figures/", body)


def _eval_rst(lines: list[str]) -> str:
  return "```{eval-rst}\n" + "\n".join(lines) + "\n```\n"


def _public_modules(name: str) -> list[str]:
  """``name`` itself if it is a module; a package's public modules (and subpackages), sorted, if a package."""
  module = importlib.import_module(name)
  if not hasattr(module, "__path__"):
    return [name]
  return [f"{name}.{info.name}" for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda info: info.name)
          if not info.name.startswith("_")]


def _on_package_pages() -> set[int]:
  """The identities of the objects the package pages document."""
  seen = set()
  for package in PACKAGES:
    module = importlib.import_module(package)
    for name in module.__all__:
      key = _identity(getattr(module, name))
      if key is not None:
        seen.add(key)
  return seen


def _with_members(obj) -> bool:
  """Whether a class's methods and fields are worth listing: not for exceptions, named tuples or Flax modules."""
  bases = [f"{base.__module__}.{base.__qualname__}" for base in inspect.getmro(obj)]
  return not (issubclass(obj, (BaseException, tuple)) or "flax.linen.module.Module" in bases)


def directive_for(name: str, obj) -> list[str]:
  """The autodoc directive (and its options) for ``obj``, documented as ``name``."""
  if inspect.ismodule(obj):
    return [f".. automodule:: {name}", "   :no-members:"]
  if inspect.isclass(obj):
    return [f".. autoclass:: {name}"] + (["   :members:"] if _with_members(obj) else [])
  if callable(obj):
    return [f".. autofunction:: {name}"]
  return [f".. autodata:: {name}"]


def modules_markdown(names: list[str]) -> str:
  """The API reference's sections for the modules ``names`` stands for (see :func:`_public_modules`)."""
  documented = _on_package_pages()
  out = []
  for module_name in [module for name in names for module in _public_modules(name)]:
    module = importlib.import_module(module_name)
    out += [f"## `{module_name}`", "", _eval_rst([f".. automodule:: {module_name}", "   :no-members:"])]
    lines = []
    for name in getattr(module, "__all__", []):
      obj = getattr(module, name)
      if inspect.ismodule(obj) or _identity(obj) in documented:
        continue
      if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ != module_name:
        continue  # documented where it is defined
      lines += directive_for(f"{module_name}.{name}", obj) + [""]
    if lines:
      out.append(_eval_rst(lines[:-1]))
  return "\n".join(out) + "\n"


def _source_read(app, docname, source):
  match = MODULES_MARKER.search(source[0])
  if match is not None:
    source[0] = source[0][:match.start()] + modules_markdown(match[1].split()) + source[0][match.end():]
  match = MARKER.search(source[0])
  if match is not None:
    app.env.note_dependency(str(RESULTS))
    sections = results_markdown(RESULTS.read_text(encoding="utf-8"), match[1])
    source[0] = source[0][:match.start()] + sections + source[0][match.end():]


class _Built(Exception):
  """Carries the parser out of the function that built it, before it parses anything."""


def convert_parser() -> argparse.ArgumentParser:
  """``dtnh-convert``'s parser, as ``dtnh_jax.cli._convert`` builds it (stopped at its ``parse_args``)."""
  from dtnh_jax import cli  # pylint: disable=g-import-not-at-top

  def built(parser, *args, **kwargs):
    raise _Built(parser)

  with mock.patch.object(argparse.ArgumentParser, "parse_args", built):
    try:
      cli._convert([])  # pylint: disable=protected-access
    except _Built as e:
      return _plain_text(e.args[0])
  raise RuntimeError("dtnh_jax.cli._convert returned without building its parser")


def train_parser() -> argparse.ArgumentParser:
  """``dtnh-train``'s parser."""
  from dtnh_jax import cli  # pylint: disable=g-import-not-at-top
  return _plain_text(cli._train_parser())  # pylint: disable=protected-access


def data_parser() -> argparse.ArgumentParser:
  """``dtnh-data``'s parser (also ``python -m dtnh_jax.data``)."""
  from dtnh_jax.data import __main__ as data_command  # pylint: disable=g-import-not-at-top
  return _plain_text(data_command._parser())  # pylint: disable=protected-access


def _plain_text(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The parser with ``|`` in its texts escaped: sphinx-argparse reads them as reStructuredText (``|head|²``
  would be a substitution), ``--help`` as plain text."""
  escape = lambda text: text.replace("|", "\\|") if isinstance(text, str) else text
  parser.description = escape(parser.description)
  for group in parser._action_groups:  # pylint: disable=protected-access
    group.description = escape(group.description)
  for action in parser._actions:  # pylint: disable=protected-access
    action.help = escape(action.help)
    if isinstance(action.choices, dict):  # the subcommands' parsers
      for subparser in action.choices.values():
        _plain_text(subparser)
  return parser


_MISSING = object()


def _resolve(name: str):
  """The object a dotted ``name`` names (a module, then attributes), or ``_MISSING``."""
  parts = name.split(".")
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:split]))
    except ImportError:
      continue
    for attribute in parts[split:]:
      obj = getattr(obj, attribute, _MISSING)
      if obj is _MISSING:
        return _MISSING
    return obj
  return _MISSING


def _identity(obj):
  """What two names of one object share; ``None`` for values that equal ones may share by chance (ints, strs)."""
  obj = getattr(obj, "__func__", obj)  # a classmethod reached through its class is a new bound method each time
  if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj) or isinstance(obj, (tuple, list, dict)):
    return id(obj)
  if type(obj).__name__ == "ndarray":
    return id(obj)
  return None


def _documented(app, env) -> dict:
  """``{identity: documented name}`` for every Python object the site documents (once per build, when the
  references are resolved: every page has been read by then)."""
  cache = getattr(app, "_dtnh_documented", None)
  if cache is None:
    cache = {}
    for name, entry in sorted(env.get_domain("py").objects.items()):
      if entry.aliased:
        continue
      key = _identity(_resolve(name))
      if key is not None:
        cache.setdefault(key, name)
    app._dtnh_documented = cache  # pylint: disable=protected-access
  return cache


def _exists_unexported(target: str) -> bool:
  """Whether some module of dtnh_jax has ``target`` (a name, or ``Class.attribute``) as an attribute."""
  head, _, rest = target.partition(".")
  for module_name, module in list(sys.modules.items()):
    if module_name.split(".")[0] == "dtnh_jax" and module is not None and hasattr(module, head):
      return not rest or _resolve(f"{module_name}.{target}") is not _MISSING
  return False


def _missing_reference(app, env, node, contnode):
  from sphinx.util.nodes import make_refnode  # pylint: disable=g-import-not-at-top  (tests import this module)

  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"].lstrip(".~")
  if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
    return contnode  # a private name: shown, not linked
  candidates = [target]
  for context in (node.get("py:class"), node.get("py:module")):
    if context:
      candidates.insert(0, f"{context}.{target}")
  module = node.get("py:module")
  if module and node.get("py:class"):
    candidates.insert(0, f"{module}.{node.get('py:class')}.{target}")
  objects = env.get_domain("py").objects
  name = None
  for candidate in candidates:
    obj = _resolve(candidate)
    if obj is not _MISSING:
      name = _documented(app, env).get(_identity(obj))
      break
  if name is None:  # a name of the module the docstring is in: the one documented name that ends like it
    ending = [documented for documented in objects if documented.endswith("." + target)]
    name = ending[0] if len(ending) == 1 else None
  if name is None:
    if _exists_unexported(target):
      return contnode  # a name outside every __all__: not public, shown as code
    return None
  entry = objects[name]
  return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)


_TABLE_BORDER = re.compile(r"^(\s*)=+( +=+)+\s*$")


def _simple_tables_as_literal(lines: list[str]) -> None:
  """Shows the docstrings' simple tables (``====  ====`` borders) as typed, in a literal block.

  They are written for ``help()``: a cell may run past its column's border, which reStructuredText refuses.
  """
  i = 0
  while i < len(lines):
    border = _TABLE_BORDER.match(lines[i])
    if border is None:
      i += 1
      continue
    borders = [j for j in range(i, len(lines)) if _TABLE_BORDER.match(lines[j])][:3]
    end = borders[-1] + 1
    lines[i:end] = ["", border[1] + "::", ""] + ["  " + line for line in lines[i:end]] + [""]
    i = end + 4


_PLAIN_TYPE = re.compile(r"[A-Za-z_][\w.]*(\[[\w., \[\]]*\])?")


def _escape_bars(lines: list[str]) -> None:
  """``|g|`` (a norm) is plain text, not a substitution: escape ``|`` outside literals and literal blocks."""
  literal_block_at = None  # indentation of the line that opened a literal block (``::``)
  in_literal = False  # inside a ````...```` that runs over lines
  for i, line in enumerate(lines):
    indent = len(line) - len(line.lstrip())
    if not line.strip():
      in_literal = False
      continue
    if literal_block_at is not None:
      if indent > literal_block_at:
        continue
      literal_block_at = None
    parts = line.split("``")
    for j in range(len(parts)):
      if not in_literal:
        parts[j] = parts[j].replace("|", "\\|")
      if j < len(parts) - 1:
        in_literal = not in_literal
    lines[i] = "``".join(parts)
    if line.rstrip().endswith("::"):
      literal_block_at = indent


def _guard_first_line(lines: list[str], at: int) -> None:
  """Napoleon reads ``WORDS: description`` on line ``at`` as a type; unless WORDS look like one, a comment
  line before it (an empty ``..``, not shown) makes the whole text the description."""
  line = lines[at].strip()
  before, colon, _ = line.partition(":")
  if colon and not line.startswith(":") and _PLAIN_TYPE.fullmatch(before.strip()) is None:
    lines[at:at] = ["..", ""] if at == 0 else [" " * (len(lines[at]) - len(lines[at].lstrip())) + "..", ""]


def _before_napoleon(app, what, name, obj, options, lines):
  """Makes a docstring written for ``help()`` read the same in the site (runs before napoleon).

  * A constant documented without a doc-comment of its own shows no docstring, not its type's.
  * Simple tables are shown as typed (a cell may overrun its column, which reStructuredText refuses).
  * ``|`` is text (``|g|``), not a substitution.
  * A constant's, field's or ``Returns:`` section's first line is prose: words before a colon are not a type.
  """
  if what in ("data", "attribute") and lines:
    own = [line.strip() for line in lines if line.strip()][:1]
    doc = type(obj).__doc__
    inherited = [line.strip() for line in inspect.cleandoc(doc if isinstance(doc, str) else "").splitlines()
                 if line.strip()][:1]
    if own == inherited or own and own[0].startswith(f"{type(obj).__name__}("):  # numpy's differs by version
      lines[:] = []
      return
  _simple_tables_as_literal(lines)
  _escape_bars(lines)
  if what in ("attribute", "data", "property") and lines:
    _guard_first_line(lines, 0)
  for i in range(len(lines) - 1, -1, -1):
    if lines[i].strip() in ("Returns:", "Yields:"):
      body = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
      if body is not None:
        _guard_first_line(lines, body)


def setup(app):
  app.connect("source-read", _source_read)
  app.connect("missing-reference", _missing_reference)
  app.connect("autodoc-process-docstring", _before_napoleon, priority=400)  # napoleon's is at 500
  return {"parallel_read_safe": True, "parallel_write_safe": True}
