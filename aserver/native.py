"""The optional C modules (built at install time when a C compiler is there).

Each has a pure-Python equivalent that is used when the C one is missing, or when
ASERVER_PURE_PYTHON is set (to compare the two, or to test the Python one).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def native(module: str) -> ModuleType | None:
    """The C module, or None when it was not built or ASERVER_PURE_PYTHON is set."""
    if os.environ.get("ASERVER_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# Every C module, by what it speeds up (for the start-up line).
MODULES = {"aserver.ipc._ring_core": "ring records", "aserver.worker._inline": "worker inline loop"}


def describe() -> str:
    """Which parts run in C here, e.g. "C: ring records, worker inline loop"."""
    built = [what for module, what in MODULES.items() if native(module) is not None]
    return "C: " + ", ".join(built) if built else "pure Python"
