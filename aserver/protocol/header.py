"""The packed 18-byte packet header and its encoder/decoder."""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER_SIZE = 18


class ByteOrder(enum.Enum):
    LITTLE = "little"
    NETWORK = "network"

    @property
    def struct_prefix(self) -> str:
        return "<" if self is ByteOrder.LITTLE else "!"


class Header(NamedTuple):
    pkg_len: int
    seq_num: int
    cmd_id: int
    status_code: int
    user_id: int


class Packet(NamedTuple):
    """One decoded packet: header fields plus the body (bytes after the header)."""

    seq_num: int
    cmd_id: int
    status_code: int
    user_id: int
    body: bytes


class PacketCodec:
    """Encodes and decodes packets for one byte order.

    Holds the precompiled structs so the hot paths do no format parsing.
    """

    __slots__ = ("byte_order", "header", "length")

    def __init__(self, byte_order: ByteOrder = ByteOrder.LITTLE) -> None:
        self.byte_order = byte_order
        prefix = byte_order.struct_prefix
        self.header = struct.Struct(prefix + "IIHII")
        self.length = struct.Struct(prefix + "I")

    def encode(
        self,
        cmd_id: int,
        body: bytes | bytearray | memoryview = b"",
        *,
        seq_num: int = 0,
        status_code: int = 0,
        user_id: int = 0,
    ) -> bytes:
        return self.header.pack(HEADER_SIZE + len(body), seq_num, cmd_id, status_code, user_id) + body

    def decode_header(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        return Header._make(self.header.unpack_from(buf, offset))

    def decode(self, packet: bytes | bytearray | memoryview) -> Packet:
        """Decode one whole packet (its length must match pkg_len)."""
        pkg_len, seq, cmd, status, user = self.header.unpack_from(packet, 0)
        if pkg_len != len(packet):
            raise ValueError(f"pkg_len {pkg_len} does not match packet size {len(packet)}")
        return Packet(seq, cmd, status, user, bytes(packet[HEADER_SIZE:]))
