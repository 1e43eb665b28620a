"""Command line: `python -m aserver [run options]` and `python -m aserver check`."""

from __future__ import annotations

import argparse
import sys

from aserver import logs
from aserver.settings import SettingsError, load


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aserver", description="Run the aserver supervisor in the foreground."
    )
    parser.add_argument("--settings", default="settings.toml", help="settings file (default: ./settings.toml)")
    parser.add_argument("--bind", metavar="HOST:PORT", help="override server.bind")
    parser.add_argument("--workers", type=int, metavar="N", help="override workers.count")
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aserver check", description="Validate a settings file.")
    parser.add_argument("--settings", default="settings.toml", help="settings file (default: ./settings.toml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        args = _check_parser().parse_args(argv[1:])
        try:
            settings = load(args.settings)
        except SettingsError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{args.settings}: OK ({settings.workers.count} workers, listening on {settings.server.bind})")
        return 0

    args = _run_parser().parse_args(argv)
    overrides = {}
    if args.bind is not None:
        overrides["server.bind"] = args.bind
    if args.workers is not None:
        overrides["workers.count"] = args.workers
    try:
        settings = load(args.settings, overrides)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    logs.setup(settings.server.log_level, "supervisor")
    from aserver.supervisor.supervisor import serve

    return serve(settings)
