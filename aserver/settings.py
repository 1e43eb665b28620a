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
    max_reply_backlog: Annotated[int, msgspec.Meta(ge=64 * 1024, le=1 << 40)] = 16 * 1024 * 1024
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stop_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    # Conn processes sharing the listening socket; losing one loses only its clients.
    conn_processes: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class SupervisorSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Locked while the server runs: a second instance with the same file is refused.
    # `status` talks to the supervisor through "<pid_file>.sock".
    pid_file: Annotated[str, msgspec.Meta(min_length=1)] = "aserver.pid"
    # A child whose event loop does not answer a ping for heartbeat_timeout is killed.
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    heartbeat_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    # More than max_restarts deaths of one child within restart_window seconds stops
    # the server instead of restarting it forever.
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_window: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # "module:function" called in the supervisor as f(role, index, pid, exitcode) after
    # any child exits: the place for a crash alert.
    on_child_exit: str = ""


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
    max_pending: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    # Wire format of typed handlers' bodies (@app.handler(..., request=Struct)).
    body_format: Literal["msgpack", "json"] = "msgpack"


class RingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Bytes of each shared-memory ring (one per direction per conn process/worker pair).
    size: Annotated[int, msgspec.Meta(ge=64 * 1024, le=1024 * 1024 * 1024)] = 8 * 1024 * 1024


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Prometheus endpoint served by the supervisor (GET http://bind/metrics).
    enabled: bool = False
    bind: str = "127.0.0.1:9100"


class LoggingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # One file per process (NAME-supervisor.log, NAME-conn-0.log, NAME-worker-0.log) in
    # this directory, rotated by size; empty: everything to stderr.
    dir: str = ""
    max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 10 * 1024 * 1024
    # Files kept per process, the current one included.
    max_files: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 5
    # "json": one object per line (time, level, role, pid, logger, message, exc_info).
    format: Literal["text", "json"] = "text"


class LimitSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Connections from one client IP (per conn process); 0: unlimited.
    max_per_ip: Annotated[int, msgspec.Meta(ge=0)] = 0
    # CIDRs ("10.0.0.0/8", "::1/128", or a bare address). deny wins; an empty allow
    # admits every address not denied.
    allow: list[str] = msgspec.field(default_factory=list)
    deny: list[str] = msgspec.field(default_factory=list)
    # "module:function" called in the conn process as f(host, port) -> bool; False refuses.
    accept_hook: str = ""
    # Close a connection that sent nothing for this long with no request in flight; 0: off.
    idle_timeout: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Close a connection whose packet is still incomplete this long after its first
    # byte arrived (slowloris); 0: off.
    packet_timeout: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class ProxyProtocolSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Every connection from a trusted address must start with a PROXY v1/v2 header;
    # connections from other addresses are closed.
    enabled: bool = False
    trusted: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    # Seconds a connection may take to send its PROXY header.
    header_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    workers: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    ring: RingSettings = msgspec.field(default_factory=RingSettings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    proxy_protocol: ProxyProtocolSettings = msgspec.field(default_factory=ProxyProtocolSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    # Free-form table for the service's own handlers: `app.config` in every worker.
    service: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def byte_order(self) -> ByteOrder:
        return ByteOrder(self.server.byte_order)

    @property
    def bind_address(self) -> tuple[str, int]:
        return parse_bind(self.server.bind)

    @property
    def metrics_address(self) -> tuple[str, int]:
        return parse_bind(self.metrics.bind)


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


def _check_hook(value: str) -> None:
    if value and ":" not in value:
        raise ValueError(f"{value!r} is not 'module:function'")


def _check_networks(value: list[str]) -> None:
    bad = []
    for text in value:
        try:
            ipaddress.ip_network(text)
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError("not a CIDR: " + "; ".join(bad))


# Rules on single values that msgspec's constraints cannot express.
_KEY_CHECKS = {
    ("server", "bind"): parse_bind,
    ("workers", "routing"): _check_routing,
    ("supervisor", "on_child_exit"): _check_hook,
    ("limits", "accept_hook"): _check_hook,
    ("limits", "allow"): _check_networks,
    ("limits", "deny"): _check_networks,
    ("proxy_protocol", "trusted"): _check_networks,
    ("metrics", "bind"): parse_bind,
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
    if settings.supervisor.heartbeat_timeout <= settings.supervisor.heartbeat_interval:
        problems.append(
            f"supervisor.heartbeat_timeout: {settings.supervisor.heartbeat_timeout} must be longer than "
            f"supervisor.heartbeat_interval {settings.supervisor.heartbeat_interval}"
        )
    return problems


# What a reload (SIGHUP) can change; anything else needs a restart.
RELOADABLE = {
    ("workers", "handlers"),
    ("workers", "concurrency"),
    ("workers", "max_pending"),
    ("server", "log_level"),
    ("server", "stop_timeout"),
    ("service", None),
}


def reload_merge(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """The settings to run after a reload: `new` where it may change, `old` elsewhere.
    Also returns the keys that changed but need a restart."""
    merged = msgspec.structs.replace(old)
    needs_restart = []
    for section in msgspec.structs.fields(Settings):
        name = section.name
        old_value, new_value = getattr(old, name), getattr(new, name)
        if not isinstance(old_value, msgspec.Struct):
            if (name, None) in RELOADABLE:
                merged = msgspec.structs.replace(merged, **{name: new_value})
            elif old_value != new_value:
                needs_restart.append(name)
            continue
        changes = {}
        for field in msgspec.structs.fields(type(old_value)):
            before, after = getattr(old_value, field.name), getattr(new_value, field.name)
            if before == after:
                continue
            if (name, field.name) in RELOADABLE:
                changes[field.name] = after
            else:
                needs_restart.append(f"{name}.{field.name}")
        if changes:
            merged = msgspec.structs.replace(merged, **{name: msgspec.structs.replace(old_value, **changes)})
    return merged, needs_restart


def from_toml_text(text: str, source: str = "settings") -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source}: not valid TOML: {exc}") from None
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = "settings") -> Settings:
    problems, valid = _per_key_problems(raw)
    # Rules across keys are checked on the valid keys too, so they are reported
    # alongside the others rather than only once those are fixed.
    try:
        settings = msgspec.convert(valid, Settings)
    except msgspec.ValidationError as exc:
        problems.append(_explain(exc))
    else:
        problems += _check(settings)
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
        section, _, key = dotted.partition(".")
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # otherwise the section itself is reported as wrong
            table[key] = value
    return from_dict(raw, str(path))


def _per_key_problems(raw: dict) -> tuple[list[str], dict]:
    """Validate each key on its own (every field has a default), so all problems are
    reported at once rather than the first only. Also returns the keys that passed."""
    problems = []
    valid: dict[str, dict] = {}
    sections = {f.encode_name: f.type for f in msgspec.structs.fields(Settings)}
    for section, values in raw.items():
        struct_type = sections.get(section)
        if struct_type is None:
            problems.append(f"{section}: unknown section (expected one of {', '.join(sections)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a [{section}] table")
            continue
        valid[section] = {}
        if section == "service":
            valid[section] = values  # the service's own keys: its handlers validate them
            continue
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
                    continue
            valid[section][key] = value
    return problems, valid


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
