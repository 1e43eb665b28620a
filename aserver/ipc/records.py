"""Record kinds on the rings between conn processes and workers.

A record's 32-bit kind field holds the kind in its low byte; on the reply ring the upper
bits carry how many of the connection's requests the worker finished (acks), so the conn
process knows what is still in flight without a record of its own.
"""

import enum
import struct

# A connection id carries the index of its conn process in its top byte, so a worker
# knows which reply ring leads back to it.
CONN_INDEX_SHIFT = 56

KIND_MASK = 0xFF
# 24 bits of acks; a worker that finished more in one go sends them over several records.
ACK_SHIFT = 8
MAX_ACKS = (1 << 24) - 1


class Kind(enum.IntEnum):
    # conn -> worker (request ring)
    OPENED = 1  # a client connected; payload: msgpack [host, port]
    PACKETS = 2  # a run of complete packets of one connection (requests or replies)
    CLOSED = 3  # a client is gone
    # worker -> conn (reply ring); PACKETS carries replies
    CLOSE = 4  # a handler asks to close the connection (after the replies before it)
    # The worker is done with its request ring up to the position in the conn_id field:
    # the conn process frees that space itself, once it has handled the replies before
    # this record (they may refer to bytes in it; see PACKETS_BY_REF).
    RELEASE = 5
    # Replies whose larger parts are bytes of the request ring, referred to rather than
    # copied (the C ring writer does this; see _ring_core.c try_write). The payload is
    # entries back to back, each a REF_ENTRY (bytes inline after it, then bytes of the
    # request ring: length and offset in its segment) followed by the inline bytes.
    PACKETS_BY_REF = 6


# (inline length, referred length, referred offset in the request ring's segment)
REF_ENTRY = struct.Struct("<IIQ")
# Parts smaller than this are copied: a reference costs the conn process a memoryview and
# an iovec of its own, more than copying a small part costs the worker.
REF_MIN = 1024

OPENED = int(Kind.OPENED)
PACKETS = int(Kind.PACKETS)
CLOSED = int(Kind.CLOSED)
CLOSE = int(Kind.CLOSE)
RELEASE = int(Kind.RELEASE)
PACKETS_BY_REF = int(Kind.PACKETS_BY_REF)
