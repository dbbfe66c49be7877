"""Sphinx configuration of the dtnh_jax documentation site.

Build it from the repository root with ``python -m pip install ".[docs]" && sphinx-build -W docs docs/_build``
(``.ci/run`` runs the same with ``-n``). The API reference is generated from the docstrings of the checkout (the
repository root goes first on ``sys.path``), the CLI reference from the commands' parsers, the Results and
Archive pages from ``benchmarks/RESULTS.md``; the notebooks are rendered with their stored outputs, never run.
"""

import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout, not whichever dtnh_jax is installed
sys.path.insert(0, str(DOCS / "_ext"))

import dtnh_jax  # noqa: E402

project = "dtnh_jax"
author = "The dtnh_jax authors"
copyright = "the dtnh_jax authors (Apache-2.0)"
release = dtnh_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "sphinx_copybutton",
    "dtnh_docs",
]

exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# MyST: ```{directive} fences, :::{note} blocks, $math$, anchors for the headings of every page (### and up).
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
# The notebooks are rendered with the outputs stored in them: running them takes minutes and needs the [train] extra.
nb_execution_mode = "off"

# Docstrings are Google style; the signatures carry the types, so the descriptions do not repeat them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autosummary_generate = False
add_module_names = False

# -n (nitpicky) checks every cross-reference inside the site; the names of other projects cannot be checked here
# (no intersphinx: the build needs no network beyond the package index).
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|optax|flax|nn|nnx|chex|orbax|ocp|grain|tfds|tensorflow_datasets|torch|"
               r"PIL|argparse|collections|typing|types|enum|os|pathlib|concurrent|threading|logging|"
               r"json|io|contextlib|functools|dataclasses|abc|builtins)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|Literal|Optional|Union|"
               r"PyTree|Path|Include|ArrayTree|Array|Params|Schedule|ScalarOrSchedule|Self|"
               r"int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|None|type|"
               r"Exception|ValueError|TypeError|RuntimeError|OSError|KeyError)"),
]

html_theme = "sphinx_book_theme"
html_title = f"dtnh_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
html_static_path = []
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False


def _copy_notebooks() -> None:
  """notebooks/*.ipynb -> docs/notebooks/ (git-ignored), rewritten only when changed: Sphinx reads only srcdir."""
  target = DOCS / "notebooks"
  target.mkdir(exist_ok=True)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    copy = target / notebook.name
    if not copy.exists() or copy.read_bytes() != notebook.read_bytes():
      shutil.copyfile(notebook, copy)
  for copy in target.glob("*.ipynb"):
    if not (ROOT / "notebooks" / copy.name).exists():
      os.remove(copy)


_copy_notebooks()
