"""The TLS lane on loopback, with real certificates and real sockets: both directions carried
to the end, connections reset in the middle and replaced with nothing lost or doubled, and
refusals (wrong token, wrong certificate, a receiver too far behind)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from dwcp_migrate.agent import lane, tlslane
from dwcp_migrate.agent.lane import LaneError, LaneUnreachableError
from dwcp_migrate.agent.tlslane import (
    FORWARD,
    RETURN,
    Dialer,
    LaneResult,
    Retained,
    TlsLaneListener,
    open_tls_lane,
    run_tls_lane,
)
from dwcp_migrate.transports.certs import issue, load_or_make_ca
from dwcp_migrate.transports.tls import TlsConfig
from tests.cutting_proxy import CuttingProxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    """Agents a and b from one CA, and an ``a`` from another CA (``stranger``)."""
    good, other = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("other")
    configs = {}
    for directory, names in ((good, ("a", "b", "c")), (other, ("a",))):
        ca = load_or_make_ca(directory)
        for name in names:
            issued = issue(directory, name, ca=ca)
            key = name if directory == good else "stranger"
            configs[key] = TlsConfig(issued.cert, issued.key, directory / "ca.pem")
    return configs


def test_retained_ring_gives_back_what_is_missing() -> None:
    kept = Retained(size=10)
    kept.put(b"0123456789abcd")  # wraps: positions 4..13 are kept
    assert b"".join(kept.since(10)) == b"abcd"
    assert b"".join(kept.since(4)) == b"456789abcd"
    assert kept.since(14) == []
    with pytest.raises(LaneError, match="11 bytes behind, more than the 10 kept"):
        kept.since(3)
    with pytest.raises(LaneError, match="claims 15 bytes of a stream of 14"):
        kept.since(15)


class Ends:
    """A source and a destination agent's halves of one lane, with a QEMU socket pair each."""

    def __init__(self, pki: dict[str, TlsConfig], *, client: str = "a",
                 token: bytes | None = None, open_first: bool = False) -> None:
        self.open_first = open_first
        self.listener = TlsLaneListener("127.0.0.1", pki["b"], source="a")
        ctx = pki[client].client_context()
        address = ("127.0.0.1", self.listener.port)
        use = token if token is not None else self.listener.token
        self.out = Dialer(FORWARD, address, use, ctx, "b")
        self.back = Dialer(RETURN, address, use, ctx, "b")
        # "QEMU" at each end: the agent holds one end of a socketpair, the test the other
        self.src_qemu, self.src_agent = socket.socketpair()
        self.dst_qemu, self.dst_agent = socket.socketpair()
        self.results = (LaneResult(), LaneResult())

    def run(self) -> None:
        # As the agents do: the source opens both connections before it hands QEMU's socket
        # to the lane; the destination waits for them before it commits its QEMU.
        async def source() -> None:
            if self.open_first:
                await open_tls_lane(self.out, self.back)
            await run_tls_lane(self.src_agent, self.out, self.back, self.results[0])

        async def destination() -> None:
            if self.open_first:
                assert await asyncio.to_thread(self.listener.wait_for_source, 5)
            await run_tls_lane(self.dst_agent, self.listener.slots[RETURN],
                               self.listener.slots[FORWARD], self.results[1])

        async def main() -> None:
            try:
                await asyncio.gather(source(), destination())
            finally:
                self.listener.close()
        asyncio.run(main())


def _feed(sock: socket.socket, data: bytes, during: Callable[[int], None] | None = None) -> None:
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        sent += sock.send(view[sent:sent + (1 << 20)])
        if during is not None:
            during(sent)
    sock.shutdown(socket.SHUT_WR)


def _drain(sock: socket.socket, into: list[bytes]) -> None:
    while chunk := sock.recv(1 << 20):
        into.append(chunk)


def _carry(ends: Ends, forward: bytes, back: bytes,
           during: Callable[[int], None] | None = None) -> tuple[bytes, bytes]:
    got_dst: list[bytes] = []
    got_src: list[bytes] = []
    threads = [threading.Thread(target=_feed, args=(ends.src_qemu, forward, during)),
               threading.Thread(target=_feed, args=(ends.dst_qemu, back)),
               threading.Thread(target=_drain, args=(ends.dst_qemu, got_dst)),
               threading.Thread(target=_drain, args=(ends.src_qemu, got_src))]
    for t in threads:
        t.start()
    try:
        ends.run()
    finally:
        for s in (ends.src_qemu, ends.dst_qemu):
            s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(30)
    return b"".join(got_dst), b"".join(got_src)


def test_both_directions_reach_the_end(pki: dict[str, TlsConfig]) -> None:
    forward, back = os.urandom(24 << 20), os.urandom(100_000)
    ends = Ends(pki)
    got_forward, got_back = _carry(ends, forward, back)
    assert hashlib.sha256(got_forward).digest() == hashlib.sha256(forward).digest()
    assert got_back == back
    source, destination = ends.results
    assert source.sent.bytes == destination.received.bytes == len(forward)
    assert destination.sent.bytes == source.received.bytes == len(back)
    assert source.record() == {"lane": "tls", "reconnects": 0, "resent_bytes": 0}


def test_connections_opened_first_are_the_ones_used(pki: dict[str, TlsConfig]) -> None:
    """The source opens both connections before it hands QEMU's socket to the lane (so a lane
    the network blocks can still be declined); the pumps then use those, not new ones."""
    forward, back = os.urandom(4 << 20), os.urandom(10_000)
    ends = Ends(pki, open_first=True)
    got_forward, got_back = _carry(ends, forward, back)
    assert got_forward == forward and got_back == back
    assert ends.results[0].record()["reconnects"] == 0
    assert ends.results[1].record()["reconnects"] == 0
    assert not ends.listener.refused


def test_a_silent_connection_delays_nobody(pki: dict[str, TlsConfig],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections to the lane port that never speak (a port scanner, a half-open path) are
    handshaken in threads of their own: the source's connections, made after them, are
    admitted within the source's own wait. (Handshakes one at a time would hold the source's
    behind the first silent one for the 60 s handshake timeout set here, and the source
    would give up after its 5 s.)"""
    monkeypatch.setattr(tlslane, "HANDSHAKE_TIMEOUT", 60.0)
    ends = Ends(pki, open_first=True)
    silent = [socket.create_connection(("127.0.0.1", ends.listener.port)) for _ in range(3)]
    try:
        forward, back = os.urandom(1 << 20), os.urandom(1000)
        got_forward, got_back = _carry(ends, forward, back)  # opens first: open_tls_lane
        assert got_forward == forward and got_back == back
        # Closing the listener ended the silent ones' handshakes at once, and says so.
        deadline = time.monotonic() + 30
        while len(ends.listener.refused) < len(silent):
            assert time.monotonic() < deadline, ends.listener.refused
            time.sleep(0.05)
        assert all("the lane ended during its handshake" in r for r in ends.listener.refused)
    finally:
        for sock in silent:
            sock.close()


def test_handshakes_at_once_are_bounded(pki: dict[str, TlsConfig],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """More silent connections than MAX_HANDSHAKES: the surplus is closed at once (a flood
    must not make the agent start a thread per connection)."""
    monkeypatch.setattr(tlslane, "HANDSHAKE_TIMEOUT", 60.0)
    monkeypatch.setattr(tlslane, "MAX_HANDSHAKES", 2)
    listener = TlsLaneListener("127.0.0.1", pki["b"], source="a")
    silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(4)]
    try:
        deadline = time.monotonic() + 30
        while len(listener.refused) < 2:
            assert time.monotonic() < deadline, listener.refused
            time.sleep(0.05)
        assert all("2 connections are handshaking already" in r for r in listener.refused)
        assert silent[3].recv(1) == b""  # closed by the listener
    finally:
        listener.close()
        for sock in silent:
            sock.close()


def test_waiting_for_the_source_ends_on_timeout_and_on_close(pki: dict[str, TlsConfig]) -> None:
    listener = TlsLaneListener("127.0.0.1", pki["b"], source="a")
    try:
        assert listener.wait_for_source(0.2) is False
        threading.Timer(0.2, listener.close).start()
        started = time.monotonic()
        assert listener.wait_for_source(30) is False
        assert time.monotonic() - started < 10  # woken by close, not by the 30 s
    finally:
        listener.close()


def test_a_silent_lane_port_is_unreachable(pki: dict[str, TlsConfig],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that takes the TCP connection but never answers TLS (as behind a proxy that
    swallows it) is unreachable for the lane: declinable, not a security failure."""
    monkeypatch.setattr(tlslane, "ACCEPT_TIMEOUT", 0.6)
    monkeypatch.setattr(tlslane, "HANDSHAKE_TIMEOUT", 0.2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        out = Dialer(FORWARD, silent.getsockname(), b"t" * lane.TOKEN_BYTES,
                     pki["a"].client_context(), "b")
        back = Dialer(RETURN, silent.getsockname(), b"t" * lane.TOKEN_BYTES,
                      pki["a"].client_context(), "b")
        with pytest.raises(LaneUnreachableError, match=r"cannot open the TLS lane .* within "
                                                       r"0\.6 s .*transport.tls_lane: false"):
            asyncio.run(open_tls_lane(out, back))
        assert out.closed.is_set() and back.closed.is_set()


def _reset(port: int) -> None:
    """The kernel kills the client end of the lane connections (the server end gets a RST)."""
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port)], check=True,
                   capture_output=True)


@pytest.mark.usefixtures("root")
def test_reset_connections_are_replaced(pki: dict[str, TlsConfig]) -> None:
    forward, back = os.urandom(96 << 20), os.urandom(3 << 20)
    ends = Ends(pki)
    resets = [16 << 20, 48 << 20]

    def during(sent: int) -> None:
        if resets and sent >= resets[0]:
            resets.pop(0)
            _reset(ends.listener.port)

    got_forward, got_back = _carry(ends, forward, back, during)
    assert not resets
    assert hashlib.sha256(got_forward).digest() == hashlib.sha256(forward).digest()
    assert got_back == back
    source, destination = ends.results
    assert source.sent.reconnects >= 2, source
    assert destination.received.bytes == len(forward)


# Client bytes of a lane connection: about 300 in the ClientHello, about 1000 more to the end
# of the handshake (certificate, its proof, Finished), then the token; then the stream.
@pytest.mark.parametrize("cut_after", [0, 200, 400, 600, 800, 1000, 1300, 1600, 64 << 10])
def test_a_connection_reset_while_the_lane_opens_is_replaced(pki: dict[str, TlsConfig],
                                                             cut_after: int) -> None:
    """The source's first forward connection is reset at some point of its opening (in
    TCP's, in TLS's handshake, in the greeting, in the first bytes of the stream): it is
    made again, and the lane carries everything. A reset in TLS's handshake reads as an
    EOF 'in violation of protocol'; it was taken for a refused certificate and failed the
    migration."""
    ends = Ends(pki, open_first=True)
    proxy = CuttingProxy(("127.0.0.1", ends.listener.port), cut_after)
    ends.out = Dialer(FORWARD, proxy.address, ends.listener.token, pki["a"].client_context(),
                      "b")
    try:
        forward, back = os.urandom(4 << 20), os.urandom(10_000)
        got_forward, got_back = _carry(ends, forward, back)
    finally:
        proxy.close()
    assert proxy.cut_done
    assert hashlib.sha256(got_forward).digest() == hashlib.sha256(forward).digest()
    assert got_back == back


def test_wrong_token_is_refused(pki: dict[str, TlsConfig],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlslane, "ACCEPT_TIMEOUT", 1.0)
    ends = Ends(pki, token=b"x" * lane.TOKEN_BYTES)
    with pytest.raises(LaneError):
        _carry(ends, b"data", b"")
    assert any("did not present the lane's token" in r for r in ends.listener.refused)


@pytest.mark.parametrize("client", ["c", "stranger"])
def test_wrong_certificate_is_refused(pki: dict[str, TlsConfig], client: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``c`` is from the cluster's CA but is not the source agent; ``stranger`` is an ``a``
    from another CA."""
    monkeypatch.setattr(tlslane, "ACCEPT_TIMEOUT", 1.0)
    ends = Ends(pki, client=client)
    with pytest.raises(LaneError):
        _carry(ends, b"data", b"")
    assert ends.listener.refused, "the destination accepted a wrong client"
    if client == "c":
        assert "not the source agent 'a'" in ends.listener.refused[0]


def test_destination_qemu_gone_fails_the_lane(pki: dict[str, TlsConfig]) -> None:
    ends = Ends(pki)
    ends.dst_qemu.close()  # QEMU died: writing into it fails on the destination

    async def main() -> None:
        try:
            results = await asyncio.gather(
                run_tls_lane(ends.src_agent, ends.out, ends.back, ends.results[0]),
                run_tls_lane(ends.dst_agent, ends.listener.slots[RETURN],
                             ends.listener.slots[FORWARD], ends.results[1]),
                return_exceptions=True)
        finally:
            ends.listener.close()
        for outcome in results:
            assert isinstance(outcome, LaneError), outcome

    def feed() -> None:
        with contextlib.suppress(OSError):  # the source agent gives up: QEMU's socket breaks
            _feed(ends.src_qemu, os.urandom(8 << 20))

    feeder = threading.Thread(target=feed)
    feeder.start()
    asyncio.run(main())
    ends.src_qemu.close()
    feeder.join(30)


def test_a_receiver_too_far_behind_is_refused() -> None:
    kept = Retained(size=1 << 20)
    kept.put(os.urandom(3 << 20))
    with pytest.raises(LaneError, match="more than the 1048576 kept"):
        kept.since(1 << 20)


def test_no_connection_times_out(pki: dict[str, TlsConfig],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlslane, "ACCEPT_TIMEOUT", 0.3)
    listener = TlsLaneListener("127.0.0.1", pki["b"], source="a")
    try:
        with pytest.raises(LaneError, match=r"did not open the TLS lane within 0\.3 s: the "
                                            r"destination's lane ports"):
            listener.slots[FORWARD].get(None, time.monotonic() + 0.3)
    finally:
        listener.close()


def test_an_unreachable_lane_says_what_to_do(pki: dict[str, TlsConfig],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A first connection that cannot be made (here: refused, as a REJECT rule would) names
    the ports to open and the setting that avoids the lane."""
    monkeypatch.setattr(tlslane, "ACCEPT_TIMEOUT", 0.5)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port nobody listens on
        port = unused.getsockname()[1]
        dialer = Dialer(FORWARD, ("127.0.0.1", port), b"t" * lane.TOKEN_BYTES,
                        pki["a"].client_context(), "b")
        with pytest.raises(LaneUnreachableError, match=r"was refused .*must be reachable "
                                                       r"from the source agent; or set "
                                                       r"transport.tls_lane: false"):
            dialer.get(None, time.monotonic() + 0.5)
        # Refused after a break: the lane was up, so its end is gone, not a firewall.
        with pytest.raises(LaneError, match="the destination closed the TLS lane") as info:
            dialer.get(ConnectionResetError(), time.monotonic() + 0.5)
        assert not isinstance(info.value, LaneUnreachableError)
