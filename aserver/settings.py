"""settings.toml, decoded and validated with msgspec.

A user's mistake must end start-up with the key's name and the reason, never a traceback:
every problem surfaces as a SettingsError whose message names the key.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from aserver.protocol import HEADER_SIZE, ByteOrder

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class SettingsError(Exception):
    """Bad settings; str() lists every problem found, one per line."""


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = "aserver"
    bind: str = "127.0.0.1:7000"
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    max_packet_size: Annotated[int, msgspec.Meta(ge=HEADER_SIZE, le=64 * 1024 * 1024)] = 1024 * 1024
    byte_order: Literal["little", "network"] = "little"
    backlog: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1024
    # Bytes of replies a client may leave unread before it is disconnected.
    max_reply_backlog: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 16 * 1024 * 1024
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stop_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class WorkerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    count: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    handlers: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["handlers.echo"]
    )
    # "connection": every packet of a connection goes to one worker (keeps reply order);
    # "user_id": by user_id; or "package.module:function" for a routing hook.
    routing: str = "connection"
    # Long-lived tasks per worker running handlers; connections are served concurrently,
    # the requests of one connection one after another.
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    # Requests a worker holds in memory before it leaves the rest in its ring (backpressure).
    max_pending: Annotated[int, msgspec.Meta(ge=1)] = 10_000


class RingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Bytes of each shared-memory ring (one per direction per conn process/worker pair).
    size: Annotated[int, msgspec.Meta(ge=64 * 1024, le=1024 * 1024 * 1024)] = 8 * 1024 * 1024


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    workers: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    ring: RingSettings = msgspec.field(default_factory=RingSettings)
    # Free-form table for the service's own handlers: `app.config` in every worker.
    service: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def byte_order(self) -> ByteOrder:
        return ByteOrder(self.server.byte_order)

    @property
    def bind_address(self) -> tuple[str, int]:
        return parse_bind(self.server.bind)


def parse_bind(value: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); raises ValueError with the reason."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"host {host!r} is not an IP address") from None
    return host, port


def _check_routing(value: str) -> None:
    if value not in ("connection", "user_id") and ":" not in value:
        raise ValueError(f"{value!r} is not 'connection', 'user_id' or 'module:function'")


# Rules on single values that msgspec's constraints cannot express.
_KEY_CHECKS = {
    ("server", "bind"): parse_bind,
    ("workers", "routing"): _check_routing,
}


def _check(settings: Settings) -> list[str]:
    """Rules across keys."""
    problems = []
    # A ring must hold a maximum-size packet with room to spare, or one such packet
    # would stall its connection forever.
    need = 4 * (settings.server.max_packet_size + 64)
    if settings.ring.size < need:
        problems.append(
            f"ring.size: {settings.ring.size} is too small for server.max_packet_size "
            f"{settings.server.max_packet_size} (needs at least {need})"
        )
    return problems


def from_toml_text(text: str, source: str = "settings") -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source}: not valid TOML: {exc}") from None
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = "settings") -> Settings:
    problems = _per_key_problems(raw)
    if not problems:
        try:
            settings = msgspec.convert(raw, Settings)
        except msgspec.ValidationError as exc:
            problems = [_explain(exc)]
        else:
            problems = _check(settings)
    if problems:
        raise SettingsError("\n".join(f"{source}: {p}" for p in problems))
    return settings


def load(path: str | Path, overrides: dict | None = None) -> Settings:
    """Read a settings file, apply command-line overrides ({'server.bind': ...}), validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, str(path))


def _per_key_problems(raw: dict) -> list[str]:
    """Validate each key on its own (every field has a default), so all problems are
    reported at once rather than the first only."""
    problems = []
    sections = {f.encode_name: f.type for f in msgspec.structs.fields(Settings)}
    for section, values in raw.items():
        struct_type = sections.get(section)
        if struct_type is None:
            problems.append(f"{section}: unknown section (expected one of {', '.join(sections)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a [{section}] table")
            continue
        if section == "service":
            continue  # the service's own keys: its handlers validate them
        for key, value in values.items():
            try:
                msgspec.convert({key: value}, struct_type)
            except msgspec.ValidationError as exc:
                problems.append(_explain(exc, prefix=section))
                continue
            check = _KEY_CHECKS.get((section, key))
            if check is not None:
                try:
                    check(value)
                except ValueError as exc:
                    problems.append(f"{section}.{key}: {exc}")
    return problems


def _explain(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec says 'Object contains unknown field `x` - at `$.server`'; name the key."""
    text, sep, where = str(exc).rpartition(" - at `$")
    if not sep:
        text, where = str(exc), ""
    where = ".".join(p for p in (prefix, where.rstrip("`").lstrip(".")) if p)
    if "unknown field" in text:
        field = text.split("`")[1]
        key = f"{where}.{field}" if where else field
        return f"{key}: unknown key"
    return f"{where}: {text}"
