"""Sans-I/O parser for the HAProxy PROXY protocol header, versions 1 (text) and 2 (binary).

A proxy (HAProxy `send-proxy` / `send-proxy-v2`, cloud load balancers) prepends this header
to a connection so the server learns the real client address. Feed the first bytes of the
connection to a ProxyHeaderParser; it returns the addresses plus whatever bytes followed
the header (they belong to the application protocol, e.g. go straight to FrameDecoder).

Spec: haproxy doc/proxy-protocol.txt. This is a security boundary (a client that can send
this header can claim any address), hence the strictness: anything that does not exactly
match the spec raises ProxyHeaderError, as early as the offending byte arrives, and only
peers passing `is_trusted` should be parsed at all (the spec forbids guessing whether a
header is present: a listener either requires it or never accepts it).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "V1_MAX_LINE",
    "V2_SIGNATURE",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "ProxyInfo",
    "is_trusted",
]

V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107  # worst case "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature + ver/cmd + fam + 2-byte length
DEFAULT_MAX_V2_SIZE = 4096  # whole v2 header (16 fixed bytes + addresses + TLVs)

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# The only family/protocol bytes the spec lists, with their address block size. UNSPEC (0x00)
# and AF_UNIX carry nothing usable as (host, port): they fall back to the real endpoints.
_V2_ADDR_LEN = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_V4_BLOCK = struct.Struct("!4s4sHH")
_V6_BLOCK = struct.Struct("!16s16sHH")
_U16 = struct.Struct("!H")

_PRINTABLE = bytes(range(0x20, 0x7F))
# Spec: decimal, no leading zeros (ipaddress re-checks the 0..255 range).
_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# Hex groups, colons and an optional dotted tail; no '%scope', which ipaddress would accept.
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(Exception):
    """Malformed or unsupported PROXY header: the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What the header said. `source`/`destination` are (ip, port), or None when the
    connection must be treated as its real endpoints: v2 LOCAL (proxy health checks),
    v1 UNKNOWN, v2 UNSPEC and AF_UNIX."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    version: int


class ProxyHeaderParser:
    """Feed the first bytes of a connection in any split; get (ProxyInfo, rest) once the
    whole header has arrived. One-shot: one parser per connection."""

    __slots__ = ("_buffer", "_done", "_failed", "max_v2_size")

    def __init__(self, max_v2_size: int = DEFAULT_MAX_V2_SIZE) -> None:
        if max_v2_size < V2_FIXED + max(_V2_ADDR_LEN.values()):
            raise ValueError(f"max_v2_size must be at least {V2_FIXED + max(_V2_ADDR_LEN.values())}")
        self.max_v2_size = max_v2_size
        self._buffer = bytearray()
        self._done = False
        self._failed = False

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[ProxyInfo, bytes] | None:
        """Return (info, bytes after the header) once complete, None if more bytes are needed.

        Raises ProxyHeaderError as soon as the bytes so far cannot start a valid header.
        """
        if self._done:
            raise RuntimeError("PROXY header already parsed; feed the application protocol instead")
        if self._failed:
            raise ProxyHeaderError("PROXY header already rejected")
        if self._buffer:
            self._buffer += data
            buf: bytes | bytearray | memoryview = self._buffer
        else:
            buf = data  # common case: whole header in the first read, no copy into the buffer
        try:
            result = self._parse(buf)
        except ProxyHeaderError:
            self._failed = True
            self._buffer = bytearray()
            raise
        if result is None:
            if buf is not self._buffer:
                self._buffer = bytearray(buf)
            return None
        info, size = result
        self._done = True
        self._buffer = bytearray()
        return info, bytes(buf[size:])

    def _parse(self, buf: bytes | bytearray | memoryview) -> tuple[ProxyInfo, int] | None:
        size = len(buf)
        if size == 0:
            return None
        start = bytes(buf[:12])
        if V1_PREFIX.startswith(start[:6]):
            return self._parse_v1(buf) if size >= len(V1_PREFIX) else None
        if V2_SIGNATURE.startswith(start):
            return self._parse_v2(buf) if size > len(V2_SIGNATURE) else None
        raise ProxyHeaderError(f"not a PROXY protocol header: {start!r}")

    # -- version 1 ------------------------------------------------------------------------

    def _parse_v1(self, buf: bytes | bytearray | memoryview) -> tuple[ProxyInfo, int] | None:
        head = bytes(buf[:V1_MAX_LINE])
        cr = head.find(b"\r")
        line = head if cr < 0 else head[:cr]
        # The line is printable US-ASCII; this also rejects a bare LF or binary junk at once.
        if line.translate(None, _PRINTABLE):
            raise ProxyHeaderError("PROXY v1 line contains a non-printable byte or a bare LF")
        # The CRLF must end within V1_MAX_LINE bytes, so the CR must sit at index <= 105.
        if cr < 0 or cr > V1_MAX_LINE - 2:
            if len(head) >= V1_MAX_LINE - 1:
                raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LINE} bytes")
            return None
        if cr + 1 == len(head):
            return None
        if head[cr + 1] != 0x0A:  # spec: a lone CR must not be taken as the line end
            raise ProxyHeaderError("PROXY v1 line: CR not followed by LF")
        return _v1_info(line.decode("ascii")), cr + 2

    # -- version 2 ------------------------------------------------------------------------

    def _parse_v2(self, buf: bytes | bytearray | memoryview) -> tuple[ProxyInfo, int] | None:
        head = bytes(buf[:V2_FIXED])
        ver_cmd = head[12]
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
        command = ver_cmd & 0x0F
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyHeaderError(f"PROXY v2: unsupported command {command:#x}")
        if len(head) < 14:
            return None
        family = head[13]
        # LOCAL: the spec says the family is ignored; PROXY: only the listed combinations.
        if command == _CMD_PROXY and family not in _V2_ADDR_LEN:
            raise ProxyHeaderError(f"PROXY v2: unsupported family/protocol {family:#04x}")
        if len(head) < V2_FIXED:
            return None
        (length,) = _U16.unpack_from(head, 14)
        total = V2_FIXED + length
        if total > self.max_v2_size:
            raise ProxyHeaderError(f"PROXY v2: header of {total} bytes exceeds {self.max_v2_size}")
        addr_len = _V2_ADDR_LEN[family] if command == _CMD_PROXY else 0
        if length < addr_len:
            raise ProxyHeaderError(f"PROXY v2: length {length} too short for family {family:#04x}")
        if len(buf) < total:
            return None
        if command == _CMD_LOCAL or family == 0x00:
            # Health check / unspecified: the block is skipped unread, as the spec says.
            return ProxyInfo(None, None, 2), total
        block = bytes(buf[V2_FIXED:total])
        _check_tlvs(block, addr_len)
        if family >> 4 == 0x1:
            src, dst, sport, dport = _V4_BLOCK.unpack_from(block)
            return ProxyInfo(
                (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport), 2
            ), total
        if family >> 4 == 0x2:
            src, dst, sport, dport = _V6_BLOCK.unpack_from(block)
            return ProxyInfo(
                (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport), 2
            ), total
        return ProxyInfo(None, None, 2), total  # AF_UNIX: no (host, port) to report


def _v1_info(line: str) -> ProxyInfo:
    parts = line.split(" ")
    proto = parts[1]
    if proto == "UNKNOWN":
        return ProxyInfo(None, None, 1)  # spec: ignore whatever follows up to the CRLF
    if proto not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1: unsupported protocol {proto[:16]!r}")
    if len(parts) != 6:  # exactly one space between exactly four fields
        raise ProxyHeaderError("PROXY v1: malformed line")
    return ProxyInfo(
        (_v1_address(parts[2], proto), _v1_port(parts[4])),
        (_v1_address(parts[3], proto), _v1_port(parts[5])),
        1,
    )


def _v1_address(text: str, proto: str) -> str:
    try:
        if proto == "TCP4":
            if _V1_IPV4.fullmatch(text):
                return str(ipaddress.IPv4Address(text))
        elif _V1_IPV6.fullmatch(text):
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise ProxyHeaderError(f"PROXY v1: bad {proto} address {text[:48]!r}")


def _v1_port(text: str) -> int:
    if _V1_PORT.fullmatch(text):
        port = int(text)
        if port <= 0xFFFF:
            return port
    raise ProxyHeaderError(f"PROXY v1: bad port {text[:16]!r}")


def _check_tlvs(block: bytes, offset: int) -> None:
    """The bytes after the addresses must be whole TLVs (type, 2-byte length, value).

    Their content is ignored (nothing here needs ALPN/SNI/SSL info, and verifying CRC32C is
    optional), but a truncated TLV means the sender and we disagree on the framing.
    """
    end = len(block)
    while offset < end:
        if end - offset < 3:
            raise ProxyHeaderError("PROXY v2: truncated TLV")
        (length,) = _U16.unpack_from(block, offset + 1)
        offset += 3 + length
        if offset > end:
            raise ProxyHeaderError("PROXY v2: TLV overruns the header")


def is_trusted(peer_ip: str, trusted: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Is the immediate peer (the TCP connection's address) allowed to send a PROXY header?

    An IPv4-mapped IPv6 peer (dual-stack listener) also matches IPv4 networks. A peer that
    is not an IP address (e.g. an AF_UNIX socket) is not trusted.
    """
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        candidates.append(addr.ipv4_mapped)
    return any(a.version == net.version and a in net for net in trusted for a in candidates)
