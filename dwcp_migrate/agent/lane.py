"""The direct lane: passthrough bytes spliced by the kernel over one plain TCP connection.

On a datacenter path the agents forward QEMU's stream unencoded (passthrough). Through the
transport session that still costs Python per-byte work at both ends (framing, sums, TLS):
1.5 to 2 s of CPU per GB on the test bed, more than plain QEMU takes for the whole
migration on a LAN. The direct lane moves those bytes with ``splice(2)`` instead, QEMU's
unix socket -> pipe -> TCP socket and back, never into user space.

What it gives up, and why it is opt-in (``transport.direct_lane: true`` on both agents):
the bytes are neither encrypted nor checked beyond TCP's checksum (like plain QEMU's own
migration), and a broken connection fails the migration instead of being replaced. The
control messages (OPEN/ACCEPT, the lane's one-time token) still go through the TLS session;
a connection to the lane port that does not present the token within ``LANE_ACCEPT_TIMEOUT``
is closed, and the lane's port listens for one connection only.

The pumps run in threads (``os.splice`` releases the GIL); each ends at EOF, forwarding it
as a half-close, or at the first error, which closes everything so QEMU sees a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hmac
import logging
import os
import secrets
import socket
import threading
from collections.abc import Sequence

from dwcp_migrate.errors import MigrationError

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
LANE_ACCEPT_TIMEOUT = 5.0
LANE_DEAD_S = 10.0  # TCP_USER_TIMEOUT of a lane connection
SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in the fcntl module only from 3.10 on


def _guard(sock: socket.socket) -> None:
    """A peer that vanishes (host down, network cut) must not leave a pump blocked forever:
    unacknowledged data fails the connection after LANE_DEAD_S, and an idle one is probed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(LANE_DEAD_S * 1000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def widen_unix_buffer(qemu: socket.socket) -> None:
    """A bigger send buffer on the agent's end of QEMU's unix socket. A unix stream socket
    holds only what its sender's SO_SNDBUF allows (208 KiB by default), so the agent writing
    into the destination QEMU is woken every 208 KiB while QEMU's loading thread waits. Three
    ad hoc LAN runs with it took 0.77 to 0.79 s on the TLS lane, but the benchmark's five
    (0.90 to 1.69 s) were no better than the five before it (0.79 to 1.45 s): no measured
    effect on this bed, whose LAN runs spread by 2x. Kept as cheap and not harmful."""
    with contextlib.suppress(OSError):  # capped at net.core.wmem_max by the kernel
        qemu.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)


class LaneError(MigrationError):
    """A lane (direct or TLS) could not be set up or broke."""


class LaneUnreachableError(LaneError):
    """The source could not make a first connection to the lane's port (refused, timed out,
    unreachable): a firewall, most likely. Nothing has gone over the lane yet, so the agents
    may carry the stream through their session instead (LANE_DECLINED, agent/lanes.py)."""


def bind_lane_port(host: str, ports: tuple[int, int] | None) -> socket.socket:
    """A socket bound to a port of ``ports`` (tried from a random place on), or to an
    ephemeral port when None. Raises :class:`LaneError` when every port of the range is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [0]
    if ports is not None:
        low, high = ports
        start = secrets.randbelow(high - low + 1)
        span = list(range(low, high + 1))
        candidates = span[start:] + span[:start]
    for port in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A port whose last lane is in TIME_WAIT is free for a new listener: without
            # this a small range would be used up for a minute after each migration.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
        except BaseException:
            sock.close()
            raise
    assert ports is not None
    raise LaneError(f"every port of transport.direct_lane_ports ({ports[0]}-{ports[1]}) "
                    f"is in use on {host}: widen the range")


class LaneListener:
    """Destination: a one-connection listening socket for a lane, with its token."""

    def __init__(self, host: str, ports: tuple[int, int] | None = None) -> None:
        """``ports``: the range to listen in (``transport.direct_lane_ports``), tried from a
        random place on; None: an ephemeral port. Raises :class:`LaneError` when every port
        of the range is taken."""
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.ports = ports
        self._sock = bind_lane_port(host, ports)
        self._sock.listen(1)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]

    def _where(self) -> str:
        if self.ports is None:
            return "let this host's ephemeral ports through the firewall from the source"
        return (f"let ports {self.ports[0]}-{self.ports[1]} (transport.direct_lane_ports) "
                f"through the firewall from the source")

    async def accept(self, timeout: float | None = None) -> socket.socket:
        """The connection that presents the token; anything else is closed and refused.
        ``timeout``: LANE_ACCEPT_TIMEOUT when None."""
        loop = asyncio.get_running_loop()
        timeout = LANE_ACCEPT_TIMEOUT if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                conn, peer = await loop.sock_accept(self._sock)
                try:
                    got = b""
                    while len(got) < TOKEN_BYTES:
                        chunk = await loop.sock_recv(conn, TOKEN_BYTES - len(got))
                        if not chunk:
                            break
                        got += chunk
                except BaseException:
                    conn.close()
                    raise
        except TimeoutError:
            raise LaneError(f"the source agent did not open the direct lane within "
                            f"{timeout:g} s (port {self.port}): {self._where()}, "
                            f"or set transport.direct_lane: false") from None
        finally:
            self._sock.close()
        if not hmac.compare_digest(got, self.token):
            conn.close()
            raise LaneError(f"a lane connection from {peer} did not present the token")
        _guard(conn)
        return conn

    def close(self) -> None:
        self._sock.close()


async def connect_lane(host: str, port: int, token: bytes,
                       timeout: float | None = None) -> socket.socket:
    """Source: connect to the destination's lane port and present the token. Raises
    :class:`LaneUnreachableError` if the connection is refused or not answered within
    ``timeout`` (LANE_ACCEPT_TIMEOUT when None; nothing has gone over the lane then),
    :class:`LaneError` if it breaks after."""
    loop = asyncio.get_running_loop()
    timeout = LANE_ACCEPT_TIMEOUT if timeout is None else timeout
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    hint = ("the destination's lane ports (transport.direct_lane_ports, else its ephemeral "
            "ports) must be reachable from here; or set transport.direct_lane: false on "
            "either agent")
    try:
        _guard(sock)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError as exc:
            raise LaneUnreachableError(f"cannot open the direct lane to {host}:{port}: no "
                                       f"answer within {timeout:g} s ({hint})") from exc
        except OSError as exc:
            why = "refused" if isinstance(exc, ConnectionRefusedError) else \
                (exc.strerror or repr(exc))
            raise LaneUnreachableError(f"cannot open the direct lane to {host}:{port}: "
                                       f"{why} ({hint})") from exc
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(sock, token)
        except (OSError, TimeoutError) as exc:
            raise LaneError(f"the direct lane to {host}:{port} broke as it opened: "
                            f"{exc!r}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


class Counter:
    def __init__(self) -> None:
        self.bytes = 0


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # a bigger pipe: fewer splice calls (1 MiB by default)
        fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_CHUNK)
    return r, w


def _pump(src: socket.socket, dst: socket.socket, counter: Counter,
          head: Sequence[bytes | memoryview]) -> None:
    """src -> dst until src's EOF (then dst's write side is shut), in the kernel."""
    for chunk in head:
        dst.sendall(chunk)
        counter.bytes += len(chunk)
    r, w = _pipe()
    try:
        while True:
            n = os.splice(src.fileno(), w, SPLICE_CHUNK)
            if n == 0:
                break
            counter.bytes += n
            while n:
                n -= os.splice(r, dst.fileno(), n)
        dst.shutdown(socket.SHUT_WR)
    finally:
        os.close(r)
        os.close(w)


async def run_lane(qemu: socket.socket, lane: socket.socket, *, to_lane: Counter,
                   from_lane: Counter, head: Sequence[bytes | memoryview] = ()) -> None:
    """Pump both directions between a QEMU socket and the lane until both have ended.

    ``head``: bytes read from QEMU before, sent first. The sockets are set blocking (the
    pumps own them from here). The first error shuts both sockets down (which ends the other
    pump) and is raised; the lane socket is closed at the end, the QEMU one is the caller's."""
    for s in (qemu, lane):
        s.setblocking(True)
    widen_unix_buffer(qemu)
    loop = asyncio.get_running_loop()
    done: asyncio.Queue[BaseException | None] = asyncio.Queue()

    def run(src: socket.socket, dst: socket.socket, counter: Counter,
            first: Sequence[bytes | memoryview]) -> None:
        try:
            _pump(src, dst, counter, first)
            result: BaseException | None = None
        except BaseException as exc:  # handed to the event loop, which raises it
            result = exc
        loop.call_soon_threadsafe(done.put_nowait, result)

    threads = [threading.Thread(target=run, args=(qemu, lane, to_lane, head),
                                name="dwcp-lane-up", daemon=True),
               threading.Thread(target=run, args=(lane, qemu, from_lane, ()),
                                name="dwcp-lane-down", daemon=True)]
    for t in threads:
        t.start()
    error: BaseException | None = None
    try:
        for _ in threads:
            result = await done.get()
            if result is not None and error is None:
                error = result
                for s in (qemu, lane):  # wakes the other pump: its splice fails
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
    except asyncio.CancelledError:
        for s in (qemu, lane):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:  # they end now: their sockets are shut down
            await asyncio.to_thread(t.join, 5)
        raise
    finally:
        lane.close()
    if error is not None:
        raise LaneError(f"the direct lane broke: {error}") from error
