"""Failure semantics of the agent data path, each on the test bed with real guests.

In every case that fails, the migration reports why, the VM keeps running on the source and
its memory verifies. In every case that completes, the destination's RAM is identical to the
source's at switchover. Nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dwcp_migrate.testbed.agents import TestAgent
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.build import BuildProducts
from dwcp_migrate.testbed.guests import SerialLog, WorkloadSpec
from dwcp_migrate.testbed.migration import compare_guest_ram, wait_incoming_complete
from dwcp_migrate.testbed.netns import TcpSettings
from dwcp_migrate.testbed.qemu import GuestVM
from dwcp_migrate.testbed.scenario import GuestSetup, boot_source, start_destination
from dwcp_migrate.testbed.wan import WanSpec

pytestmark = [pytest.mark.guest, pytest.mark.netns]

# Slow enough (a capped WAN) that a failure lands in the middle of the migration.
SETUP = GuestSetup("baremetal", 512, WorkloadSpec(working_set_mib=256, dirty_mib_per_s=8))
WAN = WanSpec.from_rtt(rtt_ms=20, rate_mbit=200)


@dataclass
class Run:
    bed: TestBed
    agents: dict[str, TestAgent]
    src: GuestVM
    dst: GuestVM


@pytest.fixture(params=["tls"])
def run(request: pytest.FixtureRequest, products: BuildProducts,
        leak_check: None) -> Iterator[Run]:
    # Plaintext (configured explicitly) lets injected damage reach the frame checks; with TLS
    # its record MAC catches it first. Both must end the same way: never delivered.
    choices: dict[str, dict[str, Any]] = {
        "plaintext": {"tls": {"plaintext": True}},
        # the opt-in direct lane carries passthrough only: force passthrough on the WAN
        "lane": {"codec": {"mode": "passthrough"}, "transport": {"direct_lane": True}},
        # passthrough goes over the TLS lane by default
        "tlslane": {"codec": {"mode": "passthrough"}},
    }
    settings = choices.get(request.param)
    with TestBed(("a", "b"), wan=WAN, tcp=TcpSettings.stock()) as bed:
        agents = {h: TestAgent(bed, h, settings=settings)
                  for h in ("a", "b")}  # WAN: the encoded data path
        for agent in agents.values():
            agent.start()
        src = boot_source(bed, "a", SETUP)
        dst = start_destination(bed, "b", SETUP, f"unix:{agents['b'].outgoing_socket('b')}")
        yield Run(bed, agents, src, dst)
        for vm in (src, dst):
            vm.stop_process()


def migrate_with(run: Run, inject: Callable[[Run], None] | None, *, after_bytes: int = 32 << 20,
                 timeout_s: float = 120) -> dict[str, Any]:
    """Start the migration, call ``inject`` once this many bytes went, wait for the end."""
    run.src.qmp("migrate", uri=f"unix:{run.agents['a'].outgoing_socket('b')}")
    injected = inject is None
    deadline = time.monotonic() + timeout_s
    while True:
        info = run.src.query_migrate()
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if not injected and info.get("ram", {}).get("transferred", 0) >= after_bytes:
            assert inject is not None
            inject(run)
            injected = True
        assert time.monotonic() < deadline, f"migration did not end: {info}"
        time.sleep(0.05)


def assert_failed_safely(run: Run, info: dict[str, Any], why: str) -> None:
    assert info["status"] == "failed", info
    # The source resumes the guest by itself after a failed migration.
    deadline = time.monotonic() + 30
    while run.src.status() != "running":
        assert time.monotonic() < deadline, run.src.status()
        time.sleep(0.1)
    log = SerialLog(run.src.serial_path)
    log.refresh()
    log.wait_for_passes(log.verify_passes + 2, timeout=60)
    assert not log.corruptions, log.corruptions
    # The source agent (if alive) recorded the failure and why.
    agent = run.agents["a"]
    if agent.process is not None and agent.process.poll() is None:
        recent = _wait_recent(agent)
        assert recent["result"] == "failed", recent
        assert why in (recent["error"] or ""), recent


def _wait_recent(agent: TestAgent) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        status = agent.client().call("status")
        if status["recent"] and not status["active"]:
            recent: dict[str, Any] = status["recent"][-1]
            return recent
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def assert_completed_identically(run: Run, info: dict[str, Any]) -> None:
    assert info["status"] == "completed", info
    wait_incoming_complete(run.dst, timeout_s=60)
    ram = compare_guest_ram(run.src, run.dst, run.bed.workdir)
    assert ram.identical, ram.describe()
    run.dst.qmp("cont")
    log = SerialLog(run.dst.serial_path)
    log.wait_for_passes(2, timeout=60)
    assert not log.corruptions


def test_destination_agent_killed(run: Run) -> None:
    info = migrate_with(run, lambda r: r.agents["b"].kill())
    assert_failed_safely(run, info, "b")


def test_source_agent_killed(run: Run) -> None:
    info = migrate_with(run, lambda r: r.agents["a"].kill())
    assert_failed_safely(run, info, "")
    assert not run.dst.running_process() or run.dst.status() != "running"


def test_destination_qemu_gone(run: Run) -> None:
    info = migrate_with(run, lambda r: os.kill(r.dst.pid, signal.SIGKILL))
    assert_failed_safely(run, info, "")


def test_connection_reset_is_survived(run: Run) -> None:
    # Cut the WAN for a second in the middle: connections break and are replaced; the
    # migration goes on and the destination gets exactly the source's RAM.
    assert run.bed.wan is not None
    wan = run.bed.wan
    info = migrate_with(run, lambda r: wan.cut(1.0, wait=False))
    assert_completed_identically(run, info)


def test_plain_completion_is_identical(run: Run) -> None:
    info = migrate_with(run, None)
    assert_completed_identically(run, info)
    # The encoded path reads from QEMU against the destination's delivery credit.
    transport = _wait_recent(run.agents["a"])["transport"]["0"]
    assert transport["credit_window"] >= 32 << 20, transport


def _reset_one_connection(r: Run) -> None:
    """Kill one of the source agent's transport connections (the kernel sends a reset)."""
    host = r.bed.host("a")
    peer = r.bed.address("b", "wan")
    out = host.run(["ss", "-Htn", "state", "established", "dst", peer, "dport", "=", "7480"])
    ports = sorted(int(line.split()[-2].rsplit(":", 1)[1]) for line in out.stdout.splitlines()
                   if line.strip())
    assert len(ports) > 1, out.stdout
    host.run(["ss", "-K", "dst", peer, "dport", "=", "7480", "sport", "=", str(ports[0])])


def test_one_connection_reset_is_survived(run: Run) -> None:
    info = migrate_with(run, _reset_one_connection)
    assert_completed_identically(run, info)
    record = _wait_recent(run.agents["a"])
    assert record["transport"]["0"]["connections_lost"] >= 1, record["transport"]


def _reset_lane_connections(r: Run) -> None:
    """Kill the source agent's TLS lane connections (both directions; the kernel sends
    resets): everything to the destination agent but its session port. Both must be there
    (the caller waits until the lane runs: killing them while it opens tests something
    else)."""
    host = r.bed.host("a")
    peer = r.bed.address("b", "wan")
    deadline = time.monotonic() + 20
    while True:
        out = host.run(["ss", "-Htn", "state", "established", "dst", peer, "dport", "!=",
                        "7480"])
        if len(out.stdout.splitlines()) == 2:  # F and R
            break
        assert time.monotonic() < deadline, f"the TLS lane did not open: {out.stdout!r}"
        time.sleep(0.02)
    host.run(["ss", "-K", "dst", peer, "dport", "!=", "7480"])


@pytest.mark.parametrize("run", ["tlslane"], indirect=True)
def test_tls_lane_reset_is_survived(run: Run) -> None:
    # Past the source agent's read-ahead (64 MiB, READ_AHEAD_BYTES) QEMU can only have
    # written what the lane carried: the lane is open and running then.
    info = migrate_with(run, _reset_lane_connections, after_bytes=96 << 20)
    assert_completed_identically(run, info)
    record = _wait_recent(run.agents["a"])["transport"]["0"]
    assert record["lane"] == "tls" and record["reconnects"] >= 1, record


@pytest.mark.parametrize("run", ["tls", "plaintext", "tlslane"], indirect=True)
def test_corrupted_frame_is_never_delivered(run: Run) -> None:
    assert run.bed.wan is not None
    wan = run.bed.wan
    info = migrate_with(run, lambda r: wan.corrupt_next())
    assert wan.counters().ab.corrupted == 1  # the damage really went onto the wire
    assert_completed_identically(run, info)  # ... and never reached the destination QEMU
    dst_record = _wait_recent(run.agents["b"])
    lost = dst_record["transport"]["0"]
    if lost.get("lane") == "tls":
        assert lost["reconnects"] >= 1, lost  # TLS refused the record; the source resent
    elif run.agents["b"].config_path.read_text().find("plaintext: true") >= 0:
        assert lost["corrupt_frames"] >= 1, lost  # the frame check caught it
    else:
        assert lost["connections_lost"] >= 1, lost  # TLS dropped the damaged connection


# The direct lane (opt-in, unencrypted, spliced by the kernel) does not survive a broken
# connection, but whatever breaks, the migration fails on the source and the VM runs on. The
# TLS lane survives broken connections (above), not a dead agent or QEMU.
@pytest.mark.parametrize("run", ["lane", "tlslane"], indirect=True)
@pytest.mark.parametrize("inject", ["destination agent", "source agent", "destination QEMU"])
def test_lane_failures_leave_the_vm_on_the_source(run: Run, inject: str) -> None:
    actions: dict[str, Callable[[Run], None]] = {
        "destination agent": lambda r: r.agents["b"].kill(),
        "source agent": lambda r: r.agents["a"].kill(),
        "destination QEMU": lambda r: os.kill(r.dst.pid, signal.SIGKILL),
    }
    info = migrate_with(run, actions[inject])
    assert_failed_safely(run, info, "")
    if "direct_lane: true" in run.agents["a"].config_path.read_text():
        assert "direct lane to b" in run.agents["a"].log_tail(50000)
    elif inject != "source agent":
        assert "TLS lane" in _wait_recent(run.agents["a"])["error"]


@pytest.mark.parametrize("run", ["lane"], indirect=True)
def test_direct_lane_completion_is_identical(run: Run) -> None:
    info = migrate_with(run, None)
    assert_completed_identically(run, info)
    assert _wait_recent(run.agents["a"])["transport"]["0"] == {"lane": "direct"}
