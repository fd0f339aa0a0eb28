"""The RDMA transport, over the FAKE verbs layer: this machine has no RDMA hardware.

Every data-path test here runs :mod:`dwcp_migrate.transports.rdma` against
:mod:`dwcp_migrate.transports.fake_verbs`, which simulates RC queue pairs in this process
(receiver-not-ready when no receive is posted, completions in posting order and late, flush
errors, peers that hang up or vanish). The real pyverbs wrapper is tested only as far as this
machine allows: device discovery reports "no device", and the transport chooser then picks TCP.
"""

from __future__ import annotations

import asyncio
import importlib
import random
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp_migrate.errors import ConfigError
from dwcp_migrate.transports import pyverbs_verbs
from dwcp_migrate.transports.errors import (
    AuthenticationError,
    ConnectError,
    PeerError,
    SessionClosedError,
    TransportError,
)
from dwcp_migrate.transports.fake_verbs import FakeConnection, FakeFabric
from dwcp_migrate.transports.rdma import (
    RdmaConfig,
    RdmaServer,
    RdmaSession,
    RdmaState,
    connect_rdma,
)
from dwcp_migrate.transports.selection import (
    Capabilities,
    RdmaSettings,
    choose_transport,
    local_capabilities,
)
from dwcp_migrate.transports.verbs import (
    DeviceInfo,
    DeviceScan,
    QpParams,
    RdmaConnectionLostError,
    ReceiverNotReadyError,
    RemoteRegion,
    VerbsCallError,
    WcStatus,
)

MIB = 1 << 20
HOST = "10.9.0.2"


def _run(coro: Awaitable[Any], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Pair:
    """A fake fabric with a server "b" and a client "a" connected to it."""

    def __init__(self, fabric: FakeFabric, client: RdmaSession, server: RdmaSession,
                 listener: RdmaServer) -> None:
        self.fabric, self.client, self.server, self.listener = fabric, client, server, listener

    def server_conn(self) -> FakeConnection:
        conn = self.server.conn
        assert isinstance(conn, FakeConnection)
        return conn


async def _pair(config: RdmaConfig | None = None, server_config: RdmaConfig | None = None, *,
                seed: int = 0, random_batches: bool = True) -> Pair:
    fabric = FakeFabric(seed=seed, random_batches=random_batches)
    provider = fabric.provider()
    listener = RdmaServer(name="b", provider=provider, config=server_config or config)
    await listener.start(HOST, 7481)
    client = await connect_rdma((HOST, 7481), name="a", provider=provider, config=config,
                                peer_name="b")
    server = await asyncio.wait_for(listener.accept(), 5)
    return Pair(fabric, client, server, listener)


async def _send_chunks(session: RdmaSession, data: bytes, rng: random.Random,
                       max_chunk: int) -> None:
    pos = 0
    while pos < len(data):
        # Mostly large chunks, sometimes tiny ones (message headers), sometimes empty.
        n = rng.choice([rng.randint(1, max_chunk), rng.randint(0, 16)])
        await session.send(data[pos:pos + n])
        pos += n
    session.finish()


async def _recv_all(session: RdmaSession, rng: random.Random | None = None) -> bytes:
    out = bytearray()
    while True:
        chunk = await session.recv(rng.randint(1, 300_000) if rng else None)
        if not chunk:
            return bytes(out)
        out += chunk


async def _exchange(pair: Pair, a_to_b: bytes, b_to_a: bytes, seed: int,
                    max_chunk: int = 3 * MIB) -> None:
    rng_a, rng_b, rng_c, rng_d = (random.Random(seed + i) for i in range(4))
    _, got_b, _, got_a = await asyncio.gather(
        _send_chunks(pair.client, a_to_b, rng_a, max_chunk), _recv_all(pair.server, rng_b),
        _send_chunks(pair.server, b_to_a, rng_c, max_chunk), _recv_all(pair.client, rng_d))
    assert len(got_b) == len(a_to_b) and got_b == a_to_b
    assert len(got_a) == len(b_to_a) and got_a == b_to_a
    await asyncio.gather(pair.client.close(), pair.server.close())
    await pair.listener.close()


# ---- the data path ----------------------------------------------------------------------------
def test_64_mib_both_ways_byte_exact_with_random_chunking() -> None:
    """Default rings (16 x 1 MiB); the fake delivers random batches, so completions lag."""
    a_to_b = random.Random(1).randbytes(64 * MIB)
    b_to_a = random.Random(2).randbytes(64 * MIB)

    async def main() -> Pair:
        pair = await _pair(seed=7)
        await _exchange(pair, a_to_b, b_to_a, seed=11)
        return pair

    pair = _run(main())
    assert pair.fabric.rnr_naks == 0  # flow control never let a send meet an empty queue
    for session in (pair.client, pair.server):
        stats = session.stats()
        assert stats.bytes_sent == stats.bytes_acked == stats.bytes_received == 64 * MIB
        assert stats.min_rtt_ms is not None and stats.connections == 0
        assert session.state is RdmaState.CLOSED
    assert pair.fabric.connections == [] and pair.fabric.listeners == {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), size_ab=st.integers(0, 300_000),
       size_ba=st.integers(0, 300_000), ring=st.integers(2, 5),
       client_slot=st.sampled_from([4096, 5000, 16384]),
       server_slot=st.sampled_from([4096, 9000, 65536]))
def test_small_rings_any_chunking_any_interleaving(seed: int, size_ab: int, size_ba: int,
                                                   ring: int, client_slot: int,
                                                   server_slot: int) -> None:
    """Tiny rings and unequal slot sizes: credits run out constantly; RNR retries are 0, so
    a single send without a posted receive would break the connection."""
    rng = random.Random(seed)
    a_to_b, b_to_a = rng.randbytes(size_ab), rng.randbytes(size_ba)
    client_cfg = RdmaConfig(ring_slots=ring, slot_bytes=client_slot, rnr_retry=0)
    server_cfg = RdmaConfig(ring_slots=rng.randint(2, 5), slot_bytes=server_slot, rnr_retry=0)

    async def main() -> Pair:
        pair = await _pair(client_cfg, server_cfg, seed=seed)
        await _exchange(pair, a_to_b, b_to_a, seed=seed, max_chunk=40_000)
        return pair

    assert _run(main(), 30).fabric.rnr_naks == 0


def test_slow_receiver_blocks_the_sender_and_loses_nothing() -> None:
    cfg = RdmaConfig(ring_slots=4, slot_bytes=64 * 1024, rnr_retry=0)
    data = random.Random(3).randbytes(4 * MIB)
    # At most the sender's ring and the receiver's ring can hold data in between.
    bound = 2 * cfg.ring_slots * cfg.slot_bytes
    in_between: list[int] = []

    async def slow_reader(session: RdmaSession) -> bytes:
        out = bytearray()
        while chunk := await session.recv(20_000):
            out += chunk
            await asyncio.sleep(0.0005)
        return bytes(out)

    async def sender(pair: Pair) -> float:
        blocked = 0.0
        for pos in range(0, len(data), 100_000):
            started = time.monotonic()
            await pair.client.send(data[pos:pos + 100_000])
            blocked += time.monotonic() - started
            in_between.append(pair.client.stats().bytes_sent
                              - pair.server.stats().bytes_received)
        pair.client.finish()
        return blocked

    async def main() -> tuple[Pair, float, bytes]:
        pair = await _pair(cfg, seed=5)
        blocked, got = await asyncio.gather(sender(pair), slow_reader(pair.server))
        await asyncio.gather(pair.client.close(), pair.server.close())
        await pair.listener.close()
        return pair, blocked, got

    pair, blocked, got = _run(main())
    assert got == data
    assert pair.fabric.rnr_naks == 0
    assert max(in_between) <= bound
    assert blocked > 0.05  # the sender waited for the reader (a few ms per slot)


def test_without_credits_the_fake_receiver_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control experiment: a sender that ignores credits overruns the receiver; the fake
    answers receiver-not-ready and the transport says so. So the credits are what keep the
    other tests clean, not a lenient fake."""
    cfg = RdmaConfig(ring_slots=2, slot_bytes=4096, rnr_retry=0)

    async def main() -> tuple[FakeFabric, BaseException]:
        pair = await _pair(cfg, seed=9)
        monkeypatch.setattr(RdmaSession, "_credits", lambda self: 1000)
        with pytest.raises(TransportError) as caught:
            for _ in range(50):  # nobody reads at the server
                await pair.client.send(b"x" * 4000)
                await asyncio.sleep(0.001)
            await pair.client.close()
        await pair.listener.close()
        return pair.fabric, caught.value

    fabric, error = _run(main(), 20)
    assert fabric.rnr_naks > 0
    assert isinstance(error, ReceiverNotReadyError)
    assert "receiver not ready" in str(error) and "peer b" in str(error)


def test_half_close_then_the_other_direction() -> None:
    async def main() -> None:
        pair = await _pair(RdmaConfig(ring_slots=3, slot_bytes=8192))
        await pair.client.send(b"request")
        pair.client.finish()
        assert await _recv_all(pair.server) == b"request"
        with pytest.raises(SessionClosedError):
            await pair.client.send(b"more")
        # More than both rings hold: the reader must run at the same time.
        await asyncio.gather(_answer(pair.server), _expect(pair.client, b"answer" * 10_000))
        await pair.client.close()
        await pair.client.close()  # twice is fine
        with pytest.raises(SessionClosedError):
            await pair.client.recv()
        await pair.listener.close()

    async def _answer(session: RdmaSession) -> None:
        await session.send(b"answer" * 10_000)
        await session.close()

    async def _expect(session: RdmaSession, want: bytes) -> None:
        assert await _recv_all(session) == want

    _run(main(), 20)


# ---- failures ---------------------------------------------------------------------------------
def test_peer_host_dies_mid_transfer() -> None:
    cfg = RdmaConfig(ring_slots=4, slot_bytes=64 * 1024)

    async def main() -> BaseException:
        pair = await _pair(cfg)
        data = bytes(256 * 1024)
        await pair.client.send(data)
        got = 0
        while got < len(data):
            got += len(await pair.server.recv())
        await asyncio.sleep(0.01)  # the server's credit update reaches the client
        await pair.client.send(bytes(1000))  # goes out when this task next waits ...
        pair.fabric.kill(pair.server_conn())  # ... to a host that is gone
        with pytest.raises(RdmaConnectionLostError) as caught:
            for _ in range(100):
                await pair.client.send(data)
        with pytest.raises(RdmaConnectionLostError):
            await pair.client.recv()  # the error stays
        pair.server.abort("test over")
        await pair.listener.close()
        return caught.value

    error = _run(main(), 20)
    text = str(error)
    assert text.startswith("peer b (10.9.0.2:7481): RDMA connection lost while sending: "
                           "RETRY_EXC_ERR (12): transport retries exhausted: the peer does "
                           "not answer"), text


def test_a_receiver_notices_a_dead_peer_by_keepalive() -> None:
    """Only receiving, nothing to send: the keepalive RDMA write fails and says why."""
    cfg = RdmaConfig(ring_slots=2, slot_bytes=4096, keepalive_s=0.05)

    async def main() -> tuple[BaseException, float]:
        pair = await _pair(cfg)
        pair.fabric.kill(pair.server_conn())
        started = time.monotonic()
        with pytest.raises(RdmaConnectionLostError) as caught:
            await pair.client.recv()
        pair.server.abort("test over")
        await pair.listener.close()
        return caught.value, time.monotonic() - started

    error, waited = _run(main(), 20)
    assert waited < 2 and "keepalive" in str(error) and "RETRY_EXC_ERR" in str(error)


def test_peer_abort_reason_arrives() -> None:
    async def main() -> BaseException:
        pair = await _pair(RdmaConfig(ring_slots=2, slot_bytes=4096))
        pair.server.abort("destination disk full")
        with pytest.raises(PeerError) as caught:
            await pair.client.recv()
        with pytest.raises(SessionClosedError, match="destination disk full"):
            await pair.server.send(b"x")
        await pair.listener.close()
        return caught.value

    error = _run(main(), 20)
    assert "peer b" in str(error) and "destination disk full" in str(error)


def test_peer_hangs_up_before_the_end() -> None:
    async def main() -> BaseException:
        pair = await _pair(RdmaConfig(ring_slots=2, slot_bytes=4096))
        pair.server_conn().disconnect()
        with pytest.raises(RdmaConnectionLostError) as caught:
            await pair.client.recv()
        pair.server.abort("test over")
        await pair.listener.close()
        return caught.value

    assert "hung up" in str(_run(main(), 20))


def test_close_times_out_when_the_peer_never_closes() -> None:
    async def main() -> None:
        pair = await _pair(RdmaConfig(ring_slots=2, slot_bytes=4096, close_timeout=0.2))
        with pytest.raises(SessionClosedError, match="peer's end of stream"):
            await pair.client.close()
        assert await pair.server.recv() == b""  # the client's FIN came before its ABORT
        await asyncio.sleep(0.05)
        with pytest.raises(PeerError, match="close timed out"):
            await pair.server.send(b"late")
        await pair.listener.close()

    _run(main(), 20)


def test_connect_to_nothing_says_so() -> None:
    async def main() -> None:
        provider = FakeFabric().provider()
        with pytest.raises(ConnectError, match="nothing listens"):
            await connect_rdma((HOST, 9), name="a", provider=provider)

    _run(main(), 10)


def test_acceptor_refuses_unknown_agents_and_bad_tokens() -> None:
    async def main() -> None:
        fabric = FakeFabric()
        provider = fabric.provider()

        def authorize(name: str, token: bytes) -> str | None:
            return None if token == b"agreed" else "token does not match this migration"

        server = RdmaServer(name="b", provider=provider, allowed_peers=["a"],
                            authorize=authorize)
        await server.start(HOST, 7481)
        with pytest.raises(PeerError, match="not a configured peer"):
            await connect_rdma((HOST, 7481), name="mallory", provider=provider)
        with pytest.raises(PeerError, match="token does not match"):
            await connect_rdma((HOST, 7481), name="a", provider=provider, token=b"guess")
        good = await connect_rdma((HOST, 7481), name="a", provider=provider, token=b"agreed")
        accepted = await server.accept()
        assert accepted.peer_name == "a" and good.peer_name == "b"
        assert accepted.session_id == good.session_id
        with pytest.raises(AuthenticationError, match="expected agent 'c'"):
            await connect_rdma((HOST, 7481), name="a", provider=provider, token=b"agreed",
                               peer_name="c")
        good.abort("done")
        accepted.abort("done")
        await server.close()

    _run(main(), 20)


def test_config_limits() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        RdmaConfig(ring_slots=1)
    with pytest.raises(ValueError, match="at least 4096"):
        RdmaConfig(slot_bytes=1000)


# ---- the fake itself (what the tests above rely on) -------------------------------------------
def _connected_fakes(params: QpParams | None = None) -> tuple[FakeFabric, FakeConnection,
                                                               FakeConnection]:
    params = params or QpParams()

    async def main() -> tuple[FakeFabric, FakeConnection, FakeConnection]:
        fabric = FakeFabric(random_batches=False)
        provider = fabric.provider()
        listener = await provider.listen(HOST, 0, params)
        client = await provider.connect(HOST, listener.port, params, 1)
        server = await listener.accept()
        await server.establish(1)
        await client.establish(1)
        return fabric, client, server
    result: tuple[FakeFabric, FakeConnection, FakeConnection] = _run(main(), 5)
    return result


def test_fake_rc_semantics() -> None:
    fabric, a, b = _connected_fakes(QpParams(max_send_wr=2, max_recv_wr=2, rnr_retry=1))
    small, big = b.register(8), a.register(16)
    big.mem[:] = bytes(range(16))
    b.post_recv(small)
    a.post_send(big, 4)
    big.mem[0] = 99  # changed before delivery: the fake copies at delivery, like a NIC
    assert [c.byte_len for c in b.poll_recv(8)] == [4] and small.mem[:4] == bytes([99, 1, 2, 3])
    assert [c.status for c in a.poll_send(8)] == [WcStatus.SUCCESS]
    a.post_send(big, 4)  # no receive posted: RNR, once retried, then the connection breaks
    assert a.poll_send(8) == [] and fabric.rnr_naks == 1
    assert [c.status for c in a.poll_send(8)] == [WcStatus.RNR_RETRY_EXC_ERR]
    a.post_send(big, 1)  # the error state flushes whatever comes next
    assert [c.status for c in a.poll_send(8)] == [WcStatus.WR_FLUSH_ERR]

    fabric, a, b = _connected_fakes()
    small, big = b.register(8, remote_write=True), a.register(16)
    b.post_recv(small)
    a.post_send(big, 16)  # longer than the receive buffer: both sides fail
    assert [c.status for c in a.poll_send(8)] == [WcStatus.REM_INV_REQ_ERR]
    assert [c.status for c in b.poll_recv(8)] == [WcStatus.LOC_LEN_ERR]

    fabric, a, b = _connected_fakes(QpParams(max_send_wr=1))
    region, src = b.register(8, remote_write=True), a.register(8)
    a.post_write(src, 8, RemoteRegion(region.addr, region.rkey + 1, 8))
    with pytest.raises(VerbsCallError, match="send queue full"):
        a.post_write(src, 8, RemoteRegion(region.addr, region.rkey, 8))
    assert [c.status for c in a.poll_send(8)] == [WcStatus.REM_ACCESS_ERR]


# ---- choosing the transport -------------------------------------------------------------------
DEVICE = DeviceScan((DeviceInfo("mlx5_0", "InfiniBand", True),))
NONE = DeviceScan((), "no RDMA device on this host (pyverbs: Failed to get devices list)")
RDMA_ON = RdmaSettings(address="10.9.0.1")
PEER = Capabilities(("mlx5_1",), "10.9.0.2", 7481)


@pytest.mark.parametrize(("scan", "peer", "config", "kind", "reason"), [
    (DEVICE, PEER, RDMA_ON, "rdma", "both ends have RDMA (here: mlx5_0; peer: mlx5_1"),
    (NONE, PEER, RDMA_ON, "tcp", "no RDMA device on this host (pyverbs: Failed to get"),
    (DEVICE, Capabilities(rdma_reason="no RDMA device on this host (pyverbs lists none)"),
     RDMA_ON, "tcp", "peer has no RDMA device (no RDMA device on this host"),
    (DEVICE, Capabilities(), RDMA_ON, "tcp", "peer has no RDMA device"),
    (DEVICE, None, RDMA_ON, "tcp", "peer sent no capabilities"),
    (DEVICE, PEER, RdmaSettings(mode="off", address="10.9.0.1"), "tcp", "RDMA is off"),
    (DEVICE, PEER, RdmaSettings(tls=True, address="10.9.0.1"), "tcp", "the agents use TLS"),
    (DEVICE, PEER, RdmaSettings(tls=True, allow_plaintext=True, address="10.9.0.1"), "rdma",
     "both ends"),
    (DEVICE, PEER, RdmaSettings(device="mlx5_9", address="10.9.0.1"), "tcp",
     "RDMA device mlx5_9 is not on this host"),
    (DeviceScan((DeviceInfo("mlx5_0", active=False),)), PEER, RDMA_ON, "tcp",
     "no RDMA device with an active port"),
    (DEVICE, PEER, RdmaSettings(), "tcp", "no RDMA address configured"),
    (DEVICE, Capabilities(("x",), "10.9.0.2", 7481, rdma_protocol=99), RDMA_ON, "tcp",
     "peer speaks RDMA protocol 99"),
])
def test_choose_transport(scan: DeviceScan, peer: Capabilities | None, config: RdmaSettings,
                          kind: str, reason: str) -> None:
    got_kind, got_reason = choose_transport(scan, peer, config)
    assert (got_kind, got_reason[:len(reason)]) == (kind, reason), got_reason


def test_capabilities_round_trip_and_tolerance() -> None:
    mine = local_capabilities(DEVICE, RDMA_ON)
    assert Capabilities.from_json(mine.to_json()) == mine
    assert choose_transport(DEVICE, Capabilities.from_json(mine.to_json()), RDMA_ON)[0] == "rdma"
    without = local_capabilities(NONE, RDMA_ON)
    assert Capabilities.from_json(without.to_json()).rdma_reason == NONE.reason
    odd: object
    for odd in (None, [], {"rdma": {"devices": "mlx5_0"}}, {"rdma": 3}):
        assert not Capabilities.from_json(odd).rdma_devices
    with pytest.raises(ConfigError):
        RdmaSettings(mode="on")  # type: ignore[arg-type]


# ---- the real pyverbs wrapper, on this machine (no RDMA hardware) -----------------------------
def test_pyverbs_discovery_here_finds_no_device_and_tcp_is_chosen() -> None:
    scan = pyverbs_verbs.scan_devices()
    if scan.devices:
        pytest.skip(f"this machine has RDMA devices: {scan.devices}")
    assert scan.reason is not None
    assert scan.reason.startswith(("no RDMA device on this host", "pyverbs not importable"))
    kind, reason = choose_transport(scan, PEER, RDMA_ON)
    assert (kind, reason) == ("tcp", scan.reason)
    assert local_capabilities(scan, RDMA_ON).to_json() == {"rdma": None,
                                                            "rdma_reason": scan.reason}


def test_pyverbs_importable_in_the_venv() -> None:
    """The venv is made with --system-site-packages so that Debian's python3-pyverbs works."""
    scan = pyverbs_verbs.scan_devices()
    assert not (scan.reason or "").startswith("pyverbs not importable"), scan.reason
    assert scan.reason == "no RDMA device on this host (pyverbs: Failed to get devices list)" \
        or scan.devices


def test_pyverbs_missing_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def no_pyverbs(name: str, package: str | None = None) -> Any:
        if name.startswith("pyverbs"):
            raise ModuleNotFoundError("No module named 'pyverbs'")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", no_pyverbs)
    scan = pyverbs_verbs.scan_devices()
    assert scan.devices == () and scan.reason is not None
    assert scan.reason.startswith("pyverbs not importable: No module named 'pyverbs'")
    assert choose_transport(scan, PEER, RDMA_ON) == ("tcp", scan.reason)


def test_pyverbs_connect_here_fails_clearly() -> None:
    if pyverbs_verbs.scan_devices().devices:
        pytest.skip("this machine has RDMA devices")

    async def main() -> None:
        provider = pyverbs_verbs.PyverbsProvider()
        with pytest.raises(ConnectError, match="No such device"):
            await connect_rdma(("127.0.0.1", 7481), name="a", provider=provider)

    _run(main(), 10)
