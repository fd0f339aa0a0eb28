"""The AMST session protocol: N connections carrying one ordered byte stream each way. No I/O.

Like h11 and aioquic, a :class:`Session` is a state machine fed with bytes and time by a driver
(``transports/tcp.py`` for asyncio sockets, the tests for a simulated network):

- bytes in: ``get_buffer(cid)`` / ``buffer_updated(cid, n, now)`` (the asyncio
  ``BufferedProtocol`` calls; ``receive_data`` copies for simple callers);
- bytes out: ``pull(cid, now, budget)`` gives the buffers to write on connection ``cid``;
  the driver pulls whenever that connection's socket has room, so frames go to whichever
  connection drains fastest;
- application: ``write(data, now)`` / ``read()`` / ``finish(now)``;
- time: ``next_deadline()`` and ``handle_timer(now)`` (delayed ACKs, pings, timeouts);
- what happened: ``events()`` (connections opened or dropped, session established or ended).

Connections. The initiator opens every connection and sends HELLO (session id, role, index,
capabilities, a timestamp, its limits and the session's secret token, which the initiator draws
at random). The acceptor's ``SessionTable`` (:mod:`.acceptor`) matches a HELLO to its session
by id and token (or creates the session if the HELLO may) and answers WELCOME, which echoes the
timestamp: an RTT sample. A broken connection's unacknowledged frames are queued again and sent
on the others; the initiator's driver opens a replacement that joins with the token.

Close. ``finish`` queues a FIN after the data. A side is *done* when its FIN is acknowledged
(ACK with FIN_ACK: everything delivered) and the peer's FIN and all data before it arrived.
The initiator, once done, sends on every connection an ACK (carrying FIN_ACK) and then RETIRE;
the acceptor answers RETIRE, after which nothing more is sent on it. Since TCP keeps order per
connection, a RETIRE answered proves the acceptor got the FIN_ACK, so both agree that all data
arrived. If connections break during this, the initiator reconnects until one RETIRE is
answered (or the acceptor, done meanwhile, answers a join with ERROR "closed").
"""

from __future__ import annotations

import enum
import hmac
import secrets
from collections import deque
from dataclasses import dataclass

from dwcp_migrate.transports.errors import (
    AuthenticationError,
    ConnectError,
    FrameTooLargeError,
    HandshakeError,
    PeerError,
    ProtocolError,
    SessionClosedError,
    TransportError,
    VersionMismatchError,
)
from dwcp_migrate.transports.flow import DeliveryWindow, RecvStream, SendStream
from dwcp_migrate.transports.frames import (
    LOCAL_CAPABILITIES,
    MAX_PAYLOAD_LIMIT,
    TOKEN_SIZE,
    AckInfo,
    BufferPool,
    Bytes,
    Capability,
    ErrorCode,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    Hello,
    Role,
    decode_error,
    decode_stamp,
    encode_error,
    encode_frame,
    encode_stamp,
)

MIB = 1024 * 1024


@dataclass(frozen=True)
class SessionConfig:
    """Limits and timers of a session (both sides may differ; each announces its own)."""

    max_payload: int = 1 * MIB  # largest DATA payload this side sends and accepts
    send_window: int = 64 * MIB  # unacknowledged bytes kept for resend (memory bound)
    recv_window: int = 64 * MIB  # bytes held for reordering + unread (memory bound)
    ack_delay: float = 0.005  # ACK at most this long after new data arrived
    ping_interval: float = 1.0  # PING every connection this often (RTT, liveness)
    idle_timeout: float = 15.0  # drop a connection that received nothing for this long
    handshake_timeout: float = 10.0  # drop a connection whose handshake takes longer
    reconnect_timeout: float = 60.0  # acceptor: fail when no connection is back by then
    max_corrupt_frames: int = 16  # corrupted frames (each costs a connection) before failing

    def __post_init__(self) -> None:
        if not 0 < self.max_payload <= MAX_PAYLOAD_LIMIT:
            raise ValueError(f"max_payload must be within 1..{MAX_PAYLOAD_LIMIT}")
        if min(self.send_window, self.recv_window) < self.max_payload:
            raise ValueError("send_window and recv_window must hold at least one max_payload")

    @property
    def ack_every(self) -> int:
        """ACK at once after this many new bytes (keeps the peer's send window moving)."""
        return max(self.recv_window // 16, self.max_payload)


class SessionState(enum.Enum):
    CONNECTING = "connecting"  # initiator: no WELCOME yet
    OPEN = "open"
    CLOSING = "closing"  # done both ways; connections being retired
    CLOSED = "closed"
    FAILED = "failed"


class ConnState(enum.Enum):
    HANDSHAKE = "handshake"  # initiator: HELLO sent, waiting for WELCOME
    OPEN = "open"
    CLOSED = "closed"


# ---- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Established:
    """The session exists on both sides (first WELCOME, or the acceptor's first HELLO)."""


@dataclass(frozen=True)
class ConnectionOpened:
    cid: int


@dataclass(frozen=True)
class ConnectionDropped:
    """The driver must close connection ``cid`` (after writing what was pulled for it).

    ``clean``: retired by both sides, nothing lost. Otherwise its unacknowledged frames were
    queued again, and ``error`` says why when the protocol (not the socket) ended it.
    """

    cid: int
    reason: str
    clean: bool
    error: TransportError | None = None


@dataclass(frozen=True)
class SessionEnded:
    """CLOSED (``error`` None) or FAILED; after FAILED, pull once more to send the ERROR."""

    error: TransportError | None


Event = Established | ConnectionOpened | ConnectionDropped | SessionEnded


class _Conn:
    __slots__ = ("bytes_in", "bytes_out", "cid", "control", "label", "last_rx", "next_ping",
                 "opened_at", "reader", "retire_got", "retire_sent", "retire_wanted", "rtt",
                 "state")

    def __init__(self, cid: int, reader: FrameReader, now: float, label: str | None) -> None:
        self.cid = cid
        self.state = ConnState.HANDSHAKE
        self.reader = reader
        self.control: deque[bytes] = deque()
        self.opened_at = now
        self.last_rx = now
        self.next_ping = now
        self.rtt: float | None = None
        self.retire_wanted = False  # RETIRE goes out after what is pending
        self.retire_sent = False
        self.retire_got = False
        self.label = label
        self.bytes_in = 0
        self.bytes_out = 0


@dataclass(frozen=True)
class SessionStats:
    bytes_written: int  # accepted from the application
    bytes_acked: int  # delivered to the peer, acknowledged
    bytes_read: int  # handed to the application
    frames_sent: int
    frames_received: int
    frames_resent: int
    bytes_resent: int
    duplicates_received: int
    connections_opened: int
    connections_lost: int  # dropped without a clean retire
    connections_live: int
    corrupt_frames: int
    srtt_ms: float | None
    min_rtt_ms: float | None


def _data_flags(peer_capabilities: int) -> int:
    """XXH3 payload sums if both sides can check them (see frames)."""
    both = peer_capabilities & LOCAL_CAPABILITIES
    # A plain int: it goes into every DATA header, and IntFlag arithmetic runs Python code.
    return int(Flag.XXH3) if both & Capability.XXH3 else 0


def _ns(now: float) -> int:
    return int(now * 1e9) & 0xFFFF_FFFF_FFFF_FFFF


class Session:
    """One session; see the module docstring. Create initiators directly, acceptors through
    ``acceptor.SessionTable``."""

    def __init__(self, role: Role, config: SessionConfig, *, local_name: str, now: float,
                 session_id: int | None = None, token: bytes | None = None,
                 peer: str | None = None) -> None:
        self.role = role
        self.config = config
        self.local_name = local_name
        self.session_id = session_id if session_id is not None else secrets.randbits(64) or 1
        self.token = token if token is not None else secrets.token_bytes(TOKEN_SIZE)
        if len(self.token) != TOKEN_SIZE:
            raise ValueError(f"token must be {TOKEN_SIZE} bytes")
        self.peer_address = peer  # for errors until the peer's agent name is known
        self.peer_name: str | None = None
        self.state = SessionState.CONNECTING if role is Role.INITIATOR else SessionState.OPEN
        self.error: TransportError | None = None
        self.send = SendStream(self.session_id, config.send_window, config.max_payload)
        self.recv = RecvStream(config.recv_window)
        self._conns: dict[int, _Conn] = {}
        # A window's worth of full frames, plus what an application holds on to after
        # reading (the agent keeps payload views in its pipeline queues: ~20 frames). Frames
        # under half a buffer do not use the pool (BufferPool.take), so what unread frames
        # hold stays under twice the window whatever frame sizes the peer sends.
        self._pool = BufferPool(config.max_payload,
                                config.recv_window // config.max_payload + 32)
        self._next_cid = 0
        self._events: list[Event] = []
        self._ack_due: float | None = None
        self._acked_sent = 0  # ``delivered`` in the last ACK sent
        self._limit_sent = config.recv_window
        self._fin_ack_sent = False
        self._close_confirmed = False  # initiator: the acceptor answered a RETIRE when done
        self._orphan_since: float | None = None if role is Role.INITIATOR else now
        self._srtt: float | None = None
        self._min_rtt: float | None = None
        self._window_tuner: DeliveryWindow | None = None
        self.connections_opened = 0
        self.connections_lost = 0
        self.corrupt_frames = 0

    # ---- naming -------------------------------------------------------------------------
    @property
    def peer(self) -> str:
        if self.peer_name and self.peer_address:
            return f"{self.peer_name} ({self.peer_address})"
        return self.peer_name or self.peer_address or "(unknown peer)"

    def _conn_peer(self, conn: _Conn) -> str:
        where = conn.label or self.peer_address
        name = self.peer_name or "(unnamed)"
        return f"{name} ({where}, connection {conn.cid})" if where else \
            f"{name} (connection {conn.cid})"

    # ---- connections --------------------------------------------------------------------
    def open_connection(self, now: float, label: str | None = None) -> int:
        """Initiator: a new connection (first ones or replacements); HELLO is queued on it."""
        if self.role is not Role.INITIATOR:
            raise TransportError("only the initiator opens connections")
        if self.state is not SessionState.CLOSING:  # closing may need one to confirm
            self._check_usable()
        cid = self._next_cid
        if cid > 0xFFFF:
            raise TransportError("connection index space exhausted", peer=self.peer)
        self._next_cid += 1
        conn = _Conn(cid, FrameReader(self.config.max_payload, pool=self._pool), now, label)
        conn.reader.peer = self._conn_peer(conn)
        flags = Flag.NEW_SESSION if self.state is SessionState.CONNECTING else Flag.NONE
        hello = Hello(Role.INITIATOR, cid, LOCAL_CAPABILITIES, _ns(now), 0,
                      self.config.max_payload, self.config.recv_window, self.token,
                      self.local_name)
        conn.control.append(encode_frame(FrameType.HELLO, flags, self.session_id, 0,
                                         hello.encode()))
        self._conns[cid] = conn
        return cid

    def accept_connection(self, hello: Hello, reader: FrameReader, now: float,
                           label: str | None) -> int:
        cid = hello.conn_index
        old = self._conns.get(cid)
        if old is not None and old.state is not ConnState.CLOSED:
            raise HandshakeError(f"opened connection {cid} twice", peer=self.peer)
        if self.peer_name is not None and hello.name != self.peer_name:
            raise AuthenticationError(f"a connection claiming to be agent {hello.name!r} tried "
                                      f"to join the session of {self.peer_name!r}",
                                      peer=label or self.peer_address)
        self.peer_name = hello.name
        conn = _Conn(cid, reader, now, label)
        reader.peer = self._conn_peer(conn)
        reader.pool = self._pool
        welcome = Hello(Role.ACCEPTOR, cid, LOCAL_CAPABILITIES, _ns(now), hello.timestamp_ns,
                        self.config.max_payload, self.config.recv_window, self.token,
                        self.local_name)
        conn.control.append(encode_frame(FrameType.WELCOME, 0, self.session_id, 0,
                                         welcome.encode()))
        self._conns[cid] = conn
        self._conn_opened(conn, now)
        return cid

    def needs_connection(self) -> bool:
        """Initiator, closing: every connection broke before the close was confirmed."""
        return self.role is Role.INITIATOR and self.state is SessionState.CLOSING and \
            not self._close_confirmed and not self._live_conns()

    def apply_peer_limits(self, hello: Hello) -> None:
        """What the peer's first HELLO/WELCOME announced: frame size, window, checksums."""
        self.send.max_payload = min(self.send.max_payload, hello.max_payload)
        self.send.peer_limit = hello.recv_window
        self.send.data_flags = _data_flags(hello.capabilities)

    def note_established(self) -> None:
        """Acceptor: report Established first (the session was just created from a HELLO)."""
        self._events.insert(0, Established())

    def _conn_opened(self, conn: _Conn, now: float) -> None:
        conn.state = ConnState.OPEN
        if self.state is SessionState.CLOSING and self.role is Role.INITIATOR:
            conn.retire_wanted = True
        conn.next_ping = now + self.config.ping_interval
        self.connections_opened += 1
        self._orphan_since = None
        self._ack_due = now  # tell the peer at once where we stand (speeds up resends)
        self._events.append(ConnectionOpened(conn.cid))

    def connection_lost(self, cid: int, now: float, reason: str = "connection lost",
                        error: TransportError | None = None) -> None:
        """The driver's socket for ``cid`` closed or failed (no-op if already dropped)."""
        conn = self._conns.get(cid)
        if conn is None or conn.state is ConnState.CLOSED:
            return
        clean = conn.retire_sent and conn.retire_got
        self._drop(conn, now, reason, clean=clean, error=error)

    def _drop(self, conn: _Conn, now: float, reason: str, *, clean: bool,
              error: TransportError | None = None) -> None:
        conn.state = ConnState.CLOSED
        conn.control.clear()
        if not clean:
            self.connections_lost += 1
            self.send.connection_lost(conn.cid)
            if self.state in (SessionState.OPEN, SessionState.CLOSING):
                self._ack_due = now  # the ACK may have gone down with it
        self._events.append(ConnectionDropped(conn.cid, reason, clean, error))
        del self._conns[conn.cid]
        if not self._live_conns():
            if self.state is SessionState.CLOSING and (self.role is Role.ACCEPTOR
                                                       or self._close_confirmed):
                self._end(None)
            elif self.role is Role.ACCEPTOR and self._orphan_since is None:
                self._orphan_since = now

    def _live_conns(self) -> list[_Conn]:
        return [c for c in self._conns.values() if c.state is not ConnState.CLOSED]

    def connection_ids(self) -> list[int]:
        """Connections not yet dropped (handshaking or open)."""
        return [c.cid for c in self._live_conns()]

    def open_connection_ids(self) -> list[int]:
        """Connections carrying data: open, and not being retired."""
        return [c.cid for c in self._conns.values() if c.state is ConnState.OPEN
                and not c.retire_wanted]

    def open_connection_count(self) -> int:
        return len(self.open_connection_ids())

    def retire_connection(self, cid: int) -> None:
        """Initiator: stop using ``cid`` (fewer streams); it closes once both sides RETIRE."""
        conn = self._conns.get(cid)
        if self.role is not Role.INITIATOR or conn is None or conn.state is not ConnState.OPEN:
            return
        conn.retire_wanted = True

    # ---- bytes in -----------------------------------------------------------------------
    def get_buffer(self, cid: int) -> memoryview:
        conn = self._conns.get(cid)
        if conn is None:
            return memoryview(bytearray(4096))  # a late read on a dropped connection: discard
        return conn.reader.get_buffer()

    def buffer_updated(self, cid: int, nbytes: int, now: float) -> bool:
        """``nbytes`` arrived in the buffer from :meth:`get_buffer`. Errors become events:
        a corrupted frame drops the connection, any other protocol error fails the session.

        Returns False when nothing but bytes happened (part of a frame arrived): the driver
        can skip its work then, which at LAN rates is most calls.
        """
        conn = self._conns.get(cid)
        if conn is None or conn.state is ConnState.CLOSED:
            return False
        conn.bytes_in += nbytes
        conn.last_rx = now
        try:
            frames = conn.reader.buffer_updated(nbytes)
            if not frames:
                return False
            for frame in frames:
                self._on_frame(conn, frame, now)
                if cid not in self._conns or self.state is SessionState.FAILED:
                    break  # dropped (retired, corrupt) or failed: ignore what follows
        except ProtocolError as exc:
            self._protocol_error(conn, exc, now)
        except AuthenticationError as exc:
            self._fail(exc, ErrorCode.BAD_TOKEN)
        return True

    def receive_data(self, cid: int, data: Bytes, now: float) -> None:
        """Copying convenience around :meth:`get_buffer` / :meth:`buffer_updated`."""
        view = memoryview(data).cast("B")
        while view and cid in self._conns:
            buf = self.get_buffer(cid)
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(cid, n, now)

    def _protocol_error(self, conn: _Conn, exc: ProtocolError, now: float) -> None:
        if not exc.fatal:
            self.corrupt_frames += 1
            if self.corrupt_frames > self.config.max_corrupt_frames:
                exc = type(exc)(f"{self.corrupt_frames} corrupted frames, more than the "
                                f"{self.config.max_corrupt_frames} allowed; the last: {exc}")
                exc.fatal = True
        if exc.fatal:
            self._fail(exc, ErrorCode.VERSION if isinstance(exc, VersionMismatchError)
                       else ErrorCode.PROTOCOL)
            return
        if conn.state is not ConnState.CLOSED:
            self._drop(conn, now, str(exc), clean=False, error=exc)

    def _on_frame(self, conn: _Conn, frame: Frame, now: float) -> None:
        peer = conn.reader.peer
        if frame.session_id != self.session_id and frame.type != FrameType.ERROR:
            raise HandshakeError(f"sent a frame of session {frame.session_id:#x} on a "
                                 f"connection of session {self.session_id:#x}", peer=peer)
        ftype = frame.type
        if ftype == FrameType.DATA:
            self._on_data(conn, frame, now, peer)
        elif ftype == FrameType.ACK:
            self._require_open(conn, "ACK", peer)
            info = AckInfo.decode(frame.payload, peer)
            self.send.on_ack(info, bool(frame.flags & Flag.FIN_ACK), peer)
            if self._window_tuner is not None:
                window = self._window_tuner.on_ack(self.send.acked, now, self._min_rtt)
                if window is not None:
                    self.send.window = window
            self._check_done(now)
        elif ftype == FrameType.PING:
            self._require_open(conn, "PING", peer)
            decode_stamp(frame.payload, peer)
            if not conn.retire_sent:
                conn.control.append(encode_frame(FrameType.PONG, 0, self.session_id, 0,
                                                 frame.payload))
        elif ftype == FrameType.PONG:
            self._rtt_sample(conn, now - decode_stamp(frame.payload, peer) / 1e9)
        elif ftype == FrameType.FIN:
            self._require_open(conn, "FIN", peer)
            self.recv.on_fin(frame.seq, peer)
            if self.recv.eof:
                self._ack_due = now
        elif ftype == FrameType.RETIRE:
            self._on_retire(conn, now, peer)
        elif ftype == FrameType.WELCOME:
            self._on_welcome(conn, frame, now, peer)
        elif ftype == FrameType.ERROR:
            code, message = decode_error(frame.payload)
            if code == ErrorCode.CLOSED and self.state is SessionState.CLOSING:
                self._close_confirmed = True  # the acceptor completed: it had everything
                self._drop(conn, now, "the peer completed the session", clean=True)
                return
            try:
                name = ErrorCode(code).name
            except ValueError:
                name = str(code)
            what = "refused the connection" if conn.state is ConnState.HANDSHAKE else \
                "ended the session"
            self._fail(PeerError(f"{what} ({name}): {message}", peer=peer), None)
        elif ftype == FrameType.HELLO:
            raise HandshakeError("sent a HELLO on a connection that already has one",
                                 peer=peer)
        else:
            raise HandshakeError(f"sent a frame of unknown type {ftype}", peer=peer)

    def _require_open(self, conn: _Conn, what: str, peer: str | None) -> None:
        if conn.state is not ConnState.OPEN or conn.retire_got:
            raise HandshakeError(f"sent {what} on a connection that is "
                                 f"{'retired' if conn.retire_got else 'not open yet'}",
                                 peer=peer)

    def _on_data(self, conn: _Conn, frame: Frame, now: float, peer: str | None) -> None:
        self._require_open(conn, "DATA", peer)
        if frame.length > self.config.max_payload:
            raise FrameTooLargeError(f"sent a {frame.length}-byte DATA frame, more than the "
                                     f"{self.config.max_payload} bytes announced", peer=peer)
        recv = self.recv
        if recv.on_data(frame.seq, frame.payload, peer):
            if recv.delivered - self._acked_sent >= self.config.ack_every:
                self._ack_due = now
            elif self._ack_due is None:
                self._ack_due = now + self.config.ack_delay
        elif self._ack_due is None:  # a duplicate or a gap: let the peer know soon
            self._ack_due = now + self.config.ack_delay

    def _on_welcome(self, conn: _Conn, frame: Frame, now: float, peer: str | None) -> None:
        if self.role is not Role.INITIATOR or conn.state is not ConnState.HANDSHAKE:
            raise HandshakeError("sent an unexpected WELCOME", peer=peer)
        hello = Hello.decode(frame.payload, peer)
        if hello.role is not Role.ACCEPTOR or hello.conn_index != conn.cid:
            raise HandshakeError(f"answered connection {conn.cid} with a WELCOME for "
                                 f"connection {hello.conn_index} as {hello.role.name}", peer=peer)
        if not hmac.compare_digest(hello.token, self.token):
            raise AuthenticationError("answered with another session's token", peer=peer)
        if not hello.capabilities & Capability.CRC32:
            raise HandshakeError("does not checksum its frames (no CRC32 capability)",
                                 peer=peer)
        if self.peer_name is not None and hello.name != self.peer_name:
            raise AuthenticationError(f"connection {conn.cid} reached agent {hello.name!r}, "
                                      f"not {self.peer_name!r} as the others", peer=peer)
        self.peer_name = hello.name
        for c in self._conns.values():
            c.reader.peer = self._conn_peer(c)
        self._rtt_sample(conn, now - hello.echo_ns / 1e9)
        if self.state is SessionState.CONNECTING:
            self.apply_peer_limits(hello)
            self.state = SessionState.OPEN
            self._events.append(Established())
        self._conn_opened(conn, now)

    def _on_retire(self, conn: _Conn, now: float, peer: str | None) -> None:
        if conn.state is not ConnState.OPEN or conn.retire_got:
            raise HandshakeError("sent RETIRE twice or before the handshake", peer=peer)
        conn.retire_got = True
        if self.role is Role.INITIATOR:
            if not conn.retire_sent:
                raise HandshakeError("retired a connection the initiator did not retire",
                                     peer=peer)
            if self.state is SessionState.CLOSING:
                self._close_confirmed = True
            self._drop(conn, now, "retired", clean=True)
        else:
            conn.retire_wanted = True  # answer after what is pending; then it is closed

    def _rtt_sample(self, conn: _Conn, rtt: float) -> None:
        if not 0 <= rtt < 3600:
            return  # a clock jump, or a stamp from a confused peer: ignore
        conn.rtt = rtt if conn.rtt is None else 0.875 * conn.rtt + 0.125 * rtt
        self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt
        self._min_rtt = rtt if self._min_rtt is None else min(self._min_rtt, rtt)

    # ---- bytes out ----------------------------------------------------------------------
    def pull(self, cid: int, now: float, budget: int) -> list[Bytes]:
        """Buffers to write on connection ``cid`` now, about ``budget`` bytes (at least one
        frame if any is due). Frames handed out count as sent on ``cid``."""
        conn = self._conns.get(cid)
        if conn is None or conn.state is ConnState.CLOSED or conn.retire_sent:
            return []  # nothing may follow a RETIRE on its connection
        out: list[Bytes] = []
        size = 0
        while conn.control:
            frame = conn.control.popleft()
            out.append(frame)
            size += len(frame)
        if conn.state is not ConnState.OPEN or self.state is SessionState.FAILED:
            conn.bytes_out += size
            return out
        # Before a RETIRE an ACK goes out in any case: when closing, the one that proves the
        # FIN arrived must precede each RETIRE (see the module docstring).
        if (self._ack_due is not None and now >= self._ack_due) or conn.retire_wanted:
            frame = self._ack_frame(now)
            out.append(frame)
            size += len(frame)
        if not conn.retire_wanted and not conn.retire_got:
            send = self.send
            while size < budget:
                item = send.next_frame(cid)
                if item is None:
                    break
                out.append(item.header)
                size += len(item.header)
                if item.end > item.seq:
                    out.append(item.payload)
                    size += item.end - item.seq
        else:
            out.append(encode_frame(FrameType.RETIRE, 0, self.session_id, 0))
            conn.retire_sent = True
            if self.role is Role.ACCEPTOR:  # the answer: nothing more either way
                self._drop(conn, now, "retired", clean=True)
        conn.bytes_out += size
        return out

    def _ack_frame(self, now: float) -> bytes:
        recv = self.recv
        info = recv.ack_info()
        flags = Flag.FIN_ACK if recv.eof else Flag.NONE
        self._ack_due = None
        self._acked_sent = info.ack
        self._limit_sent = info.limit
        if recv.eof:
            self._fin_ack_sent = True
            self._check_done(now)
        return encode_frame(FrameType.ACK, flags, self.session_id, 0, info.encode())

    def wants_to_send(self, cid: int, now: float) -> bool:
        """Whether :meth:`pull` would return something for ``cid`` now."""
        conn = self._conns.get(cid)
        if conn is None or conn.state is ConnState.CLOSED or conn.retire_sent:
            return False
        if conn.control:
            return True
        if conn.state is not ConnState.OPEN or self.state is SessionState.FAILED:
            return False
        return conn.retire_wanted or self.send.has_sendable() or (
            self._ack_due is not None and now >= self._ack_due)

    # ---- application --------------------------------------------------------------------
    def write(self, data: Bytes, now: float) -> int:
        """Take what the send window allows of ``data`` (0 if full or not yet established)."""
        self._check_usable()
        if self.send.fin is not None:
            raise SessionClosedError("cannot send after close()", peer=self.peer)
        if self.state is SessionState.CONNECTING:
            return 0
        return self.send.write(data)

    def send_space(self) -> int:
        return self.send.space() if self.state is SessionState.OPEN else 0

    def set_send_window(self, window: int, *, adaptive_floor: int | None = None) -> int:
        """Change the send window (bytes written and not yet acknowledged, sent or not);
        returns the window now in force, within one frame .. the configured ``send_window``.

        With ``adaptive_floor`` the window then follows the path (:class:`DeliveryWindow`:
        twice the recent delivery rate x the lowest RTT), between that floor and ``window``.
        With :meth:`set_recv_window` on the peer it bounds what a relay holds between the two
        applications (see there). Lowering it below what is unacknowledged only makes
        :meth:`write` wait for ACKs; nothing already taken is dropped.
        """
        window = max(self.config.max_payload, min(window, self.config.send_window))
        self.send.window = window
        self._window_tuner = None if adaptive_floor is None else DeliveryWindow(
            max(self.config.max_payload, min(adaptive_floor, window)), window)
        return window

    def set_recv_window(self, window: int) -> int:
        """Change the receive window (bytes the peer may send beyond what was read); returns
        the window now in force, within one frame .. the configured ``recv_window``.

        It bounds what sits between the peer's application and this one's: a relay with a
        slow consumer holds a window's worth, and draining it adds to the guest's downtime.
        Lowering takes effect as the application reads (limits already announced stand: the
        announced limit never goes back); raising at the next ACK.
        """
        window = max(self.config.max_payload, min(window, self.config.recv_window))
        self.recv.window = window
        return window

    def read(self, max_bytes: int | None = None) -> Bytes | None:
        """Next in-order bytes; None if none yet, ``b""`` at the end of the peer's stream.

        Reading opens the receive window: an ACK with the new limit is sent once a quarter
        of the window has been consumed since the last one.
        """
        chunk = self.recv.read(max_bytes)
        if chunk is None and self.state is SessionState.FAILED and self.error is not None:
            raise self.error
        if chunk and self.recv.consumed + self.recv.window - self._limit_sent >= \
                self.recv.window // 4 and self._ack_due is None:
            self._ack_due = 0.0  # due now; the driver pulls after read
        return chunk

    def readable_bytes(self) -> int:
        return self.recv.readable_bytes()

    @property
    def at_eof(self) -> bool:
        return self.recv.eof and self.recv.readable_bytes() == 0

    def finish(self, now: float) -> None:
        """No more data from this side: queue the FIN after what was written."""
        self._check_usable()
        self.send.finish()
        self._check_done(now)

    def abort(self, reason: str) -> None:
        """End the session at once; the peer gets an ERROR frame with ``reason``."""
        if self.state in (SessionState.CLOSED, SessionState.FAILED):
            return
        self._fail(SessionClosedError(f"aborted: {reason}", peer=self.peer), ErrorCode.ABORTED)

    def _check_usable(self) -> None:
        if self.state is SessionState.FAILED:
            assert self.error is not None
            raise self.error
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            raise SessionClosedError("the session is closed", peer=self.peer)

    def _check_done(self, now: float) -> None:
        if self.state is SessionState.OPEN and self.send.all_acked and self.recv.eof \
                and self._fin_ack_sent:
            self.state = SessionState.CLOSING
            if self.role is Role.INITIATOR:
                for conn in list(self._live_conns()):
                    if conn.state is ConnState.HANDSHAKE:
                        self._drop(conn, now, "session finished during handshake", clean=True)
                    else:
                        conn.retire_wanted = True
            if not self._live_conns():
                self._end(None)

    def _fail(self, exc: TransportError, code: ErrorCode | None) -> None:
        if self.state in (SessionState.CLOSED, SessionState.FAILED):
            return
        self.state = SessionState.FAILED
        self.error = exc
        for conn in self._live_conns():
            conn.control.clear()
            if code is not None:
                conn.control.append(encode_frame(FrameType.ERROR, 0, self.session_id, 0,
                                                 encode_error(code, str(exc))))
        self._events.append(SessionEnded(exc))

    def fail(self, exc: TransportError) -> None:
        """The driver gives up (e.g. reconnecting failed); the peer is told why."""
        self._fail(exc, ErrorCode.ABORTED)

    def _end(self, error: TransportError | None) -> None:
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self._events.append(SessionEnded(error))

    # ---- time ---------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        cfg = self.config
        deadlines: list[float] = []
        if self._ack_due is not None:
            deadlines.append(self._ack_due)
        if self._orphan_since is not None:
            deadlines.append(self._orphan_since + cfg.reconnect_timeout)
        for conn in self._conns.values():
            if conn.state is ConnState.OPEN:
                deadlines.append(min(conn.next_ping, conn.last_rx + cfg.idle_timeout))
            elif conn.state is ConnState.HANDSHAKE:
                deadlines.append(conn.opened_at + cfg.handshake_timeout)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        if self.state in (SessionState.CLOSED, SessionState.FAILED):
            return
        cfg = self.config
        if self._orphan_since is not None and now >= self._orphan_since + cfg.reconnect_timeout:
            self._fail(ConnectError(
                f"no connection for {cfg.reconnect_timeout:g} s: the initiator did not "
                f"reconnect", peer=self.peer), None)
            return
        for conn in list(self._conns.values()):
            if conn.state is ConnState.HANDSHAKE and now >= conn.opened_at + \
                    cfg.handshake_timeout:
                self._drop(conn, now, f"no WELCOME within {cfg.handshake_timeout:g} s",
                           clean=False)
            elif conn.state is ConnState.OPEN:
                if now >= conn.last_rx + cfg.idle_timeout:
                    self._drop(conn, now, f"nothing received for {cfg.idle_timeout:g} s",
                               clean=False)
                elif now >= conn.next_ping:
                    conn.next_ping = now + cfg.ping_interval
                    if not conn.retire_sent:
                        conn.control.append(encode_frame(FrameType.PING, 0, self.session_id,
                                                         0, encode_stamp(_ns(now))))

    # ---- observing ----------------------------------------------------------------------
    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def conn_rtt(self, cid: int) -> float | None:
        conn = self._conns.get(cid)
        return conn.rtt if conn else None

    @property
    def min_rtt(self) -> float | None:
        """The lowest round trip (seconds) of the session's frames so far."""
        return self._min_rtt

    def stats(self) -> SessionStats:
        send, recv = self.send, self.recv
        return SessionStats(
            bytes_written=send.offset, bytes_acked=send.acked, bytes_read=recv.consumed,
            frames_sent=send.frames_sent, frames_received=recv.frames_received,
            frames_resent=send.frames_resent, bytes_resent=send.bytes_resent,
            duplicates_received=recv.duplicates, connections_opened=self.connections_opened,
            connections_lost=self.connections_lost, connections_live=len(self._live_conns()),
            corrupt_frames=self.corrupt_frames,
            srtt_ms=None if self._srtt is None else self._srtt * 1e3,
            min_rtt_ms=None if self._min_rtt is None else self._min_rtt * 1e3)
