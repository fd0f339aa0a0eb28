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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any, Protocol

from dwcp_migrate.agent.channel import (
    HEADER,
    ChannelProtocolError,
    Message,
    MessageReader,
    MessageType,
    encode,
    encode_joined,
)
from dwcp_migrate.agent.credit import CREDIT_STEP, DeliveryCredit, decode_credit
from dwcp_migrate.agent.records import ChannelCounters
from dwcp_migrate.errors import MigrationError

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024  # per read from QEMU: big reads keep per-call overhead low
IDLE_FLUSH_S = 0.002  # QEMU sent nothing for this long: flush the encoder's partial batch
RAW_MESSAGE_BYTES = READ_SIZE - HEADER.size  # passthrough: a message fills a default frame
PIPELINE_DEPTH = 8  # items between two stages: bounds memory (~8 MiB) while keeping overlap
# Into the destination QEMU: what these queues hold drains after the source guest has stopped
# (see relay_window in policies/mode.py), and two items per queue are enough to overlap
# receiving, decoding and writing. 8 + 8 one-MiB RAW messages took about 40 ms on the LAN here.
DELIVERY_PIPELINE_DEPTH = 2


class Sender(Protocol):
    """The sending side of a session (TcpSession, or a SerializedSender over one)."""

    async def send(self, data: bytes) -> None: ...


class Session(Sender, Protocol):
    """What the data path needs of a transport session (TcpSession has it)."""

    async def recv(self, max_bytes: int | None = None) -> bytes: ...
    async def recv_view(self, max_bytes: int | None = None) -> bytes | bytearray | memoryview: ...
    async def close(self) -> None: ...
    def abort(self, reason: str = ...) -> None: ...


class QemuReader(Protocol):
    """The reading side of a local QEMU connection (agent.qemuio.QemuConnection)."""

    async def read(self, max_bytes: int = ...) -> bytes | memoryview: ...
    async def read_parts(self, max_bytes: int = ...) -> list[memoryview]: ...


class QemuWriter(Protocol):
    """The writing side of a local QEMU connection (agent.qemuio.QemuConnection)."""

    def write(self, data: bytes | memoryview) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...


class ChunkEncoder(Protocol):
    """Turns raw QEMU stream chunks into encoded batches (see dwcp_migrate.codec)."""

    def feed(self, data: bytes | memoryview) -> list[bytes]: ...
    def flush(self) -> list[bytes]: ...
    def finish(self) -> list[bytes]: ...


class ChunkDecoder(Protocol):
    def decode(self, batch: bytes | memoryview) -> bytes: ...


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
            # Views of the session's received frames, no copy: the messages keep them.
            data = await self.session.recv_view()
            if not data:
                if self.reader.pending:
                    raise ChannelProtocolError(f"agent {self.peer} closed in the middle of a "
                                               "message")
                return None
            self.wire_bytes += len(data)
            self.queue.extend(self.reader.feed(data))
        return self.queue.pop(0)


class SerializedSender:
    """One session's sending side shared by two tasks (the destination's return path and its
    CREDIT reports): each ``send`` goes out whole before the next starts, so two messages
    never interleave. Callers must send each message in one call."""

    def __init__(self, session: Sender) -> None:
        self.session = session
        self._lock = asyncio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._lock:
            await self.session.send(data)


async def send_message(session: Sender, counters: ChannelCounters, kind: MessageType,
                       payload: bytes | memoryview = b"") -> None:
    for part in encode(kind, payload):
        counters.wire_bytes += len(part)
        await session.send(part)


Executor = Callable[[Callable[[], Any]], "asyncio.Future[Any]"]
_END = object()  # queue sentinel: the stage before has finished
_NOTHING = object()


async def _first_error(*coros: Coroutine[Any, Any, None]) -> None:
    """Run pipeline stages together; the first failure cancels the rest and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None


async def qemu_to_session(reader: QemuReader, session: Sender,
                          counters: ChannelCounters, encoder: ChunkEncoder | None,
                          run_encoder: Executor | None = None, *,
                          head: list[bytes | memoryview] | None = None,
                          head_eof: bool = False,
                          credit: DeliveryCredit | None = None) -> None:
    """Source side upstream. Ends with an EOF message when QEMU closes its stream.

    With an encoder, three stages overlap (read from QEMU | encode in a worker thread | send),
    joined by bounded queues, so neither QEMU nor the network waits for the encoder more
    than it must. The encoder fills batches while QEMU streams; when QEMU pauses (nothing to
    read for ``IDLE_FLUSH_S``) whatever is pending is flushed at once. Without that, a small
    message QEMU waits on an answer for (a return-path PING, the switchover handshake) would
    sit in a half-full batch forever.

    ``head``: what was read from QEMU before (see qemuio.ReadAhead), carried first and
    consumed (emptied) on the way: its chunks are views of QEMU's pooled receive buffers, and
    a buffer still viewed cannot be reused. (Kept for the whole migration, the up to 64 MiB
    read during the handshake held every pooled buffer, and each later read from QEMU took a
    fresh 1 MiB buffer: about a tenth of the source agent's time on the WAN, py-spy.)
    ``head_eof``: QEMU's stream ended there. ``credit`` (with an encoder only): read from
    QEMU only while less than its window ahead of what the destination reported delivered.
    """
    if encoder is None:
        async def send_raw(parts: list[memoryview]) -> None:
            message = encode_joined(MessageType.RAW, parts)
            counters.bytes_from_qemu += len(message) - HEADER.size
            counters.wire_bytes += len(message)
            await session.send(message)

        if head:
            for parts in _gathered(head, RAW_MESSAGE_BYTES):
                await send_raw(parts)
            head.clear()
        # One message per frame's worth of what QEMU has written by now, header included:
        # fewer, fuller frames (per-frame work on both agents; see channel.encode_joined).
        while not head_eof and (parts := await reader.read_parts(RAW_MESSAGE_BYTES)):
            await send_raw(parts)
        await send_message(session, counters, MessageType.EOF)
        return

    chunks: asyncio.Queue[Any] = asyncio.Queue(maxsize=PIPELINE_DEPTH)
    batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=PIPELINE_DEPTH)

    async def read_stage() -> None:
        if head:
            head.reverse()
            while head:
                chunk = head.pop()
                counters.bytes_from_qemu += len(chunk)
                await chunks.put(chunk)
                del chunk  # the queue's reference is the only one left
        if head_eof:
            await chunks.put(_END)
            return
        while True:
            if credit is not None and credit.room(counters.bytes_from_qemu) <= 0:
                # What the encoder holds back for a fuller batch is what the destination
                # waits for before it can report more: send it now.
                await chunks.put(None)
                await credit.wait_for_room(counters.bytes_from_qemu)
            try:
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that
                # races with the read completing, and a cancelled pipeline would then hang.
                async with asyncio.timeout(IDLE_FLUSH_S):
                    chunk = await reader.read(READ_SIZE)
            except TimeoutError:
                await chunks.put(None)  # QEMU paused: flush
                chunk = await reader.read(READ_SIZE)
            if not chunk:
                await chunks.put(_END)
                return
            counters.bytes_from_qemu += len(chunk)
            await chunks.put(chunk)

    async def encode_stage() -> None:
        held: Any = _NOTHING  # taken from the queue while grouping, not yet handled
        while True:
            item, held = (await chunks.get() if held is _NOTHING else held), _NOTHING
            if item is _END:
                await batches.put(await _run(encoder.finish, run_encoder))
                await batches.put(_END)
                return
            if item is None:
                work: Callable[[], list[bytes]] = encoder.flush
            else:
                # Whatever else has arrived goes to the encoder in the same call: one hand-off
                # to the worker thread instead of one per chunk (about a tenth of the source
                # agent's CPU went to hand-offs).
                group = [item]
                while not chunks.empty():
                    nxt = chunks.get_nowait()
                    if nxt is None or nxt is _END:
                        held = nxt
                        break
                    group.append(nxt)

                def work(group: list[bytes | memoryview] = group) -> list[bytes]:
                    out: list[bytes] = []
                    for chunk in group:
                        out += encoder.feed(chunk)
                    return out
            out = await _run(work, run_encoder)
            if out:
                await batches.put(out)

    async def send_stage() -> None:
        while (out := await batches.get()) is not _END:
            for batch in out:
                await send_message(session, counters, MessageType.BATCH, batch)
        await send_message(session, counters, MessageType.EOF)

    await _first_error(read_stage(), encode_stage(), send_stage())


def _gathered(chunks: Sequence[bytes | memoryview], limit: int) -> list[list[memoryview]]:
    """``chunks`` as groups of views of at most ``limit`` bytes each, in order (a chunk
    longer than ``limit`` is cut)."""
    groups: list[list[memoryview]] = []
    group: list[memoryview] = []
    room = limit
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            take = view[:room]
            group.append(take)
            room -= len(take)
            view = view[len(take):]
            if not room:
                groups.append(group)
                group, room = [], limit
    if group:
        groups.append(group)
    return groups


async def _run(work: Callable[[], Any], executor: Executor | None) -> Any:
    return work() if executor is None else await executor(work)


async def session_to_qemu(messages: MessageStream, writer: QemuWriter,
                          counters: ChannelCounters, decoder: ChunkDecoder | None,
                          *, count_as_return: bool,
                          run_decoder: Executor | None = None,
                          depth: int = PIPELINE_DEPTH,
                          on_credit: Callable[[int], None] | None = None,
                          report_delivered: Callable[[int], Awaitable[None]] | None = None
                          ) -> None:
    """Messages from the peer into the local QEMU, until the peer's EOF.

    Three stages overlap: receive | decode (one batch at a time, in order, in a worker
    thread) | write to QEMU. A batch that fails its check is never written.

    Delivery credit (agent/credit.py): on the source, ``on_credit`` takes each CREDIT the
    destination sends (without it a CREDIT is a protocol error); on the destination,
    ``report_delivered`` is given the bytes written into QEMU so far, at least every
    ``CREDIT_STEP`` bytes and whenever nothing more is ready to write.
    """
    received: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)
    decoded: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)

    async def receive_stage() -> None:
        while True:
            msg = await messages.next()
            if msg is None:
                raise MigrationError(f"agent {messages.peer} closed the channel without EOF")
            if msg.type is MessageType.ABORT:
                raise RemoteAbortError(f"agent {messages.peer} aborted: {msg.text()}")
            if msg.type is MessageType.CREDIT and on_credit is not None:
                on_credit(decode_credit(msg.payload))
                continue
            if msg.type is MessageType.BATCH and decoder is None:
                raise ChannelProtocolError(f"agent {messages.peer} sent an encoded batch on a "
                                           "channel opened for passthrough")
            if msg.type not in (MessageType.RAW, MessageType.BATCH, MessageType.EOF):
                raise ChannelProtocolError(f"agent {messages.peer} sent {msg.type.name} in the "
                                           "middle of a migration")
            await received.put(msg)
            if msg.type is MessageType.EOF:
                return

    async def decode_stage() -> None:
        while True:
            msg = await received.get()
            if msg.type is MessageType.BATCH:
                assert decoder is not None
                await decoded.put(await _run(partial(decoder.decode, msg.payload),
                                             run_decoder))
            elif msg.type is MessageType.RAW:
                await decoded.put(msg.payload)
            else:
                await decoded.put(_END)
                return

    async def write_stage() -> None:
        reported = 0
        while (data := await decoded.get()) is not _END:
            if count_as_return:
                counters.return_bytes += len(data)
            else:
                counters.bytes_to_qemu += len(data)
            writer.write(data)
            await writer.drain()
            delivered = counters.bytes_to_qemu
            if report_delivered is not None and delivered > reported and (
                    delivered - reported >= CREDIT_STEP or decoded.empty()):
                reported = delivered
                await report_delivered(delivered)
        if report_delivered is not None and counters.bytes_to_qemu > reported:
            await report_delivered(counters.bytes_to_qemu)
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    await _first_error(receive_stage(), decode_stage(), write_stage())


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
            async with asyncio.timeout(2):
                await session.send(b"".join(encode(MessageType.ABORT,
                                                   str(exc).encode()[:4096])))
    session.abort(str(exc))
    raise exc
