"""Two libvirt hosts on one machine: ``virsh migrate --live --p2p`` moves the test guest
from host a to host b, and the guest keeps verifying its memory on b."""

from __future__ import annotations

from pathlib import Path

import pytest

from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.build import BuildProducts
from dwcp_migrate.testbed.guests import SerialLog, WorkloadSpec, guest_boot_args
from dwcp_migrate.testbed.libvirt_host import domain_xml

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.libvirt]


def _boot_parts(args: list[str]) -> tuple[str, str | None, str]:
    """kernel, initrd, cmdline out of the QEMU boot arguments of a test guest."""
    values = dict(zip(args[::2], args[1::2], strict=True))
    return values["-kernel"], values.get("-initrd"), values.get("-append", "")


def test_virsh_p2p_migration(products: BuildProducts, leak_check: None) -> None:
    spec = WorkloadSpec(working_set_mib=128, dirty_mib_per_s=8)
    kernel, initrd, cmdline = _boot_parts(guest_boot_args("baremetal", products.guests, spec))
    serial = "/var/log/libvirt/qemu/dwcp-guest.serial"
    xml = domain_xml("dwcp-guest", memory_mib=256, kernel=Path(kernel),
                     initrd=Path(initrd) if initrd else None, cmdline=cmdline, serial_log=serial)
    with TestBed(("a", "b"), libvirt=True) as bed:
        a, b = bed.libvirt["a"], bed.libvirt["b"]
        xml_path = bed.workdir / "dwcp-guest.xml"
        xml_path.write_text(xml)
        a.virsh("create", str(xml_path))
        SerialLog(a.private(serial)).wait_for_fill(timeout=120)
        SerialLog(a.private(serial)).wait_for_passes(1, timeout=120)

        dst = bed.address("b", "lan")
        a.virsh("migrate", "--live", "--p2p", "--verbose", "dwcp-guest", b.uri,
                "--migrateuri", f"tcp://{dst}:49152", timeout=300)

        assert "dwcp-guest" not in a.virsh("list", "--name").stdout.split()
        assert b.virsh("domstate", "dwcp-guest").stdout.strip() == "running"
        log_b = SerialLog(b.private(serial))
        log_b.wait_for_passes(2, timeout=120)
        assert not log_b.corruptions, log_b.corruptions
        b.virsh("destroy", "dwcp-guest")
