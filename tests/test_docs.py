"""The documentation site (docs/): every public name in the API reference, the guides' code runs, links resolve.

The site itself is built by ``.ci/run``'s docs step (``sphinx-build -W -n``); the last test builds it here too
when Sphinx and the ``[docs]`` extra are installed, and is skipped otherwise (the ``[test]`` extra has no Sphinx).
"""

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import dtnh_docs  # noqa: E402  (docs/_ext: the site's extension, importable without Sphinx)

PAGES = sorted(path for path in DOCS.rglob("*.md") if "_build" not in path.parts)
API_PAGES = sorted((DOCS / "api").glob("*.md"))
_DIRECTIVE = re.compile(r"^\.\. (currentmodule|automodule|autofunction|autoclass|autodata|autoexception)::\s*(\S+)",
                        re.M)
_MODULES_MARKER = re.compile(r"^<!-- API modules: ([\w. ]+) -->$", re.M)


def _documented() -> tuple[set[str], list[object]]:
  """The qualified names the API reference's sources document, and the objects they name."""
  names = set()
  for page in API_PAGES:
    text = page.read_text(encoding="utf-8")
    current = None
    for directive, target in _DIRECTIVE.findall(text):
      if directive == "currentmodule":
        current = target
        continue
      qualified = target if target.startswith("dtnh_jax") or current is None else f"{current}.{target}"
      names.add(qualified)
    for listed in _MODULES_MARKER.findall(text):
      names.update(module for name in listed.split() for module in dtnh_docs._public_modules(name))  # pylint: disable=protected-access
  objects = []
  for name in names:
    obj = dtnh_docs._resolve(name)  # pylint: disable=protected-access
    assert obj is not dtnh_docs._MISSING, f"the API reference documents {name}, which does not exist"  # pylint: disable=protected-access
    objects.append(obj)
  return names, objects


@pytest.mark.parametrize("package", dtnh_docs.PACKAGES)
def test_every_name_in_a_packages_all_is_in_the_api_reference(package):
  module = importlib.import_module(package)
  names, objects = _documented()
  missing = [name for name in module.__all__
             if f"{package}.{name}" not in names and not any(getattr(module, name) is obj for obj in objects)]
  assert not missing, (f"{package}.__all__ names {missing}, documented nowhere in docs/api/: add them to "
                       f"docs/api/{package.split('.')[-1] if package != 'dtnh_jax' else 'dtnh_jax'}.md")


def test_the_api_packages_are_every_public_subpackage():
  packages = {f"dtnh_jax.{path.parent.name}" for path in (ROOT / "dtnh_jax").glob("*/__init__.py")
              if not path.parent.name.startswith("_")}
  assert packages <= set(dtnh_docs.PACKAGES)


def _python_blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.parametrize("page", [page for page in PAGES if _python_blocks(page)],
                         ids=lambda page: str(page.relative_to(DOCS)))
def test_the_pages_python_examples_run(page, tmp_path, monkeypatch):
  blocks = _python_blocks(page)
  if any("torch" in block for block in blocks):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    # the file a user downloads, here with random weights (no network)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "docs_example"}  # read top to bottom: a block may use names defined above it
  for block in blocks:
    exec(compile(block, str(page.relative_to(ROOT)), "exec"), namespace)  # pylint: disable=exec-used


def _rendered(page: pathlib.Path) -> str:
  """The page's Markdown as Sphinx reads it: the Results and Archive pages hold RESULTS.md's sections."""
  text = page.read_text(encoding="utf-8")
  match = dtnh_docs.MARKER.search(text)
  if match:
    text = text.replace(match[0], dtnh_docs.results_markdown(dtnh_docs.RESULTS.read_text(encoding="utf-8"),
                                                             match[1]))
  include = re.search(r"^```\{include\} (\S+)\n```", text, flags=re.M)
  if include:
    text = (page.parent / include[1]).read_text(encoding="utf-8")
  return text


def _anchors(page: pathlib.Path) -> set[str]:
  """MyST's heading anchors (``myst_heading_anchors``, GitHub's slugs) of a page's headings."""
  anchors = set()
  for _, title in re.findall(r"^(#{1,6}) +(.*)$", _rendered(page), flags=re.M):
    title = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", title)  # a link's text
    title = re.sub(r"\{\w+\}`([^`]*)`", r"\1", title).replace("`", "").replace("*", "")
    anchors.add(re.sub(r"[^\w\u4e00-\u9fff\- ]", "", title.lower().replace(" ", "-")))
  return anchors


def _links(page: pathlib.Path) -> list[str]:
  text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)  # not in code blocks
  return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_the_pages_internal_links_resolve(page):
  broken = []
  for link in _links(page):
    if re.match(r"[a-z]+:", link):  # https:, mailto:
      continue
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists() and not (path.startswith("../notebooks/") or path.startswith("notebooks/")):
      broken.append(f"{link}: no file {path}")
    elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
      broken.append(f"{link}: no heading with anchor #{anchor} in {path or page.name}")
  assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_the_pages_python_cross_references_name_real_objects(page):
  text = page.read_text(encoding="utf-8")
  targets = re.findall(r"\{py:\w+\}`(?:[^`<]*<)?~?([\w.]+)>?`|\{(?:func|class|mod|data|obj|meth|attr|exc)\}"
                       r"`(?:[^`<]*<)?~?([\w.]+)>?`", text)
  missing = [name for pair in targets for name in pair if name and dtnh_docs._resolve(name) is dtnh_docs._MISSING]  # pylint: disable=protected-access
  assert not missing, f"{page.relative_to(ROOT)} refers to {missing}, which do not exist"


def test_every_preset_has_a_row_in_the_training_guide():
  presets = pytest.importorskip("dtnh_jax.train.presets")
  guide = (DOCS / "guides" / "training.md").read_text(encoding="utf-8")
  missing = [name for name in presets.PRESETS if f"| `{name}` |" not in guide]
  assert not missing, f"presets {missing} have no row in docs/guides/training.md's table of presets"


def test_the_notebooks_are_in_the_site():
  index = (DOCS / "index.md").read_text(encoding="utf-8")
  for notebook in (ROOT / "notebooks").glob("*.ipynb"):
    assert f"notebooks/{notebook.stem}" in index, f"{notebook.name} is not in docs/index.md's toctree"


def test_results_pages_split_results_md_into_current_and_superseded_sections():
  text = dtnh_docs.RESULTS.read_text(encoding="utf-8")
  current = dtnh_docs.results_markdown(text, "current")
  superseded = dtnh_docs.results_markdown(text, "superseded")
  headings = [line for line in text.splitlines() if re.match(r"#{2,6} ", line)]
  for heading in headings:
    title = heading.lstrip("#").strip()
    in_current, in_archive = f" {title}\n" in current, f" {title}\n" in superseded
    assert in_current != in_archive, f"RESULTS.md's section {title!r} is on both pages or on neither"
    assert in_archive == ("superseded" in title.lower() or not in_current)


def test_site_builds_with_warnings_as_errors(tmp_path):
  for module in ("sphinx", "myst_nb", "sphinxarg", "sphinx_book_theme", "sphinx_copybutton"):
    pytest.importorskip(module, reason="the [docs] extra is not installed; .ci/run's docs step builds the site")
  build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-d",
                          str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
                         capture_output=True, text=True, cwd=ROOT, check=False)
  assert build.returncode == 0, build.stderr[-5000:]


def test_readme_links_into_the_site_resolve():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  for link in re.findall(r"\]\((docs/[^)#\s]+)", readme):
    assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"


def test_docstrings_quote_no_measurements():
  """Times, speed-ups and rates measured once belong in benchmarks/RESULTS.md (the Results page), with their
  command and machine; a docstring says what and how, and links there. Literals (````3 runs, 4.2 min````, an
  example of output) are not measurements."""
  measured = re.compile(r"~?\d+(\.\d+)? ?(s|ms|µs|min|seconds|minutes|hours)\b|\d(\.\d+)?x (faster|slower|of)\b"
                        r"|\d+(\.\d+)?(-\d+(\.\d+)?)?% (slower|faster|of the)\b|\d× faster|images/s")
  found = []
  for path in (ROOT / "dtnh_jax").rglob("*.py"):
    for doc in _docstrings(path.read_text(encoding="utf-8")):
      prose = re.sub(r"``.*?``", "", doc, flags=re.S)
      found += [f"{path.relative_to(ROOT)}: {match[0]!r}" for match in measured.finditer(prose)]
  assert not found, "docstrings quote measured figures (they belong in benchmarks/RESULTS.md): " + ", ".join(found)


def _docstrings(source: str) -> list[str]:
  docs = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      doc = ast.get_docstring(node)
      if doc:
        docs.append(doc)
  return docs

