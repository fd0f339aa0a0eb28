"""The asyncio driver of AMST sessions over N TCP (or TLS) connections.

Timeouts use ``asyncio.timeout()``, never ``asyncio.wait_for``: on Python 3.11 the latter can
swallow a cancellation that races with completion, which hung a cancelled agent pipeline.

Thin by design: every protocol decision is in :mod:`.session`. This module owns sockets,
time and tasks:

- each connection is an ``asyncio.BufferedProtocol``; received bytes go straight into the
  session's frame buffers (:meth:`Session.get_buffer`), no intermediate copy; plaintext
  connections run on :class:`.rawsock.RawTransport` (several reads per wakeup, no write
  copies), TLS ones on asyncio's SSL transport;
- a connection's transport has a write buffer limit of zero, so ``pause_writing`` means "the
  kernel took all it will take for now"; frames are pulled from the session one at a time,
  round-robin over the connections that are not paused, so data goes to whichever
  connections drain fastest (see ``TCP_NOTSENT_LOWAT`` in :mod:`.sockopts`);
- one timer follows :meth:`Session.next_deadline` (delayed ACKs, pings, timeouts);
- the acceptor side (listening, matching HELLOs to sessions) is :mod:`.tcp_server`;
- the initiator replaces broken connections (with backoff, up to ``reconnect_timeout``), and
  with ``adapt`` set, changes the connection count from measured goodput (:mod:`.adapt`).

Errors are never swallowed: whatever ends a session is kept and raised by the next
``send``/``recv``/``close``, and logged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from dwcp_migrate.transports.adapt import GoodputSample, StreamRange, next_stream_count
from dwcp_migrate.transports.errors import (
    AuthenticationError,
    ConnectError,
    ProtocolError,
    SessionClosedError,
    TlsError,
    TransportError,
    UnknownSessionError,
)
from dwcp_migrate.transports.frames import Bytes, Role
from dwcp_migrate.transports.rawsock import RawTransport
from dwcp_migrate.transports.session import (
    ConnectionDropped,
    ConnectionOpened,
    Established,
    Event,
    Session,
    SessionConfig,
    SessionEnded,
    SessionState,
)
from dwcp_migrate.transports.sockopts import (
    SocketLike,
    TcpOptions,
    apply_after_connect,
    apply_before_connect,
    tcp_info,
)
from dwcp_migrate.transports.tls import TransportSecurity, cut_short, explain

if TYPE_CHECKING:  # the acceptor (tcp_server) builds on this module
    from dwcp_migrate.transports.tcp_server import SessionServer

log = logging.getLogger(__name__)

REFUSALS_MEAN_DOWN = 5  # refused reconnects in a row (~1.5 s of backoff): the peer is down

WRITE_SLICE = 512 * 1024  # see _Conn.write_pending


@dataclass(frozen=True)
class TransportConfig:
    """Everything a transport endpoint needs besides addresses and names."""

    security: TransportSecurity
    session: SessionConfig = field(default_factory=SessionConfig)
    tcp: TcpOptions = field(default_factory=TcpOptions)
    adapt: StreamRange | None = None  # None: keep the connection count given
    adapt_interval: float = 2.0  # seconds per goodput sample
    connect_timeout: float = 10.0  # one TCP (+TLS) connect
    reconnect_timeout: float = 60.0  # initiator: give up replacing connections after this
    close_timeout: float = 60.0  # close(): wait this long for the peer to agree
    linger: float = 60.0  # acceptor: remember a finished session to answer late joins


@dataclass(frozen=True)
class TransportStats:
    bytes_sent: int  # accepted by send()
    bytes_acked: int  # delivered to the peer's session
    bytes_received: int  # returned by recv()
    elapsed_s: float  # since the session was established
    goodput_mbit_s: float  # bytes_acked over elapsed (sending side)
    recv_goodput_mbit_s: float  # bytes_received over elapsed (receiving side)
    srtt_ms: float | None  # session PING RTT (includes queueing in socket buffers)
    min_rtt_ms: float | None
    tcp_rtt_ms: float | None  # the kernel's smoothed RTT, mean over live connections
    frames_resent: int  # frames sent again after a connection broke
    tcp_retransmits: int  # segments TCP retransmitted, all connections so far
    connections: int  # live now
    connections_opened: int
    connections_lost: int
    corrupt_frames: int
    congestion_control: str | None


class _Conn(asyncio.BufferedProtocol):
    """One TCP/TLS connection; before its HELLO is matched (acceptor) it reads on its own."""

    def __init__(self, owner: TcpSession | None, cid: int, label: str,
                 server: SessionServer | None = None) -> None:
        self.owner = owner
        self.cid = cid
        self.label = label
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.sock: SocketLike | None = None
        self.writable = True
        self.closed = False
        self.pre_reader = server.table.new_reader(label) if server else None
        self.pending: deque[Bytes] = deque()  # pulled for this connection, not yet written
        self.tls_pending = False  # acceptor: TLS handshake running, HELLO must wait for it
        self.deferred: list[Any] = []

    # -- asyncio callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._set_transport(transport)
        if self.server is not None:
            self.server._connection_made(self)

    def _set_transport(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # Paused as soon as anything waits in user space (the SSL transport pauses at
        # size >= high, the plain one at size > high: 1 and 0 mean the same for both).
        transport.set_write_buffer_limits(high=1, low=0)
        self.sock = transport.get_extra_info("socket")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.owner is not None:
            return self.owner.core.get_buffer(self.cid)
        assert self.pre_reader is not None
        return self.pre_reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        owner = self.owner
        if owner is not None:
            if owner.core.buffer_updated(self.cid, nbytes, owner.loop.time()):
                owner._pump()
            return
        assert self.server is not None and self.pre_reader is not None
        try:
            frames = self.pre_reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.server._refuse(self, exc)
            return
        if frames:
            self.server._hello(self, frames)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.owner is not None:
            self.owner._pump()  # writes what is pending here first (see _flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable = False
        if self.owner is not None:
            self.owner._conn_lost(self, exc)
        elif self.server is not None:
            self.server._pending.discard(self)

    def write_pending(self) -> bool:
        """Write pulled buffers in slices while the kernel takes them; True if all went.

        Python 3.11's transport copies whatever the socket does not take at once into its
        own buffer (a 1 MiB frame written whole to a socket with room for half of it: a
        512 KiB copy, about a tenth of the sender's CPU on the LAN). Slices bound that copy;
        on the LAN, 512 KiB slices beat 128 KiB ones by about 15 % (fewer calls). The
        frames stay committed to this connection. The plain transport (RawTransport) keeps
        unsent buffers as views, uncopied: all pending buffers go to it at once, one
        ``sendmsg`` for a frame's header and payload (on the LAN +8 % goodput against a
        header and two slices written apart).
        """
        transport = self.transport
        pending = self.pending
        if transport is None or self.closed:
            pending.clear()
            return False
        if isinstance(transport, RawTransport):
            if pending and self.writable:
                transport.writelines(pending)
                pending.clear()
            return self.writable
        while pending and self.writable:
            buf = pending[0]
            if len(buf) <= WRITE_SLICE:
                pending.popleft()
                transport.write(buf)
            else:
                view = memoryview(buf)
                transport.write(view[:WRITE_SLICE])
                pending[0] = view[WRITE_SLICE:]
        return not pending and self.writable

    def close(self, *, abort: bool = False) -> None:
        if self.transport is not None and not self.closed:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


class TcpSession:
    """A running session: ``send``/``recv``/``close`` for the application (see module doc)."""

    def __init__(self, core: Session, config: TransportConfig, *, target: int,
                 connect: Callable[[], Any] | None = None) -> None:
        self.core = core
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.target = target
        self._connect = connect  # initiator: coroutine factory opening one connection
        self._conns: dict[int, _Conn] = {}
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._established = asyncio.Event()
        self._ended = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._reconnect_task: asyncio.Task[None] | None = None
        self._adapt_task: asyncio.Task[None] | None = None
        self._adapt_policy: StreamRange | None = None
        self._lost_since: float | None = None
        self._failures = 0  # connections failed since one last completed its handshake
        self._refusals = 0  # reconnects refused in a row (nothing listening at the peer)
        self._opened: set[int] = set()
        self._last_conn_error: BaseException | None = None
        self._started = time.monotonic()
        self._retrans_closed = 0
        self._pumping = False
        self._backlogged = False
        self.congestion_control: str | None = None
        self.history: list[GoodputSample] = []
        self.on_end: Callable[[TcpSession], None] | None = None

    # ---- naming and state ---------------------------------------------------------------
    @property
    def peer(self) -> str:
        return self.core.peer

    @property
    def session_id(self) -> int:
        return self.core.session_id

    @property
    def n_connections(self) -> int:
        return len(self.core.connection_ids())

    def _raise_if_failed(self) -> None:
        if self.core.state is SessionState.FAILED:
            assert self.core.error is not None
            raise self.core.error

    # ---- connections --------------------------------------------------------------------
    def _attach(self, conn: _Conn) -> None:
        conn.owner = self
        self._conns[conn.cid] = conn
        if conn.sock is not None:
            cc = apply_after_connect(conn.sock, self.config.tcp, streams=max(1, self.target))
            self.congestion_control = self.congestion_control or cc
        self._pump()

    def _conn_lost(self, conn: _Conn, exc: Exception | None) -> None:
        if self._conns.get(conn.cid) is conn:
            del self._conns[conn.cid]
        self._count_retrans(conn)
        reason = f"connection lost: {exc}" if exc else "connection closed by the peer"
        if isinstance(exc, ssl.SSLError) and _is_authentication_failure(exc):
            # The peer refused our certificate (TLS 1.3 reports it on the first read): that
            # does not go away on another connection. Any other TLS error on an established
            # connection (a bad record MAC: data damaged on the way) costs only this
            # connection; its unacknowledged frames are resent on the others.
            who = f"{self.core.peer_name} ({conn.label})" if self.core.peer_name else conn.label
            self.core.fail(explain(exc, who, side="client"))
        self.core.connection_lost(conn.cid, self.loop.time(), reason)
        self._pump()

    def _count_retrans(self, conn: _Conn) -> None:
        if conn.sock is not None and conn.sock.fileno() >= 0:
            info = tcp_info(conn.sock)
            if info is not None:
                self._retrans_closed += info.total_retrans
                conn.sock = None

    def _want_more(self) -> bool:
        core = self.core
        if core.role is not Role.INITIATOR or self._connect is None:
            return False
        if core.needs_connection():
            return True
        # Not while CONNECTING: connect_session reports a failed first handshake itself.
        return core.state is SessionState.OPEN and len(core.connection_ids()) < self.target

    def _start_reconnect(self) -> None:
        if self._want_more() and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = self.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while self._want_more():
            # Back off only after failures (refused, or dropped before its WELCOME): a peer
            # that hangs up on every connection must not cause a storm of reconnects.
            if self._failures:
                await asyncio.sleep(min(0.05 * 2 ** (self._failures - 1), 1.0))
                if not self._want_more():
                    break
            assert self._connect is not None
            try:
                await self._connect()
            except (TlsError, UnknownSessionError) as exc:
                # Neither goes away by retrying: a certificate problem, or a peer that no
                # longer knows the session (it restarted and lost its state).
                self.core.fail(exc)
                self._pump()
                return
            except (OSError, TransportError, TimeoutError) as exc:
                self._failures += 1
                self._refusals = self._refusals + 1 \
                    if isinstance(exc, ConnectionRefusedError) else 0
                self._last_conn_error = exc
                log.info("reconnecting to %s failed: %s", self.peer, exc)
                if self._refusals >= REFUSALS_MEAN_DOWN and not self.core.connection_ids():
                    # Nothing listens there any more: the peer agent is gone, and with it the
                    # session's state, so waiting out reconnect_timeout cannot help.
                    self.core.fail(ConnectError(
                        f"all connections lost and the peer refuses new ones "
                        f"({self._refusals} times): its agent is not running", peer=self.peer))
                    self._pump()
                    return
            if not self.core.connection_ids():
                now = self.loop.time()
                self._lost_since = self._lost_since or now
                if now - self._lost_since > self.config.reconnect_timeout:
                    self.core.fail(ConnectError(
                        f"all connections lost and none could be made again for "
                        f"{self.config.reconnect_timeout:g} s; last error: "
                        f"{self._last_conn_error}", peer=self.peer))
                    self._pump()
                    return

    def retune(self, tcp: TcpOptions) -> None:
        """Apply other socket options (congestion control, pacing...) to every connection
        now, and to those opened later."""
        self.config = replace(self.config, tcp=tcp)
        for conn in self._conns.values():
            if conn.sock is not None and not conn.closed:
                self.congestion_control = apply_after_connect(conn.sock, tcp,
                                                              streams=max(1, self.target))

    def set_send_window(self, window: int, *, adaptive_floor: int | None = None) -> int:
        """See :meth:`Session.set_send_window` (the core)."""
        window = self.core.set_send_window(window, adaptive_floor=adaptive_floor)
        self._pump()
        return window

    def set_recv_window(self, window: int) -> int:
        """See :meth:`Session.set_recv_window` (the core)."""
        return self.core.set_recv_window(window)

    def set_target(self, n: int) -> None:
        """Initiator: use ``n`` connections (opens new ones or retires surplus ones)."""
        self.target = max(1, n)
        self._retire_surplus()
        self._start_reconnect()
        self._pump()

    def _retire_surplus(self) -> None:
        """Retire open connections beyond the target, the newest first. Also called when a
        connection finishes its handshake: one still handshaking when the target was lowered
        (the agent's 8 -> 1 on a LAN comes while first contact's 8 are being opened) would
        otherwise carry data on beyond the target for good."""
        if self.core.role is not Role.INITIATOR:
            return
        open_ids = self.core.open_connection_ids()
        for cid in sorted(open_ids, reverse=True)[:max(0, len(open_ids) - self.target)]:
            self.core.retire_connection(cid)

    # ---- the pump -----------------------------------------------------------------------
    def _pump(self) -> None:
        """After any input: write what is due, act on events, wake waiters, re-arm the timer."""
        if self._pumping:
            return
        self._pumping = True
        try:
            self._flush()
            self._events()
            core = self.core
            now_failed = core.state is SessionState.FAILED
            if core.readable_bytes() or core.at_eof or now_failed:
                self._readable.set()
            if core.send_space() > 0 or now_failed or core.state is not SessionState.OPEN:
                self._writable.set()
            self._arm_timer()
        finally:
            self._pumping = False

    def _flush(self) -> None:
        """Round-robin one frame at a time over the connections the kernel takes data on."""
        core = self.core
        now = self.loop.time()
        budget = core.config.max_payload
        active = [c for c in self._conns.values()
                  if c.writable and (c.pending or core.wants_to_send(c.cid, now))]
        while active:
            still = []
            for conn in active:
                if not conn.pending:
                    conn.pending.extend(core.pull(conn.cid, now, budget))
                if conn.write_pending() and core.wants_to_send(conn.cid, now):
                    still.append(conn)
            active = still

    def _events(self) -> None:
        # Handling an event can cause more (a failed first handshake fails the session).
        while events := self.core.events():
            for ev in events:
                self._event(ev)
        if self._want_more():
            self._start_reconnect()
        if self.core.connection_ids():
            self._lost_since = None

    def _event(self, ev: Event) -> None:
        if isinstance(ev, ConnectionDropped):
            conn = self._conns.pop(ev.cid, None)
            if conn is not None:
                self._count_retrans(conn)
                conn.close(abort=not ev.clean)
            if ev.cid not in self._opened and not ev.clean:
                self._failures += 1
                self._last_conn_error = TransportError(ev.reason, peer=self.peer)
            self._opened.discard(ev.cid)
            if self.core.state is SessionState.CONNECTING and not self.core.connection_ids():
                self._first_handshake_failed(ev.reason)
            if not ev.clean:
                level = logging.WARNING if ev.error else logging.INFO
                log.log(level, "session %#x with %s: connection %d dropped: %s",
                        self.session_id, self.peer, ev.cid, ev.reason)
                self._start_reconnect()
            elif self.core.needs_connection():
                self._start_reconnect()
        elif isinstance(ev, ConnectionOpened):
            self._opened.add(ev.cid)
            self._failures = 0
            self._refusals = 0
            self._retire_surplus()
        elif isinstance(ev, Established):
            self._established.set()
            self._lost_since = None
        elif isinstance(ev, SessionEnded):
            self._end(ev.error)

    def _first_handshake_failed(self, reason: str) -> None:
        hint = ""
        if self.config.security.tls is not None:
            hint = ("; with TLS this usually means the peer refused our certificate (not signed "
                    "by a CA it trusts, expired, or not for our agent name): see the peer's log")
        cls = TlsError if hint else ConnectError
        self.core.fail(cls(f"every connection ended before the handshake completed "
                           f"({reason}){hint}", peer=self.peer))

    def _end(self, error: TransportError | None) -> None:
        if error is not None:
            log.error("session %#x with %s failed: %s", self.session_id, self.peer, error)
            self._flush()  # the ERROR frames
        for conn in list(self._conns.values()):
            self._count_retrans(conn)
            conn.close()
        self._conns.clear()
        for ev in (self._ended, self._established, self._readable, self._writable):
            ev.set()
        for task in (self._reconnect_task, self._adapt_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.on_end is not None:
            self.on_end(self)

    def _arm_timer(self) -> None:
        if self.core.state in (SessionState.CLOSED, SessionState.FAILED):
            return
        deadline = self.core.next_deadline()
        if deadline is None:
            return
        now = self.loop.time()
        deadline = max(deadline, now + 0.0005)  # a due ACK with no writable connection: no spin
        if self._timer is not None and self._timer_when <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.loop.time())
        self._pump()

    # ---- application --------------------------------------------------------------------
    async def send(self, data: Bytes) -> None:
        """Send ``data`` (waits while the send window is full). ``bytes`` are not copied:
        do not change a buffer passed here; writable buffers are copied once."""
        view = memoryview(data).cast("B")
        while view:
            self._raise_if_failed()
            taken = self.core.write(view, self.loop.time())
            if taken:
                view = view[taken:]
                self._pump()
                continue
            self._backlogged = True
            self._writable.clear()
            await self._writable.wait()

    async def recv_view(self, max_bytes: int | None = None) -> Bytes:
        """The next bytes in order, without copying (often a whole frame's bytearray);
        empty at the end of the peer's stream. Raises the error that ended the session."""
        while True:
            chunk = self.core.read(max_bytes)
            if chunk is not None:
                if chunk:
                    self._pump()  # reading may open the window: the ACK goes out now
                return chunk
            self._raise_if_failed()
            self._readable.clear()
            await self._readable.wait()

    async def recv(self, max_bytes: int | None = None) -> bytes:
        """Like :meth:`recv_view` but always a ``bytes`` object (a copy unless it is one)."""
        chunk = await self.recv_view(max_bytes)
        return chunk if isinstance(chunk, bytes) else bytes(chunk)

    async def wait_established(self) -> None:
        await self._established.wait()
        self._raise_if_failed()

    def finish(self) -> None:
        """Half-close: no more data from this side (FIN); ``recv`` goes on until the peer's
        end. :meth:`close` does this first if it has not been done."""
        core = self.core
        if core.state in (SessionState.CONNECTING, SessionState.OPEN) and core.send.fin is None:
            core.finish(self.loop.time())
            self._pump()

    async def close(self) -> None:
        """Send FIN and wait until both sides agree everything was delivered.

        The peer must read to the end and close too; data it sends meanwhile is kept for
        ``recv``. Raises if that does not happen within ``close_timeout`` or the session failed.
        """
        core = self.core
        self.finish()
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self._ended.wait()
        except TimeoutError:
            stats = core.stats()
            waiting = []
            if not core.send.all_acked:
                waiting.append(f"acknowledgement of our data ({stats.bytes_acked} of "
                               f"{stats.bytes_written} bytes acknowledged)")
            if not core.recv.eof:
                waiting.append("the peer's end of stream (it has not called close, or "
                               "cannot send because we stopped reading)")
            err = SessionClosedError(f"close did not complete within "
                                     f"{self.config.close_timeout:g} s, waiting for "
                                     f"{' and '.join(waiting) or 'connections to retire'}",
                                     peer=self.peer)
            core.fail(err)
            self._pump()
            raise err from None
        self._raise_if_failed()

    def abort(self, reason: str = "aborted by the application") -> None:
        """End the session now; the peer is told ``reason``."""
        self.core.abort(reason)
        self._pump()

    def stats(self) -> TransportStats:
        s = self.core.stats()
        elapsed = max(1e-9, time.monotonic() - self._started)
        rtts, retrans = [], self._retrans_closed
        for conn in self._conns.values():
            info = tcp_info(conn.sock) if conn.sock is not None else None
            if info is not None:
                rtts.append(info.rtt_ms)
                retrans += info.total_retrans
        return TransportStats(
            bytes_sent=s.bytes_written, bytes_acked=s.bytes_acked, bytes_received=s.bytes_read,
            elapsed_s=elapsed, goodput_mbit_s=s.bytes_acked * 8 / elapsed / 1e6,
            recv_goodput_mbit_s=s.bytes_read * 8 / elapsed / 1e6, srtt_ms=s.srtt_ms,
            min_rtt_ms=s.min_rtt_ms, tcp_rtt_ms=sum(rtts) / len(rtts) if rtts else None,
            frames_resent=s.frames_resent, tcp_retransmits=retrans,
            connections=s.connections_live, connections_opened=s.connections_opened,
            connections_lost=s.connections_lost, corrupt_frames=s.corrupt_frames,
            congestion_control=self.congestion_control)

    def reset_clock(self) -> None:
        """Start the goodput clock now (e.g. after a warm-up)."""
        self._started = time.monotonic()

    # ---- adapting the connection count --------------------------------------------------
    def _start_adapting(self, policy: StreamRange) -> None:
        self._adapt_policy = policy
        self._adapt_task = self.loop.create_task(self._adapt())

    def restart(self, n: int, policy: StreamRange | None = None) -> None:
        """Use ``n`` connections from now on and judge adaptation afresh from there (within
        ``policy``, if given): what the application does once it knows more about the path
        than the goodput so far can tell (the samples before were taken at another count)."""
        if policy is not None and self._adapt_policy is not None:
            self._adapt_policy = policy
        self.history.clear()
        self.set_target(n)

    async def _adapt(self) -> None:
        interval = self.config.adapt_interval
        last = self.core.stats().bytes_acked
        while self.core.state is SessionState.OPEN:
            policy = self._adapt_policy
            assert policy is not None
            self._backlogged = False
            await asyncio.sleep(interval)
            acked = self.core.stats().bytes_acked
            backlogged = self._backlogged or self.core.send_space() == 0
            count = self.core.open_connection_count()
            mbit_s = (acked - last) * 8 / interval / 1e6
            last = acked
            if count != self.target:
                # Connections still joining: this goodput belongs to no count, and judging
                # it would take the passing count for a chosen one.
                continue
            self.history.append(GoodputSample(count, mbit_s, backlogged))
            del self.history[:-64]
            want = next_stream_count(self.history, policy)
            if want != self.target:
                log.info("session %#x with %s: %d -> %d connections (%.0f Mbit/s)",
                         self.session_id, self.peer, self.target, want, self.history[-1].mbit_s)
                self.set_target(want)


_AUTH_FAILURES = ("CERTIFICATE", "UNKNOWN_CA", "HANDSHAKE_FAILURE", "ACCESS_DENIED",
                  "WRONG_VERSION", "NO_PROTOCOLS")


def _is_authentication_failure(exc: ssl.SSLError) -> bool:
    reason = str(getattr(exc, "reason", None) or exc).upper()
    return any(word in reason for word in _AUTH_FAILURES)


# ---- initiator ----------------------------------------------------------------------------
async def connect_session(address: tuple[str, int], n_streams: int = 8, *, name: str,
                          peer_name: str | None = None,
                          config: TransportConfig) -> TcpSession:
    """Open a session to the agent at ``address`` with ``n_streams`` connections.

    ``name`` is this agent's name; ``peer_name`` the agent expected there (required with TLS:
    its certificate must be for that name). Returns once the session is established.
    """
    host, port = address
    label = f"{host}:{port}"
    security = config.security
    if security.tls is not None and not peer_name:
        raise ConnectError("TLS needs the peer's agent name (peer_name) to check its "
                           "certificate", peer=label)
    ssl_ctx = security.tls.client_context() if security.tls else None
    security.warn_if_plaintext(f"session to {peer_name or label}")
    loop = asyncio.get_running_loop()
    core = Session(Role.INITIATOR, config.session, local_name=name, now=loop.time(),
                   peer=label)
    if peer_name:
        core.peer_name = peer_name
    session: TcpSession

    async def open_one() -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            apply_before_connect(sock, config.tcp)
            async with asyncio.timeout(config.connect_timeout):
                await loop.sock_connect(sock, (host, port))
            cid = core.open_connection(loop.time(), label)
            conn = _Conn(session, cid, label)  # owned now: an early refusal is read by the core
            try:
                if ssl_ctx is None:
                    RawTransport(loop, sock, conn)
                else:
                    async with asyncio.timeout(config.connect_timeout):
                        await loop.create_connection(
                            lambda: conn, sock=sock, ssl=ssl_ctx, server_hostname=peer_name,
                            ssl_handshake_timeout=config.connect_timeout)
            except BaseException:
                core.connection_lost(cid, loop.time(), "connect failed")
                session._pump()
                raise
        except ssl.SSLError as exc:
            sock.close()
            if cut_short(exc):  # the network cut the handshake: another connection may do
                raise ConnectError(f"the TLS handshake was cut short: {exc}",
                                   peer=label) from exc
            raise explain(exc, f"{peer_name} ({label})", side="client") from exc
        except BaseException:
            sock.close()
            raise
        session._attach(conn)

    session = TcpSession(core, config, target=n_streams, connect=open_one)
    results = await asyncio.gather(*(open_one() for _ in range(max(1, n_streams))),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors:
        if isinstance(err, TlsError | AuthenticationError):
            session._end(None)
            raise err
    if len(errors) == len(results):
        session._end(None)
        raise ConnectError(f"cannot connect: {errors[0]}", peer=label) from errors[0]
    try:
        async with asyncio.timeout(config.session.handshake_timeout):
            await session.wait_established()
    except TimeoutError:
        session.abort("no WELCOME in time")
        raise ConnectError(f"no answer to HELLO within {config.session.handshake_timeout:g} s",
                           peer=label) from None
    if errors:
        log.warning("session to %s: %d of %d connections failed at first (%s); replacing them",
                    session.peer, len(errors), len(results), errors[0])
        session._start_reconnect()
    if config.adapt is not None:
        session._start_adapting(config.adapt)
    return session
