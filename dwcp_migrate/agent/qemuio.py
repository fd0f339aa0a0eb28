"""The agent's end of a local QEMU migration connection (unix socket), without asyncio streams.

Why not ``asyncio.StreamReader``/``StreamWriter``: they cost the source agent about a quarter
of its CPU on a migration (measured with py-spy on the WAN test bed). A read makes a new
``bytes`` per ``recv`` (a fresh allocation, a copy), appends it to the reader's bytearray (a
copy) and slices it out again (a copy); a write the kernel does not take at once is copied
into the writer's buffer. Here reads land by ``recv_into`` in 1 MiB buffers and are handed out
as views of them (the consumers, stream parser or transport, copy once as they must anyway),
and writes are kept as views until sent (:class:`~dwcp_migrate.transports.rawsock.RawTransport`).

The interface is the part of the streams the data path uses: ``read``, ``write``, ``drain``,
``write_eof``, ``close``, ``abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path

from dwcp_migrate.transports.frames import BufferPool
from dwcp_migrate.transports.rawsock import RawTransport

READ_BUFFER = 1 << 20  # each receive buffer; reads are views into it
MAX_BUFFERED = 8 << 20  # read, not yet consumed: above this the socket is not read
POOLED_BUFFERS = 24  # receive buffers kept for reuse (the data path holds up to ~20 MiB)
WRITE_HIGH = 1 << 20  # written, not yet sent: above this drain() waits...
WRITE_LOW = 256 << 10  # ...until it is below this


class QemuConnection(asyncio.BufferedProtocol):
    """One connection to or from a local QEMU (see the module docstring)."""

    def __init__(self) -> None:
        self.transport: RawTransport | None = None
        self._pool = BufferPool(READ_BUFFER, POOLED_BUFFERS)
        self._buffer = bytearray(READ_BUFFER)
        self._filled = 0  # bytes of _buffer received
        self._segments: deque[tuple[bytearray, int, int]] = deque()  # received, not read
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._error: Exception | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ---- protocol callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, RawTransport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._filled == len(self._buffer):
            # The old buffer lives on in the views handed out; reading goes on in another,
            # one whose views are all gone if there is one (a fresh 1 MiB buffer costs
            # zeroing and page faults: 5 % of the source agent's CPU).
            self._buffer = self._pool.take(READ_BUFFER).obj  # type: ignore[assignment]
            self._filled = 0
        return memoryview(self._buffer)[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        start, end = self._filled, self._filled + nbytes
        self._filled = end
        segments = self._segments
        if segments and segments[-1][0] is self._buffer and segments[-1][2] == start:
            segments[-1] = (self._buffer, segments[-1][1], end)  # contiguous: one read
        else:
            segments.append((self._buffer, start, end))
        self._buffered += nbytes
        if self._buffered >= MAX_BUFFERED and self.transport is not None:
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep our side open: what we still write must reach QEMU

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drainers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._error = exc
        self._wake_reader()
        self._wake_drainers()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drainers(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # ---- the data path's side ---------------------------------------------------------------
    async def read(self, max_bytes: int = READ_BUFFER) -> memoryview | bytes:
        """Up to ``max_bytes`` received bytes, as a view (valid for good: the buffer is never
        written there again); ``b""`` at the end of QEMU's stream. Cancelling a read loses
        nothing."""
        while not self._segments:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        buf, start, end = self._segments[0]
        if end - start > max_bytes:
            end = start + max_bytes
            self._segments[0] = (buf, end, self._segments[0][2])
        else:
            self._segments.popleft()
        self._buffered -= end - start
        transport = self.transport
        if (transport is not None and not transport.is_reading() and not self._eof
                and self._buffered < MAX_BUFFERED // 2):
            transport.resume_reading()
        return memoryview(buf)[start:end]

    async def read_parts(self, max_bytes: int = READ_BUFFER) -> list[memoryview]:
        """What has been received, up to ``max_bytes``, as views (see :meth:`read`): waits
        for the first bytes, then takes whatever else is already here. ``[]`` at the end."""
        first = await self.read(max_bytes)
        if not first:
            return []
        parts = [memoryview(first)]
        room = max_bytes - len(first)
        while room > 0 and self._segments:
            part = await self.read(room)  # data is buffered: returns without waiting
            parts.append(memoryview(part))
            room -= len(part)
        return parts

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data`` for QEMU; it must not change until sent (bytes, or views of them)."""
        if self._lost:
            raise ConnectionResetError("the QEMU connection is closed")
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until what was written is (mostly) taken by the kernel."""
        while self._writing_paused and not self._lost:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._lost:
            raise ConnectionResetError(f"the QEMU connection is closed"
                                       f"{f': {self._error}' if self._error else ''}")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.transport is not None:
            self.transport.write_eof()

    def detach(self) -> tuple[socket.socket, list[memoryview]]:
        """Stop reading and hand over the socket, with what was received but not read yet
        (the direct lane pumps it from here; :meth:`close`/:meth:`abort` still close it)."""
        assert self.transport is not None
        self.transport.pause_reading()
        sock = self.transport.get_extra_info("socket")
        unread = [memoryview(buf)[start:end] for buf, start, end in self._segments]
        self._segments.clear()
        self._buffered = 0
        return sock, unread

    def close(self) -> None:
        """Close once what was written is sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what was not sent: QEMU sees a broken stream."""
        if self.transport is not None:
            self.transport.abort()


class QemuListener:
    """A unix socket QEMU connects to; each connection is handed to ``on_connection``."""

    def __init__(self, path: Path, on_connection: Callable[[QemuConnection], None]) -> None:
        self.path = path
        self._on_connection = on_connection
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, mode: int = 0o600) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, mode)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            protocol = QemuConnection()
            RawTransport(loop, conn, protocol)
            self._on_connection(protocol)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def connect_qemu(path: Path) -> QemuConnection:
    """Connect to a QEMU listening on a unix socket (raises FileNotFoundError or
    ConnectionRefusedError as ``connect`` does)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, str(path))
    except BaseException:
        sock.close()
        raise
    protocol = QemuConnection()
    RawTransport(loop, sock, protocol)
    return protocol


class ReadAhead:
    """Reads a QEMU connection into memory (up to ``limit`` bytes) while the agent is busy
    with something else, the session handshake: QEMU streams on instead of waiting several
    round trips, and the first bytes (with the guest's RAM size) are at hand to configure
    the encoder. :meth:`stop` hands over what was read; nothing is lost."""

    def __init__(self, conn: QemuConnection, limit: int) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self.eof = False
        self.first = asyncio.Event()
        self._conn = conn
        self._limit = limit
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.size < self._limit:
            chunk = await self._conn.read()
            self.first.set()
            if not chunk:
                self.eof = True
                return
            self.chunks.append(chunk)
            self.size += len(chunk)

    def prefix(self, size: int) -> bytes:
        """The first ``size`` bytes read so far (fewer if fewer were read)."""
        out = bytearray()
        for chunk in self.chunks:
            if len(out) >= size:
                break
            out += chunk[:size - len(out)]
        return bytes(out)

    async def stop(self) -> tuple[list[bytes | memoryview], bool]:
        """Stop reading; returns the chunks read and whether QEMU's stream had ended. A
        read error of QEMU's connection is raised here. The chunks are handed over, not
        kept: they are views of the connection's pooled receive buffers, and a buffer goes
        back into use only once no view of it is left (so the data path drops each chunk
        as it has carried it)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        chunks, self.chunks = self.chunks, []
        return chunks, self.eof
