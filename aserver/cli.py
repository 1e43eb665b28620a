"""Command line: run the server, or check / stop / reload / status a server's settings."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from aserver import logs
from aserver.settings import Settings, SettingsError, load

COMMANDS = ("check", "stop", "reload", "status")


def _parser(command: str | None) -> argparse.ArgumentParser:
    prog = "python -m aserver" + (f" {command}" if command else "")
    descriptions = {
        None: "Run the aserver supervisor in the foreground.",
        "check": "Validate a settings file and list every problem.",
        "stop": "Stop the running server gracefully (SIGTERM to the pid in the pid file).",
        "reload": "Reload settings and handler code without dropping clients (SIGHUP).",
        "status": "Print the running server's processes.",
    }
    parser = argparse.ArgumentParser(prog=prog, description=descriptions[command])
    parser.add_argument("--settings", default="settings.toml", help="settings file (default: ./settings.toml)")
    if command is None:
        parser.add_argument("--bind", metavar="HOST:PORT", help="override server.bind")
        parser.add_argument("--workers", type=int, metavar="N", help="override workers.count")
        parser.add_argument("--conn-processes", type=int, metavar="N", help="override server.conn_processes")
    return parser


def _load(path: str, overrides: dict | None = None) -> Settings | None:
    try:
        return load(path, overrides)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    args = _parser(command).parse_args(argv[1:] if command else argv)

    if command is None:
        overrides = {}
        for key, value in (("server.bind", args.bind), ("workers.count", args.workers),
                           ("server.conn_processes", args.conn_processes)):
            if value is not None:
                overrides[key] = value
        settings = _load(args.settings, overrides)
        if settings is None:
            return 2
        try:
            logs.setup(settings.server.log_level, "supervisor", settings.logging, settings.server.name)
        except OSError as exc:
            print(f"{args.settings}: logging.dir: cannot open the log file: {exc}", file=sys.stderr)
            return 2
        from aserver.supervisor.supervisor import serve

        return serve(settings, args.settings, overrides)

    settings = _load(args.settings)
    if settings is None:
        return 2
    if command == "check":
        print(f"{args.settings}: OK ({settings.workers.count} workers, listening on {settings.server.bind})")
        return 0
    from aserver.supervisor.pidfile import read_pid

    try:
        pid = read_pid(settings.supervisor.pid_file)
    except ProcessLookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    if command == "status":
        from aserver.supervisor.status import format_table, query

        print(format_table(query(settings.supervisor.pid_file + ".sock")))
        return 0
    os.kill(pid, signal.SIGTERM if command == "stop" else signal.SIGHUP)
    print(f"sent {'SIGTERM' if command == 'stop' else 'SIGHUP'} to pid {pid}")
    return 0
