"""A fake verbs layer: RC queue pairs simulated in this process, for testing without hardware.

**This machine has no RDMA hardware (and its kernel has no rxe/siw), so the RDMA transport is
tested only against this fake.** It implements the :mod:`.verbs` protocols with the RC
semantics the transport depends on, so that flow control, ordering and error handling are
really exercised:

- a send is delivered into the *oldest* receive buffer the peer has posted, and its bytes are
  copied at delivery time, not when it is posted (reusing a send buffer before its completion
  corrupts data, as on hardware);
- completions come out in posting order, per queue; delivery happens only when either side
  polls (the "hardware" runs then), and with ``random_batches`` a random number of the work
  requests in flight is delivered per poll, so completions lag and interleave;
- a send that finds no receive posted is NAK'd "receiver not ready" (counted in
  :attr:`FakeFabric.rnr_naks`); after the peer's ``rnr_retry`` count it completes with
  ``RNR_RETRY_EXC_ERR`` and the queue pair goes to the error state (7 retries forever);
- a message longer than the receive buffer fails both sides (``LOC_LEN_ERR``/``REM_INV_REQ_ERR``);
- RDMA writes check the peer's address, key and length (``REM_ACCESS_ERR``);
- the error state flushes every posted work request (``WR_FLUSH_ERR``), later posts too;
- :meth:`FakeConnection.disconnect` raises ``DISCONNECTED`` on both ends;
  :meth:`FakeFabric.kill` makes an end vanish silently (a crashed host): the other side learns
  it only from failing sends and writes (``RETRY_EXC_ERR``), as on a real fabric.

What it does not model: timing (rates, RNR and retry timers), memory protection beyond
keys and lengths, inline data, shared receive queues, more than one path.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

from dwcp_migrate.transports.verbs import (
    Buffer,
    CmEvent,
    Completion,
    DeviceInfo,
    DeviceScan,
    Opcode,
    QpParams,
    RemoteRegion,
    VerbsCallError,
    WcStatus,
)

INFINITE_RNR_RETRY = 7  # the verbs encoding of "retry forever"


@dataclass(eq=False)
class FakeBuffer:
    """A "registered" region: a bytearray with an address and a key on the fabric."""

    mem: bytearray
    addr: int
    rkey: int
    remote_write: bool

    @property
    def view(self) -> memoryview:
        return memoryview(self.mem)

    @property
    def length(self) -> int:
        return len(self.mem)


@dataclass(eq=False)
class _Wr:
    kind: str  # "send" or "write"
    buf: FakeBuffer
    length: int
    remote: RemoteRegion | None = None
    rnr_tries: int = 0


class FakeFabric:
    """Everything connected in one test: listeners by address, connections, counters."""

    def __init__(self, *, seed: int = 0, random_batches: bool = True,
                 devices: tuple[DeviceInfo, ...] = (
                     DeviceInfo("fake_rc0", "InfiniBand (simulated)", True),)) -> None:
        self.rng = random.Random(seed)
        self.random_batches = random_batches
        self.devices = devices
        self.listeners: dict[tuple[str, int], FakeListener] = {}
        self.connections: list[FakeConnection] = []
        self.rnr_naks = 0  # sends that found no receive posted (0 with working flow control)
        self.messages = 0  # sends delivered
        self.writes = 0  # RDMA writes delivered
        self._addrs = itertools.count(0x10000, 0x1000)
        self._keys = itertools.count(1)
        self._ports = itertools.count(20000)

    def provider(self) -> FakeProvider:
        return FakeProvider(self)

    def kill(self, conn: FakeConnection) -> None:
        """``conn``'s host crashes: it stops answering, nothing is sent to its peer."""
        conn.killed = True
        conn.state = "error"
        conn.rq.clear()
        conn.inflight.clear()
        if conn in self.connections:
            self.connections.remove(conn)

    def progress(self) -> None:
        """Run the "hardware": deliver work requests in flight on every connection."""
        for conn in list(self.connections):
            if conn.state == "rts" and conn.inflight:
                n = len(conn.inflight)
                conn._deliver(self.rng.randint(0, n) if self.random_batches else n)


class FakeConnection:
    """One end of an RC queue pair (see the module docstring for what is simulated)."""

    def __init__(self, fabric: FakeFabric, label: str, params: QpParams) -> None:
        self.fabric = fabric
        self.label = label
        self.params = params
        self.state = "init"  # init -> rts -> error -> closed
        self.peer: FakeConnection | None = None
        self.killed = False
        self.inflight: deque[_Wr] = deque()
        self.rq: deque[FakeBuffer] = deque()
        self.scq: deque[Completion] = deque()
        self.rcq: deque[Completion] = deque()
        self.events: deque[CmEvent] = deque()
        self.regions: dict[int, FakeBuffer] = {}
        self.accepted: asyncio.Future[None] | None = None  # initiator: the acceptor's answer
        fabric.connections.append(self)

    # -- memory ------------------------------------------------------------------------------
    def register(self, size: int, *, remote_write: bool = False) -> FakeBuffer:
        if self.state == "closed":
            raise VerbsCallError(f"reg_mr on a closed connection to {self.label}")
        buf = FakeBuffer(bytearray(size), next(self.fabric._addrs), next(self.fabric._keys),
                         remote_write)
        self.regions[buf.addr] = buf
        return buf

    # -- connection setup --------------------------------------------------------------------
    async def establish(self, timeout: float) -> None:
        if self.accepted is not None:  # initiator: wait for the acceptor
            await asyncio.wait_for(asyncio.shield(self.accepted), timeout)
            return
        peer = self.peer  # acceptor
        if peer is None or peer.state != "init" or peer.accepted is None:
            raise VerbsCallError(f"rdma_accept from {self.label}: the connection request "
                                 "was withdrawn")
        self.state = peer.state = "rts"
        if not peer.accepted.done():
            peer.accepted.set_result(None)

    # -- posting -----------------------------------------------------------------------------
    def _own(self, buf: Buffer, length: int, call: str) -> FakeBuffer:
        """``buf`` as this connection's registered region (an lkey check, as on a NIC)."""
        mine = self.regions.get(buf.addr)
        if mine is not buf:
            raise VerbsCallError(f"{call} to {self.label}: buffer not registered here")
        if not 0 <= length <= mine.length:
            raise VerbsCallError(f"{call} to {self.label}: length {length} outside the "
                                 f"{mine.length}-byte buffer")
        return mine

    def post_send(self, buf: Buffer, length: int) -> None:
        self._post(_Wr("send", self._own(buf, length, "post_send"), length), "post_send")

    def post_write(self, buf: Buffer, length: int, remote: RemoteRegion) -> None:
        self._post(_Wr("write", self._own(buf, length, "post_write"), length, remote),
                   "post_write")

    def _post(self, wr: _Wr, call: str) -> None:
        if self.state in ("init", "closed"):
            raise VerbsCallError(f"{call} to {self.label}: queue pair is not connected "
                                 "(EINVAL)")
        if self.state == "error":  # allowed, and flushed at once
            self.scq.append(Completion(WcStatus.WR_FLUSH_ERR, self._opcode(wr)))
            return
        if len(self.inflight) >= self.params.max_send_wr:
            raise VerbsCallError(f"{call} to {self.label}: send queue full ("
                                 f"{self.params.max_send_wr} outstanding, ENOMEM)")
        self.inflight.append(wr)

    def post_recv(self, buf: Buffer) -> None:
        mine = self._own(buf, buf.length, "post_recv")
        if self.state == "closed":
            raise VerbsCallError(f"post_recv to {self.label}: connection closed")
        if self.state == "error":
            self.rcq.append(Completion(WcStatus.WR_FLUSH_ERR, Opcode.RECV))
            return
        if len(self.rq) >= self.params.max_recv_wr:
            raise VerbsCallError(f"post_recv to {self.label}: receive queue full ("
                                 f"{self.params.max_recv_wr} posted, ENOMEM)")
        self.rq.append(mine)

    # -- completions and events --------------------------------------------------------------
    def poll_send(self, max_entries: int) -> list[Completion]:
        self.fabric.progress()
        return _take(self.scq, max_entries)

    def poll_recv(self, max_entries: int) -> list[Completion]:
        self.fabric.progress()
        return _take(self.rcq, max_entries)

    def poll_event(self) -> CmEvent | None:
        return self.events.popleft() if self.events else None

    # -- teardown ----------------------------------------------------------------------------
    def disconnect(self) -> None:
        if self.state in ("closed", "init"):
            return
        if self.state == "rts":
            self._to_error()
            self.events.append(CmEvent.DISCONNECTED)
            peer = self.peer
            if peer is not None and not peer.killed and peer.state == "rts":
                peer.events.append(CmEvent.DISCONNECTED)

    def close(self) -> None:
        if self.state == "closed":
            return
        if self.state == "rts":
            self.disconnect()
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(VerbsCallError(f"connection to {self.label} closed "
                                                       "before it was established"))
        peer = self.peer
        if (self.state == "init" and peer is not None and peer.accepted is not None
                and not peer.accepted.done()):  # an acceptor that never accepted: rejected
            peer.accepted.set_exception(VerbsCallError(
                f"rdma_connect to {peer.label}: RDMA_CM_EVENT_REJECTED (the listener closed)"))
        self.state = "closed"
        self.regions.clear()
        if self in self.fabric.connections:
            self.fabric.connections.remove(self)

    # -- the simulated hardware --------------------------------------------------------------
    @staticmethod
    def _opcode(wr: _Wr) -> int:
        return Opcode.SEND if wr.kind == "send" else Opcode.RDMA_WRITE

    def _complete(self, wr: _Wr, status: WcStatus) -> None:
        self.scq.append(Completion(status, self._opcode(wr), wr.length))

    def _to_error(self) -> None:
        """The error state: every posted work request completes with a flush error."""
        self.state = "error"
        while self.inflight:
            self._complete(self.inflight.popleft(), WcStatus.WR_FLUSH_ERR)
        while self.rq:
            self.rq.popleft()
            self.rcq.append(Completion(WcStatus.WR_FLUSH_ERR, Opcode.RECV))

    def _fail(self, wr: _Wr, status: WcStatus) -> None:
        self.inflight.popleft()
        self._complete(wr, status)
        self._to_error()

    def _deliver(self, count: int) -> None:
        fabric = self.fabric
        for _ in range(count):
            if self.state != "rts" or not self.inflight:
                return
            wr = self.inflight[0]
            peer = self.peer
            if peer is None or peer.killed or peer.state != "rts":
                self._fail(wr, WcStatus.RETRY_EXC_ERR)  # nobody answers: retries run out
                return
            if wr.kind == "write":
                assert wr.remote is not None
                region = peer.regions.get(wr.remote.addr)
                if (region is None or region.rkey != wr.remote.rkey or not region.remote_write
                        or wr.length > min(region.length, wr.remote.length)):
                    self._fail(wr, WcStatus.REM_ACCESS_ERR)
                    return
                region.mem[:wr.length] = wr.buf.mem[:wr.length]
                fabric.writes += 1
            else:
                if not peer.rq:
                    fabric.rnr_naks += 1
                    wr.rnr_tries += 1
                    limit = peer.params.rnr_retry
                    if limit != INFINITE_RNR_RETRY and wr.rnr_tries > limit:
                        self._fail(wr, WcStatus.RNR_RETRY_EXC_ERR)
                    return  # retried at a later poll (RC keeps order: nothing passes it)
                target = peer.rq.popleft()
                if wr.length > target.length:
                    peer.rcq.append(Completion(WcStatus.LOC_LEN_ERR, Opcode.RECV))
                    peer._to_error()
                    self._fail(wr, WcStatus.REM_INV_REQ_ERR)
                    return
                target.mem[:wr.length] = wr.buf.mem[:wr.length]
                peer.rcq.append(Completion(WcStatus.SUCCESS, Opcode.RECV, wr.length))
                fabric.messages += 1
            self.inflight.popleft()
            self._complete(wr, WcStatus.SUCCESS)


def _take(queue: deque[Completion], n: int) -> list[Completion]:
    out: list[Completion] = []
    while queue and len(out) < n:
        out.append(queue.popleft())
    return out


@dataclass(eq=False)
class FakeListener:
    fabric: FakeFabric
    host: str
    port: int
    params: QpParams
    requests: asyncio.Queue[FakeConnection] = field(default_factory=asyncio.Queue)
    closed: bool = False

    async def accept(self) -> FakeConnection:
        return await self.requests.get()

    def close(self) -> None:
        self.closed = True
        self.fabric.listeners.pop((self.host, self.port), None)
        while not self.requests.empty():  # rejected: their initiators hear it
            self.requests.get_nowait().close()


class FakeProvider:
    """:class:`~.verbs.VerbsProvider` over a :class:`FakeFabric`."""

    name = "fake"

    def __init__(self, fabric: FakeFabric) -> None:
        self.fabric = fabric

    def scan(self) -> DeviceScan:
        if not self.fabric.devices:
            return DeviceScan((), "no RDMA device on this host (fake fabric without devices)")
        return DeviceScan(self.fabric.devices)

    async def connect(self, host: str, port: int, params: QpParams,
                      timeout: float) -> FakeConnection:
        loop = asyncio.get_running_loop()
        conn = FakeConnection(self.fabric, f"{host}:{port}", params)
        conn.accepted = loop.create_future()
        listener = self.fabric.listeners.get((host, port))
        if listener is None or listener.closed:
            conn.accepted.set_exception(VerbsCallError(
                f"rdma_connect to {host}:{port}: RDMA_CM_EVENT_REJECTED (nothing listens "
                "there)"))
            return conn
        server_side = FakeConnection(self.fabric, f"initiator {len(self.fabric.connections)} "
                                     f"of {host}:{port}", listener.params)
        server_side.peer, conn.peer = conn, server_side
        listener.requests.put_nowait(server_side)
        return conn

    async def listen(self, host: str, port: int, params: QpParams) -> FakeListener:
        if port == 0:
            port = next(p for p in self.fabric._ports
                        if (host, p) not in self.fabric.listeners)
        if (host, port) in self.fabric.listeners:
            raise VerbsCallError(f"rdma_bind_addr {host}:{port}: address in use (EADDRINUSE)")
        listener = FakeListener(self.fabric, host, port, params)
        self.fabric.listeners[(host, port)] = listener
        return listener
