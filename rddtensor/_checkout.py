"""``rddtensor.layers`` and ``rddtensor.optim`` when ``rddtensor`` is imported from a source checkout.

The repository keeps them in its top-level folders ``layers/`` and ``optim/``; ``pyproject.toml``
maps them into the package (``package-dir``), so an installed rddtensor (wheel, ``pip install .``)
has them inside its own folder and this module does nothing. Imported from a checkout instead
(``python -m pytest`` at its root, ``PYTHONPATH=<checkout>`` in a subprocess or a Spark worker),
``rddtensor/`` has no such folders: ``mount`` adds a finder that loads exactly those two names
from the checkout's folders, under their ``rddtensor.`` names only. Nothing here makes a
top-level ``layers`` or ``optim`` importable.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

SUBPACKAGES = ("layers", "optim")  # pyproject.toml: [tool.setuptools] package-dir


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, folders: dict):
        self.package, self.folders = package, folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def mount(package: str, init_file: str) -> None:
    """Map ``<package>.layers`` / ``.optim`` to the checkout's folders, if this is a checkout."""
    here = os.path.dirname(os.path.abspath(init_file))
    root = os.path.dirname(here)
    folders = {f"{package}.{name}": os.path.join(root, name) for name in SUBPACKAGES
               if not os.path.isdir(os.path.join(here, name))
               and os.path.isfile(os.path.join(root, name, "__init__.py"))}
    if folders and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(package, folders))
