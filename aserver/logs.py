"""Logging setup shared by every process: one line per record, tagged with the role.

With `[logging] dir` set, each process writes its own file (NAME-supervisor.log,
NAME-conn-0.log, NAME-worker-1.log, ...), rotated by size: one writer per file, so
rotation needs no locking between processes. Otherwise everything goes to stderr.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aserver.settings import LoggingSettings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, role, pid, logger, message, and exc_info
    (the traceback text) when there is one."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(role: str, fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(role)
    return logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")


def log_file(directory: str, name: str, role: str) -> Path:
    return Path(directory) / f"{name}-{role.replace(' ', '-')}.log"


# Set by setup(): whether stderr already shows INFO records (see announce()).
_stderr_shows_info = True


def setup(level: str, role: str, options: LoggingSettings | None = None, name: str = "aserver") -> None:
    """Configure the root logger of this process. Raises OSError if the log file cannot be opened."""
    global _stderr_shows_info
    fmt = options.format if options is not None else "text"
    handlers: list[logging.Handler] = []
    if options is not None and options.dir:
        path = log_file(options.dir, name, role)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=options.max_bytes, backupCount=options.max_files - 1, encoding="utf-8"
        )
        handler.setFormatter(_formatter(role, fmt))
        handlers.append(handler)
        if role == "supervisor":
            # Whoever started the server (a terminal, systemd's journal) still sees why
            # it failed to start or stopped.
            console = logging.StreamHandler(sys.stderr)
            console.setLevel(logging.ERROR)
            console.setFormatter(_formatter(role, fmt))
            handlers.append(console)
        _stderr_shows_info = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter(role, fmt))
        handlers.append(handler)
        _stderr_shows_info = True
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def announce(logger: logging.Logger, message: str) -> None:
    """Log at INFO; when logging to files, also print the line on stderr: the readiness
    line is what scripts and aserver.testing wait for."""
    logger.info("%s", message)
    if not _stderr_shows_info:
        print(message, file=sys.stderr, flush=True)
