"""libvirt migrations through the agents on the two-host libvirt test bed.

`virsh migrate --live --p2p DOM qemu+tcp://DST/system --migrateuri unix:///run/dwcp/to/DST.sock`
works unchanged; `dwcp migrate DOM --to DST` does the same with progress and a summary; the
hook refuses an incoming migration when the destination's agent is down, and the guest keeps
running (and verifying) on the source.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp_migrate.testbed.agents import TestAgent
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.build import BuildProducts
from dwcp_migrate.testbed.guests import SerialLog, WorkloadSpec, guest_boot_args
from dwcp_migrate.testbed.libvirt_host import LibvirtHost, domain_xml
from dwcp_migrate.testbed.netns import TcpSettings
from dwcp_migrate.testbed.wan import WanSpec

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.libvirt]

DOMAIN = "dwcp-guest"
SERIAL = f"/var/log/libvirt/qemu/{DOMAIN}.serial"
DWCP = [sys.executable, "-m", "dwcp_migrate.cli"]


class Bed:
    def __init__(self, bed: TestBed, agents: dict[str, TestAgent]) -> None:
        self.bed = bed
        self.agents = agents
        self.a: LibvirtHost = bed.libvirt["a"]
        self.b: LibvirtHost = bed.libvirt["b"]

    def start_guest(self, products: BuildProducts) -> None:
        spec = WorkloadSpec(working_set_mib=128, dirty_mib_per_s=8)
        args = dict(zip(*[iter(guest_boot_args("baremetal", products.guests, spec))] * 2,
                        strict=True))
        xml = domain_xml(DOMAIN, memory_mib=256, kernel=Path(args["-kernel"]), initrd=None,
                         cmdline=args.get("-append", ""), serial_log=SERIAL)
        path = self.bed.workdir / f"{DOMAIN}.xml"
        path.write_text(xml)
        self.a.virsh("create", str(path))
        log = SerialLog(self.a.private(SERIAL))
        log.wait_for_fill(timeout=120)
        log.wait_for_passes(1, timeout=120)

    def assert_verifies_on(self, lv: LibvirtHost, passes: int = 2) -> None:
        assert lv.virsh("domstate", DOMAIN).stdout.strip() == "running"
        log = SerialLog(lv.private(SERIAL))
        log.refresh()
        log.wait_for_passes(log.verify_passes + passes, timeout=120)
        assert not log.corruptions, log.corruptions


@pytest.fixture
def libvirt_bed(products: BuildProducts, leak_check: None) -> Iterator[Bed]:
    wan = WanSpec.from_rtt(rtt_ms=20, rate_mbit=500)
    with TestBed(("a", "b"), wan=wan, libvirt=True, start_libvirtd=False,
                 tcp=TcpSettings.stock()) as bed:
        agents = {h: TestAgent(bed, h) for h in ("a", "b")}  # WAN: the encoded data path
        for name, agent in agents.items():
            agent.write_config()
            lv = bed.libvirt[name]
            lv.run([*DWCP, "hooks", "install", "--config", str(agent.config_path)])
            lv.start_libvirtd()
            agent.start()
        yield Bed(bed, agents)


def test_virsh_migrate_through_agents(libvirt_bed: Bed, products: BuildProducts) -> None:
    t = libvirt_bed
    t.start_guest(products)
    res = t.a.virsh("migrate", "--live", "--p2p", DOMAIN, t.b.uri,
                    "--migrateuri", "unix:///run/dwcp/to/b.sock", check=False, timeout=300)
    assert res.returncode == 0, res.stderr + t.agents["a"].log_tail() + t.agents["b"].log_tail()
    assert DOMAIN not in t.a.virsh("list", "--name").stdout.split()
    t.assert_verifies_on(t.b)
    recent_a = t.agents["a"].client().call("status")["recent"]
    recent_b = t.agents["b"].client().call("status")["recent"]
    assert recent_a[-1]["result"] == "completed" and recent_a[-1]["bytes_from_qemu"] > 0
    assert recent_b[-1]["result"] == "completed"
    assert recent_b[-1]["bytes_to_qemu"] == recent_a[-1]["bytes_from_qemu"]


def test_dwcp_migrate_command(libvirt_bed: Bed, products: BuildProducts) -> None:
    t = libvirt_bed
    t.start_guest(products)
    res = t.a.run([*DWCP, "migrate", DOMAIN, "--to", "b", "--config",
                   str(t.agents["a"].config_path)], check=False, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr + t.agents["a"].log_tail()
    assert f"migrated {DOMAIN} to b" in res.stdout
    assert "on the wire" in res.stdout
    t.assert_verifies_on(t.b)
    status = t.a.run([*DWCP, "status", "--config", str(t.agents["a"].config_path)]).stdout
    assert "completed" in status


def test_unknown_domain_is_a_clear_error(libvirt_bed: Bed) -> None:
    t = libvirt_bed
    res = t.a.run([*DWCP, "migrate", "no-such-vm", "--to", "b", "--config",
                   str(t.agents["a"].config_path)], check=False)
    assert res.returncode != 0
    assert "no domain 'no-such-vm'" in res.stderr
    assert "Traceback" not in res.stderr
    res = t.a.run([*DWCP, "migrate", DOMAIN, "--to", "zz", "--config",
                   str(t.agents["a"].config_path)], check=False)
    assert res.returncode != 0 and "not a peer" in res.stderr


def test_hook_refuses_when_destination_agent_is_down(libvirt_bed: Bed,
                                                      products: BuildProducts) -> None:
    t = libvirt_bed
    t.start_guest(products)
    t.agents["b"].stop()
    res = t.a.virsh("migrate", "--live", "--p2p", DOMAIN, t.b.uri,
                    "--migrateuri", "unix:///run/dwcp/to/b.sock", check=False, timeout=300)
    assert res.returncode != 0
    assert "dwcp agent on this host does not answer" in res.stderr, res.stderr
    t.assert_verifies_on(t.a)
