"""The daemon's use of the lanes (agent/lane.py, agent/tlslane.py) for a passthrough channel.

After ACCEPT the source opens the lane the destination offered. If the network does not let
it through (refused, or no answer: a firewall), nothing has gone over the lane yet, so the
source says LANE_DECLINED on the session and the session carries the channel instead. The
destination therefore waits for one of two things before it commits its QEMU to the lane:
the source's connection(s), or the decline (:func:`lane_or_decline`). A connection that
does go through but then fails (TLS, token) is not declined: it fails the migration, the VM
stays on the source.

Between agents that both know it (``lane_verdict`` in OPEN and ACCEPT) the source also says
LANE_TAKEN once it has its connections, and the destination waits for that verdict rather
than for the connections: a source whose second connection timed out on its side just as the
destination admitted it declines, and the destination, which has both connections then,
would otherwise have committed its QEMU to a lane nobody feeds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

from dwcp_migrate.agent.channel import ChannelProtocolError, Message, MessageType
from dwcp_migrate.agent.config import PeerConfig
from dwcp_migrate.agent.datapath import MessageStream
from dwcp_migrate.agent.lane import (
    LANE_ACCEPT_TIMEOUT,
    TOKEN_BYTES,
    LaneError,
    LaneListener,
    connect_lane,
    run_lane,
)
from dwcp_migrate.agent.lane import Counter as LaneCounter
from dwcp_migrate.agent.qemuio import QemuConnection
from dwcp_migrate.agent.records import ChannelCounters
from dwcp_migrate.agent.tlslane import (
    ACCEPT_TIMEOUT,
    FIREWALL_HINT,
    FORWARD,
    HANDSHAKE_TIMEOUT,
    RETURN,
    Dialer,
    LaneResult,
    TlsLaneListener,
    run_tls_lane,
)
from dwcp_migrate.errors import MigrationError
from dwcp_migrate.transports.tls import TlsConfig

T = TypeVar("T")

# Destination: how long the source may take to connect or decline. The source tries for up
# to LANE_ACCEPT_TIMEOUT (direct lane) or ACCEPT_TIMEOUT per connection (TLS lane, two of
# them, each with its handshake) before it declines; the decline then still has to arrive.
DIRECT_LANE_WAIT = 2 * LANE_ACCEPT_TIMEOUT
TLS_LANE_WAIT = 2 * ACCEPT_TIMEOUT + HANDSHAKE_TIMEOUT


def _offer(peer: PeerConfig, offer: Any, what: str) -> tuple[int, bytes]:
    """The port and token of a lane the destination offered, checked: a misbehaving peer
    gets an error that says so, not a socket error from a port that cannot exist."""
    try:
        port, token = offer["port"], bytes.fromhex(str(offer["token"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MigrationError(f"agent {peer.name} offered a malformed {what}: {exc!r}") from exc
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise MigrationError(f"agent {peer.name} offered a {what} on port {port!r}, which "
                             f"cannot be a TCP port")
    if len(token) != TOKEN_BYTES:  # both lanes' tokens are that long
        raise MigrationError(f"agent {peer.name} offered a {what} with a token of "
                             f"{len(token)} bytes, not {TOKEN_BYTES}")
    return port, token


# ---- source ---------------------------------------------------------------------------------

def tls_dialers(tls: TlsConfig, peer: PeerConfig, offer: Any) -> tuple[Dialer, Dialer]:
    """The connections to the TLS lane the destination offered (not yet opened)."""
    port, token = _offer(peer, offer, "TLS lane")
    context = tls.client_context()
    address = (peer.host, port)
    return (Dialer(FORWARD, address, token, context, peer.name),
            Dialer(RETURN, address, token, context, peer.name))


async def open_direct_lane(peer: PeerConfig, offer: Any) -> socket.socket:
    """The connection to the direct lane the destination offered, token sent. Raises
    :class:`~dwcp_migrate.agent.lane.LaneUnreachableError` when the network does not let
    it through (the caller may then decline the lane)."""
    port, token = _offer(peer, offer, "direct lane")
    return await connect_lane(peer.host, port, token)


async def carry_on_tls_lane(qemu: QemuConnection, outgoing: Dialer, incoming: Dialer,
                            head: list[bytes | memoryview], counters: ChannelCounters
                            ) -> dict[str, Any]:
    """Source: the stream over the TLS lane, its connections open."""
    sock, unread = qemu.detach()
    result = LaneResult()
    try:
        await run_tls_lane(sock, outgoing, incoming, result, head=[*head, *unread])
    finally:
        counters.bytes_from_qemu += result.sent.bytes
        counters.return_bytes += result.received.bytes
        counters.wire_bytes += result.payload_bytes()
    return result.record()


async def carry_on_direct_lane(qemu: QemuConnection, lane: socket.socket,
                               head: list[bytes | memoryview], counters: ChannelCounters
                               ) -> None:
    """Source: the stream over the direct lane, its connection open."""
    sock, unread = qemu.detach()
    up, down = LaneCounter(), LaneCounter()
    try:
        await run_lane(sock, lane, to_lane=up, from_lane=down, head=[*head, *unread])
    finally:
        counters.bytes_from_qemu += up.bytes
        counters.return_bytes += down.bytes
        counters.wire_bytes += up.bytes + down.bytes


# ---- destination ----------------------------------------------------------------------------

async def lane_or_decline(connecting: Awaitable[T], messages: MessageStream, what: str, *,
                          verdict: bool = False, wait: float = TLS_LANE_WAIT
                          ) -> tuple[T | None, str | None]:
    """Destination, after offering a lane: ``(connecting's result, None)`` once the source
    has connected (with ``verdict``: once it said LANE_TAKEN, within ``wait`` seconds);
    ``(None, reason)`` if it declined the lane on the session (then ``connecting`` is
    cancelled and the session carries the stream). Errors of ``connecting`` (a timeout, a
    wrong token) are raised."""
    connected = asyncio.ensure_future(connecting)
    if verdict:
        return await _by_verdict(connected, messages, what, wait)
    said = asyncio.ensure_future(messages.next())
    try:
        await asyncio.wait((connected, said), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not said.done():
            said.cancel()  # nothing is lost: a message is only taken off the session whole
    if not (said.done() and not said.cancelled()):
        return await connected, None
    _drop(connected)
    return None, _declined(said.result(), messages, what)


async def _by_verdict(connected: asyncio.Future[T], messages: MessageStream, what: str,
                      wait: float) -> tuple[T | None, str | None]:
    try:
        async with asyncio.timeout(wait):
            message = await messages.next()
    except TimeoutError:
        _drop(connected)
        raise LaneError(f"the source agent neither took nor declined the {what} within "
                        f"{wait:g} s") from None
    except BaseException:
        _drop(connected)
        raise
    if message is not None and message.type is MessageType.LANE_TAKEN:
        return await connected, None
    _drop(connected)
    return None, _declined(message, messages, what)


def _drop(connected: asyncio.Future[Any]) -> None:
    """The lane is not used: stop waiting for it, or close what came."""
    if not connected.done():
        connected.cancel()  # accept() closes what it holds; wait_for_source ends on close
    elif not connected.cancelled() and connected.exception() is None:
        result = connected.result()  # a connection that made it after all: not used
        if isinstance(result, socket.socket):
            result.close()


def _declined(message: Message | None, messages: MessageStream, what: str) -> str:
    """The source's reason for declining the lane, from its message on the session."""
    if message is None:
        raise MigrationError(f"agent {messages.peer} closed the session instead of "
                             f"connecting to the {what}")
    if message.type is not MessageType.LANE_DECLINED:
        raise ChannelProtocolError(f"agent {messages.peer} sent {message.type.name} "
                                   f"instead of connecting to the {what}")
    return str(message.json().get("why", "no reason given"))[:500]


async def tls_lane_or_decline(listener: TlsLaneListener, messages: MessageStream, *,
                              verdict: bool) -> str | None:
    """Destination: None once the source has made both TLS lane connections (and said so,
    with ``verdict``); its reason if it declined the lane instead."""
    connected, declined = await lane_or_decline(
        asyncio.to_thread(listener.wait_for_source, TLS_LANE_WAIT), messages, "TLS lane",
        verdict=verdict, wait=TLS_LANE_WAIT)
    if declined is None and not connected:
        raise LaneError(f"the source agent did not open the TLS lane within "
                        f"{TLS_LANE_WAIT:g} s: {FIREWALL_HINT}")
    return declined


async def direct_lane_or_decline(listener: LaneListener, messages: MessageStream, *,
                                 verdict: bool) -> tuple[socket.socket | None, str | None]:
    """Destination: the source's direct lane connection (token checked), or its reason for
    declining the lane. The listening socket is closed either way."""
    try:
        return await lane_or_decline(listener.accept(DIRECT_LANE_WAIT), messages,
                                     "direct lane", verdict=verdict, wait=DIRECT_LANE_WAIT)
    finally:
        listener.close()


async def deliver_on_tls_lane(listener: TlsLaneListener, qemu: QemuConnection,
                              counters: ChannelCounters) -> dict[str, Any]:
    """Destination: the stream from the TLS lane into QEMU, QEMU's answers back."""
    sock, unread = qemu.detach()
    result = LaneResult()
    try:
        await run_tls_lane(sock, listener.slots[RETURN], listener.slots[FORWARD], result,
                           head=unread)
    finally:
        listener.close()  # a source trying to reconnect now is refused at once
        counters.bytes_to_qemu += result.received.bytes
        counters.return_bytes += result.sent.bytes
        counters.wire_bytes += result.payload_bytes()
    return result.record()


async def deliver_on_direct_lane(lane: socket.socket, qemu: QemuConnection,
                                 counters: ChannelCounters) -> None:
    """Destination: the stream from the direct lane into QEMU, QEMU's answers back."""
    sock, unread = qemu.detach()
    up, down = LaneCounter(), LaneCounter()
    try:
        await run_lane(sock, lane, to_lane=up, from_lane=down, head=unread)
    finally:
        counters.bytes_to_qemu += down.bytes
        counters.return_bytes += up.bytes
        counters.wire_bytes += up.bytes + down.bytes
