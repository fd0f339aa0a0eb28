"""A LAN migration through the agents: the path is detected as a datacenter one, so the data
passes through unencoded over the mode's connections (2, CUBIC) instead of the 8 BBR ones
opened on first contact; the destination's RAM is identical at switchover."""

from __future__ import annotations

import time

import pytest

from dwcp_migrate.testbed.agents import TestAgent
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.build import BuildProducts
from dwcp_migrate.testbed.guests import WorkloadSpec
from dwcp_migrate.testbed.scenario import GuestSetup, agent_migration

pytestmark = [pytest.mark.guest, pytest.mark.netns]


def test_lan_migration_passes_through_on_the_datacenter_settings(
        products: BuildProducts, leak_check: None) -> None:
    setup = GuestSetup("baremetal", 256, WorkloadSpec(working_set_mib=128, dirty_mib_per_s=4))
    with TestBed(("a", "b")) as bed:
        agents = {h: TestAgent(bed, h, link="lan") for h in ("a", "b")}
        for agent in agents.values():
            agent.start()
        result = agent_migration(bed, setup, str(agents["a"].outgoing_socket("b")),
                                 str(agents["b"].outgoing_socket("b")), timeout_s=120,
                                 parameters={"max-bandwidth": 1 << 40})
        assert result.ram_identical, result.ram_detail
        assert result.guest_verified, result.verify_detail
        deadline = time.monotonic() + 20
        while not (status := agents["a"].client().call("status"))["recent"] or \
                status["active"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        record = status["recent"][-1]
        assert record["result"] == "completed", record
        assert record["mode"] == "passthrough", record
        transport = record["transport"]["0"]
        assert transport["congestion_control"] == "cubic", transport
        assert transport["connections_opened"] == 8, transport  # first contact: the most
        # then the mode's count; goodput adaptation may probe upwards from there
        assert "datacenter path: 2 connections, adapting within 1..8, cubic" in \
            agents["a"].log_tail(20000)
        assert 1 <= transport["connections_at_end"] <= 8, transport


@pytest.mark.parametrize("destination_allows", [True, False])
def test_direct_lane(products: BuildProducts, leak_check: None,
                     destination_allows: bool) -> None:
    """transport.direct_lane on both agents: the passthrough bytes go over one spliced plain
    TCP connection; with the destination's off, over the session as usual."""
    setup = GuestSetup("baremetal", 256, WorkloadSpec(working_set_mib=128, dirty_mib_per_s=4))
    with TestBed(("a", "b")) as bed:
        agents = {h: TestAgent(bed, h, link="lan", settings={"transport": {
            "direct_lane": h == "a" or destination_allows}}) for h in ("a", "b")}
        for agent in agents.values():
            agent.start()
        result = agent_migration(bed, setup, str(agents["a"].outgoing_socket("b")),
                                 str(agents["b"].outgoing_socket("b")), timeout_s=120,
                                 parameters={"max-bandwidth": 1 << 40})
        assert result.ram_identical, result.ram_detail
        assert result.guest_verified, result.verify_detail
        deadline = time.monotonic() + 20
        while not (status := agents["a"].client().call("status"))["recent"] or \
                status["active"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        record = status["recent"][-1]
        assert record["result"] == "completed", record
        (channel,) = record["channels"]
        assert channel["bytes_from_qemu"] > 64 << 20, channel
        if destination_allows:
            assert record["transport"]["0"] == {"lane": "direct"}, record
            assert "direct lane to b" in agents["a"].log_tail(20000)
        else:
            assert "congestion_control" in record["transport"]["0"], record
            assert "offers no direct lane" in agents["a"].log_tail(20000)
        dst = agents["b"].client().call("status")["recent"][-1]
        assert dst["result"] == "completed", dst
        assert dst["channels"][0]["bytes_to_qemu"] == channel["bytes_from_qemu"]
