"""The TLS lane: passthrough bytes over mutual TLS, in threads, resumed after a broken connection.

Why it exists: on a datacenter path the agents pass QEMU's stream through unencoded. Through
the transport session that costs Python per-byte work in the event loop at both ends
(asyncio's TLS layer copies every byte through memory BIOs; framing; sums): 1.4 s of agent
CPU for a 430 MB LAN migration on the test bed, 1.7x plain QEMU's time. Blocking
``ssl.SSLSocket`` s in threads let OpenSSL read and write the sockets itself (AES-GCM at
several GB/s; a 2 GiB loopback transfer costs 1.3 s of CPU to send and 0.9 s to receive,
against 0.4 and 0.2 s in plaintext, ad hoc), and the GIL is released in every call.

What it keeps from the session, unlike the plaintext direct lane (agent/lane.py):
- encryption and mutual authentication with the agents' certificates (the same contexts);
  the lane's one-time token travels inside TLS;
- integrity: TLS's AEAD refuses damaged bytes, and a connection that ends without TLS's
  close_notify is a broken one, never a clean end of the stream;
- a broken connection is replaced, not fatal. Each direction is a connection of its own,
  read by one thread and written by one thread (an ``SSLSocket`` is not safe for
  concurrent use). The source connects both; after a break it connects again, and the
  receiving end says how many bytes it has written into its QEMU; the sending end sends
  again from there, out of the last :data:`RETAIN_BYTES` it keeps. That bound holds because
  every lane socket's buffers are fixed at :data:`SOCKET_BUFFER` (what a broken connection
  can lose is what sits in the two kernels' buffers), and it is checked: a receiver further
  behind than that fails the lane, it never gets a gap.

The wire: TCP, TLS 1.3 (the client checks the server's certificate names the destination
agent, the server that the client's names the source agent), then the client sends the
token (32 bytes) and the connection's kind (``F``: source -> destination, ``R``: back). The
receiving end of that kind then sends, as a big-endian u64, the bytes it has received so far,
and the sending end goes on from there. The end of a direction is TLS's close_notify, both
ways (the receiver answers once it has written everything into QEMU), then TCP's FIN.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import logging
import mmap
import queue
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dwcp_migrate.agent.lane import (
    TOKEN_BYTES,
    LaneError,
    LaneUnreachableError,
    _guard,
    bind_lane_port,
    widen_unix_buffer,
)
from dwcp_migrate.transports.tls import TlsConfig, cut_short, explain, peer_names

log = logging.getLogger(__name__)

FORWARD, RETURN = b"F", b"R"
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF and SO_RCVBUF of every lane socket (the kernel doubles it)
# What a sender keeps to send again: twice what the two ends' doubled buffers can hold.
RETAIN_BYTES = 32 << 20
CHUNK = 1 << 20  # one read from QEMU at most
GATHER = 256 << 10  # records gathered for one write into QEMU, at most
ACCEPT_TIMEOUT = 5.0  # the first connection of each kind
RESUME_TIMEOUT = 10.0  # a replacement connection, from the break on
HANDSHAKE_TIMEOUT = 5.0
# Connections in their handshake at once on one lane port, each in a thread of its own: a
# connection that never speaks (a port scanner, a half-open path) then delays nobody.
MAX_HANDSHAKES = 8
_COUNT = struct.Struct(">Q")
FIREWALL_HINT = ("the destination's lane ports (transport.direct_lane_ports, else its ephemeral "
                 "ports) must be reachable from the source agent; or set "
                 "transport.tls_lane: false on either agent to carry passthrough in the session")


class Retained:
    """The last ``size`` bytes sent, by their position in the stream: a ring buffer that
    QEMU's bytes are read into, so keeping them costs no copy."""

    def __init__(self, size: int = RETAIN_BYTES) -> None:
        self.size = size
        # Anonymous memory is mapped as bytes arrive: a return path that carries little costs
        # little (a bytearray would be zeroed, so resident, at once).
        self._ring = memoryview(mmap.mmap(-1, size))
        self.total = 0

    def slot(self, most: int) -> memoryview:
        """Where the next bytes go: up to ``most``, never across the ring's end."""
        at = self.total % self.size
        return self._ring[at:at + min(most, self.size - at)]

    def commit(self, n: int) -> None:
        self.total += n

    def put(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            slot = self.slot(len(view))
            slot[:] = view[:len(slot)]
            self.commit(len(slot))
            view = view[len(slot):]

    def since(self, start: int) -> list[memoryview]:
        """The bytes from stream position ``start`` to the end, in at most two pieces."""
        if start > self.total:
            raise LaneError(f"the receiver claims {start} bytes of a stream of {self.total}")
        if self.total - start > self.size:
            raise LaneError(f"the receiver is {self.total - start} bytes behind, more than the "
                            f"{self.size} kept to send again")
        pieces = []
        while start < self.total:
            at = start % self.size
            n = min(self.total - start, self.size - at)
            pieces.append(self._ring[at:at + n])
            start += n
        return pieces


def _force_shut(conn: socket.socket) -> None:
    """Wake a thread blocked on ``conn``. ``SSLSocket.shutdown`` would drop its SSL object
    under the thread using it; the plain socket call acts on the descriptor only."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


def _tune(sock: socket.socket) -> None:
    _guard(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class LaneStats:
    bytes: int = 0  # from QEMU sent (sending end) or written into QEMU (receiving end)
    reconnects: int = 0
    resent: int = 0  # bytes sent again after a reconnect


class LaneClosedError(LaneError):
    """The lane was ended (an error elsewhere, or cancelled) while this side waited."""


class ConnectionSource(abc.ABC):
    """Where a pump gets its connection of one kind, the first one and after a break."""

    def __init__(self, kind: bytes) -> None:
        self.kind = kind
        self.current: ssl.SSLSocket | None = None
        self.closed = threading.Event()

    @abc.abstractmethod
    def get(self, broken: BaseException | None, deadline: float) -> ssl.SSLSocket:
        """A new connection (the current one is closed first), by ``deadline`` (monotonic
        clock) or :class:`LaneError`."""

    def wait_s(self, broken: BaseException | None) -> float:
        return ACCEPT_TIMEOUT if broken is None else RESUME_TIMEOUT

    def close(self) -> None:
        self.closed.set()
        if self.current is not None:
            _force_shut(self.current)


class Dialer(ConnectionSource):
    """Source: connects (again) to the destination's lane port."""

    def __init__(self, kind: bytes, address: tuple[str, int], token: bytes,
                 context: ssl.SSLContext, peer: str) -> None:
        super().__init__(kind)
        self.address, self.token, self.context, self.peer = address, token, context, peer
        self._opened_first = False  # open_first made self.current: the pump's first one

    def open_first(self, deadline: float) -> None:
        """Make the first connection now (before QEMU's socket is handed to the lane), so
        that a lane the network does not let through (:class:`LaneUnreachableError`) can
        be declined while the session can still carry the stream."""
        self.get(None, deadline)
        self._opened_first = True

    def get(self, broken: BaseException | None, deadline: float) -> ssl.SSLSocket:
        if broken is None and self._opened_first and self.current is not None:
            self._opened_first = False
            return self.current
        if self.current is not None:
            self.current.close()
            self.current = None
        last: BaseException | None = broken
        while not self.closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self.current = self._connect(min(left, HANDSHAKE_TIMEOUT))
                return self.current
            except ConnectionRefusedError as exc:
                if broken is None:  # the port was open a moment ago: a firewall rejects it
                    raise LaneUnreachableError(
                        f"the TLS lane to {self.address[0]}:{self.address[1]} was refused "
                        f"({exc}): {FIREWALL_HINT}") from exc
                # The destination's lane port is gone: its lane ended (failed) or its agent.
                raise LaneError(f"the destination closed the TLS lane ({exc}): the "
                                f"destination agent's log says why") from exc
            except ssl.SSLError as exc:
                if not cut_short(exc):  # a refused certificate: final
                    raise explain(exc, self.peer, side="client") from exc
                last = exc  # the network cut the handshake: as below
                self.closed.wait(0.2)
            except OSError as exc:  # timeouts, unreachable: the network may come back
                last = exc
                self.closed.wait(0.2)
        if self.closed.is_set():
            raise LaneClosedError("the lane was closed")
        error = LaneError if broken is not None else LaneUnreachableError
        raise error(f"cannot {'open' if broken is None else 'reconnect'} the TLS lane to "
                        f"{self.address[0]}:{self.address[1]} within "
                        f"{self.wait_s(broken):g} s ({last}): {FIREWALL_HINT}")

    def _connect(self, timeout: float) -> ssl.SSLSocket:
        raw = socket.create_connection(self.address, timeout=timeout)
        try:
            _tune(raw)
            conn = self.context.wrap_socket(raw, server_hostname=self.peer,
                                            suppress_ragged_eofs=False)
        except BaseException:
            raw.close()
            raise
        try:
            conn.sendall(self.token + self.kind)
        except BaseException:
            conn.close()
            raise
        return conn


class Slot(ConnectionSource):
    """Destination: waits for the source to connect (again) for this kind."""

    def __init__(self, kind: bytes) -> None:
        super().__init__(kind)
        self.arrivals: queue.Queue[ssl.SSLSocket] = queue.Queue()
        self.arrived = threading.Event()  # a first connection has come (or the slot closed)
        self._handing = threading.Lock()  # handshakes finish in threads of their own

    def hand_over(self, conn: ssl.SSLSocket) -> bool:
        """From the acceptor: a new connection replaces the current one, which is shut so a
        pump blocked on it (a silently dead path) wakes up. False: this lane has ended."""
        with self._handing:
            if self.closed.is_set():
                conn.close()
                return False
            # Read before the hand-over: once queued, the pump may take the new one as current.
            replaced = self.current
            self.arrivals.put(conn)
            self.arrived.set()
            if replaced is not None:
                _force_shut(replaced)
            return True

    def get(self, broken: BaseException | None, deadline: float) -> ssl.SSLSocket:
        if self.current is not None:
            self.current.close()
            self.current = None
        while not self.closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(queue.Empty):
                self.current = self.arrivals.get(timeout=min(left, 0.2))
                return self.current
        if self.closed.is_set():
            raise LaneClosedError("the lane was closed")
        what = ("open" if broken is None else f"reconnect (after: {broken})")
        raise LaneError(f"the source agent did not {what} the TLS lane within "
                        f"{self.wait_s(broken):g} s: {FIREWALL_HINT}")

    def close(self) -> None:
        super().close()
        self.arrived.set()  # wakes wait_for_source
        while True:
            try:
                self.arrivals.get_nowait().close()
            except queue.Empty:
                break


def _read_exactly(conn: ssl.SSLSocket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = conn.recv(n - len(got))
        if not chunk:
            raise ConnectionError("the lane connection ended during its greeting")
        got += chunk
    return bytes(got)


def send_side(qemu: socket.socket, lane: ConnectionSource, stats: LaneStats,
              head: Sequence[bytes | memoryview] = ()) -> None:
    """QEMU -> lane until QEMU's EOF, then a TLS close that the receiver answers. A broken
    connection is replaced and the receiver gets what it is missing."""
    kept = Retained()
    conn: ssl.SSLSocket | None = None

    def connect(broken: BaseException | None) -> ssl.SSLSocket:
        """A connection on which the receiver has everything sent so far."""
        deadline = time.monotonic() + lane.wait_s(broken)
        while True:
            new = lane.get(broken, deadline)
            try:
                new.settimeout(RESUME_TIMEOUT)
                (has,) = _COUNT.unpack(_read_exactly(new, _COUNT.size))
                pieces = kept.since(has)
                new.settimeout(None)
                for piece in pieces:
                    new.sendall(piece)
                if broken is not None:
                    stats.reconnects += 1
                    stats.resent += kept.total - has
                    log.warning("TLS lane (%s): connection replaced after %s; %d bytes sent "
                                "again", lane.kind.decode(), broken, kept.total - has)
                return new
            except OSError as exc:  # ssl.SSLError is an OSError
                broken = exc
                lane.closed.wait(0.1)

    for piece in head:  # bytes read from QEMU before the lane existed
        kept.put(piece)
    stats.bytes += kept.total
    conn = connect(None)
    while True:
        slot = kept.slot(CHUNK)
        n = qemu.recv_into(slot)
        if n == 0:
            break
        kept.commit(n)
        stats.bytes += n
        try:
            conn.sendall(slot[:n])
        except OSError as exc:
            conn = connect(exc)  # sends these bytes again, with whatever else is missing
    while True:
        try:
            conn.unwrap()  # close_notify, then the receiver's: it has it all
            break
        except (OSError, ValueError) as exc:
            conn = connect(exc)
    conn.close()
    lane.current = None


def receive_side(qemu: socket.socket, lane: ConnectionSource, stats: LaneStats) -> None:
    """Lane -> QEMU until the sender's TLS close; then QEMU's side is shut for writing. A
    broken connection is replaced; the sender learns how much QEMU already has."""
    buffer = memoryview(bytearray(CHUNK))

    def connect(broken: BaseException | None) -> ssl.SSLSocket:
        deadline = time.monotonic() + lane.wait_s(broken)
        while True:
            new = lane.get(broken, deadline)
            try:
                new.settimeout(RESUME_TIMEOUT)
                new.sendall(_COUNT.pack(stats.bytes))
                new.settimeout(None)
                if broken is not None:
                    stats.reconnects += 1
                return new
            except OSError as exc:
                broken = exc
                lane.closed.wait(0.1)

    conn = connect(None)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    while True:
        # A read gives one TLS record (16 KiB) at most: gather what has arrived already, so
        # QEMU gets fewer, bigger writes.
        filled, ended, broken = 0, False, None
        try:
            filled = conn.recv_into(buffer)
            ended = filled == 0  # the sender's close_notify: the stream is complete
            while not ended and filled < GATHER and (conn.pending() or poller.poll(0)):
                n = conn.recv_into(buffer[filled:])
                ended = n == 0
                filled += n
        except OSError as exc:  # reset, damaged record, EOF without close_notify
            broken = exc
        if filled:
            qemu.sendall(buffer[:filled])  # an error here is QEMU's: the lane fails
            stats.bytes += filled
        if ended:
            break
        if broken is not None:
            poller.unregister(conn.fileno())
            conn = connect(broken)
            poller.register(conn.fileno(), select.POLLIN)
    with contextlib.suppress(OSError, ValueError):
        conn.unwrap()  # tells the sender everything arrived
    conn.close()
    lane.current = None
    qemu.shutdown(socket.SHUT_WR)


class TlsLaneListener:
    """Destination: the lane's port, taking the source's connections (the first ones and
    replacements) until the lane ends. Only connections with a client certificate for the
    source agent and the token are handed on."""

    def __init__(self, host: str, tls: TlsConfig, source: str,
                 ports: tuple[int, int] | None = None) -> None:
        self._sock = bind_lane_port(host, ports)
        self._sock.listen(4)
        self.port: int = self._sock.getsockname()[1]
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.source = source
        self._context = tls.server_context()
        self._context.num_tickets = 0  # no resumption tickets: nobody would use them
        self.slots = {FORWARD: Slot(FORWARD), RETURN: Slot(RETURN)}
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._handshaking: dict[int, socket.socket] = {}  # shut by close()
        self._admitted = 0  # connections accepted so far (the keys above)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="dwcp-tlslane-accept",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                raw, peer = self._sock.accept()
            except OSError:  # closed: the lane has ended
                return
            with self._lock:
                busy = len(self._handshaking) >= MAX_HANDSHAKES
                if not busy:
                    self._admitted += 1
                    key = self._admitted
                    self._handshaking[key] = raw
            if busy:
                raw.close()
                self._refuse(peer, f"{MAX_HANDSHAKES} connections are handshaking already")
                continue
            threading.Thread(target=self._admit_one, args=(raw, peer, key), daemon=True,
                             name="dwcp-tlslane-admit").start()

    def _refuse(self, peer: tuple[str, int], why: object) -> None:
        if self._closed.is_set():  # shut by close(): nothing wrong with the connection
            why = "the lane ended during its handshake"
            log.info("TLS lane port %d: a connection from %s: %s", self.port, peer[0], why)
        else:
            log.warning("TLS lane port %d: refused a connection from %s: %s", self.port,
                        peer[0], why)
        self.refused.append(f"{peer[0]}:{peer[1]}: {why}")

    def _admit_one(self, raw: socket.socket, peer: tuple[str, int], key: int) -> None:
        try:
            kind, conn = self._admit(raw, key)
        except Exception as exc:
            raw.close()
            self._refuse(peer, exc)
            return
        finally:
            with self._lock:
                del self._handshaking[key]
        if not self.slots[kind].hand_over(conn):
            # The lane has ended here: the source's next attempt is refused at once.
            _force_shut(self._sock)
            self._sock.close()

    def _admit(self, raw: socket.socket, key: int) -> tuple[bytes, ssl.SSLSocket]:
        _tune(raw)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        conn = self._context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False,
                                         do_handshake_on_connect=False)
        with self._lock:  # the descriptor moved to ``conn``: close() must shut that now
            self._handshaking[key] = conn
        try:
            try:
                conn.do_handshake()
            except ssl.SSLError as exc:
                raise explain(exc, "the lane's client", side="server") from exc
            names = peer_names(conn.getpeercert())
            if self.source not in names:
                raise LaneError(f"its certificate is for {names}, not the source agent "
                                f"{self.source!r}")
            greeting = _read_exactly(conn, TOKEN_BYTES + 1)
            if not hmac.compare_digest(greeting[:TOKEN_BYTES], self.token):
                raise LaneError("it did not present the lane's token")
            kind = greeting[TOKEN_BYTES:]
            if kind not in self.slots:
                raise LaneError(f"it asked for an unknown direction {kind!r}")
        except BaseException:
            conn.close()
            raise
        return kind, conn

    def wait_for_source(self, timeout: float) -> bool:
        """Block until the source has made its first connection of both kinds (True), the
        lane was closed, or ``timeout`` passed (False). The destination commits its QEMU
        to the lane only then: until that moment the source may still decline it."""
        deadline = time.monotonic() + timeout
        for slot in self.slots.values():
            if not slot.arrived.wait(max(0.0, deadline - time.monotonic())):
                return False
        return not any(slot.closed.is_set() for slot in self.slots.values())

    def close(self) -> None:
        self._closed.set()
        _force_shut(self._sock)
        self._sock.close()
        with self._lock:
            for conn in self._handshaking.values():
                _force_shut(conn)  # its handshake fails at once; its thread refuses it
        for slot in self.slots.values():
            slot.close()


@dataclass
class LaneResult:
    sent: LaneStats = field(default_factory=LaneStats)
    received: LaneStats = field(default_factory=LaneStats)

    def payload_bytes(self) -> int:
        """Bytes this end put on its lane connections or took from them (TLS's own few
        bytes per 16 KiB record not counted), those sent again included."""
        return self.sent.bytes + self.sent.resent + self.received.bytes

    def record(self) -> dict[str, int | str]:
        return {"lane": "tls", "reconnects": self.sent.reconnects + self.received.reconnects,
                "resent_bytes": self.sent.resent}


async def open_tls_lane(outgoing: Dialer, incoming: Dialer) -> None:
    """Source: make both first connections, or close both dialers and raise (a
    :class:`LaneUnreachableError` if the network did not let a connection through)."""
    try:
        for dialer in (outgoing, incoming):
            await asyncio.to_thread(dialer.open_first, time.monotonic() + ACCEPT_TIMEOUT)
    except BaseException:
        for dialer in (outgoing, incoming):
            dialer.close()
            if dialer.current is not None:
                dialer.current.close()
        raise


async def run_tls_lane(qemu: socket.socket, outgoing: ConnectionSource,
                       incoming: ConnectionSource, result: LaneResult,
                       head: Sequence[bytes | memoryview] = ()) -> None:
    """Carry QEMU's bytes out on ``outgoing`` and the peer's in on ``incoming`` until both
    directions have ended. The first error ends the lane as a whole (QEMU's socket shut, so
    QEMU sees a broken stream) and is raised as a :class:`LaneError`; the QEMU socket is the
    caller's to close."""
    qemu.setblocking(True)
    widen_unix_buffer(qemu)
    loop = asyncio.get_running_loop()
    done: asyncio.Queue[BaseException | None] = asyncio.Queue()

    def run(target: Callable[[], None]) -> None:
        try:
            target()
            outcome: BaseException | None = None
        except BaseException as exc:  # handed to the event loop, which raises it
            outcome = exc
        loop.call_soon_threadsafe(done.put_nowait, outcome)

    def stop() -> None:
        for source in (outgoing, incoming):
            source.close()
        _force_shut(qemu)

    threads = [
        threading.Thread(target=run, name="dwcp-tlslane-out", daemon=True,
                         args=(lambda: send_side(qemu, outgoing, result.sent, head),)),
        threading.Thread(target=run, name="dwcp-tlslane-in", daemon=True,
                         args=(lambda: receive_side(qemu, incoming, result.received),))]
    for t in threads:
        t.start()
    error: BaseException | None = None
    try:
        for _ in threads:
            outcome = await done.get()
            if outcome is not None and error is None:
                error = outcome
                stop()
    except asyncio.CancelledError:
        stop()
        for t in threads:  # they end now: their sockets are shut down
            await asyncio.to_thread(t.join, 5)
        raise
    finally:
        for source in (outgoing, incoming):
            source.close()
            if source.current is not None:
                source.current.close()
    if error is not None:
        if isinstance(error, LaneError):
            raise error
        raise LaneError(f"the TLS lane broke: {error}") from error
