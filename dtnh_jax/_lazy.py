"""Lazy package attributes (PEP 562), as numpy and scipy do: the ``__getattr__`` and ``__dir__`` of a package
whose public names are imported from their modules when first used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(package: str, namespace: dict[str, Any], exports: Mapping[str, str],
           submodules: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for ``package``, whose module globals are ``namespace``.

  ``exports`` maps each public name to the module defining it: a full name (``dtnh_jax.transform``) or one
  relative to ``package`` (``datasets``); ``submodules`` are reachable as attributes.
  """
  submodules = tuple(submodules)

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name in exports:
      module = exports[name]
      value = getattr(importlib.import_module(module if module.startswith("dtnh_jax") else f"{package}.{module}"),
                      name)
      namespace[name] = value  # the next lookup is a plain attribute
      return value
    if name in submodules:
      return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted(set(namespace) | set(namespace.get("__all__", ())) | set(submodules))

  return __getattr__, __dir__
