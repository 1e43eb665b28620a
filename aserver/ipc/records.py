"""Record kinds on the rings between conn processes and workers."""

import enum


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
