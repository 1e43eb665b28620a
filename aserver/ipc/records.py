"""Record kinds on the rings between conn processes and workers.

A record's 32-bit kind field holds the kind in its low byte; on the reply ring the upper
bits carry how many of the connection's requests the worker finished (acks), so the conn
process knows what is still in flight without a record of its own.
"""

import enum

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


OPENED = int(Kind.OPENED)
PACKETS = int(Kind.PACKETS)
CLOSED = int(Kind.CLOSED)
CLOSE = int(Kind.CLOSE)
