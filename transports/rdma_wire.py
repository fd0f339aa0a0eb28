"""The RDMA transport's wire format and configuration, without I/O (see :mod:`.rdma`).

Every message fills the front of one receive buffer::

    header  = u16 magic | u8 type | u8 flags | u32 payload length | u64 reposted   (LE, 16 B)
    HELLO   JSON: version, agent name, session id, token, ring size, slot size, credit region
    DATA    stream bytes (up to one slot less the header)
    FIN     end of this side's stream
    ABORT   UTF-8 reason; the sender is ending the session

``reposted`` is the number of receive buffers the sender has posted again since the start:
the peer's credit information, carried by every message (and by RDMA writes, see
:mod:`.rdma`). A HELLO and an ABORT always fit in ``MIN_SLOT`` bytes, the smallest slot an
agent may announce, so they can be sent before the peer's slot size is known.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from dwcp_migrate.transports.errors import HandshakeError, VersionMismatchError
from dwcp_migrate.transports.verbs import QpParams, RemoteRegion

VERSION = 1
MAGIC = 0xD7C1
HEADER = struct.Struct("<HBBIQ")
MIN_SLOT = 4096
CTRL_BYTES = MIN_SLOT  # the control buffer (HELLO, ABORT)
COUNTER = struct.Struct("<Q")  # the credit region: our ``reposted``, written by RDMA


class MsgType(enum.IntEnum):
    HELLO = 1
    DATA = 2
    FIN = 3
    ABORT = 4


@dataclass(frozen=True)
class RdmaConfig:
    ring_slots: int = 16  # receive buffers posted (and as many send buffers)
    slot_bytes: int = 1 << 20
    connect_timeout: float = 10.0  # rdmacm resolution and connection
    handshake_timeout: float = 10.0  # HELLO answered
    close_timeout: float = 60.0
    keepalive_s: float = 1.0  # idle: an RDMA write this often (liveness and RTT)
    spin_s: float = 0.0002  # keep polling this long after the last completion
    idle_poll_s: float = 0.001  # then sleep this long between polls, doubling ...
    idle_poll_max_s: float = 0.01  # ... up to this
    abort_linger_s: float = 1.0  # wait this long for an ABORT to go out before hanging up
    rnr_retry: int = 3  # see QpParams.rnr_retry

    def __post_init__(self) -> None:
        if self.ring_slots < 2:
            raise ValueError("ring_slots must be at least 2 (one credit is kept for ABORT)")
        if self.slot_bytes < MIN_SLOT:
            raise ValueError(f"slot_bytes must be at least {MIN_SLOT}")

    def qp_params(self) -> QpParams:
        # Sends outstanding: every data slot, the control buffer and one credit write.
        return QpParams(max_send_wr=self.ring_slots + 2, max_recv_wr=self.ring_slots,
                        rnr_retry=self.rnr_retry)


@dataclass(frozen=True)
class Hello:
    name: str  # the agent's name
    session_id: int  # chosen by the initiator, echoed by the acceptor
    token: bytes  # checked by the acceptor (agreed over the agents' TLS session)
    ring: int  # receive buffers posted before connecting
    slot: int  # bytes per receive buffer
    credit: RemoteRegion  # where to RDMA-write our ``reposted`` counter

    def encode(self) -> bytes:
        return json.dumps({
            "v": VERSION, "name": self.name, "session": self.session_id,
            "token": self.token.hex(), "ring": self.ring, "slot": self.slot,
            "credit": [self.credit.addr, self.credit.rkey]}).encode()

    @classmethod
    def parse(cls, payload: bytes, peer: str) -> Hello:
        try:
            hello: dict[str, Any] = json.loads(payload)
            version = hello["v"]
            name, session_id = str(hello["name"]), int(hello["session"])
            ring, slot = int(hello["ring"]), int(hello["slot"])
            addr, rkey = (int(x) for x in hello["credit"])
            token = bytes.fromhex(hello["token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HandshakeError(f"malformed HELLO: {exc}", peer=peer) from exc
        if version != VERSION:
            raise VersionMismatchError(f"peer speaks RDMA protocol version {version}, this "
                                       f"agent {VERSION}: upgrade one of them", peer=peer)
        if ring < 2 or slot < MIN_SLOT:
            raise HandshakeError(f"HELLO announces {ring} buffers of {slot} bytes (need at "
                                 f"least 2 of {MIN_SLOT})", peer=peer)
        return cls(name, session_id, token, ring, slot, RemoteRegion(addr, rkey, COUNTER.size))
