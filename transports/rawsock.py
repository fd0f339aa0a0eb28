"""A lean asyncio transport for plain TCP sockets: several reads per wakeup, no write copies.

Why not asyncio's own: on a LAN, where one TCP stream moves 5 GB/s and more, the per-call
cost of Python 3.11's selector transport showed: one ``recv_into`` per event-loop iteration
(each with its own ``epoll`` round), and a copy into a bytearray of whatever a ``send`` did not
take at once. This transport reads until the socket is drained (up to ``READS_PER_WAKEUP``),
keeps unsent buffers as memoryviews and sends them with ``sendmsg`` (no copy: callers pass
immutable bytes or views of them, which AMST frames are). It implements only what
:mod:`.tcp` uses of ``asyncio.Transport``, for ``asyncio.BufferedProtocol`` protocols. TLS
connections keep asyncio's SSL transport.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import deque
from typing import Any

READS_PER_WAKEUP = 16
_MAX_IOV = 64


class RawTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.BufferedProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._out: deque[memoryview] = deque()
        self._out_size = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._paused = False  # the protocol's writing
        self._reading = False
        self._writer = False
        self._closing = False
        self._closed = False
        self._eof_wanted = False  # write_eof() called: shut the write side once all is sent
        sock.setblocking(False)
        protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # ---- reading --------------------------------------------------------------------------
    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def is_reading(self) -> bool:
        return self._reading

    def _read_ready(self) -> None:
        protocol = self._protocol
        for _ in range(READS_PER_WAKEUP):
            if self._closing or not self._reading:
                return
            buf = memoryview(protocol.get_buffer(-1))
            try:
                n = self._sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fatal(exc)
                return
            if n == 0:
                self.pause_reading()
                if not protocol.eof_received():
                    self.close()
                return
            protocol.buffer_updated(n)
            if n < len(buf):
                return  # the socket is (almost surely) drained: spare the EAGAIN call

    # ---- writing --------------------------------------------------------------------------
    def write(self, data: Any) -> None:
        if self._closing or self._eof_wanted:
            return
        view = memoryview(data).cast("B")
        if not view:
            return
        if not self._out:
            try:
                n = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(view):
                return
            view = view[n:]
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer = True
        self._out.append(view)
        self._out_size += len(view)
        if not self._paused and self._out_size > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, data: Any) -> None:
        """Write several buffers with one ``sendmsg``; what the kernel does not take is kept
        as views, uncopied (the buffers must not change until sent: AMST's do not)."""
        if self._closing or self._eof_wanted:
            return
        views = [v for v in (memoryview(d).cast("B") for d in data) if v]
        if not views:
            return
        if not self._out:
            try:
                n = self._sock.sendmsg(views[:_MAX_IOV])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if not views:
                return
            if n:
                views[0] = views[0][n:]
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer = True
        self._out.extend(views)
        self._out_size += sum(len(v) for v in views)
        if not self._paused and self._out_size > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        out = self._out
        try:
            n = self._sock.sendmsg(list(out)[:_MAX_IOV])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        self._out_size -= n
        while n:
            head = out[0]
            if len(head) <= n:
                n -= len(head)
                out.popleft()
            else:
                out[0] = head[n:]
                n = 0
        if not out:
            self._loop.remove_writer(self._fd)
            self._writer = False
            if self._closing:
                self._finish(None)
                return
            if self._eof_wanted:
                self._shutdown_write()
        if self._paused and self._out_size <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Shut down our sending side once everything written so far is sent."""
        if self._closing or self._eof_wanted:
            return
        self._eof_wanted = True
        if not self._out:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fatal(exc)

    # ---- closing --------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close once what was written is sent."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._out:
            self._finish(None)

    def abort(self) -> None:
        self._closing = True
        self.pause_reading()
        self._finish(None)

    def _fatal(self, exc: OSError) -> None:
        self._closing = True
        self.pause_reading()
        self._finish(exc if exc.errno != errno.EBADF else None)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False
        self._out.clear()
        self._out_size = 0
        self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    # ---- the rest of the interface -------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.BufferedProtocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


async def serve(sock: socket.socket, factory: Any) -> None:
    """Accept on a listening socket forever; each connection gets ``RawTransport(factory())``."""
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(sock)
        RawTransport(loop, conn, factory())
