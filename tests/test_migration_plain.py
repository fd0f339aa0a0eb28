"""Reference correctness: plain QEMU live migration between two test hosts reproduces the
guest's RAM byte for byte (checked at switchover) and the guest keeps verifying its memory.

These run on QEMU 10 from bookworm-backports: Debian 12's QEMU 7.2 loses pages in
multi-iteration TCG migrations on these machines (docs/TESTBED.md).
"""

from __future__ import annotations

import pytest

from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.build import BuildProducts
from dwcp_migrate.testbed.guests import WorkloadSpec
from dwcp_migrate.testbed.scenario import GuestSetup, plain_migration

pytestmark = [pytest.mark.guest, pytest.mark.netns]


def test_lan_migration_is_identical(products: BuildProducts, leak_check: None) -> None:
    setup = GuestSetup("baremetal", 512, WorkloadSpec(working_set_mib=256, dirty_mib_per_s=8))
    with TestBed(("a", "b")) as bed:
        result = plain_migration(bed, setup, link="lan")
    o = result.outcome
    assert o.status == "completed"
    # Timed end to end from QMP events: the destination loads the stream after the source
    # started sending it and after the source guest stopped (both QEMUs share one clock).
    assert o.end_to_end_ms is not None and o.switchover_ms is not None
    assert o.total_time_ms is not None and o.downtime_ms is not None
    assert 0 < o.switchover_ms < o.end_to_end_ms
    assert o.end_to_end_ms >= o.total_time_ms - 50  # 50 ms: QEMU starts its clock later
    assert result.ram_identical, result.ram_detail
    assert result.guest_verified, result.verify_detail


@pytest.mark.parametrize("kind,memory,working_set", [("baremetal", 512, 256),
                                                      ("linux", 512, 128)])
def test_multi_iteration_migration_is_identical(products: BuildProducts, leak_check: None,
                                                kind: str, memory: int,
                                                working_set: int) -> None:
    setup = GuestSetup("linux" if kind == "linux" else "baremetal", memory,
                       WorkloadSpec(working_set_mib=working_set, dirty_mib_per_s=16))
    with TestBed(("a", "b")) as bed:
        result = plain_migration(bed, setup, link="lan", min_iterations=5,
                                 parameters={"max-bandwidth": 256 * 2**20})
    assert result.outcome.iterations is not None and result.outcome.iterations >= 5
    assert result.ram_identical, result.ram_detail
    assert result.guest_verified, result.verify_detail


def test_timed_out_migration_stops_its_guests(products: BuildProducts, leak_check: None) -> None:
    """A run that times out must not keep migrating in the background (its vCPU would take a
    core from the next run of a benchmark, its destination would keep the port)."""
    from pathlib import Path

    from dwcp_migrate.errors import MigrationError
    from dwcp_migrate.testbed.wan import WanSpec

    def qemus_of(bed: TestBed) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(bed.workdir).encode() in cmdline:
                pids.append(int(proc.name))
        return pids

    setup = GuestSetup("baremetal", 256, WorkloadSpec(working_set_mib=128))
    with TestBed(("a", "b"), wan=WanSpec.from_rtt(rtt_ms=20, rate_mbit=20)) as bed:
        with pytest.raises(MigrationError, match="did not complete"):
            plain_migration(bed, setup, link="wan", timeout_s=2)
        assert qemus_of(bed) == []
