"""Multifd migrations through the agents: every channel is carried and delivered to the
destination QEMU in its order of arrival (QEMU 7.2 tells the main channel by that order;
QEMU 8+ by its magic), and the destination's RAM is identical at switchover."""

from __future__ import annotations

import time

import pytest

from dwcp_migrate.testbed.agents import TestAgent
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.build import BuildProducts
from dwcp_migrate.testbed.guests import WorkloadSpec
from dwcp_migrate.testbed.qemu import QemuBinary
from dwcp_migrate.testbed.scenario import GuestSetup, agent_migration
from dwcp_migrate.testbed.wan import WanSpec

pytestmark = [pytest.mark.guest, pytest.mark.netns]


# QEMU 7.2 does not reproduce guest RAM in multi-iteration TCG migrations on these machines
# (docs/TESTBED.md), so its guest does not dirty memory: the channel order is what is tested.
@pytest.mark.parametrize("qemu,dirty", [("10", 8.0), ("7.2", 0.0)])
def test_multifd_channels_through_agents(products: BuildProducts, leak_check: None,
                                         qemu: str, dirty: float) -> None:
    binary = QemuBinary.qemu72() if qemu == "7.2" else None
    setup = GuestSetup("baremetal", 512, WorkloadSpec(working_set_mib=256,
                                                      dirty_mib_per_s=dirty), binary=binary)
    with TestBed(("a", "b"), wan=WanSpec.from_rtt(rtt_ms=20, rate_mbit=500)) as bed:
        agents = {h: TestAgent(bed, h) for h in ("a", "b")}
        for agent in agents.values():
            agent.start()
        result = agent_migration(bed, setup, str(agents["a"].outgoing_socket("b")),
                                 str(agents["b"].outgoing_socket("b")),
                                 capabilities={"multifd": True},
                                 parameters={"multifd-channels": 4}, timeout_s=120)
        assert result.ram_identical, result.ram_detail
        assert result.guest_verified, result.verify_detail
        deadline = time.monotonic() + 20
        while True:
            status = agents["a"].client().call("status")
            if status["recent"] and not status["active"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        record = status["recent"][-1]
        assert record["result"] == "completed", record
        assert len(record["channels"]) == 5  # main + 4 multifd channels
        assert all(c["bytes_from_qemu"] > 0 for c in record["channels"])
        # The page cache is sized from the guest's RAM (MEM_SIZE): 512 MiB and its ROMs, not
        # the configured limit (1024 MiB); the multifd channels take it from the main one.
        main_cache = record["codec"]["0"]["cache_bytes"]
        assert 512 << 20 <= main_cache < 520 << 20, record["codec"]["0"]
        dst = agents["b"].client().call("status")["recent"][-1]
        by_index = {c["index"]: c for c in dst["channels"]}
        for channel in record["channels"]:
            assert by_index[channel["index"]]["bytes_to_qemu"] == channel["bytes_from_qemu"]
