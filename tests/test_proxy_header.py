"""PROXY protocol v1/v2 header parser (aserver.protocol.proxy_header)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aserver.protocol.header import PacketCodec
from aserver.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyInfo,
    is_trusted,
)

PACKET = PacketCodec().encode(7, seq_num=42)  # a bare 18-byte aserver packet
assert len(PACKET) == 18


def v2(
    ver_cmd: int = 0x21,
    fam: int = 0x11,
    block: bytes = b"",
    *,
    length: int | None = None,
) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(block) if length is None else length) + block


def v4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse(data: bytes) -> tuple[ProxyInfo, bytes] | None:
    return ProxyHeaderParser().feed(data)


def feed_pieces(pieces: list[bytes]) -> tuple[ProxyInfo, bytes] | None:
    """Feed pieces one by one; after the header is done, append later pieces to `rest`."""
    parser = ProxyHeaderParser()
    for i, piece in enumerate(pieces):
        result = parser.feed(piece)
        if result is not None:
            info, rest = result
            return info, rest + b"".join(pieces[i + 1 :])
    return None


V4_INFO = ProxyInfo(("192.168.0.1", 56324), ("192.168.0.11", 443), 2)
V6_INFO = ProxyInfo(("2001:db8::1", 1234), ("2001:db8::ff", 5678), 2)
TLVS = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0x20, b"\x01\x00\x00\x00\x00")

# (header, expected info): every one must parse, in any split, with PACKET left over.
VALID: list[tuple[bytes, ProxyInfo]] = [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ProxyInfo(("192.168.0.1", 56324), ("192.168.0.11", 443), 1)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ProxyInfo(("0.0.0.0", 0), ("255.255.255.255", 65535), 1)),
    (b"PROXY TCP6 2001:DB8::1 ::1 1234 80\r\n", ProxyInfo(("2001:db8::1", 1234), ("::1", 80), 1)),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ProxyInfo(
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), 1
        ),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyInfo(None, None, 1)),
    (b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", ProxyInfo(None, None, 1)),
    (b"PROXY UNKNOWN " + b"f" * 90 + b"\r\n", ProxyInfo(None, None, 1)),  # exactly 107 bytes
    (v2(0x21, 0x11, v4_block("192.168.0.1", "192.168.0.11", 56324, 443)), V4_INFO),
    (v2(0x21, 0x12, v4_block("192.168.0.1", "192.168.0.11", 56324, 443)), V4_INFO),  # UDP/IPv4
    (v2(0x21, 0x11, v4_block("192.168.0.1", "192.168.0.11", 56324, 443) + TLVS), V4_INFO),
    (v2(0x21, 0x21, v6_block("2001:db8::1", "2001:db8::ff", 1234, 5678)), V6_INFO),
    (v2(0x21, 0x21, v6_block("2001:db8::1", "2001:db8::ff", 1234, 5678) + TLVS), V6_INFO),
    (v2(0x20, 0x00), ProxyInfo(None, None, 2)),  # LOCAL (health check)
    (v2(0x20, 0x11, v4_block("10.0.0.1", "10.0.0.2", 1, 2)), ProxyInfo(None, None, 2)),  # LOCAL ignores the block
    (v2(0x20, 0xFF, b"\x00" * 5), ProxyInfo(None, None, 2)),  # LOCAL: family ignored, length skipped
    (v2(0x21, 0x00), ProxyInfo(None, None, 2)),  # PROXY UNSPEC
    (v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\x00") + b"/tmp/b".ljust(108, b"\x00")), ProxyInfo(None, None, 2)),
]
VALID_IDS = [f"{i}-{h[:20]!r}" for i, (h, _) in enumerate(VALID)]


@pytest.mark.parametrize(("header", "expected"), VALID, ids=VALID_IDS)
def test_valid_header_whole(header: bytes, expected: ProxyInfo) -> None:
    assert parse(header + PACKET) == (expected, PACKET)
    assert parse(header) == (expected, b"")


@pytest.mark.parametrize(("header", "expected"), VALID, ids=VALID_IDS)
def test_valid_header_byte_by_byte(header: bytes, expected: ProxyInfo) -> None:
    data = header + PACKET
    parser = ProxyHeaderParser()
    for i in range(len(header) - 1):
        assert parser.feed(data[i : i + 1]) is None
    assert parser.feed(data[len(header) - 1 :]) == (expected, PACKET)


def test_rest_keeps_the_packet_intact_and_decodable() -> None:
    header = v2(0x21, 0x11, v4_block("1.2.3.4", "5.6.7.8", 1000, 2000) + TLVS)
    info, rest = parse(header + PACKET + PACKET)  # type: ignore[misc]
    assert info.source == ("1.2.3.4", 1000)
    assert rest == PACKET + PACKET
    packet = PacketCodec().decode(rest[:18])
    assert (packet.cmd_id, packet.seq_num, packet.body) == (7, 42, b"")


def test_memoryview_and_bytearray_input() -> None:
    header, expected = VALID[0]
    assert ProxyHeaderParser().feed(memoryview(header + PACKET)) == (expected, PACKET)
    parser = ProxyHeaderParser()
    assert parser.feed(bytearray(header[:10])) is None
    assert parser.feed(memoryview(header[10:] + PACKET)) == (expected, PACKET)


def test_parser_is_one_shot() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_parser_stays_failed() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"PROXY UNKNOWN\r\n")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_gives_same_result(data: st.DataObject) -> None:
    header, expected = data.draw(st.sampled_from(VALID))
    whole = header + PACKET
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert feed_pieces(pieces) == (expected, PACKET)


def test_early_rejection_of_a_wrong_signature() -> None:
    # Decided on the first byte that cannot start either signature; no waiting for more.
    for first in (b"G", b"\x00", b"\n", b"\x16"):
        with pytest.raises(ProxyHeaderError):
            ProxyHeaderParser().feed(first)
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROX") is None
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"Z")
    parser = ProxyHeaderParser()
    assert parser.feed(V2_SIGNATURE[:7]) is None
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"X")


def test_early_rejection_on_v2_fixed_fields() -> None:
    for prefix in (V2_SIGNATURE + b"\x11", V2_SIGNATURE + b"\x22", V2_SIGNATURE + b"\x21\x13"):
        with pytest.raises(ProxyHeaderError):
            ProxyHeaderParser().feed(prefix)
    # An oversize or too-short length is refused before any address byte arrives.
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(v2(0x21, 0x11, length=0xFFFF))
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(v2(0x21, 0x21, length=12))


def test_v1_line_limit() -> None:
    # 106 bytes without CR: the CRLF can no longer end within 107 bytes.
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"f" * 91) is None  # 105 bytes
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"f")
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n")  # 108 bytes


def test_v2_size_cap_is_configurable() -> None:
    block = v4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xE0, b"x" * 1000)
    assert parse(v2(0x21, 0x11, block)) is not None
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser(max_v2_size=512).feed(v2(0x21, 0x11, block))
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_v2_size=100)


V4 = v4_block("1.2.3.4", "5.6.7.8", 1, 2)
MALFORMED: dict[str, bytes] = {
    "wrong signature": b"GET / HTTP/1.1\r\n\r\n",
    "lowercase proxy": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "truncated v1 then garbage": b"PROXY TCP4 1.2.3.4 \x00\x01\x02",
    "truncated v2 signature then garbage": V2_SIGNATURE[:9] + b"GET / HTTP/1.1\r\n",
    "v1 too long": b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    "v1 port 70000": b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n",
    "v1 port leading zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n",
    "v1 port sign": b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 80\r\n",
    "v1 port missing": b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
    "v1 extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 80 80 80\r\n",
    "v1 bad ip": b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    "v1 ip leading zero": b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
    "v1 short ip": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v1 hostname": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "v1 ipv6 in tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1 ipv4 in tcp6": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 ipv6 scope": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v1 ipv6 double ::": b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    "v1 double space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1 unknown protocol": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 UNKNOWNX": b"PROXY UNKNOWNX\r\n",
    "v1 bare LF": b"PROXY UNKNOWN\n",
    "v1 CR without LF": b"PROXY UNKNOWN\rX\n",
    "v1 tab": b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 non-ascii": b"PROXY TCP4 1.2.3.\xd9\xa1 5.6.7.8 1 2\r\n",
    "v2 bad version 1": v2(0x11, 0x11, V4),
    "v2 bad version 3": v2(0x31, 0x11, V4),
    "v2 bad command": v2(0x22, 0x11, V4),
    "v2 bad command 0xf": v2(0x2F, 0x11, V4),
    "v2 bad family": v2(0x21, 0x41, V4),
    "v2 bad transport": v2(0x21, 0x13, V4),
    "v2 inet with unspec transport": v2(0x21, 0x10, V4),
    "v2 length too short for ipv4": v2(0x21, 0x11, V4[:11]),
    "v2 length too short for ipv6": v2(0x21, 0x21, V4 * 2),
    "v2 length too short for unix": v2(0x21, 0x31, b"\x00" * 215),
    "v2 oversize length": v2(0x21, 0x11, V4, length=0xFFFF),
    "v2 just over the cap": v2(0x21, 0x11, V4 + tlv(0xE0, b"x" * (4096 - 16 - 12 - 3 + 1))),
    "v2 truncated tlv header": v2(0x21, 0x11, V4 + b"\x01\x00"),
    "v2 tlv overruns": v2(0x21, 0x11, V4 + tlv(0x01, b"h2")[:-1]),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_raises(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data + PACKET)
    # Byte by byte too: it must raise at some point, never return an address.
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        for i in range(len(data)):
            assert parser.feed(data[i : i + 1]) is None
        parser.feed(PACKET)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_malformed_in_any_split_never_yields_a_result(data: st.DataObject) -> None:
    bad = data.draw(st.sampled_from(list(MALFORMED.values()))) + PACKET
    cuts = sorted(data.draw(st.lists(st.integers(0, len(bad)), max_size=12)))
    pieces = [bad[a:b] for a, b in zip([0, *cuts], [*cuts, len(bad)], strict=True)]
    with pytest.raises(ProxyHeaderError):
        feed_pieces(pieces)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    )
)
def test_fuzz_only_raises_proxy_header_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    if result is not None:
        info, rest = result
        assert info.version in (1, 2)
        assert data.endswith(rest)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("10.1.2.3", True),
        ("10.255.0.1", True),
        ("11.0.0.1", False),
        ("192.168.1.5", True),
        ("192.168.2.5", False),
        ("::ffff:10.1.2.3", True),  # IPv4 peer on a dual-stack listener
        ("fd00::1", True),
        ("fe80::1", False),
        ("", False),  # AF_UNIX peer
        ("not-an-ip", False),
    ],
)
def test_is_trusted(peer: str, expected: bool) -> None:
    trusted = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.1.0/24", "fd00::/8")]
    assert is_trusted(peer, trusted) is expected


def test_is_trusted_empty_list() -> None:
    assert is_trusted("127.0.0.1", []) is False
