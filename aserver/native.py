"""The optional C modules (built at install time when a C compiler and the Python headers
are there).

Each has a pure-Python equivalent that is used when the C one is missing or stale (built
from older sources: its ABI number differs), or when ASERVER_PURE_PYTHON is set to
anything but "" or "0" (to compare the two, or to test the Python one).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger("aserver")

# Every C module: what it speeds up (for the start-up line) and the ABI number its source
# declares (raised with every change to a call's signature or meaning).
MODULES = {
    "aserver.ipc._ring_core": ("ring records", 8),
    "aserver.worker._inline": ("worker inline loop", 4),
    "aserver.conn._conn_core": ("conn per-request steps", 5),
}


def native(module: str) -> ModuleType | None:
    """The C module, or None when it was not built, is stale, or ASERVER_PURE_PYTHON is set."""
    if os.environ.get("ASERVER_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        loaded = importlib.import_module(module)
    except ImportError:
        return None
    if getattr(loaded, "ABI", None) != MODULES[module][1]:
        log.warning("%s was built from older sources (reinstall to rebuild it): using Python instead", module)
        return None
    return loaded


def describe() -> str:
    """Which parts run in C here, e.g. "C: ring records, worker inline loop, conn per-request steps"."""
    built = [what for module, (what, _abi) in MODULES.items() if native(module) is not None]
    return "C: " + ", ".join(built) if built else "pure Python"
