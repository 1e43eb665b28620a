"""Who may connect: the conn process's admission policy (the original's check_open_cli).

Pure decisions on (address, counts), so they are cheap to unit-test; the conn server
counts, logs and closes. Checked once per connection, never per packet.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

from aserver.settings import LimitSettings

log = logging.getLogger("aserver.conn")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
AcceptHook = Callable[[str, int], bool]


class Refusal(NamedTuple):
    """Why a connection is refused: `reason` is the stats key suffix, `detail` the log text."""

    reason: str
    detail: str


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


def match_network(host: str, networks: Iterable[Network]) -> Network | None:
    """The first network holding `host` (an IPv4-mapped IPv6 address also matches IPv4
    networks); None when there is none or `host` is not an IP address."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    for net in networks:
        if (addr.version == net.version and addr in net) or (mapped is not None and mapped in net):
            return net
    return None


def per_process_share(total: int, processes: int) -> int:
    """Each conn process enforces an equal share of server.max_connections (rounded up,
    as the supervisor sizes each process's open-files limit)."""
    return -(-total // processes)


def check_capacity(open_now: int, limit: int, configured: int) -> Refusal | None:
    """`open_now` connections (this one excluded) against this process's share `limit`."""
    if open_now < limit:
        return None
    share = "" if limit == configured else f", {limit} per conn process"
    return Refusal("max_connections", f"server.max_connections ({configured}{share}) reached")


def check_address(
    host: str,
    same_ip: int,
    *,
    allow: tuple[Network, ...],
    deny: tuple[Network, ...],
    max_per_ip: int,
) -> Refusal | None:
    """deny wins over allow; an empty allow admits everything not denied. `same_ip`:
    connections already open from `host` in this process."""
    if deny:
        net = match_network(host, deny)
        if net is not None:
            return Refusal("deny", f"address in limits.deny ({net})")
    if allow and match_network(host, allow) is None:
        return Refusal("allow", "address not in limits.allow")
    if max_per_ip and same_ip >= max_per_ip:
        return Refusal("max_per_ip", f"limits.max_per_ip ({max_per_ip}) reached")
    return None


def load_accept_hook(spec: str) -> AcceptHook | None:
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    hook = getattr(importlib.import_module(module_name), attr, None)
    if not callable(hook):
        raise ImportError(f"limits.accept_hook {spec!r}: {module_name} has no callable {attr!r}")
    return hook


class Admission:
    """The [limits] policy of one conn process."""

    def __init__(self, limits: LimitSettings, max_connections: int, conn_processes: int) -> None:
        self.configured_max = max_connections
        self.max_connections = per_process_share(max_connections, conn_processes)
        self.max_per_ip = limits.max_per_ip
        self.allow = parse_networks(limits.allow)
        self.deny = parse_networks(limits.deny)
        self.accept_hook = load_accept_hook(limits.accept_hook)
        self.accept_hook_name = limits.accept_hook
        # Only these need the peer's address; without them admission is one comparison.
        self.by_address = bool(self.allow or self.deny or self.max_per_ip or self.accept_hook)

    def capacity(self, open_now: int) -> Refusal | None:
        return check_capacity(open_now, self.max_connections, self.configured_max)

    def address(self, host: str, port: int, same_ip: int) -> Refusal | None:
        refusal = check_address(host, same_ip, allow=self.allow, deny=self.deny, max_per_ip=self.max_per_ip)
        if refusal is not None or self.accept_hook is None:
            return refusal
        try:
            admitted = self.accept_hook(host, port)
        except Exception:
            # Fail closed: a broken hook must not let everyone in.
            log.exception("limits.accept_hook %s raised for %s:%s", self.accept_hook_name, host, port)
            return Refusal("accept_hook", f"limits.accept_hook {self.accept_hook_name} raised")
        if not admitted:
            return Refusal("accept_hook", f"refused by limits.accept_hook {self.accept_hook_name}")
        return None
