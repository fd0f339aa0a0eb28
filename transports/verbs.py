"""The small verbs interface the RDMA transport is written against, and its errors.

The RDMA transport (:mod:`.rdma`) never touches pyverbs directly. It needs only this much of
the verbs API, as three protocols:

- :class:`VerbsProvider`: list devices, open a connection to a peer, listen for peers
  (rdmacm's address resolution and connection setup);
- :class:`VerbsConnection`: one RC queue pair with its send and receive completion queues:
  register buffers, post send / receive / RDMA-write work requests, poll completions (never
  blocking), poll connection-manager events, disconnect;
- :class:`Buffer`: one registered memory region, seen as a ``memoryview``.

Two implementations exist. :mod:`.pyverbs_verbs` wraps Debian's python3-pyverbs (rdma-core
44). :mod:`.fake_verbs` simulates a fabric in this process: connected RC queue pairs, registered
buffers, completions in posting order, receiver-not-ready (RNR) when a send finds no receive
posted, flush errors when a queue pair goes to the error state, peers that disconnect or
vanish. **The machine this was written on has no RDMA hardware and no rxe/siw kernel driver:
the RDMA data path is tested only against the fake.** The pyverbs wrapper is exercised here
only as far as device discovery (which reports "no device").

Work requests carry no ids: the pyverbs 44 ``CMID.post_send``/``post_recv`` pass no context.
That is enough, because on one RC queue pair send completions arrive in the order the sends
were posted and receive completions in the order the receives were posted (the receive queue
is a FIFO); the transport keeps its own FIFOs of what it posted.

Errors::

    TransportError                   (dwcp_migrate.transports.errors)
     └── RdmaError                   anything RDMA-specific that stops a session
          ├── RdmaUnavailableError   no pyverbs, no device, or the device cannot be opened
          ├── VerbsCallError         a verbs or rdmacm call failed (wraps the pyverbs error)
          └── RdmaConnectionLostError a work completion failed, or the connection went away
               └── ReceiverNotReadyError  a send found no receive buffer, retries exhausted
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from dwcp_migrate.transports.errors import TransportError


# ---- errors ---------------------------------------------------------------------------------
class RdmaError(TransportError):
    """An RDMA transport session could not do what was asked."""


class RdmaUnavailableError(RdmaError):
    """RDMA cannot be used on this host: pyverbs is missing, or there is no usable device."""


class VerbsCallError(RdmaError):
    """A verbs or rdmacm call failed; the message names the call and the errno."""


class RdmaConnectionLostError(RdmaError):
    """A work completion failed or the connection was dropped before the end of the stream."""


class ReceiverNotReadyError(RdmaConnectionLostError):
    """A send found no receive buffer posted at the peer, more often than the RNR retry count.

    With credit-based flow control this cannot happen between two correct agents; seeing it
    means one side sent without a credit (a bug) or stopped posting receive buffers.
    """


# ---- work completions -----------------------------------------------------------------------
class WcStatus(enum.IntEnum):
    """``enum ibv_wc_status`` (the values pyverbs reports in ``WC.status``)."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


_MEANING = {
    WcStatus.LOC_LEN_ERR: "a message was longer than the receive buffer",
    WcStatus.WR_FLUSH_ERR: "flushed: the queue pair went to the error state",
    WcStatus.REM_INV_REQ_ERR: "the peer refused the request (message longer than its buffer?)",
    WcStatus.REM_ACCESS_ERR: "the peer refused an RDMA write (wrong key or address)",
    WcStatus.RETRY_EXC_ERR: "transport retries exhausted: the peer does not answer (agent "
                            "or host down, or the fabric link is broken)",
    WcStatus.RNR_RETRY_EXC_ERR: "receiver not ready: the peer had no receive buffer posted",
    WcStatus.FATAL_ERR: "fatal device error",
}


def describe_status(status: int) -> str:
    """``"RETRY_EXC_ERR (12): transport retries exhausted: ..."`` for logs and errors."""
    try:
        name = WcStatus(status).name
    except ValueError:
        return f"unknown work completion status {status}"
    meaning = _MEANING.get(WcStatus(status))
    return f"{name} ({status}): {meaning}" if meaning else f"{name} ({status})"


class Opcode(enum.IntEnum):
    """The completion opcodes this transport meets (``enum ibv_wc_opcode``)."""

    SEND = 0
    RDMA_WRITE = 1
    RECV = 128


@dataclass(frozen=True)
class Completion:
    """One work completion, reduced to what the transport reads."""

    status: int  # WcStatus; an int so a provider's unknown codes survive
    opcode: int
    byte_len: int = 0  # receives: the bytes placed in the buffer

    @property
    def ok(self) -> bool:
        return self.status == WcStatus.SUCCESS


class CmEvent(enum.Enum):
    """Connection-manager events a session acts on after it is established."""

    DISCONNECTED = "disconnected"  # the peer (or we) called disconnect
    DEVICE_REMOVAL = "device removal"


# ---- devices --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    name: str
    transport: str = "unknown"  # "InfiniBand", "iWARP", ... as the provider reports it
    active: bool | None = None  # a port is ACTIVE; None: not checked


@dataclass(frozen=True)
class DeviceScan:
    """Result of looking for RDMA devices: the devices, or why there are none."""

    devices: tuple[DeviceInfo, ...] = ()
    reason: str | None = None  # set when ``devices`` is empty: why (for logs and the peer)

    @property
    def usable(self) -> tuple[DeviceInfo, ...]:
        """Devices not known to be down."""
        return tuple(d for d in self.devices if d.active is not False)


# ---- the interface --------------------------------------------------------------------------
@dataclass(frozen=True)
class QpParams:
    """Sizes and retry counts of one RC queue pair."""

    max_send_wr: int = 32  # sends and RDMA writes outstanding at once
    max_recv_wr: int = 32  # receive buffers posted at once
    retry: int = 7  # transport retries (7 is the maximum) before RETRY_EXC_ERR
    # RNR retries granted to the *peer's* sends. Flow control makes RNR impossible between
    # correct agents, so a small finite count turns a flow-control bug into a clear error
    # instead of a silent stall (7 would mean "retry forever").
    rnr_retry: int = 3


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's buffer that this side may RDMA-write into."""

    addr: int
    rkey: int
    length: int


class Buffer(Protocol):
    """A registered memory region; ``view`` is its memory (writable, ``length`` bytes)."""

    @property
    def view(self) -> memoryview: ...

    @property
    def length(self) -> int: ...

    @property
    def addr(self) -> int: ...

    @property
    def rkey(self) -> int: ...


class VerbsConnection(Protocol):
    """One RC queue pair to one peer. Every method returns at once (no blocking waits)."""

    label: str  # the peer's address, for messages

    def register(self, size: int, *, remote_write: bool = False) -> Buffer: ...

    async def establish(self, timeout: float) -> None:
        """Connect (initiator) or accept (acceptor). Post receives before calling this."""

    def post_send(self, buf: Buffer, length: int) -> None: ...

    def post_recv(self, buf: Buffer) -> None: ...

    def post_write(self, buf: Buffer, length: int, remote: RemoteRegion) -> None: ...

    def poll_send(self, max_entries: int) -> list[Completion]: ...

    def poll_recv(self, max_entries: int) -> list[Completion]: ...

    def poll_event(self) -> CmEvent | None: ...

    def disconnect(self) -> None:
        """Move the queue pair to the error state (posted work flushes) and tell the peer."""

    def close(self) -> None:
        """Release the queue pair, completion queues and registered memory."""


class VerbsListener(Protocol):
    port: int

    async def accept(self) -> VerbsConnection:
        """The next connection request, its queue pair made but not yet accepted."""

    def close(self) -> None: ...


class VerbsProvider(Protocol):
    name: str

    def scan(self) -> DeviceScan: ...

    async def connect(self, host: str, port: int, params: QpParams,
                      timeout: float) -> VerbsConnection:
        """Resolve the peer and make a queue pair for it; :meth:`VerbsConnection.establish`
        then connects."""

    async def listen(self, host: str, port: int, params: QpParams) -> VerbsListener: ...
