"""The direct lane's pieces on loopback: the token gate, the spliced pumps carrying both
directions to the end (half-closes passed on) or failing as a whole, and the destination's
wait for the source's connection or its decline (agent/lanes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import threading
from pathlib import Path

import pytest

from dwcp_migrate.agent import lane
from dwcp_migrate.agent.channel import ChannelProtocolError, MessageType, encode, encode_json
from dwcp_migrate.agent.config import PeerConfig
from dwcp_migrate.agent.datapath import MessageStream
from dwcp_migrate.agent.lane import (
    Counter,
    LaneError,
    LaneListener,
    LaneUnreachableError,
    connect_lane,
    run_lane,
)
from dwcp_migrate.agent.lanes import direct_lane_or_decline, lane_or_decline, tls_dialers
from dwcp_migrate.errors import MigrationError
from dwcp_migrate.transports.tls import TlsConfig


def test_token_gate() -> None:
    async def main() -> None:
        listener = LaneListener("127.0.0.1")
        accepting = asyncio.create_task(listener.accept())
        sock = await connect_lane("127.0.0.1", listener.port, listener.token)
        accepted = await accepting
        accepted.close()
        sock.close()

        listener = LaneListener("127.0.0.1")
        accepting = asyncio.create_task(listener.accept())
        sock = await connect_lane("127.0.0.1", listener.port, b"x" * lane.TOKEN_BYTES)
        with pytest.raises(LaneError, match="did not present the token"):
            await accepting
        sock.close()
        with pytest.raises(LaneError, match="cannot open the direct lane"):  # one use only
            await connect_lane("127.0.0.1", listener.port, listener.token)

    asyncio.run(main())


def _free_port_range(n: int) -> tuple[int, int]:
    """``n`` consecutive ports none of which is listening right now (best effort)."""
    for low in range(41000, 60000, 97):
        taken = False
        for port in range(low, low + n):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return low, low + n - 1
    raise AssertionError("no free port range")


def test_lane_ports_come_from_the_configured_range() -> None:
    low, high = _free_port_range(3)
    listeners = [LaneListener("127.0.0.1", (low, high)) for _ in range(3)]
    assert sorted(lst.port for lst in listeners) == [low, low + 1, high]
    with pytest.raises(LaneError, match=rf"every port .* \({low}-{high}\) is in use"):
        LaneListener("127.0.0.1", (low, high))

    async def main() -> None:
        for lst in listeners:  # each still takes its connection (and then closes its port)
            accepting = asyncio.create_task(lst.accept())
            sock = await connect_lane("127.0.0.1", lst.port, lst.token)
            (await accepting).close()
            sock.close()

    asyncio.run(main())
    again = LaneListener("127.0.0.1", (low, high))  # the range is free again
    assert low <= again.port <= high


def test_nobody_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lane, "LANE_ACCEPT_TIMEOUT", 0.2)

    async def main() -> None:
        with pytest.raises(LaneError, match="did not open the direct lane"):
            await LaneListener("127.0.0.1").accept()
        with pytest.raises(LaneError, match=r"let ports \d+-\d+ \(transport.direct_lane_ports\)"):
            low, high = _free_port_range(2)
            await LaneListener("127.0.0.1", (low, high)).accept()

    asyncio.run(main())


def _qemu_side(sock: socket.socket, payload: bytes, got: list[bytes]) -> None:
    """A QEMU stand-in: writes its stream, half-closes, reads what comes back to EOF."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    got.append(bytes(out))
    sock.close()


def test_pumps_carry_both_ways_to_the_end() -> None:
    src_stream, dst_answer = os.urandom(9 << 20), os.urandom(3 << 20)
    got_src: list[bytes] = []
    got_dst: list[bytes] = []

    async def main() -> tuple[Counter, Counter, Counter, Counter]:
        src_qemu, src_agent = socket.socketpair()
        dst_agent, dst_qemu = socket.socketpair()
        listener = LaneListener("127.0.0.1")
        accepting = asyncio.create_task(listener.accept())
        a_lane = await connect_lane("127.0.0.1", listener.port, listener.token)
        b_lane = await accepting
        threads = [threading.Thread(target=_qemu_side, args=(src_qemu, src_stream, got_src)),
                   threading.Thread(target=_qemu_side, args=(dst_qemu, dst_answer, got_dst))]
        for t in threads:
            t.start()
        counters = Counter(), Counter(), Counter(), Counter()
        await asyncio.gather(
            run_lane(src_agent, a_lane, to_lane=counters[0], from_lane=counters[1],
                     head=[b"HEAD"]),
            run_lane(dst_agent, b_lane, to_lane=counters[2], from_lane=counters[3]))
        for t in threads:
            await asyncio.to_thread(t.join)
        src_agent.close()
        dst_agent.close()
        return counters

    up_a, down_a, up_b, down_b = asyncio.run(main())
    assert got_dst == [b"HEAD" + src_stream]  # what the destination QEMU read
    assert got_src == [dst_answer]  # the return path
    assert up_a.bytes == down_b.bytes == len(src_stream) + 4
    assert up_b.bytes == down_a.bytes == len(dst_answer)


def test_a_broken_lane_fails_both_pumps() -> None:
    async def main() -> None:
        qemu, agent = socket.socketpair()
        listener = LaneListener("127.0.0.1")
        accepting = asyncio.create_task(listener.accept())
        lane_a = await connect_lane("127.0.0.1", listener.port, listener.token)
        lane_b = await accepting
        running = asyncio.create_task(run_lane(agent, lane_a, to_lane=Counter(),
                                               from_lane=Counter()))
        writing = asyncio.create_task(asyncio.to_thread(_write_until_refused, qemu))
        lane_b.setblocking(True)
        await asyncio.to_thread(lane_b.recv, 1 << 16)  # the stream flows through the lane
        lane_b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        lane_b.close()  # a reset under the pumps
        with pytest.raises(LaneError, match="broke"):
            async with asyncio.timeout(10):
                await running
        async with asyncio.timeout(10):
            assert await writing  # QEMU's side is shut down too: its writes fail
        qemu.close()
        agent.close()

    asyncio.run(main())


def _write_until_refused(sock: socket.socket) -> bool:
    try:
        for _ in range(1000):
            sock.sendall(b"y" * (1 << 20))
    except OSError:
        return True
    return False


def test_a_refused_lane_is_unreachable_and_declinable() -> None:
    """Nothing listens on the port: LaneUnreachableError (the source may decline the lane and
    use the session), saying which ports must be let through."""
    with socket.socket() as probe:  # a port nobody listens on (bound, never listening)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

        async def main() -> None:
            with pytest.raises(LaneUnreachableError,
                               match=r"cannot open the direct lane .*refused.* must be "
                                     r"reachable from here"):
                await connect_lane("127.0.0.1", port, b"t" * lane.TOKEN_BYTES)

        asyncio.run(main())


class _Session:
    """What MessageStream reads from: messages scripted in advance, or nothing, ever."""

    def __init__(self, data: list[bytes]) -> None:
        self.data = data

    async def recv_view(self, max_bytes: int | None = None) -> bytes:
        if not self.data:
            await asyncio.Event().wait()  # silent until cancelled
        return self.data.pop(0)


def _stream(*messages: list[bytes]) -> MessageStream:
    return MessageStream(_Session([b"".join(m) for m in messages]), "a")  # type: ignore[arg-type]


def test_lane_or_decline() -> None:
    async def connects(after: float, result: str = "lane") -> str:
        await asyncio.sleep(after)
        return result

    async def main() -> None:
        # the source connects: its connection, no reason
        assert await lane_or_decline(connects(0), _stream(), "direct lane") == ("lane", None)
        # the source declines first: no connection, its reason; the waiting is cancelled
        waiting = asyncio.ensure_future(connects(30))
        assert await lane_or_decline(waiting, _stream(encode_json(
            MessageType.LANE_DECLINED, {"why": "refused"})), "direct lane") == (None, "refused")
        await asyncio.sleep(0)
        assert waiting.cancelled()
        # anything else on the session instead is a protocol error, a closed session an error
        with pytest.raises(ChannelProtocolError, match="sent RAW instead of connecting to "
                                                       "the direct lane"):
            await lane_or_decline(connects(30), _stream(encode(MessageType.RAW, b"x")),
                                  "direct lane")
        with pytest.raises(MigrationError, match="closed the session instead of connecting"):
            await lane_or_decline(connects(30), _stream([b""]), "TLS lane")
        # the connection's own failure (a timeout, a wrong token) is raised as it is
        listener = LaneListener("127.0.0.1")
        with pytest.raises(LaneError, match=r"did not open the direct lane within 0\.1 s"):
            await lane_or_decline(listener.accept(0.1), _stream(), "direct lane")

    asyncio.run(main())


def test_direct_lane_or_decline_closes_the_port_on_a_decline() -> None:
    async def main() -> None:
        listener = LaneListener("127.0.0.1")
        lane_sock, why = await direct_lane_or_decline(listener, _stream(encode_json(
            MessageType.LANE_DECLINED, {"why": "no answer within 5 s"})), verdict=False)
        assert (lane_sock, why) == (None, "no answer within 5 s")
        with pytest.raises(LaneUnreachableError):  # the port is closed: refused at once
            await connect_lane("127.0.0.1", listener.port, listener.token)

        listener = LaneListener("127.0.0.1")
        connecting = asyncio.ensure_future(
            connect_lane("127.0.0.1", listener.port, listener.token))
        lane_sock, why = await direct_lane_or_decline(listener, _stream(), verdict=False)
        assert why is None and lane_sock is not None
        lane_sock.close()
        (await connecting).close()

    asyncio.run(main())


def test_lane_or_decline_by_the_source_verdict() -> None:
    """Between agents that both know LANE_TAKEN, the source's word decides, not the arrival
    of its connections."""
    async def connects(after: float, result: object = "lane") -> object:
        await asyncio.sleep(after)
        return result

    async def main() -> None:
        taken = _stream(encode(MessageType.LANE_TAKEN))
        assert await lane_or_decline(connects(0.05), taken, "TLS lane",
                                     verdict=True) == ("lane", None)
        # The narrow race: the connection arrived here, but the source had given up on it
        # (its side timed out) and declined. The connection is closed, the session carries.
        here, there = socket.socketpair()
        arrived = asyncio.get_running_loop().create_future()
        arrived.set_result(here)
        assert await lane_or_decline(arrived, _stream(encode_json(
            MessageType.LANE_DECLINED, {"why": "timed out"})), "direct lane",
            verdict=True) == (None, "timed out")
        assert here.fileno() == -1 and there.recv(1) == b""
        there.close()
        # No word within the wait: an error, and the waiting for connections stops.
        waiting = asyncio.ensure_future(connects(30))
        with pytest.raises(LaneError, match=r"neither took nor declined the TLS lane within "
                                            r"0\.1 s"):
            await lane_or_decline(waiting, _stream(), "TLS lane", verdict=True, wait=0.1)
        await asyncio.sleep(0)
        assert waiting.cancelled()
        with pytest.raises(ChannelProtocolError, match="sent EOF instead of connecting"):
            await lane_or_decline(connects(30), _stream(encode(MessageType.EOF)), "TLS lane",
                                  verdict=True)
        with pytest.raises(MigrationError, match="closed the session instead of connecting"):
            await lane_or_decline(connects(30), _stream([b""]), "TLS lane", verdict=True)

    asyncio.run(main())


def test_direct_lane_declined_after_its_connection_is_closed() -> None:
    """The source's connection got through, but the source declined the lane (its side gave
    up on it first): the destination closes that connection and its port."""
    async def main() -> None:
        listener = LaneListener("127.0.0.1")
        source_side = await connect_lane("127.0.0.1", listener.port, listener.token)
        lane_sock, why = await direct_lane_or_decline(listener, _stream(encode_json(
            MessageType.LANE_DECLINED, {"why": "timed out"})), verdict=True)
        assert (lane_sock, why) == (None, "timed out")
        source_side.setblocking(True)
        source_side.settimeout(10)
        # closed by the destination: taken and closed, or reset in the accept queue
        with contextlib.suppress(ConnectionResetError):
            assert source_side.recv(1) == b""
        source_side.close()
        with pytest.raises(LaneUnreachableError):  # and the port with it
            await connect_lane("127.0.0.1", listener.port, listener.token)

    asyncio.run(main())


@pytest.mark.parametrize(("offer", "says"), [
    ({"port": 70000, "token": "ab" * 32}, "on port 70000, which cannot be a TCP port"),
    ({"port": 0, "token": "ab" * 32}, "on port 0, which cannot be a TCP port"),
    ({"port": "443", "token": "ab" * 32}, "on port '443', which cannot be a TCP port"),
    ({"port": 4000, "token": "ab"}, "with a token of 1 bytes, not 32"),
    ({"port": 4000, "token": "xyz"}, "offered a malformed TLS lane"),
    ({"token": "ab" * 32}, "offered a malformed TLS lane"),
    ("not an object", "offered a malformed TLS lane"),
])
def test_a_misbehaving_lane_offer_is_refused_clearly(offer: object, says: str) -> None:
    """What the destination offers is checked before anything is dialled."""
    peer = PeerConfig(name="b", host="127.0.0.1", port=7480, libvirt_uri="")
    with pytest.raises(MigrationError, match=re.escape(says)):
        tls_dialers(TlsConfig(Path("c.pem"), Path("c.key"), Path("ca.pem")), peer, offer)
