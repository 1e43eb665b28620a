"""Sans-I/O wire protocol: the 18-byte header, framing, encoding. No sockets here."""

from aserver.protocol.framing import FrameDecoder, ProtocolError, count_packets, iter_packets, split_run
from aserver.protocol.header import HEADER_SIZE, ByteOrder, Header, Packet, PacketCodec

__all__ = [
    "HEADER_SIZE",
    "ByteOrder",
    "FrameDecoder",
    "Header",
    "Packet",
    "PacketCodec",
    "ProtocolError",
    "count_packets",
    "iter_packets",
    "split_run",
]
