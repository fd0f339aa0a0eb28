"""Moving one QEMU connection's bytes through the agents: the asyncio pumps.

Source side: QEMU -> (stream codec -> page encoder, or passthrough) -> channel messages ->
transport session; and the return path back into QEMU. Destination side: the reverse. The
cores (channel protocol, codecs, transport session) do no I/O; this module only moves bytes.

Failure rule: anything that goes wrong closes the QEMU connection on that host. On the source
that makes QEMU fail the migration and keep running the guest; on the destination the
incoming QEMU sees a broken stream and exits without ever running. The error is kept in the
migration record and logged; nothing is swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from dwcp_migrate.agent.channel import (
    ChannelProtocolError,
    Message,
    MessageReader,
    MessageType,
    encode,
)
from dwcp_migrate.agent.records import ChannelCounters
from dwcp_migrate.errors import MigrationError

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024  # per read from QEMU: big reads keep per-call overhead low
IDLE_FLUSH_S = 0.002  # QEMU sent nothing for this long: flush the encoder's partial batch


class Session(Protocol):
    """What the data path needs of a transport session (TcpSession has it)."""

    async def send(self, data: bytes) -> None: ...
    async def recv(self, max_bytes: int | None = None) -> bytes: ...
    async def close(self) -> None: ...
    def abort(self, reason: str = ...) -> None: ...


class ChunkEncoder(Protocol):
    """Turns raw QEMU stream chunks into encoded batches (see dwcp_migrate.codec)."""

    def feed(self, data: bytes) -> list[bytes]: ...
    def flush(self) -> list[bytes]: ...
    def finish(self) -> list[bytes]: ...


class ChunkDecoder(Protocol):
    def decode(self, batch: bytes) -> bytes: ...


class RemoteAbortError(MigrationError):
    """The peer agent aborted the migration (its reason is the message)."""


class MessageStream:
    """Messages in from a session, one at a time."""

    def __init__(self, session: Session, peer: str) -> None:
        self.session = session
        self.peer = peer
        self.reader = MessageReader()
        self.queue: list[Message] = []
        self.wire_bytes = 0

    async def next(self) -> Message | None:
        """The next message; None when the peer closed its side cleanly."""
        while not self.queue:
            data = await self.session.recv()
            if not data:
                if self.reader.pending:
                    raise ChannelProtocolError(f"agent {self.peer} closed in the middle of a "
                                               "message")
                return None
            self.wire_bytes += len(data)
            self.queue.extend(self.reader.feed(data))
        return self.queue.pop(0)


async def send_message(session: Session, counters: ChannelCounters, kind: MessageType,
                       payload: bytes = b"") -> None:
    for part in encode(kind, payload):
        counters.wire_bytes += len(part)
        await session.send(part)


async def qemu_to_session(reader: asyncio.StreamReader, session: Session,
                          counters: ChannelCounters, encoder: ChunkEncoder | None,
                          run_encoder: Callable[[Callable[[], list[bytes]]],
                                                asyncio.Future[list[bytes]]] | None = None
                          ) -> None:
    """Source side upstream. Ends with an EOF message when QEMU closes its stream.

    The encoder fills batches while QEMU streams; when QEMU pauses (nothing to read for
    ``IDLE_FLUSH_S``) whatever is pending is flushed at once. Without that, a small message
    QEMU waits on an answer for (a return-path PING, the switchover handshake) would sit in
    a half-full batch forever.
    """
    while True:
        if encoder is None:
            chunk = await reader.read(READ_SIZE)
        else:
            try:
                chunk = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_FLUSH_S)
            except TimeoutError:
                for batch in await _encode(encoder, b"", run_encoder, flush=True):
                    await send_message(session, counters, MessageType.BATCH, batch)
                chunk = await reader.read(READ_SIZE)
        if not chunk:
            break
        counters.bytes_from_qemu += len(chunk)
        if encoder is None:
            await send_message(session, counters, MessageType.RAW, chunk)
            continue
        batches = await _encode(encoder, chunk, run_encoder)
        for batch in batches:
            await send_message(session, counters, MessageType.BATCH, batch)
    if encoder is not None:
        for batch in await _encode(encoder, None, run_encoder):
            await send_message(session, counters, MessageType.BATCH, batch)
    await send_message(session, counters, MessageType.EOF)


async def _encode(encoder: ChunkEncoder, chunk: bytes | None,
                  run: Callable[[Callable[[], list[bytes]]], asyncio.Future[list[bytes]]] | None,
                  *, flush: bool = False) -> list[bytes]:
    def work() -> list[bytes]:
        if flush:
            return encoder.flush()
        return encoder.feed(chunk) if chunk is not None else encoder.finish()
    if run is None:
        return work()
    return await run(work)


async def session_to_qemu(messages: MessageStream, writer: asyncio.StreamWriter,
                          counters: ChannelCounters, decoder: ChunkDecoder | None,
                          *, count_as_return: bool) -> None:
    """Messages from the peer into the local QEMU, until the peer's EOF."""
    while True:
        msg = await messages.next()
        if msg is None:
            raise MigrationError(f"agent {messages.peer} closed the channel without EOF")
        if msg.type is MessageType.RAW:
            data = msg.payload
        elif msg.type is MessageType.BATCH:
            if decoder is None:
                raise ChannelProtocolError(f"agent {messages.peer} sent an encoded batch on a "
                                           "channel opened for passthrough")
            data = decoder.decode(msg.payload)
        elif msg.type is MessageType.EOF:
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()
            return
        elif msg.type is MessageType.ABORT:
            raise RemoteAbortError(f"agent {messages.peer} aborted: {msg.text()}")
        else:
            raise ChannelProtocolError(f"agent {messages.peer} sent {msg.type.name} in the "
                                       "middle of a migration")
        if count_as_return:
            counters.return_bytes += len(data)
        else:
            counters.bytes_to_qemu += len(data)
        writer.write(data)
        await writer.drain()


async def run_pumps(upstream: asyncio.Task[None], downstream: asyncio.Task[None],
                    session: Session, peer: str) -> None:
    """Wait for both directions; the first failure cancels the other and aborts the session."""
    done, pending = await asyncio.wait({upstream, downstream},
                                       return_when=asyncio.FIRST_EXCEPTION)
    failed = next((t for t in done if not t.cancelled() and t.exception() is not None), None)
    if failed is None:
        return
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(BaseException):
            await task
    exc = failed.exception()
    assert exc is not None
    if not isinstance(exc, RemoteAbortError):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.send(b"".join(encode(
                MessageType.ABORT, str(exc).encode()[:4096]))), 2)
    session.abort(str(exc))
    raise exc
