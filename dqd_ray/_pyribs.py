"""pyribs without torch in processes that have no use for torch.

``import ribs`` imports torch (``ribs.typing`` tries it only to learn whether
it is installed), about 2.5 s of a 6 s import on a 2-core machine. The
coordinator, which runs the archive and the emitters on numpy arrays, never
needs torch, and it is started again for every run, resume, Tune trial and
restart. :func:`install` adds an import hook that runs pyribs' package import
with torch reported as absent when torch is not loaded yet. pyribs then
behaves exactly as on a machine without torch: its numpy paths are the same,
and ``array_api_compat`` recognises torch tensors from ``sys.modules``, not
from that flag. torch stays importable: the hook only answers while
``ribs/__init__`` executes, and a process that imported torch first (a
learner) gets pyribs' import unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading

_state = threading.local()


class _RibsLoader(importlib.abc.Loader):
    """pyribs' own loader, run with torch reported as absent."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _state.hiding = "torch" not in sys.modules
        try:
            self._loader.exec_module(module)
        finally:
            _state.hiding = False

    def __getattr__(self, name):  # resources, get_code, ... of the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ribs":
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _RibsLoader(spec.loader)
            return spec
        if getattr(_state, "hiding", False) and (name == "torch" or name.startswith("torch.")):
            raise ModuleNotFoundError(f"No module named {name!r} (while importing ribs)",
                                      name=name)
        return None


_FINDER = _Finder()


def install() -> None:
    """Adds the hook (once) in front of the import system's finders."""
    if "ribs" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
