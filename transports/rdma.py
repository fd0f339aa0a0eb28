"""An AMST session over RDMA: one RC queue pair, registered rings, credit-based flow control.

**Tested only against a fake verbs layer** (:mod:`.fake_verbs`): the machine this was written
on has no RDMA hardware and no rxe/siw kernel driver. The code runs against the small verbs
interface of :mod:`.verbs`; :mod:`.pyverbs_verbs` implements it over pyverbs, the fake in
this process. Nothing here has met a real HCA.

The application sees the byte-stream API of :class:`~.tcp.TcpSession`: ``send``, ``recv``,
``recv_view``, ``finish``, ``close``, ``abort``, ``stats``, so the agent can carry a migration
over either.

Wire format: see :mod:`.rdma_wire` (HELLO, DATA, FIN, ABORT; a 16-byte header each).

Flow control. Each side posts ``ring_slots`` receive buffers before it connects and never
lets a message land where no buffer is posted (RC would answer "receiver not ready", and
after a few retries break the connection):

- a side may send ``peer ring + peer reposted - messages sent`` messages, where ``reposted``
  counts the receive buffers the peer has posted again since the start;
- a DATA buffer is posted again only when the application has *read* it, so a slow reader
  stops the sender (the send ring fills, ``send`` waits): memory is bounded on both sides by
  the two rings, and nothing is ever dropped;
- the peer learns ``reposted`` from the header of every message, and, because a receiver may
  have nothing to send, from an RDMA write of the counter into an 8-byte region the sender
  registered for it. A write consumes no receive buffer, so credit updates can never
  deadlock for want of credit; only one is in flight at a time (coalescing), and when idle one
  goes every ``keepalive_s`` anyway: its completion is an RTT sample, and its failure is how a
  side that only receives learns that the peer's host died;
- one credit is kept back for ABORT, so a failing side can always say why.

Ordering and integrity come from RC itself (in order, exactly once, with a CRC per packet);
the header's magic and lengths are still checked, and a peer that claims more buffers than it
can have is refused, since believing it would overrun it.

Close: FIN after the data; the session has ended cleanly when our FIN completed (so all our
data reached the peer's buffers) and the peer's FIN arrived. ``close`` then disconnects and
releases the memory; unread data is discarded at that point.

Polling: pyverbs 44 exposes no completion-channel file descriptor, and its blocking
completion calls hold the GIL, so a task polls the completion queues: continuously while there
is traffic, then backing off from ``idle_poll_s`` to ``idle_poll_max_s`` when idle, and woken
at once by ``send``/``recv``. This burns a core while data flows, as busy-polling RDMA stacks
do; an idle session wakes up to 1000 times a second at first, fewer later.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dwcp_migrate.transports.errors import (
    AuthenticationError,
    ConnectError,
    HandshakeError,
    PeerError,
    ProtocolError,
    SessionClosedError,
    TransportError,
)
from dwcp_migrate.transports.rdma_wire import (
    COUNTER,
    CTRL_BYTES,
    HEADER,
    MAGIC,
    MIN_SLOT,
    Hello,
    MsgType,
    RdmaConfig,
)
from dwcp_migrate.transports.tcp import TransportStats
from dwcp_migrate.transports.verbs import (
    Buffer,
    CmEvent,
    Completion,
    RdmaConnectionLostError,
    RdmaError,
    ReceiverNotReadyError,
    RemoteRegion,
    VerbsCallError,
    VerbsConnection,
    VerbsListener,
    VerbsProvider,
    WcStatus,
    describe_status,
)

__all__ = ["RdmaConfig", "RdmaServer", "RdmaSession", "RdmaState", "connect_rdma"]

log = logging.getLogger(__name__)

POLL_BATCH = 32  # completions taken per poll call


class RdmaState(enum.Enum):
    CONNECTING = "connecting"  # established, HELLOs not yet exchanged
    OPEN = "open"
    CLOSED = "closed"  # ended cleanly and released
    FAILED = "failed"


@dataclass(eq=False)
class _Out:
    """A message queued or in flight: its buffer (None for a FIN not yet given one)."""

    kind: MsgType
    buf: Buffer | None
    length: int = 0  # payload bytes
    posted_at: float = 0.0
    write: bool = False  # an RDMA write of our credit counter, not a message


@dataclass(eq=False)
class _Ready:
    """A received DATA buffer the application has not finished reading."""

    buf: Buffer
    start: int
    end: int


Authorize = Callable[[str, bytes], str | None]  # (peer name, token) -> refusal reason or None


class RdmaSession:
    """A running RDMA session; made by :func:`connect_rdma` or :meth:`RdmaServer.accept`."""

    def __init__(self, conn: VerbsConnection, config: RdmaConfig, *, initiator: bool,
                 name: str, peer: str, expected_peer: str | None = None, token: bytes = b"",
                 allowed_peers: list[str] | None = None,
                 authorize: Authorize | None = None) -> None:
        self.conn = conn
        self.config = config
        self.initiator = initiator
        self.name = name
        self.peer = peer  # address until the HELLO names the agent
        self.peer_name: str | None = None
        self.session_id = secrets.randbits(63) if initiator else 0
        self.state = RdmaState.CONNECTING
        self.error: TransportError | None = None
        self._expected_peer = expected_peer
        self._token = token
        self._allowed = allowed_peers
        self._authorize = authorize
        self._loop = asyncio.get_running_loop()
        # Buffers.
        self._posted: deque[Buffer] = deque()  # receives posted, oldest first
        self._free: deque[Buffer] = deque()  # send slots not in use
        self._ctrl: Buffer | None = None
        self._ctrl_busy = False
        self._credit_in: Buffer | None = None  # the peer writes its ``reposted`` here
        self._credit_out: Buffer | None = None
        # Sending.
        self._queue: deque[_Out] = deque()  # messages waiting for a credit, oldest first
        self._fill: _Out | None = None  # the queued DATA message still taking bytes
        self._outstanding: deque[_Out] = deque()  # posted, completion not yet seen
        self._sent_msgs = 0
        self._peer_ring = 1  # until the peer's HELLO: the protocol guarantees one receive
        self._peer_slot = MIN_SLOT
        self._peer_reposted = 0
        self._peer_credit: RemoteRegion | None = None
        self._fin_queued = False
        self._fin_posted = False
        self._fin_acked = False
        self._write_inflight = False
        self._last_write = 0.0
        # Receiving.
        self._ready: deque[_Ready] = deque()
        self._reposted = 0
        self._advertised = 0
        self._peer_fin = False
        # Lifecycle.
        self._established = asyncio.Event()
        self._ended = asyncio.Event()  # clean end (both FINs) or failure
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._stopping = False
        self._stop_at = 0.0
        self._released = False
        # Stats.
        self._started = time.monotonic()
        self._bytes_sent = self._bytes_acked = self._bytes_received = 0
        self._srtt: float | None = None
        self._min_rtt: float | None = None

    # ---- setup ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Register the rings and post every receive: before connecting, so that the peer's
        first message finds a buffer."""
        cfg, conn = self.config, self.conn
        try:
            for _ in range(cfg.ring_slots):
                buf = conn.register(cfg.slot_bytes)
                conn.post_recv(buf)
                self._posted.append(buf)
                self._free.append(conn.register(cfg.slot_bytes))
            self._ctrl = conn.register(CTRL_BYTES)
            self._credit_in = conn.register(COUNTER.size, remote_write=True)
            self._credit_out = conn.register(COUNTER.size)
        except VerbsCallError as exc:
            raise RdmaError(f"cannot register {cfg.ring_slots} x {cfg.slot_bytes} byte "
                            f"buffers (locked-memory limit? see `ulimit -l`): {exc}",
                            peer=self.peer) from exc

    def _start(self) -> None:
        """Connected: start polling; the initiator says HELLO first."""
        self._task = self._loop.create_task(self._run(), name=f"rdma-poll {self.peer}")
        if self.initiator:
            self._send_hello()

    def _send_hello(self) -> None:
        assert self._credit_in is not None
        hello = Hello(self.name, self.session_id, self._token, self.config.ring_slots,
                      self.config.slot_bytes, RemoteRegion(self._credit_in.addr,
                                                           self._credit_in.rkey, COUNTER.size))
        self._post_ctrl(MsgType.HELLO, hello.encode())

    async def wait_established(self) -> None:
        await self._established.wait()
        self._raise_if_failed()

    # ---- application ------------------------------------------------------------------------
    @property
    def _max_payload(self) -> int:
        return min(self.config.slot_bytes, self._peer_slot) - HEADER.size

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into send buffers (waits while all of them are in use)."""
        view = memoryview(data).cast("B")
        while view:
            self._check_sendable()
            item = self._fill
            if item is None:
                if not self._free:
                    self._writable.clear()
                    self._kick()
                    await self._writable.wait()
                    continue
                item = _Out(MsgType.DATA, self._free.popleft())
                self._queue.append(item)
                self._fill = item
            assert item.buf is not None
            n = min(self._max_payload - item.length, len(view))
            start = HEADER.size + item.length
            item.buf.view[start:start + n] = view[:n]
            item.length += n
            view = view[n:]
            self._bytes_sent += n
            if item.length == self._max_payload:
                self._fill = None
        # Full buffers go now; a partial one waits for the poller (which runs once this task
        # yields), so a message header and its payload sent one after the other share one.
        self._post_queued(partial=False)
        self._kick()

    def _check_sendable(self) -> None:
        self._raise_if_failed()
        if self.state is not RdmaState.OPEN:
            raise SessionClosedError(f"send on a session that is {self.state.value}",
                                     peer=self.peer)
        if self._fin_queued:
            raise SessionClosedError("send after finish()/close()", peer=self.peer)

    async def recv_view(self, max_bytes: int | None = None) -> bytes:
        """The next bytes in order; empty at the end of the peer's stream. Always a copy: the
        receive buffer is posted again as soon as it is read."""
        while True:
            if self._ready:
                entry = self._ready[0]
                n = entry.end - entry.start
                if max_bytes is not None:
                    n = min(n, max_bytes)
                data = bytes(entry.buf.view[entry.start:entry.start + n])
                entry.start += n
                if entry.start == entry.end:
                    self._ready.popleft()
                    self._repost(entry.buf)
                self._bytes_received += n
                return data
            self._raise_if_failed()
            if self.state is RdmaState.CLOSED:
                raise SessionClosedError("recv on a closed session", peer=self.peer)
            if self._peer_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def recv(self, max_bytes: int | None = None) -> bytes:
        return await self.recv_view(max_bytes)

    def finish(self) -> None:
        """Half-close: FIN after what was sent; ``recv`` goes on until the peer's FIN."""
        if self.state is not RdmaState.OPEN or self._fin_queued:
            return
        self._fin_queued = True
        self._fill = None
        self._queue.append(_Out(MsgType.FIN, None))
        self._post_queued(partial=True)
        self._kick()

    async def close(self) -> None:
        """FIN, wait for the peer's FIN and our FIN's completion, then hang up and release.

        Raises if the session failed or that does not happen within ``close_timeout``.
        """
        if self.state is RdmaState.CLOSED:
            return
        self.finish()
        try:
            await asyncio.wait_for(self._ended.wait(), self.config.close_timeout)
        except TimeoutError:
            waiting = []
            if not self._fin_acked:
                waiting.append(f"our data and FIN to reach the peer ({self._bytes_acked} of "
                               f"{self._bytes_sent} bytes acknowledged)")
            if not self._peer_fin:
                waiting.append("the peer's end of stream (it has not called close, or "
                               "cannot send because we stopped reading)")
            err = SessionClosedError(f"close did not complete within "
                                     f"{self.config.close_timeout:g} s, waiting for "
                                     f"{' and '.join(waiting)}", peer=self.peer)
            self._fail(err, tell_peer="close timed out")
            raise err from None
        self._raise_if_failed()
        self.state = RdmaState.CLOSED
        self._stop(now=True)
        if self._task is not None:
            await self._task

    def abort(self, reason: str = "aborted by the application") -> None:
        """End the session now; the peer is told ``reason`` (if a message can still go)."""
        self._fail(SessionClosedError(f"aborted: {reason}", peer=self.peer), tell_peer=reason)

    def stats(self) -> TransportStats:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return TransportStats(
            bytes_sent=self._bytes_sent, bytes_acked=self._bytes_acked,
            bytes_received=self._bytes_received, elapsed_s=elapsed,
            goodput_mbit_s=self._bytes_acked * 8 / elapsed / 1e6,
            recv_goodput_mbit_s=self._bytes_received * 8 / elapsed / 1e6,
            srtt_ms=self._srtt, min_rtt_ms=self._min_rtt, tcp_rtt_ms=None,
            frames_resent=0, tcp_retransmits=0,
            connections=1 if self.state in (RdmaState.CONNECTING, RdmaState.OPEN) else 0,
            connections_opened=1, connections_lost=int(self.state is RdmaState.FAILED),
            corrupt_frames=0, congestion_control=None)

    def reset_clock(self) -> None:
        self._started = time.monotonic()

    # ---- sending ----------------------------------------------------------------------------
    def _credits(self) -> int:
        return self._peer_ring + self._peer_reposted - self._sent_msgs

    def _post(self, item: _Out, now: float) -> None:
        assert item.buf is not None
        HEADER.pack_into(item.buf.view, 0, MAGIC, item.kind, 0, item.length, self._reposted)
        self.conn.post_send(item.buf, HEADER.size + item.length)
        self._advertised = self._reposted
        self._sent_msgs += 1
        self._fin_posted = self._fin_posted or item.kind is MsgType.FIN
        item.posted_at = now
        self._outstanding.append(item)

    def _post_queued(self, *, partial: bool) -> None:
        if self.state is not RdmaState.OPEN:
            return
        now = self._loop.time()
        while self._queue and self._credits() > 1:  # the last credit is kept for ABORT
            item = self._queue[0]
            if item is self._fill and not partial:
                break
            if item.buf is None:  # a FIN: any free send slot will do
                if not self._free:
                    break
                item.buf = self._free.popleft()
            self._queue.popleft()
            if item is self._fill:
                self._fill = None
            self._post(item, now)

    def _post_ctrl(self, kind: MsgType, payload: bytes) -> bool:
        """HELLO or ABORT from the control buffer (or a free slot if it is busy)."""
        buf = self._ctrl if not self._ctrl_busy else (self._free.popleft() if self._free
                                                      else None)
        if buf is None or self._credits() < 1:
            return False
        payload = payload[:CTRL_BYTES - HEADER.size]
        buf.view[HEADER.size:HEADER.size + len(payload)] = payload
        if buf is self._ctrl:
            self._ctrl_busy = True
        self._post(_Out(kind, buf, len(payload)), self._loop.time())
        return True

    def _maybe_write(self, now: float) -> None:
        """Tell the peer our ``reposted`` count by RDMA write (see the module docstring)."""
        region, src = self._peer_credit, self._credit_out
        if self._write_inflight or region is None or src is None:
            return
        if self._reposted <= self._advertised and now - self._last_write < self.config.keepalive_s:
            return
        COUNTER.pack_into(src.view, 0, self._reposted)
        self.conn.post_write(src, COUNTER.size, region)
        self._advertised = self._reposted
        self._write_inflight = True
        self._last_write = now
        self._outstanding.append(_Out(MsgType.DATA, None, posted_at=now, write=True))

    # ---- receiving --------------------------------------------------------------------------
    def _repost(self, buf: Buffer) -> None:
        if self.state in (RdmaState.CLOSED, RdmaState.FAILED) or self._stopping:
            return
        self.conn.post_recv(buf)
        self._posted.append(buf)
        self._reposted += 1
        self._kick()

    def _read_credit(self) -> None:
        if self._credit_in is None:
            return
        view = self._credit_in.view
        # Read twice: the peer's NIC may be writing the 8 bytes while we read them.
        value = COUNTER.unpack_from(view)[0]
        if value > self._peer_reposted and value == COUNTER.unpack_from(view)[0]:
            self._peer_reposted_to(value)

    def _peer_reposted_to(self, value: int) -> None:
        if value <= self._peer_reposted:
            return
        if value > self._sent_msgs:
            raise ProtocolError(f"the peer claims {value} receive buffers reposted but we "
                                f"sent only {self._sent_msgs} messages", peer=self.peer)
        self._peer_reposted = value

    def _on_recv(self, wc: Completion) -> None:
        buf = self._posted.popleft()
        if not wc.ok:
            self._completion_failed(wc, "receiving")
            return
        if wc.byte_len < HEADER.size:
            raise ProtocolError(f"a {wc.byte_len}-byte message is shorter than a header",
                                peer=self.peer)
        magic, kind, _flags, length, reposted = HEADER.unpack_from(buf.view)
        if magic != MAGIC or length > wc.byte_len - HEADER.size:
            raise ProtocolError(f"garbled message (magic {magic:#x}, length {length} in "
                                f"{wc.byte_len} bytes)", peer=self.peer)
        self._peer_reposted_to(reposted)
        payload = buf.view[HEADER.size:HEADER.size + length]
        if kind == MsgType.ABORT:
            reason = bytes(payload).decode("utf-8", "replace")
            self._fail(PeerError(f"the peer ended the RDMA session: {reason}", peer=self.peer))
            return
        if kind == MsgType.HELLO:
            self._on_hello(bytes(payload))
            self._repost(buf)
            return
        if self.state is RdmaState.CONNECTING:
            raise HandshakeError(f"message type {kind} before HELLO", peer=self.peer)
        if self._peer_fin:
            raise ProtocolError("data after the peer's FIN", peer=self.peer)
        if kind == MsgType.FIN:
            self._peer_fin = True
            self._repost(buf)
        elif kind == MsgType.DATA and length:
            self._ready.append(_Ready(buf, HEADER.size, HEADER.size + length))
        elif kind == MsgType.DATA:
            self._repost(buf)
        else:
            raise ProtocolError(f"unknown message type {kind}", peer=self.peer)
        self._readable.set()

    def _on_hello(self, payload: bytes) -> None:
        if self.state is not RdmaState.CONNECTING:
            raise HandshakeError("a second HELLO", peer=self.peer)
        hello = Hello.parse(payload, self.peer)
        name = hello.name
        # Known before the checks below, so that a refusal can still be sent as an ABORT.
        self._peer_ring, self._peer_slot = hello.ring, hello.slot
        self._peer_credit = hello.credit
        self.peer_name = name
        self.peer = f"{name} ({self.peer})"
        if self.initiator:
            if self._expected_peer is not None and name != self._expected_peer:
                raise AuthenticationError(f"expected agent {self._expected_peer!r} but "
                                          f"{name!r} answered", peer=self.peer)
            if hello.session_id != self.session_id:
                raise HandshakeError("HELLO answers another session", peer=self.peer)
        else:
            refusal = None
            if self._allowed is not None and name not in self._allowed:
                refusal = f"agent {name!r} is not a configured peer"
            elif self._authorize is not None:
                refusal = self._authorize(name, hello.token)
            if refusal:
                raise AuthenticationError(f"refused: {refusal}", peer=self.peer)
            self.session_id = hello.session_id
        self.state = RdmaState.OPEN
        if not self.initiator:
            self._send_hello()  # the acceptor's HELLO is its acceptance
        self._established.set()
        log.info("RDMA session %#x with %s open: %d x %d KiB buffers each way", self.session_id,
                 self.peer, self.config.ring_slots, self._max_payload // 1024)

    # ---- completions ------------------------------------------------------------------------
    def _on_send_done(self, wc: Completion, now: float) -> None:
        item = self._outstanding.popleft()
        if item.write:
            self._write_inflight = False
            if wc.ok:  # the peer's NIC acknowledged it: a round trip without queueing
                rtt = (now - item.posted_at) * 1000
                self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt
                self._min_rtt = rtt if self._min_rtt is None else min(self._min_rtt, rtt)
                return
        if not wc.ok:
            self._completion_failed(wc, "writing a credit update or keepalive" if item.write
                                    else "sending")
            return
        if item.buf is self._ctrl and item.buf is not None:
            self._ctrl_busy = False
            if item.kind is MsgType.ABORT:
                self._stop(now=True)
            return
        if item.buf is not None:
            self._free.append(item.buf)
            self._writable.set()
        if item.kind is MsgType.DATA and item.length > 0:
            self._bytes_acked += item.length
        elif item.kind is MsgType.FIN:
            self._fin_acked = True
        elif item.kind is MsgType.ABORT:
            self._stop(now=True)

    def _cleanly_done(self) -> bool:
        return self._fin_acked and self._peer_fin

    def _completion_failed(self, wc: Completion, doing: str) -> None:
        if self.state in (RdmaState.CLOSED, RdmaState.FAILED) or self._cleanly_done():
            return  # teardown flushes what was posted: expected
        if wc.status == WcStatus.RNR_RETRY_EXC_ERR:
            cls: type[RdmaError] = ReceiverNotReadyError
        else:
            cls = RdmaConnectionLostError
        self._fail(cls(f"RDMA connection lost while {doing}: {describe_status(wc.status)} "
                       f"({self._bytes_acked} of {self._bytes_sent} bytes sent were "
                       f"acknowledged)", peer=self.peer))

    def _on_event(self, event: CmEvent) -> None:
        if event is CmEvent.DISCONNECTED and self._peer_fin and self._fin_posted:
            # A peer hangs up without an ABORT only after a clean end, i.e. once it has our
            # FIN; our FIN's completion may still follow, even as an error if the peer's
            # acknowledgement was lost as it hung up.
            self._fin_acked = True
            return
        if self.state in (RdmaState.CLOSED, RdmaState.FAILED):
            return
        self._fail(RdmaConnectionLostError(f"the peer hung up ({event.value}) before the end "
                                           "of the stream", peer=self.peer))

    # ---- the poller -------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _poll(self, now: float) -> int:
        conn, n = self.conn, 0
        for wc in conn.poll_send(POLL_BATCH):
            n += 1
            self._on_send_done(wc, now)
        for wc in conn.poll_recv(POLL_BATCH):
            n += 1
            if self.state is RdmaState.FAILED:
                self._posted.popleft()
                continue
            self._on_recv(wc)
        while (event := conn.poll_event()) is not None:
            n += 1
            self._on_event(event)
        if self.state is RdmaState.OPEN:
            self._read_credit()
            self._post_queued(partial=True)
            self._maybe_write(now)
            if self._cleanly_done() and not self._ended.is_set():
                self._ended.set()
        return n

    async def _run(self) -> None:
        loop, cfg = self._loop, self.config
        last = loop.time()
        idle = cfg.idle_poll_s
        try:
            while True:
                now = loop.time()
                if self._stopping and now >= self._stop_at:
                    break
                try:
                    n = self._poll(now)
                except TransportError as exc:
                    self._fail(exc, tell_peer=_bare(exc))
                    continue
                if n or now - last < cfg.spin_s:
                    if n:
                        last, idle = now, cfg.idle_poll_s
                    await asyncio.sleep(0)
                    continue
                wake = self._wake = loop.create_future()
                timer = loop.call_later(min(idle, max(0.0, self._stop_at - now))
                                        if self._stopping else idle, _wake_up, wake)
                await wake
                timer.cancel()
                self._wake = None
                idle = min(idle * 2, cfg.idle_poll_max_s)
        except Exception as exc:  # a bug here must not leave the application waiting
            log.exception("RDMA poller for %s failed", self.peer)
            self._fail(RdmaError(f"internal error in the RDMA poller: {exc!r}", peer=self.peer))
        finally:
            self._release()

    # ---- ending -----------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _fail(self, error: TransportError, tell_peer: str | None = None) -> None:
        """The session is over: wake everyone with ``error``; ABORT to the peer if asked."""
        if self.state in (RdmaState.CLOSED, RdmaState.FAILED):
            return
        self.error, self.state = error, RdmaState.FAILED
        if isinstance(error, SessionClosedError):
            log.info("RDMA session with %s: %s", self.peer, error)
        else:
            log.error("RDMA session with %s failed: %s", self.peer, error)
        for event in (self._established, self._ended, self._readable, self._writable):
            event.set()
        self._ready.clear()
        sent = False
        if tell_peer is not None:  # goes only if a credit is left (see _post_ctrl)
            try:
                sent = self._post_ctrl(MsgType.ABORT, tell_peer.encode("utf-8", "replace"))
            except VerbsCallError:
                sent = False
        self._stop(now=not sent)

    def _stop(self, *, now: bool) -> None:
        loop_time = self._loop.time()
        stop_at = loop_time if now else loop_time + self.config.abort_linger_s
        if self._stopping:
            stop_at = min(stop_at, self._stop_at)
        self._stopping, self._stop_at = True, stop_at
        self._ended.set()
        if self._task is None:
            self._release()
        self._kick()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._ready.clear()
        self._queue.clear()
        try:
            self.conn.disconnect()
        except VerbsCallError as exc:
            log.debug("disconnecting from %s: %s", self.peer, exc)
        self.conn.close()


def _bare(exc: TransportError) -> str:
    """The message without its "peer X: " prefix (the peer is told it about itself)."""
    text = str(exc)
    prefix = f"peer {exc.peer}: "
    return text[len(prefix):] if exc.peer and text.startswith(prefix) else text


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# ---- initiator ---------------------------------------------------------------------------------
async def connect_rdma(address: tuple[str, int], *, name: str, provider: VerbsProvider,
                       config: RdmaConfig | None = None, peer_name: str | None = None,
                       token: bytes = b"") -> RdmaSession:
    """Open an RDMA session to the agent listening at ``address`` (its rdmacm address).

    ``name`` is this agent's name; ``peer_name`` the agent expected there; ``token`` what the
    acceptor's ``authorize`` checks (agreed over the agents' TLS session: RDMA has no TLS).
    """
    cfg = config or RdmaConfig()
    host, port = address
    label = f"{host}:{port}"
    try:
        conn = await asyncio.wait_for(
            provider.connect(host, port, cfg.qp_params(), cfg.connect_timeout),
            cfg.connect_timeout)
    except (VerbsCallError, TimeoutError, OSError) as exc:
        raise ConnectError(f"RDMA connect failed: {exc or 'timed out'}", peer=label) from exc
    session = RdmaSession(conn, cfg, initiator=True, name=name, peer=label,
                          expected_peer=peer_name, token=token)
    try:
        session._prepare()
        await conn.establish(cfg.connect_timeout)
    except (VerbsCallError, TimeoutError, OSError, RdmaError) as exc:
        conn.close()
        if isinstance(exc, RdmaError) and not isinstance(exc, VerbsCallError):
            raise
        raise ConnectError(f"RDMA connect failed: {exc or 'timed out'}", peer=label) from exc
    session._start()
    try:
        await asyncio.wait_for(session.wait_established(), cfg.handshake_timeout)
    except TimeoutError:
        session.abort("no HELLO in time")
        raise ConnectError(f"no answer to the RDMA HELLO within {cfg.handshake_timeout:g} s",
                           peer=label) from None
    return session


# ---- acceptor ----------------------------------------------------------------------------------
class RdmaServer:
    """Listens for RDMA sessions on an rdmacm address; :meth:`accept` hands them out."""

    def __init__(self, *, name: str, provider: VerbsProvider, config: RdmaConfig | None = None,
                 allowed_peers: list[str] | None = None,
                 authorize: Authorize | None = None) -> None:
        self.name = name
        self.provider = provider
        self.config = config or RdmaConfig()
        self.allowed_peers = allowed_peers
        self.authorize = authorize
        self.port = 0
        self._listener: VerbsListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[RdmaSession] = asyncio.Queue()

    async def start(self, host: str, port: int = 0) -> None:
        try:
            self._listener = await self.provider.listen(host, port, self.config.qp_params())
        except VerbsCallError as exc:
            raise RdmaError(f"agent {self.name} cannot listen for RDMA on {host}:{port}: "
                            f"{exc}") from exc
        self.port = self._listener.port
        log.warning("agent %s accepting RDMA sessions on %s:%d: RDMA traffic is NOT encrypted",
                    self.name, host, self.port)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            conn = await self._listener.accept()
            task = asyncio.get_running_loop().create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: VerbsConnection) -> None:
        cfg = self.config
        session = RdmaSession(conn, cfg, initiator=False, name=self.name, peer=conn.label,
                              allowed_peers=self.allowed_peers, authorize=self.authorize)
        try:
            session._prepare()
            await conn.establish(cfg.connect_timeout)
        except (TransportError, TimeoutError, OSError) as exc:
            log.warning("RDMA connection from %s failed: %s", conn.label, exc or "timed out")
            conn.close()
            return
        session._start()
        try:
            await asyncio.wait_for(session.wait_established(), cfg.handshake_timeout)
        except TimeoutError:
            session.abort("no HELLO in time")
            log.warning("RDMA connection from %s: no HELLO within %g s", conn.label,
                        cfg.handshake_timeout)
            return
        except TransportError as exc:
            log.warning("refused an RDMA session from %s: %s", conn.label, exc)
            return
        self._queue.put_nowait(session)

    async def accept(self) -> RdmaSession:
        """The next session whose HELLO was accepted."""
        return await self._queue.get()

    async def close(self) -> None:
        """Stop listening; handshakes in progress are abandoned."""
        for task in [self._task, *self._handshakes]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._handshakes]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._listener is not None:
            self._listener.close()
            self._listener = None
