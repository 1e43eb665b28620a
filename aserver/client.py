"""An asyncio client for the aserver protocol: pipelines calls, matches replies by seq_num.

    async with await Client.connect("127.0.0.1", 7000) as client:
        reply = await client.call(1, b"hello", user_id=42)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, TypeVar

from aserver.protocol import ByteOrder, FrameDecoder, Packet, PacketCodec, ProtocolError, iter_packets
from aserver.typed import BodyFormat, codecs

T = TypeVar("T")


class ReplyError(Exception):
    """A typed call was answered with a non-zero status."""

    def __init__(self, reply: Packet) -> None:
        super().__init__(f"cmd_id {reply.cmd_id} answered with status {reply.status_code:#x}")
        self.reply = reply
        self.status = reply.status_code


class ClientProtocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._client._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._connection_lost(exc)


class Client:
    def __init__(self, codec: PacketCodec, max_packet_size: int) -> None:
        self.codec = codec
        self._decoder = FrameDecoder(codec, max_packet_size)
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Packet]] = {}
        self._next_seq = 0
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.unsolicited: asyncio.Queue[Packet] = asyncio.Queue()
        # Packets that answer no pending call (server pushes, replies to calls that timed
        # out) go to `unsolicited`; a client that never reads them should turn this off.
        self.keep_unsolicited = True

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        byte_order: ByteOrder = ByteOrder.LITTLE,
        max_packet_size: int = 64 * 1024 * 1024,
    ) -> Client:
        client = cls(PacketCodec(byte_order), max_packet_size)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: ClientProtocol(client), host, port)
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    def _take_seq(self) -> int:
        # Skip seq numbers still awaiting a reply (after a wrap past 2**32).
        while True:
            self._next_seq = (self._next_seq + 1) & 0xFFFFFFFF
            if self._next_seq not in self._pending:
                return self._next_seq

    async def call(self, cmd_id: int, body: bytes = b"", *, user_id: int = 0, timeout: float | None = None) -> Packet:
        """Send one request and wait for the reply with the same seq_num."""
        return (await self.call_many([(cmd_id, body, user_id)], timeout=timeout))[0]

    async def call_typed(
        self,
        cmd_id: int,
        message: Any,
        reply_type: type[T],
        *,
        user_id: int = 0,
        body_format: BodyFormat = "msgpack",
        timeout: float | None = None,
    ) -> T:
        """Send a Struct (or any msgspec-encodable value) and decode the reply body as
        `reply_type`. A reply with a non-zero status raises ReplyError."""
        encode = codecs(body_format, Any)[1]
        reply = await self.call(cmd_id, encode(message), user_id=user_id, timeout=timeout)
        if reply.status_code != 0:
            raise ReplyError(reply)
        return codecs(body_format, reply_type)[0](reply.body)

    async def call_many(
        self, requests: Iterable[tuple[int, bytes, int]], *, timeout: float | None = None
    ) -> list[Packet]:
        """Send many requests in one write; return their replies in request order."""
        if self._transport is None or self.closed:
            raise ConnectionError("client is closed")
        loop = asyncio.get_running_loop()
        encode = self.codec.encode
        futures = []
        seqs = []
        chunks = []
        for cmd_id, body, user_id in requests:
            seq = self._take_seq()
            seqs.append(seq)
            future = loop.create_future()
            self._pending[seq] = future
            futures.append(future)
            chunks.append(encode(cmd_id, body, seq_num=seq, user_id=user_id))
        self._transport.write(b"".join(chunks))
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
        finally:
            # A timed-out or cancelled call must not leave its seq numbers behind.
            for seq, future in zip(seqs, futures, strict=True):
                if self._pending.get(seq) is future:  # answered ones were popped already
                    del self._pending[seq]

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (for tests of malformed input)."""
        if self._transport is None:
            raise ConnectionError("client is closed")
        self._transport.write(data)

    async def receive(self, timeout: float | None = None) -> Packet:
        """The next packet that answered no pending call (server-initiated sends)."""
        return await asyncio.wait_for(self.unsolicited.get(), timeout)

    async def wait_closed(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(asyncio.shield(self._closed), timeout)

    async def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
            await asyncio.shield(self._closed)

    def abort(self) -> None:
        """Drop the connection at once; pending calls fail with ConnectionError."""
        if self._transport is not None:
            self._transport.abort()

    def _data_received(self, data: bytes) -> None:
        try:
            run = self._decoder.feed(data)
        except ProtocolError as exc:
            self._deliver(exc.run)
            self._fail(ConnectionError(f"server broke the protocol: {exc}"))
            if self._transport is not None:
                self._transport.abort()
            return
        self._deliver(run)

    def _deliver(self, run: bytes | bytearray | memoryview) -> None:
        pending = self._pending
        for packet in iter_packets(run, self.codec):
            future = pending.pop(packet.seq_num, None)
            if future is None:
                if self.keep_unsolicited:
                    self.unsolicited.put_nowait(packet)
            elif not future.done():
                future.set_result(packet)

    def _connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection closed: {exc}" if exc else "connection closed by server"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _fail(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
