"""Sans-I/O protocol layer: header codec, FrameDecoder, iter_packets, split_run."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aserver.protocol import (
    HEADER_SIZE,
    ByteOrder,
    FrameDecoder,
    Header,
    Packet,
    PacketCodec,
    ProtocolError,
    iter_packets,
    split_run,
)

U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
ORDERS = st.sampled_from([ByteOrder.LITTLE, ByteOrder.NETWORK])
MAX_LEN = 4096

packets_st = st.builds(
    Packet,
    seq_num=U32,
    cmd_id=U16,
    status_code=U32,
    user_id=U32,
    body=st.binary(min_size=0, max_size=2000),
)


def encode(codec: PacketCodec, p: Packet) -> bytes:
    return codec.encode(p.cmd_id, p.body, seq_num=p.seq_num, status_code=p.status_code, user_id=p.user_id)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split `data` at the given (unsorted, possibly repeated) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[start:p])
        start = p
    return pieces


def feed_all(decoder: FrameDecoder, pieces, as_type=bytes) -> bytes:
    out = bytearray()
    for piece in pieces:
        run = decoder.feed(as_type(piece))
        assert isinstance(run, (bytes, bytearray, memoryview))
        out += run
    return bytes(out)


def feed_until_error(decoder: FrameDecoder, pieces) -> tuple[bytes, ProtocolError | None]:
    """Feed pieces, collecting runs, until a ProtocolError.

    Accepts either way a decoder may hand over the packets that preceded the bad header in
    the same chunk: returned first with the error raised on a later feed (an empty feed is
    made at the end to surface it), or attached to the error as `run`/`packets`.
    """
    out = bytearray()
    for piece in [*pieces, b""]:
        try:
            out += decoder.feed(piece)
        except ProtocolError as exc:
            out += getattr(exc, "run", None) or getattr(exc, "packets", None) or b""
            return bytes(out), exc
    return bytes(out), None


# -- header codec ---------------------------------------------------------------------


@given(order=ORDERS, p=packets_st)
def test_encode_decode_roundtrip(order, p):
    codec = PacketCodec(order)
    wire = encode(codec, p)
    assert len(wire) == HEADER_SIZE + len(p.body)
    assert codec.decode(wire) == p
    assert codec.decode_header(wire) == Header(len(wire), p.seq_num, p.cmd_id, p.status_code, p.user_id)


def test_header_layout_little_and_network():
    little = PacketCodec(ByteOrder.LITTLE).encode(0x0102, b"xy", seq_num=7, status_code=9, user_id=0xA0B0C0D0)
    assert little[:HEADER_SIZE] == struct.pack("<IIHII", 20, 7, 0x0102, 9, 0xA0B0C0D0)
    assert little[:4] == b"\x14\x00\x00\x00"
    network = PacketCodec(ByteOrder.NETWORK).encode(0x0102, b"xy", seq_num=7, status_code=9, user_id=0xA0B0C0D0)
    assert network[:HEADER_SIZE] == struct.pack(">IIHII", 20, 7, 0x0102, 9, 0xA0B0C0D0)
    assert network[:4] == b"\x00\x00\x00\x14"
    assert little[HEADER_SIZE:] == network[HEADER_SIZE:] == b"xy"


def test_decode_rejects_length_mismatch():
    codec = PacketCodec()
    wire = codec.encode(1, b"abc")
    with pytest.raises(ValueError):
        codec.decode(wire + b"x")
    with pytest.raises(ValueError):
        codec.decode(wire[:-1])


# -- FrameDecoder round trips ---------------------------------------------------------


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    order=ORDERS,
    packets=st.lists(packets_st, max_size=12),
    cuts=st.lists(st.integers(0, 30_000), max_size=20),
    as_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_decoder_roundtrip_arbitrary_splits(order, packets, cuts, as_type):
    codec = PacketCodec(order)
    stream = b"".join(encode(codec, p) for p in packets)
    decoder = FrameDecoder(codec, MAX_LEN)
    out = feed_all(decoder, cut(stream, cuts), as_type)
    assert out == stream
    assert decoder.buffered == 0
    assert list(iter_packets(out, codec)) == packets


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(order=ORDERS, packets=st.lists(packets_st, min_size=1, max_size=4))
def test_decoder_one_byte_at_a_time(order, packets):
    codec = PacketCodec(order)
    stream = b"".join(encode(codec, p) for p in packets)
    decoder = FrameDecoder(codec, MAX_LEN)
    runs = []
    for i in range(len(stream)):
        run = decoder.feed(stream[i : i + 1])
        if run:
            runs.append(bytes(run))
            # a packet completes only on its last byte, and then nothing stays buffered
            assert decoder.buffered == 0
    assert runs == [encode(codec, p) for p in packets]
    assert [codec.decode(r) for r in runs] == packets


@given(order=ORDERS, packets=st.lists(packets_st, min_size=1, max_size=6), data=st.data())
def test_runs_hold_only_whole_packets(order, packets, data):
    """Every run returned is itself a sequence of whole packets, and the buffered
    count is exactly the bytes of the unfinished packet."""
    codec = PacketCodec(order)
    stream = b"".join(encode(codec, p) for p in packets)
    decoder = FrameDecoder(codec, MAX_LEN)
    got = []
    fed = 0
    for piece in cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=10))):
        run = bytes(decoder.feed(piece))
        fed += len(piece)
        in_run = list(iter_packets(run, codec))
        assert decoder.count == len(in_run)  # the conn process trusts this count
        got.extend(in_run)
        assert sum(HEADER_SIZE + len(p.body) for p in got) + decoder.buffered == fed
    assert got == packets


def test_decoder_returned_run_survives_later_feeds():
    """A run handed back must not change when more data is fed afterwards."""
    codec = PacketCodec()
    a, b, c = (codec.encode(i, bytes([i]) * 50) for i in (1, 2, 3))
    decoder = FrameDecoder(codec, MAX_LEN)
    assert decoder.feed(a[:10]) == b""
    run1 = decoder.feed(a[10:] + b[:5])
    snapshot1 = bytes(run1)
    run2 = decoder.feed(b[5:] + c)
    snapshot2 = bytes(run2)
    decoder.feed(c[:30])
    decoder.feed(c[30:])
    assert bytes(run1) == snapshot1 == a
    assert bytes(run2) == snapshot2 == b + c


def test_max_len_must_hold_a_header():
    with pytest.raises(ValueError):
        FrameDecoder(PacketCodec(), HEADER_SIZE - 1)
    FrameDecoder(PacketCodec(), HEADER_SIZE)


# -- length limits ----------------------------------------------------------------------


@pytest.mark.parametrize("order", list(ByteOrder))
@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE - 1, MAX_LEN + 1, 2**32 - 1])
@pytest.mark.parametrize("split", [None, 1, 2, 3])
def test_bad_length_raises_once_length_bytes_arrive(order, length, split):
    codec = PacketCodec(order)
    decoder = FrameDecoder(codec, MAX_LEN)
    head = codec.length.pack(length)
    if split is not None:
        # fewer than 4 length bytes: cannot tell yet
        assert decoder.feed(head[:split]) == b""
        head = head[split:]
    with pytest.raises(ProtocolError):
        decoder.feed(head)  # only the 4 length bytes: no need to wait for more


@pytest.mark.parametrize("order", list(ByteOrder))
@pytest.mark.parametrize("split", [0, 1, 4, 17, MAX_LEN - 1])
def test_packet_of_exactly_max_len_passes(order, split):
    codec = PacketCodec(order)
    packet = codec.encode(5, b"m" * (MAX_LEN - HEADER_SIZE), seq_num=1)
    assert len(packet) == MAX_LEN
    decoder = FrameDecoder(codec, MAX_LEN)
    out = feed_all(decoder, [packet[:split], packet[split:]])
    assert out == packet
    assert decoder.buffered == 0


@pytest.mark.parametrize("order", list(ByteOrder))
def test_minimum_packet_header_only(order):
    codec = PacketCodec(order)
    decoder = FrameDecoder(codec, HEADER_SIZE)
    packet = codec.encode(9)
    assert len(packet) == HEADER_SIZE
    assert bytes(decoder.feed(packet * 3)) == packet * 3
    with pytest.raises(ProtocolError):
        decoder.feed(codec.encode(9, b"x")[:4])


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    order=ORDERS,
    packets=st.lists(packets_st, max_size=5),
    bad_len=st.sampled_from([0, 17, MAX_LEN + 1]),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 30_000), max_size=8),
)
def test_garbage_after_valid_packets_valid_first_then_error(order, packets, bad_len, tail, cuts):
    """Valid packets ahead of a bad header are delivered, then the error follows, however
    both are split (the bad length too may arrive in pieces). The bad header starts a new
    feed here; the same-chunk case is test_valid_and_garbage_in_one_chunk_delivers_valid."""
    codec = PacketCodec(order)
    valid = b"".join(encode(codec, p) for p in packets)
    garbage = codec.length.pack(bad_len) + tail
    pieces = cut(valid, cuts) + cut(garbage, [c // 7 for c in cuts])
    out, error = feed_until_error(FrameDecoder(codec, MAX_LEN), pieces)
    assert error is not None
    assert out == valid
    assert list(iter_packets(out, codec)) == packets


@pytest.mark.parametrize("order", list(ByteOrder))
def test_garbage_in_separate_feed_after_valid_packets(order):
    codec = PacketCodec(order)
    valid = codec.encode(1, b"a") + codec.encode(2, b"bb")
    decoder = FrameDecoder(codec, MAX_LEN)
    assert bytes(decoder.feed(valid)) == valid
    with pytest.raises(ProtocolError):
        decoder.feed(b"\xff\xff\xff\xff" + b"junk")


@pytest.mark.parametrize("order", list(ByteOrder))
def test_valid_and_garbage_in_one_chunk_delivers_valid(order):
    """A client pipelining requests then sending one bad header: whether its good
    requests are served must not depend on how TCP segmented the stream."""
    codec = PacketCodec(order)
    valid = codec.encode(1, b"a", seq_num=1) + codec.encode(2, b"bb", seq_num=2)
    out, error = feed_until_error(FrameDecoder(codec, MAX_LEN), [valid + codec.length.pack(MAX_LEN + 1)])
    assert error is not None
    assert out == valid


# -- iter_packets / split_run -------------------------------------------------------------


@given(order=ORDERS, packets=st.lists(packets_st, max_size=10), as_type=st.sampled_from([bytes, bytearray, memoryview]))
def test_iter_packets_roundtrip(order, packets, as_type):
    codec = PacketCodec(order)
    run = b"".join(encode(codec, p) for p in packets)
    got = list(iter_packets(as_type(run), codec))
    assert got == packets
    assert all(type(p.body) is bytes for p in got)


@settings(max_examples=200)
@given(
    order=ORDERS,
    packets=st.lists(packets_st, max_size=15),
    slack=st.integers(0, 5000),
)
def test_split_run_pieces(order, packets, slack):
    codec = PacketCodec(order)
    run = b"".join(encode(codec, p) for p in packets)
    biggest = max((HEADER_SIZE + len(p.body) for p in packets), default=HEADER_SIZE)
    limit = biggest + slack
    pieces = split_run(run, limit, codec)
    assert b"".join(bytes(p) for p in pieces) == run
    assert all(len(p) <= limit for p in pieces)
    # pieces are cut at packet boundaries: each one parses on its own
    reparsed = [pkt for piece in pieces for pkt in iter_packets(piece, codec)]
    assert reparsed == packets
    # and not needlessly many: two neighbours could not have been one piece
    for a, b in itertools.pairwise(pieces):
        assert len(a) + codec.length.unpack_from(b, 0)[0] > limit
    if run:
        assert all(len(p) > 0 for p in pieces)


def test_split_run_exact_fit():
    codec = PacketCodec()
    p = codec.encode(1, b"x" * 82)  # 100 bytes
    pieces = split_run(p * 4, 200, codec)
    assert [bytes(x) for x in pieces] == [p * 2, p * 2]
    pieces = split_run(p * 3, 100, codec)
    assert [bytes(x) for x in pieces] == [p, p, p]
