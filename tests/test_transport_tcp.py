"""AMST sessions over real sockets: loopback in this process, and the test bed's emulated WAN.

What arrives is compared with what was sent (sha256) after connections are reset at random
points (SO_LINGER 0, so the peer gets a RST and both sides lose what was in flight) and after
the WAN link is cut. TLS: good certificates work, a wrong CA or a wrong name is refused with
a message that names the peer and says what to fix.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from dwcp_migrate.errors import ConfigError
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.netns import TcpSettings
from dwcp_migrate.testbed.wan import WanSpec
from dwcp_migrate.transports.adapt import GoodputSample, StreamRange, next_stream_count
from dwcp_migrate.transports.certs import issue, load_or_make_ca
from dwcp_migrate.transports.errors import ConnectError, PeerError, TlsError
from dwcp_migrate.transports.probe import Pattern, _chaos
from dwcp_migrate.transports.session import SessionConfig
from dwcp_migrate.transports.sockopts import TcpOptions, congestion_control
from dwcp_migrate.transports.tcp import (
    TcpSession,
    TransportConfig,
    connect_session,
)
from dwcp_migrate.transports.tcp_server import SessionServer
from dwcp_migrate.transports.tls import TlsConfig, TransportSecurity
from tests.cutting_proxy import CuttingProxy

PLAIN = TransportSecurity(plaintext=True)
MIB = 1 << 20


def _run(coro: Awaitable[Any], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _config(security: TransportSecurity = PLAIN, **kw: Any) -> TransportConfig:
    return TransportConfig(security=security, **kw)


async def _drain(session: TcpSession) -> tuple[int, str]:
    digest, n = hashlib.sha256(), 0
    while chunk := await session.recv_view():
        digest.update(chunk)
        n += len(chunk)
    return n, digest.hexdigest()


async def _pump(session: TcpSession, total: int, seed: int) -> str:
    pattern, digest, sent = Pattern(seed), hashlib.sha256(), 0
    while sent < total:
        block = pattern.next()[:total - sent]
        digest.update(block)
        await session.send(block)
        sent += len(block)
    session.finish()
    return digest.hexdigest()


async def _exchange(client_cfg: TransportConfig, server_cfg: TransportConfig, *, a_to_b: int,
                    b_to_a: int, streams: int, peer_name: str | None = None,
                    during: Callable[[TcpSession], Coroutine[Any, Any, None]] | None = None
                    ) -> tuple[TcpSession, TcpSession]:
    """Both directions at once; asserts both arrived intact; returns (client, server)."""
    server = SessionServer(name="b", config=server_cfg)
    await server.start("127.0.0.1", 0)
    try:
        client = await connect_session(("127.0.0.1", server.port), streams, name="a",
                                       peer_name=peer_name, config=client_cfg)
        accepted = await server.accept()
        extra = asyncio.create_task(during(client)) if during else None
        results = await asyncio.gather(_pump(client, a_to_b, 1), _drain(accepted),
                                       _pump(accepted, b_to_a, 2), _drain(client))
        if extra is not None:
            extra.cancel()
        await asyncio.gather(client.close(), accepted.close())
    finally:
        await server.close()
    sent_ab, (got_ab, sum_ab), sent_ba, (got_ba, sum_ba) = results
    assert (got_ab, sum_ab) == (a_to_b, sent_ab)
    assert (got_ba, sum_ba) == (b_to_a, sent_ba)
    return client, accepted


# ---- loopback ---------------------------------------------------------------------------------
def test_loopback_both_directions_arrive_intact() -> None:
    client, server = _run(_exchange(_config(), _config(), a_to_b=64 * MIB, b_to_a=8 * MIB,
                                    streams=4))
    stats = client.stats()
    assert stats.bytes_acked == 64 * MIB and stats.bytes_received == 8 * MIB
    assert stats.connections_opened == 4 and stats.connections_lost == 0
    assert stats.srtt_ms is not None and stats.congestion_control in ("bbr", "cubic")
    assert server.stats().bytes_received == 64 * MIB


def test_random_resets_lose_nothing() -> None:
    async def chaos(session: TcpSession) -> None:
        await _chaos(session, 0.05, random.Random(7), kills)

    kills = [0]
    cfg = _config(session=SessionConfig(max_payload=256 * 1024, send_window=8 * MIB,
                                        recv_window=8 * MIB))
    client, server = _run(_exchange(cfg, cfg, a_to_b=64 * MIB, b_to_a=16 * MIB, streams=4,
                                    during=chaos))
    stats = client.stats()
    assert kills[0] >= 3 and stats.connections_lost >= 3
    assert stats.frames_resent + server.stats().frames_resent > 0
    assert stats.connections_opened > 4  # replacements joined (some may not finish in time)


def test_connection_count_changes_mid_transfer() -> None:
    """Fewer connections: surplus ones are RETIREd both ways (nothing lost, nothing resent);
    more: new ones join the session with its token."""
    counts: list[int] = []

    async def resize(session: TcpSession) -> None:
        await asyncio.sleep(0.02)
        for target in (2, 5):
            session.set_target(target)
            while session.n_connections != target or \
                    session.core.open_connection_count() != target:
                await asyncio.sleep(0.001)  # retired ones close, new ones join
            counts.append(session.n_connections)

    cfg = _config(session=SessionConfig(max_payload=256 * 1024, send_window=8 * MIB,
                                        recv_window=8 * MIB))
    client, _ = _run(_exchange(cfg, cfg, a_to_b=256 * MIB, b_to_a=MIB, streams=4,
                               during=resize))
    stats = client.stats()
    assert counts == [2, 5]
    assert stats.connections_lost == 0 and stats.frames_resent == 0
    assert stats.connections_opened == 4 + 3


def test_retune_changes_congestion_control_of_live_and_later_connections() -> None:
    """What the agent does once the path mode is known (cubic in a datacenter)."""
    seen: list[set[str]] = []

    async def retune(session: TcpSession) -> None:
        await asyncio.sleep(0.02)
        session.retune(TcpOptions(congestion_control="reno"))
        seen.append({congestion_control(c.sock) for c in session._conns.values()
                     if c.sock is not None})
        session.set_target(3)  # the one that joins now gets the new setting too
        while session.n_connections != 3:
            await asyncio.sleep(0.001)
        seen.append({congestion_control(c.sock) for c in session._conns.values()
                     if c.sock is not None})

    cfg = _config(tcp=TcpOptions(congestion_control="cubic"),
                  session=SessionConfig(max_payload=256 * 1024, send_window=8 * MIB,
                                        recv_window=8 * MIB))
    client, _ = _run(_exchange(cfg, cfg, a_to_b=256 * MIB, b_to_a=MIB, streams=2,
                               during=retune))
    assert seen == [{"reno"}, {"reno"}]
    assert client.stats().congestion_control == "reno"


def test_adaptation_judges_only_settled_counts() -> None:
    """A goodput sample taken while connections were still joining counted only those open
    so far, and the adaptation took that passing count for a chosen one (targets such as 3,
    5, 6, 7 on the way from 4 to 8). Restarted to 1 again and again mid-transfer, the count
    may only step by doubling (1, 2, 4, 8) and back."""
    targets: list[int] = []

    async def shrink(session: TcpSession) -> None:
        await asyncio.sleep(0.15)
        original = session.set_target

        def record(n: int) -> None:
            targets.append(n)
            original(n)

        session.set_target = record  # type: ignore[method-assign]
        for _ in range(6):  # cancelled when the transfer ends
            session.restart(1, StreamRange(1, 8))
            await asyncio.sleep(0.25)

    cfg = _config(adapt=StreamRange(1, 8), adapt_interval=0.01,
                  session=SessionConfig(max_payload=256 * 1024, send_window=32 * MIB,
                                        recv_window=32 * MIB))
    _run(_exchange(cfg, _config(), a_to_b=1024 * MIB, b_to_a=MIB, streams=8, during=shrink))
    assert targets[:1] == [1] and 2 in targets, targets  # the adaptation did act afterwards
    assert set(targets) <= {1, 2, 4, 8}, str(targets)


def test_plaintext_must_be_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="set plaintext: true"):
        TransportSecurity()
    caplog.set_level(logging.WARNING)
    _run(_exchange(_config(), _config(), a_to_b=MIB, b_to_a=0, streams=1))
    assert any("PLAINTEXT" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_a_peer_that_is_not_amst_is_refused() -> None:
    async def main() -> None:
        listener = await asyncio.start_server(_http_like, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(ConnectError, match="not an AMST agent"):
            await connect_session(("127.0.0.1", port), 2, name="a", config=_config())
        listener.close()

    async def _http_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()

    _run(main())


def test_connect_to_nothing_says_so() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nobody listens there
    with pytest.raises(ConnectError, match=r"peer 127.0.0.1:\d+: cannot connect"):
        _run(connect_session(("127.0.0.1", port), 2, name="a", config=_config()))


# ---- TLS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two lab CAs: ``good`` with agents a, b, c; ``other`` with its own a and b."""
    good, other = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("other")
    for directory in (good, other):
        ca = load_or_make_ca(directory)
        for name in ("a", "b", "c"):
            issue(directory, name, ca=ca)
    return good, other


def test_certs_command(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryptography import x509

    from dwcp_migrate.cli.certs_cmd import certs

    out = tmp_path / "pki"
    first = CliRunner().invoke(certs, ["a", "b", "--out", str(out), "--ip", "b=10.0.0.2"])
    assert first.exit_code == 0, first.output
    assert "made CA" in first.output
    again = CliRunner().invoke(certs, ["c", "--out", str(out)])
    assert again.exit_code == 0 and "using CA" in again.output  # the CA is kept
    cert = x509.load_pem_x509_certificate((out / "b.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["b"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    assert (out / "b.key").stat().st_mode & 0o077 == 0  # keys are private
    bad = CliRunner().invoke(certs, ["bad name", "--out", str(out)])
    assert bad.exit_code != 0 and "cannot be a certificate name" in bad.output


def _tls(directory: Path, name: str, ca_dir: Path | None = None) -> TransportSecurity:
    return TransportSecurity(tls=TlsConfig(directory / f"{name}.pem", directory / f"{name}.key",
                                           (ca_dir or directory) / "ca.pem"))


def test_tls_good_certificates(pki: tuple[Path, Path]) -> None:
    good, _ = pki
    client, server = _run(_exchange(_config(_tls(good, "a")), _config(_tls(good, "b")),
                                    a_to_b=16 * MIB, b_to_a=2 * MIB, streams=2, peer_name="b"))
    assert server.core.peer_name == "a" and client.core.peer_name == "b"


def _tls_failure(client: TransportSecurity, server: TransportSecurity, peer_name: str,
                 caplog: pytest.LogCaptureFixture) -> BaseException:
    caplog.set_level(logging.WARNING)

    async def main() -> BaseException:
        srv = SessionServer(name="b", config=_config(server))
        await srv.start("127.0.0.1", 0)
        try:
            await connect_session(("127.0.0.1", srv.port), 2, name="a", peer_name=peer_name,
                                  config=_config(client))
        except Exception as exc:
            await asyncio.sleep(0.1)  # let the server log its side
            return exc
        finally:
            await srv.close()
        raise AssertionError("the connection was not refused")

    result: BaseException = _run(main())
    return result


def test_tls_peer_from_another_ca_is_refused(pki: tuple[Path, Path],
                                             caplog: pytest.LogCaptureFixture) -> None:
    good, other = pki
    exc = _tls_failure(_tls(good, "a"), _tls(other, "b"), "b", caplog)
    assert isinstance(exc, TlsError)
    assert "peer b (127.0.0.1:" in str(exc) and "not signed by our CA" in str(exc)


def test_tls_our_certificate_from_another_ca_is_refused(pki: tuple[Path, Path],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    good, other = pki
    exc = _tls_failure(_tls(other, "a", ca_dir=good), _tls(good, "b"), "b", caplog)
    assert isinstance(exc, TlsError) and "refused our certificate" in str(exc)
    server_side = [r.getMessage() for r in caplog.records if "refused a connection" in
                   r.getMessage()]
    assert server_side and "127.0.0.1:" in server_side[0]
    assert "client certificate" in server_side[0] and "not signed by our CA" in server_side[0]


def test_tls_wrong_name_is_refused(pki: tuple[Path, Path],
                                   caplog: pytest.LogCaptureFixture) -> None:
    good, _ = pki
    exc = _tls_failure(_tls(good, "a"), _tls(good, "b"), "c", caplog)
    assert isinstance(exc, TlsError) and "peer c (127.0.0.1:" in str(exc)
    assert "not for the agent name we connected to" in str(exc)


def test_tls_agent_name_must_match_its_certificate(pki: tuple[Path, Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    good, _ = pki
    exc = _tls_failure(_tls(good, "c"), _tls(good, "b"), "b", caplog)  # says "a", cert is c
    assert isinstance(exc, PeerError) and "certificate is for ['c']" in str(exc)


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
@pytest.mark.parametrize("cut_after", [0, 300, 600, 900, 1200, 1600, 4 << 10])
def test_tls_connection_cut_while_it_opens_is_replaced(pki: tuple[Path, Path],
                                                       cut_after: int, reset: bool) -> None:
    """One of the session's first connections is reset at some point of its opening (TCP,
    the TLS handshake, AMST's greeting): the session opens with the others and makes it
    again. A reset in TLS's handshake reads as an EOF 'in violation of protocol'; it was
    taken for a refused certificate and failed the session."""
    good, _ = pki

    async def main() -> CuttingProxy:
        server = SessionServer(name="b", config=_config(_tls(good, "b")))
        await server.start("127.0.0.1", 0)
        proxy = CuttingProxy(("127.0.0.1", server.port), cut_after, reset=reset)
        try:
            client = await connect_session(proxy.address, 3, name="a", peer_name="b",
                                           config=_config(_tls(good, "a")))
            accepted = await server.accept()
            results = await asyncio.gather(_pump(client, 8 * MIB, 1), _drain(accepted))
            assert results[1] == (8 * MIB, results[0])
            await asyncio.gather(client.close(), accepted.close())
            return proxy
        finally:
            proxy.close()
            await server.close()

    assert _run(main()).cut_done


# ---- adapting the connection count (pure policy) --------------------------------------------
def _samples(*runs: tuple[int, float, int]) -> list[GoodputSample]:
    return [GoodputSample(n, rate, True) for n, rate, count in runs for _ in range(count)]


def test_stream_count_policy() -> None:
    policy = StreamRange(min_streams=1, max_streams=16, gain=0.1, probe_every=5)
    assert next_stream_count([], policy) == 1
    assert next_stream_count(_samples((2, 400, 1)), policy) == 2  # settling
    assert next_stream_count(_samples((2, 400, 2)), policy) == 4  # nothing to compare: probe
    assert next_stream_count(_samples((2, 400, 2), (4, 700, 2)), policy) == 8  # it paid
    assert next_stream_count(_samples((4, 700, 2), (8, 720, 2)), policy) == 4  # it did not
    assert next_stream_count(_samples((8, 720, 2), (4, 700, 2)), policy) == 4  # as good: stay
    assert next_stream_count(_samples((8, 900, 2), (4, 500, 2)), policy) == 8  # worse: back
    assert next_stream_count(_samples((8, 720, 2), (4, 700, 5)), policy) == 8  # re-probe
    assert next_stream_count(_samples((16, 900, 3)), policy) == 16  # at the top
    limited = [GoodputSample(2, 100, False)] * 3
    assert next_stream_count(limited, policy) == 2  # application-limited: no change
    assert next_stream_count(_samples((32, 1, 1)), policy) == 16  # clamped


# ---- the test bed's WAN -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_bed(root: None) -> Iterator[TestBed]:
    spec = WanSpec.from_rtt(rtt_ms=50, rate_mbit=1000, loss=0.001)
    with TestBed(("a", "b"), wan=spec, tcp=TcpSettings.stock()) as bed:
        yield bed


def _probe(bed: TestBed, host: str, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "dwcp_migrate.transports.probe", *args]
    assert bed.reaper is not None
    return bed.reaper.spawn(argv, name=f"probe-{args[0]}", netns=bed.host(host).netns,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()  # type: ignore
                                                        ), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(f"probe gave no result within {timeout} s: {err[-3000:]}")
    result: dict[str, Any] = json.loads(box[0])
    return result


def _wan_transfer(bed: TestBed, *, size: int, port: int, during: Callable[[], None] | None = None,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    server = _probe(bed, "b", "serve", "--listen", f"0.0.0.0:{port}", *extra)
    assert _line(server, 15)["event"] == "ready"
    client = _probe(bed, "a", "send", "--connect", f"{bed.address('b', 'wan')}:{port}",
                    "--bytes", str(size), "--streams", "8", *extra)
    if during is not None:
        during()
    sent = _line(client, 90)
    received = _line(server, 30)
    assert sent["event"] == "sent" and received["event"] == "received", (sent, received)
    assert (received["bytes"], received["sha256"]) == (size, sent["sha256"])
    return sent


@pytest.mark.netns
def test_wan_cut_for_a_second_loses_nothing(wan_bed: TestBed) -> None:
    def cut() -> None:
        time.sleep(0.7)  # mid-transfer
        assert wan_bed.wan is not None
        wan_bed.wan.cut(1.0)

    sent = _wan_transfer(wan_bed, size=64 * MIB, port=7101, during=cut)
    assert sent["elapsed_s"] > 1.0


@pytest.mark.netns
def test_wan_cut_longer_than_the_user_timeout_reconnects(wan_bed: TestBed) -> None:
    """With TCP_USER_TIMEOUT 0.5 s a 1.5 s cut kills every connection: the session opens
    new ones once the link is back and resends what was not acknowledged."""
    def cut() -> None:
        time.sleep(0.7)
        assert wan_bed.wan is not None
        wan_bed.wan.cut(1.5)

    sent = _wan_transfer(wan_bed, size=64 * MIB, port=7102, during=cut,
                         extra=("--user-timeout", "0.5"))
    assert sent["stats"]["connections_lost"] >= 1
    assert sent["stats"]["connections_opened"] > 8


@pytest.mark.netns
def test_wan_random_resets_lose_nothing(wan_bed: TestBed) -> None:
    sent = _wan_transfer(wan_bed, size=96 * MIB, port=7103, extra=("--kill-every", "0.15"))
    assert sent["kills"] >= 1 and sent["stats"]["connections_lost"] >= 1
