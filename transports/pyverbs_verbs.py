"""The verbs interface of :mod:`.verbs` over pyverbs (Debian's python3-pyverbs, rdma-core 44).

**Never run against RDMA hardware.** The machine this was written on has no RDMA device and
its kernel has no rxe/siw; here only :func:`scan_devices` runs for real (pyverbs answers
"Failed to get devices list"). Everything below it follows the pyverbs 44 API as documented
in its docstrings and rdma-core's own tests (the asynchronous rdmacm flow of
``tests/base_rdmacm.py``), and is exercised only through the same transport code that the
fake verbs layer tests. Expect to debug it on the first machine with a real HCA (or rxe).

Design constraints, all from pyverbs 44:

- Blocking calls hold the GIL (``CMID.get_send_comp``/``get_recv_comp``, synchronous
  ``connect``/``get_request``): one of them would freeze the whole agent. So connection setup
  uses *asynchronous* rdmacm IDs on an event channel, and completions are read with
  ``CQ.poll`` (``ibv_poll_cq``, never blocks) on completion queues we create ourselves.
- pyverbs does not expose the event channel's file descriptor. It is found as the
  ``/dev/infiniband/rdma_cm`` descriptor that appears when the channel is created, made
  non-blocking, and watched with ``loop.add_reader``: events are read only when there is one.
- ``CMEvent`` does not say which rdmacm ID an event is for. An initiator has a channel of
  its own, so every event is its own. A listener's children share its channel: accepts are
  serialized (the ESTABLISHED/REJECTED that follows is the pending child's), and a
  DISCONNECTED is given to the child only when there is one; with several, sessions learn
  of a peer hanging up from failed completions and keepalive writes instead.
- ``CMID.post_send``/``post_recv``/``post_write`` start at the beginning of a memory region
  and carry no work request id: every ring slot is its own MR (see :mod:`.verbs` for why no
  ids are needed). A slot's memory is seen through a ``ctypes`` view of ``MR.buf``.
- rdmacm cannot report an ephemeral port here, so a listener needs a fixed port, and it
  must bind the RDMA device's own address (binding the any-address leaves pyverbs without a
  device context for the children).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import importlib
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dwcp_migrate.transports.verbs import (
    Buffer,
    CmEvent,
    Completion,
    DeviceInfo,
    DeviceScan,
    QpParams,
    RdmaUnavailableError,
    RemoteRegion,
    VerbsCallError,
)

log = logging.getLogger(__name__)

_TRANSPORTS = {0: "InfiniBand", 1: "iWARP", 2: "usNIC", 3: "usNIC UDP", 4: "unspecified"}
_PORT_ACTIVE = 4  # IBV_PORT_ACTIVE


@dataclass(frozen=True)
class _Pyverbs:
    """The pyverbs modules, imported once (typed Any: pyverbs ships no type information)."""

    device: Any
    cmid: Any
    cm: Any  # pyverbs.cm_enums
    enums: Any
    cq: Any
    qp: Any
    mr: Any
    error: Any

    @classmethod
    def load(cls) -> _Pyverbs:
        try:
            mods: list[ModuleType] = [importlib.import_module(f"pyverbs.{name}") for name in (
                "device", "cmid", "cm_enums", "enums", "cq", "qp", "mr", "pyverbs_error")]
        except ImportError as exc:
            raise RdmaUnavailableError(f"pyverbs not importable: {exc} (install Debian's "
                                       "python3-pyverbs; a venv needs "
                                       "--system-site-packages)") from exc
        return cls(*mods)


def scan_devices() -> DeviceScan:
    """The RDMA devices of this host, or why there are none. Never raises."""
    try:
        pv = _Pyverbs.load()
    except RdmaUnavailableError as exc:
        return DeviceScan((), str(exc))
    try:
        found = pv.device.get_device_list()
    except pv.error.PyverbsError as exc:
        return DeviceScan((), f"no RDMA device on this host (pyverbs: {exc})")
    if not found:
        return DeviceScan((), "no RDMA device on this host (pyverbs lists none)")
    devices = []
    for dev in found:
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        devices.append(DeviceInfo(name, _TRANSPORTS.get(dev.transport_type, "unknown"),
                                  _port_active(pv, name)))
    return DeviceScan(tuple(devices))


def _port_active(pv: _Pyverbs, name: str) -> bool | None:
    """Port 1 is ACTIVE (None: could not tell). Multi-port devices: only port 1 is used."""
    try:
        ctx = pv.device.Context(name=name)
    except pv.error.PyverbsError:
        return None
    try:
        return bool(ctx.query_port(1).state == _PORT_ACTIVE)
    except pv.error.PyverbsError:
        return None
    finally:
        ctx.close()


def _verbs_call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call pyverbs; its errors become :class:`VerbsCallError` naming the call."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # PyverbsError and its subclasses; pyverbs raises nothing else
        raise VerbsCallError(f"{what}: {exc}") from exc


class _MrBuffer:
    """One memory region (pyverbs allocates the memory), with a view of that memory."""

    def __init__(self, mr: Any, size: int) -> None:
        self.mr = mr
        self._view = memoryview((ctypes.c_char * size).from_address(mr.buf)).cast("B")

    @property
    def view(self) -> memoryview:
        return self._view

    @property
    def length(self) -> int:
        return len(self._view)

    @property
    def addr(self) -> int:
        return int(self.mr.buf)

    @property
    def rkey(self) -> int:
        return int(self.mr.rkey)

    def close(self) -> None:
        self._view.release()
        self.mr.close()


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class _EventChannel:
    """An rdmacm event channel read without blocking (see the module docstring)."""

    def __init__(self, pv: _Pyverbs) -> None:
        self.pv = pv
        before = _fds()
        self.channel = _verbs_call("rdma_create_event_channel", pv.cmid.CMEventChannel)
        new = []
        for fd in _fds() - before:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").endswith("rdma_cm"):
                    new.append(fd)
        if len(new) != 1:
            self.channel.close()
            raise VerbsCallError(f"cannot identify the rdmacm event channel's descriptor "
                                 f"(candidates: {new})")
        self.fd = new[0]
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.on_request: Callable[[Any], None] | None = None  # listeners: make the child
        self.on_other: Callable[[int, str], bool] | None = None  # True: consumed
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        pv = self.pv
        while True:
            try:
                event = pv.cmid.CMEvent(self.channel)
            except pv.error.PyverbsRDMAError as exc:
                if exc.error_code not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.error("reading rdmacm events: %s", exc)
                return
            kind, text = int(event.event_type), str(event.event_str())
            try:
                if kind == pv.cm.RDMA_CM_EVENT_CONNECT_REQUEST and self.on_request:
                    self.on_request(event)  # the child CMID must be made before the ack
                elif self.on_other is None or not self.on_other(kind, text):
                    self.events.put_nowait((kind, text))
            finally:
                event.ack_cm_event()

    async def expect(self, wanted: int, what: str, timeout: float) -> None:
        kind, text = await asyncio.wait_for(self.events.get(), timeout)
        if kind != wanted:
            raise VerbsCallError(f"{what}: {text}")

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        self.channel.close()


class PyverbsConnection:
    """An RC queue pair on an rdmacm ID, with completion queues of its own."""

    def __init__(self, pv: _Pyverbs, cmid: Any, channel: _EventChannel, params: QpParams,
                 label: str, *, ctx: Any, pd: Any, listener: PyverbsListener | None) -> None:
        self.pv, self.cmid, self.channel, self.params = pv, cmid, channel, params
        self.label = label
        self.pd = pd
        self.listener = listener  # None: an initiator, owning its channel
        self.events: deque[CmEvent] = deque()
        self._buffers: list[_MrBuffer] = []
        self.scq = _verbs_call("ibv_create_cq", pv.cq.CQ, ctx, params.max_send_wr, None, None, 0)
        self.rcq = _verbs_call("ibv_create_cq", pv.cq.CQ, ctx, params.max_recv_wr, None, None, 0)
        cap = pv.qp.QPCap(max_send_wr=params.max_send_wr, max_recv_wr=params.max_recv_wr,
                          max_send_sge=1, max_recv_sge=1)
        init = pv.qp.QPInitAttr(qp_type=pv.enums.IBV_QPT_RC, scq=self.scq, rcq=self.rcq,
                                cap=cap, sq_sig_all=1)
        _verbs_call("rdma_create_qp", cmid.create_qp, init)

    def register(self, size: int, *, remote_write: bool = False) -> _MrBuffer:
        access = self.pv.enums.IBV_ACCESS_LOCAL_WRITE
        if remote_write:
            access |= self.pv.enums.IBV_ACCESS_REMOTE_WRITE
        buf = _MrBuffer(_verbs_call("ibv_reg_mr", self.pv.mr.MR, self.pd, size, access), size)
        self._buffers.append(buf)
        return buf

    async def establish(self, timeout: float) -> None:
        pv = self.pv
        param = pv.cmid.ConnParam(retry=self.params.retry, rnr_retry=self.params.rnr_retry)
        if self.listener is None:
            _verbs_call(f"rdma_connect to {self.label}", self.cmid.connect, param)
            await self.channel.expect(pv.cm.RDMA_CM_EVENT_ESTABLISHED,
                                      f"rdma_connect to {self.label}", timeout)
            return
        async with self.listener.accepting:  # the next ESTABLISHED is this child's
            _verbs_call("rdma_accept", self.cmid.accept, param)
            await self.channel.expect(pv.cm.RDMA_CM_EVENT_ESTABLISHED,
                                      f"rdma_accept from {self.label}", timeout)
        self.listener.children.append(self)

    @staticmethod
    def _mr(buf: Buffer) -> Any:
        if not isinstance(buf, _MrBuffer):
            raise VerbsCallError(f"not a pyverbs memory region: {buf!r}")
        return buf.mr

    def post_send(self, buf: Buffer, length: int) -> None:
        _verbs_call("post_send", self.cmid.post_send, self._mr(buf),
                    flags=self.pv.enums.IBV_SEND_SIGNALED, length=length)

    def post_recv(self, buf: Buffer) -> None:
        _verbs_call("post_recv", self.cmid.post_recv, self._mr(buf), length=buf.length)

    def post_write(self, buf: Buffer, length: int, remote: RemoteRegion) -> None:
        _verbs_call("post_write", self.cmid.post_write, self._mr(buf), length=length,
                    remote_addr=remote.addr, rkey=remote.rkey,
                    flags=self.pv.enums.IBV_SEND_SIGNALED)

    def _poll(self, cq: Any, n: int) -> list[Completion]:
        _, wcs = _verbs_call("ibv_poll_cq", cq.poll, n)
        return [Completion(int(wc.status), int(wc.opcode), int(wc.byte_len)) for wc in wcs]

    def poll_send(self, max_entries: int) -> list[Completion]:
        return self._poll(self.scq, max_entries)

    def poll_recv(self, max_entries: int) -> list[Completion]:
        return self._poll(self.rcq, max_entries)

    def poll_event(self) -> CmEvent | None:
        if self.listener is None:
            self._drain_own_channel()
        return self.events.popleft() if self.events else None

    def _drain_own_channel(self) -> None:
        cm = self.pv.cm
        while not self.channel.events.empty():
            kind, _text = self.channel.events.get_nowait()
            if kind == cm.RDMA_CM_EVENT_DISCONNECTED:
                self.events.append(CmEvent.DISCONNECTED)
            elif kind == cm.RDMA_CM_EVENT_DEVICE_REMOVAL:
                self.events.append(CmEvent.DEVICE_REMOVAL)

    def disconnect(self) -> None:
        _verbs_call("rdma_disconnect", self.cmid.disconnect)

    def close(self) -> None:
        for buf in self._buffers:
            with contextlib.suppress(Exception):
                buf.close()
        self._buffers.clear()
        for obj in (self.cmid, self.scq, self.rcq):
            with contextlib.suppress(Exception):
                obj.close()
        if self.listener is None:
            self.channel.close()
        elif self in self.listener.children:
            self.listener.children.remove(self)


class PyverbsListener:
    def __init__(self, pv: _Pyverbs, host: str, port: int, params: QpParams) -> None:
        if host in ("", "0.0.0.0", "::"):
            raise VerbsCallError("an RDMA listener must bind the RDMA device's own address, "
                                 f"not {host or 'any address'}")
        if port == 0:
            raise VerbsCallError("an RDMA listener needs a fixed port (rdmacm's ephemeral "
                                 "port cannot be read through pyverbs)")
        self.pv, self.host, self.port, self.params = pv, host, port, params
        self.channel = _EventChannel(pv)
        self.children: list[PyverbsConnection] = []
        self.accepting = asyncio.Lock()
        self._requests: asyncio.Queue[PyverbsConnection] = asyncio.Queue()
        try:
            self.cmid = _verbs_call("rdma_create_id", pv.cmid.CMID, creator=self.channel.channel,
                                    port_space=pv.cm.RDMA_PS_TCP)
            info = _verbs_call(f"rdma_getaddrinfo {host}:{port}", pv.cmid.AddrInfo, src=host,
                               src_service=str(port), port_space=pv.cm.RDMA_PS_TCP,
                               flags=pv.cm.RAI_PASSIVE)
            _verbs_call(f"rdma_bind_addr {host}:{port}", self.cmid.bind_addr, info)
            _verbs_call(f"rdma_listen {host}:{port}", self.cmid.listen, 16)
        except VerbsCallError:
            self.channel.close()
            raise
        self.channel.on_request = self._request
        self.channel.on_other = self._other

    def _request(self, event: Any) -> None:
        try:
            child = _verbs_call("rdma_create_id (request)", self.pv.cmid.CMID, creator=event,
                                listen_id=self.cmid)
            conn = PyverbsConnection(self.pv, child, self.channel, self.params,
                                     f"RDMA peer of {self.host}:{self.port}",
                                     ctx=self.cmid.context, pd=self.cmid.pd, listener=self)
        except VerbsCallError as exc:
            log.warning("dropped an RDMA connection request on %s:%d: %s", self.host,
                        self.port, exc)
            return
        self._requests.put_nowait(conn)

    def _other(self, kind: int, text: str) -> bool:
        cm = self.pv.cm
        if kind in (cm.RDMA_CM_EVENT_DISCONNECTED, cm.RDMA_CM_EVENT_DEVICE_REMOVAL):
            if len(self.children) == 1:  # unambiguous (see the module docstring)
                self.children[0].events.append(CmEvent.DISCONNECTED
                                               if kind == cm.RDMA_CM_EVENT_DISCONNECTED
                                               else CmEvent.DEVICE_REMOVAL)
            else:
                log.debug("rdmacm %s on %s:%d not attributed (%d sessions)", text, self.host,
                          self.port, len(self.children))
            return True
        return not self.accepting.locked()  # nobody waits for it: drop

    async def accept(self) -> PyverbsConnection:
        return await self._requests.get()

    def close(self) -> None:
        while not self._requests.empty():
            self._requests.get_nowait().close()
        with contextlib.suppress(Exception):
            self.cmid.close()
        if not self.children:
            self.channel.close()  # else the last child's sessions still need it


class PyverbsProvider:
    """:class:`~.verbs.VerbsProvider` over pyverbs. Raises :class:`RdmaUnavailableError` if
    pyverbs cannot be imported."""

    name = "pyverbs"

    def __init__(self) -> None:
        self.pv = _Pyverbs.load()

    def scan(self) -> DeviceScan:
        return scan_devices()

    async def connect(self, host: str, port: int, params: QpParams,
                      timeout: float) -> PyverbsConnection:
        pv, label = self.pv, f"{host}:{port}"
        channel = _EventChannel(pv)
        cmid = None
        try:
            cmid = _verbs_call("rdma_create_id", pv.cmid.CMID, creator=channel.channel,
                               port_space=pv.cm.RDMA_PS_TCP)
            info = _verbs_call(f"rdma_getaddrinfo {label}", pv.cmid.AddrInfo, dst=host,
                               dst_service=str(port), port_space=pv.cm.RDMA_PS_TCP)
            ms = max(1, int(timeout * 1000))
            _verbs_call(f"rdma_resolve_addr {label}", cmid.resolve_addr, info, ms)
            await channel.expect(pv.cm.RDMA_CM_EVENT_ADDR_RESOLVED,
                                 f"resolving {label} to an RDMA address", timeout)
            _verbs_call(f"rdma_resolve_route {label}", cmid.resolve_route, ms)
            await channel.expect(pv.cm.RDMA_CM_EVENT_ROUTE_RESOLVED,
                                 f"resolving a route to {label}", timeout)
            return PyverbsConnection(pv, cmid, channel, params, label, ctx=cmid.context,
                                     pd=cmid.pd, listener=None)
        except BaseException:
            if cmid is not None:
                with contextlib.suppress(Exception):
                    cmid.close()
            channel.close()
            raise

    async def listen(self, host: str, port: int, params: QpParams) -> PyverbsListener:
        return PyverbsListener(self.pv, host, port, params)
