"""The emulated WAN link: delay, loss, rate, cuts, and a clean teardown.

Each test builds its own bed (two hosts, one WAN link) and tears it down in the fixture's
finalizer, then checks that nothing is left. Only the RTT is held to a timing bound (10 %); the
loss test checks exact packet accounting with a fixed seed, and the rate test a generous floor.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dwcp_migrate.errors import LinkError
from dwcp_migrate.testbed.netns import Host, Network
from dwcp_migrate.testbed.procs import Reaper, process_start_time, reap_stale_beds
from dwcp_migrate.testbed.wan import (
    WanLink,
    WanSpec,
    measure_goodput,
    measure_rtt_ms,
    ping,
    wanlink_binary,
)

pytestmark = pytest.mark.netns


@dataclass
class Bed:
    reaper: Reaper
    a: Host
    b: Host
    link: WanLink


MakeBed = Callable[..., Bed]  # make_bed(spec, seed=None) -> Bed


@pytest.fixture
def make_bed(root: None) -> Iterator[MakeBed]:
    """A factory: make_bed(spec, seed=None) -> Bed; teardown is checked after the test."""
    reap_stale_beds()  # what an interrupted earlier run left behind
    reapers: list[tuple[Reaper, str]] = []
    beds: list[Bed] = []
    forwarders: list[tuple[int, int | None]] = []  # (pid, start time) of every forwarder seen

    def remember(link: WanLink) -> None:
        if link.pid is not None:
            forwarders.append((link.pid, process_start_time(link.pid)))

    def make(spec: WanSpec, seed: int | None = None) -> Bed:
        bed_id = uuid.uuid4().hex[:6]
        reaper = Reaper(f"wan-{bed_id}")
        prefix = f"dww{bed_id}"  # "dw": what conftest's leak check looks for
        reapers.append((reaper, prefix))
        net = Network(reaper, prefix)
        a, b = net.add_host("a"), net.add_host("b")
        link = WanLink(reaper, a, b, spec, seed=seed)
        remember(link)
        bed = Bed(reaper, a, b, link)
        beds.append(bed)
        return bed

    yield make

    for bed in beds:  # the forwarder may have been restarted (set_spec) since it was made
        remember(bed.link)
    problems = [p for reaper, _ in reapers for p in reaper.teardown()]
    assert problems == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    for _, prefix in reapers:
        assert prefix not in netns, f"namespaces left behind: {netns}"
    for pid, start in forwarders:
        assert start is None or process_start_time(pid) != start, \
            f"forwarder {pid} still running"


# ---- no bed needed -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"one_way_delay_ms": -1, "rate_mbit": 100},
    {"one_way_delay_ms": 10, "rate_mbit": 0},
    {"one_way_delay_ms": 10, "rate_mbit": float("nan")},
    {"one_way_delay_ms": 10, "rate_mbit": 100, "loss": 1.5},
    {"one_way_delay_ms": 10, "rate_mbit": 100, "loss": -0.1},
    {"one_way_delay_ms": 10, "rate_mbit": 100, "mtu": 100},
    {"one_way_delay_ms": 10, "rate_mbit": 100, "queue_bytes": 1000},  # less than one MTU
    {"one_way_delay_ms": "10", "rate_mbit": 100},
])
def test_bad_spec_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(LinkError, match="invalid WanSpec"):
        WanSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_defaults() -> None:
    spec = WanSpec.from_rtt(50, 1000)
    assert spec.one_way_delay_ms == 25
    assert spec.rtt_ms == 50
    assert spec.queue_limit_bytes == spec.bdp_bytes == 6_250_000
    assert WanSpec(0, 10).queue_limit_bytes == 32 * 1500  # a floor for tiny BDPs


@pytest.mark.parametrize("args, message", [
    (["--ns-a", "x", "--ns-b", "y", "--delay-ms", "10"], "--rate-mbit is required"),
    (["--ns-a", "x", "--ns-b", "y", "--delay-ms", "10", "--rate-mbit", "fast"],
     "not a number"),
    (["--ns-a", "x", "--ns-b", "y", "--delay-ms", "10", "--rate-mbit", "10", "--loss", "2"],
     "--loss must be in"),
    (["--ns-a", "x", "--ns-b", "x", "--delay-ms", "10", "--rate-mbit", "10"], "must differ"),
    (["--ns-a", "x", "--ns-b", "y", "--delay-ms", "1", "--rate-mbit", "1", "--addr-a", "1.2"],
     "--addr-a must look like"),
])
def test_forwarder_rejects_bad_arguments(args: list[str], message: str) -> None:
    res = subprocess.run([str(wanlink_binary()), *args], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 2
    assert message in res.stderr


def test_forwarder_reports_missing_namespace() -> None:
    args = ["--ns-a", f"missing-{uuid.uuid4().hex[:6]}", "--ns-b", "y", "--delay-ms", "1",
            "--rate-mbit", "1"]
    res = subprocess.run([str(wanlink_binary()), *args], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 1
    assert "network namespace missing-" in res.stderr


# ---- with a bed --------------------------------------------------------------------------
def test_rtt_matches_setting_and_follows_set_spec(make_bed: MakeBed) -> None:
    bed = make_bed(WanSpec.from_rtt(20, 100))
    assert bed.a.addresses["wan"] == "10.201.0.1"
    assert bed.b.addresses["wan"] == "10.201.0.2"
    assert bed.link.peer_address(bed.a) == "10.201.0.2"
    assert bed.link.peer_address(bed.b) == "10.201.0.1"

    rtt = measure_rtt_ms(bed.a, bed.link.peer_address(bed.a), count=10)
    assert rtt == pytest.approx(20, rel=0.10)

    first_pid = bed.link.pid
    bed.link.set_spec(WanSpec.from_rtt(50, 100))
    assert bed.link.pid != first_pid
    rtt = measure_rtt_ms(bed.b, bed.link.peer_address(bed.b), count=10)
    assert rtt == pytest.approx(50, rel=0.10)


def test_loss_is_applied_per_direction(make_bed: MakeBed) -> None:
    # A fixed seed and nothing else on the link: the drops are the same on every run.
    bed = make_bed(WanSpec.from_rtt(4, 100, loss=0.05), seed=1234)
    sent = 400
    stats = ping(bed.a, bed.link.peer_address(bed.a), sent, interval_s=0.005)
    c = bed.link.counters()
    assert stats.sent == sent
    # Every request entered A->B; every request that reached B was answered over B->A.
    assert c.ab.arrived == sent
    assert c.ba.arrived == c.ab.fwd_pkts
    assert stats.received == c.ba.fwd_pkts
    assert c.ab.drop_queue == c.ba.drop_queue == c.ab.drop_ring == 0
    # 5 % per direction, about 9.75 % per round trip; generous bounds.
    assert 0.02 <= c.ab.drop_loss / sent <= 0.10
    assert 0.02 <= c.ba.drop_loss / c.ba.arrived <= 0.10
    assert 0.05 <= stats.loss <= 0.16


def test_goodput_reaches_the_rate(make_bed: MakeBed) -> None:
    spec = WanSpec.from_rtt(20, 200)
    bed = make_bed(spec)
    for host in (bed.a, bed.b):
        host.apply_tcp(spec.tcp_settings())
    mbit = measure_goodput(bed.a, bed.b, streams=4, seconds=3, reaper=bed.reaper, omit_s=1)
    assert mbit >= 0.8 * spec.rate_mbit
    assert mbit <= 1.02 * spec.rate_mbit  # the rate limit holds
    c = bed.link.counters()
    assert c.ab.drop_ring == c.ba.drop_ring == 0


def test_cut_drops_traffic_and_restores_it(make_bed: MakeBed) -> None:
    bed = make_bed(WanSpec.from_rtt(10, 100))
    peer = bed.link.peer_address(bed.a)
    assert ping(bed.a, peer, 3, interval_s=0.05).received == 3

    bed.link.down()
    assert bed.link.is_down
    assert ping(bed.a, peer, 3, interval_s=0.05).received == 0
    bed.link.up()
    assert not bed.link.is_down
    assert ping(bed.a, peer, 3, interval_s=0.05).received == 3

    # A timed cut that returns at once (as failover tests use it): the link comes back alone.
    bed.link.cut(2.0, wait=False)
    assert ping(bed.a, peer, 3, interval_s=0.05).received == 0
    deadline = time.monotonic() + 10
    while bed.link.is_down and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not bed.link.is_down
    assert ping(bed.a, peer, 3, interval_s=0.05).received == 3
    c = bed.link.counters()
    assert c.ab.drop_cut == 6  # two cut windows of three requests each
    assert c.ab.drop_loss == c.ba.drop_loss == 0

    # SIGTERM: a clean exit (status 0, checked by stop) with the final counters.
    final = bed.link.stop()
    assert final is not None
    assert final.ab.drop_cut == 6
    assert final.ab.fwd_pkts == c.ab.fwd_pkts



def test_corruption_passes_tcp_checks(make_bed: MakeBed) -> None:
    # The injected damage is invisible to TCP: what arrives differs from what was sent. That
    # is what makes it a fair test of the transport's own frame checks (test_agent_failures).
    bed = make_bed(WanSpec.from_rtt(rtt_ms=10, rate_mbit=200))
    addr = bed.link.address(bed.b)
    sink = ("import socket, hashlib\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('{addr}', 7601)); s.listen(); print('ready', flush=True)\n"
            "c, _ = s.accept(); data = b''\n"
            "while (x := c.recv(65536)): data += x\n"
            "print(hashlib.sha256(data).hexdigest(), len(data), flush=True)\n")
    server = bed.reaper.spawn([sys.executable, "-c", sink], name="corrupt-sink",
                              netns=bed.b.netns, stdout=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline().strip() == b"ready"
    bed.link.corrupt_next()
    payload = bytes(range(256)) * 4096  # 1 MiB
    send = (f"import socket\nc = socket.create_connection(('{addr}', 7601))\n"
            "c.sendall(bytes(range(256)) * 4096); c.close()\n")
    subprocess.run(["ip", "netns", "exec", bed.a.netns, sys.executable, "-c", send],
                   check=True, timeout=60)
    digest, length = server.stdout.readline().split()
    assert int(length) == len(payload)
    assert digest.decode() != hashlib.sha256(payload).hexdigest()
    assert bed.link.counters().ab.corrupted == 1
