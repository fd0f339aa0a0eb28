"""``dwcp demo`` and ``dwcp testbed ...``: the local two-host test bed from the command line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import click

from dwcp_migrate.testbed.procs import reap_stale_beds


def _require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the test bed creates network namespaces: run as root")


@click.command()
@click.option("--guest", type=click.Choice(["baremetal", "linux"]), default="baremetal",
              show_default=True, help="Test guest: bare-metal program or Linux + workload.")
@click.option("--memory", "memory_mib", type=click.IntRange(64, 8192), default=1024,
              show_default=True, help="Guest RAM in MiB.")
@click.option("--working-set", "working_set_mib", type=click.IntRange(1, 8192), default=512,
              show_default=True, help="MiB the guest fills and keeps verifying.")
@click.option("--dirty", "dirty_mib_per_s", type=click.FloatRange(0), default=8,
              show_default=True, help="MiB/s the guest keeps dirtying.")
@click.option("--rtt", "rtt_ms", type=click.FloatRange(0), default=50, show_default=True,
              help="Round-trip time of the emulated WAN, ms.")
@click.option("--rate", "rate_mbit", type=click.FloatRange(1), default=1000, show_default=True,
              help="Rate of the emulated WAN, Mbit/s.")
@click.option("--loss", type=click.FloatRange(0, 0.5), default=0.0, show_default=True,
              help="Random loss per direction, fraction (0.001 = 0.1%).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(10), default=300,
              show_default=True, help="Give up on a migration after this many seconds.")
def demo(guest: str, memory_mib: int, working_set_mib: int, dirty_mib_per_s: float,
         rtt_ms: float, rate_mbit: float, loss: float, timeout_s: float) -> None:
    """Live-migrate the test guest between two local test hosts over an emulated WAN.

    Builds a two-host bed (network namespaces joined by a userspace WAN emulator), boots the
    test guest on host a, migrates it to host b, compares the RAM of both at switchover byte
    for byte, lets the destination run and waits for the guest's own verification.

    The dwcp agent is not built yet: this runs plain QEMU migration only, and says so.
    """
    _require_root()
    # Imported here so that `dwcp --help` stays fast and works without the test bed's needs.
    from dwcp_migrate.testbed.bed import TestBed
    from dwcp_migrate.testbed.guests import WorkloadSpec
    from dwcp_migrate.testbed.netns import TcpSettings
    from dwcp_migrate.testbed.scenario import GuestSetup, format_results, plain_migration
    from dwcp_migrate.testbed.wan import WanSpec

    setup = GuestSetup(
        kind="linux" if guest == "linux" else "baremetal",
        memory_mib=memory_mib,
        workload=WorkloadSpec(working_set_mib=working_set_mib, dirty_mib_per_s=dirty_mib_per_s),
    )
    wan = WanSpec.from_rtt(rtt_ms=rtt_ms, rate_mbit=rate_mbit, loss=loss)
    click.echo("note: the dwcp agent does not exist yet; this demo runs plain QEMU migration "
               "(direct, one TCP stream) so you can see the baseline dwcp will be measured "
               "against.")
    click.echo(f"bed: hosts a and b, WAN {rtt_ms:g} ms RTT, {rate_mbit:g} Mbit/s, loss "
               f"{loss:.3%}, stock TCP (cubic, 4 MiB buffers); guest {guest}, "
               f"{memory_mib} MiB RAM, {working_set_mib} MiB working set dirtying "
               f"{dirty_mib_per_s:g} MiB/s")

    tty = sys.stdout.isatty()
    last_print = [0.0]

    def progress(info: Mapping[str, Any]) -> None:
        # On a terminal, one line updated in place; in a log, one line a second.
        now = time.monotonic()
        if not tty and now - last_print[0] < 1.0 and info.get("status") == "active":
            return
        last_print[0] = now
        ram = info.get("ram", {})
        sent = ram.get("transferred", 0) / 2**20
        line = (f"  {info.get('status', '?'):>10}  sent {sent:8.1f} MiB  remaining "
                f"{ram.get('remaining', 0) / 2**20:7.1f} MiB  iteration "
                f"{ram.get('dirty-sync-count', 0):3}")
        click.echo(f"\r{line}" if tty else line, nl=not tty)

    with TestBed(("a", "b"), wan=wan, tcp=TcpSettings.stock()) as bed:
        click.echo("booting the guest on host a and filling its working set...")
        result = plain_migration(bed, setup, link="wan", timeout_s=timeout_s,
                                 label="plain QEMU, direct", on_progress=progress)
        if tty:
            click.echo("")
    click.echo(format_results([result]))
    click.echo(f"RAM at switchover: {result.ram_detail}")
    click.echo(f"guest on host b: {result.verify_detail}")
    if not result.ok:
        raise click.ClickException("the migrated guest did not verify (see above)")


@click.group()
def testbed() -> None:
    """Build and clean up the local test bed (hosts as network namespaces)."""


@testbed.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if up to date.")
def testbed_build(force: bool) -> None:
    """Compile the test guests and the WAN emulator (setup.sh does this)."""
    from dwcp_migrate.testbed.build import build_all

    products = build_all(force=force)
    click.echo(f"guests: {products.guests}\nwanlink: {products.wanlink}")


@testbed.command("cleanup")
def testbed_cleanup() -> None:
    """End what interrupted test runs left behind: processes, namespaces, mounts."""
    _require_root()
    reaped = reap_stale_beds()
    click.echo(f"cleaned up {len(reaped)} test bed(s)" + (f": {', '.join(reaped)}" if reaped
                                                            else ""))
