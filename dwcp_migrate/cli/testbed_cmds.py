"""``dwcp demo`` and ``dwcp testbed ...``: the local two-host test bed from the command line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import click

from dwcp_migrate.testbed.procs import reap_stale_beds


def _require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the test bed creates network namespaces: run as root")


PLAIN_CHOICES = {"direct": "PLAIN_DIRECT", "multifd": "PLAIN_MULTIFD", "xbzrle": "PLAIN_XBZRLE"}


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
@click.option("--plain", "plain", default="direct,multifd", show_default=True,
              help="Plain QEMU configurations to compare with, comma-separated: "
                   "direct, multifd (4 channels + zstd), xbzrle; 'none' for dwcp only.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(10), default=180,
              show_default=True, help="Give up on a migration after this many seconds.")
def demo(guest: str, memory_mib: int, working_set_mib: int, dirty_mib_per_s: float,
         rtt_ms: float, rate_mbit: float, loss: float, plain: str, timeout_s: float) -> None:
    """Live-migrate the test guest between two local test hosts, plain QEMU against dwcp.

    Builds a two-host bed (network namespaces joined by a userspace WAN emulator, stock TCP
    settings), then for each plain QEMU configuration and for dwcp: boots the test guest on
    host a, migrates it to host b, compares both guests' RAM byte for byte at switchover, lets
    the destination run and waits for the guest's own memory verification. dwcp runs plain
    QEMU on both hosts with the stream carried by the two agents (unix sockets, mutual TLS).
    """
    _require_root()
    # Imported here so that `dwcp --help` stays fast and works without the test bed's needs.
    from dwcp_migrate.testbed import compare
    from dwcp_migrate.testbed.guests import WorkloadSpec
    from dwcp_migrate.testbed.scenario import GuestSetup
    from dwcp_migrate.testbed.wan import WanSpec

    names = [n.strip() for n in plain.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in PLAIN_CHOICES]
    if unknown:
        raise click.BadParameter(f"unknown plain configuration {unknown[0]!r} (choose from "
                                 f"{', '.join(PLAIN_CHOICES)}, none)", param_hint="--plain")
    configs = [getattr(compare, PLAIN_CHOICES[n]) for n in names]
    setup = GuestSetup(
        kind="linux" if guest == "linux" else "baremetal",
        memory_mib=memory_mib,
        workload=WorkloadSpec(working_set_mib=working_set_mib, dirty_mib_per_s=dirty_mib_per_s),
    )
    wan = WanSpec.from_rtt(rtt_ms=rtt_ms, rate_mbit=rate_mbit, loss=loss)
    click.echo(f"bed: hosts a and b, WAN {rtt_ms:g} ms RTT, {rate_mbit:g} Mbit/s, loss "
               f"{loss:.3%}, stock TCP (cubic, 4 MiB buffers); guest {guest}, "
               f"{memory_mib} MiB RAM, {working_set_mib} MiB working set dirtying "
               f"{dirty_mib_per_s:g} MiB/s")
    tty = sys.stdout.isatty()

    def progress(label: str) -> Callable[[Mapping[str, Any]], None]:
        last_print = [0.0]

        def show(info: Mapping[str, Any]) -> None:
            # On a terminal, one line updated in place; in a log, one line a second.
            now = time.monotonic()
            if not tty and now - last_print[0] < 1.0 and info.get("status") == "active":
                return
            last_print[0] = now
            ram = info.get("ram", {})
            sent = ram.get("transferred", 0) / 2**20
            line = (f"  {label}: {info.get('status', '?'):>10}  QEMU sent {sent:8.1f} MiB  "
                    f"remaining {ram.get('remaining', 0) / 2**20:7.1f} MiB  iteration "
                    f"{ram.get('dirty-sync-count', 0):3}")
            click.echo(f"\r{line}" if tty else line, nl=not tty)
            if tty and info.get("status") in ("completed", "failed"):
                click.echo("")
        return show

    rows = compare.run_comparison("wan", wan, setup, configs, timeout_s=timeout_s,
                                  say=click.echo, progress=progress)
    click.echo("")
    click.echo(compare.format_rows(rows))
    for line in compare.summarize(rows, timeout_s):
        click.echo(line)
    bad = [r for r in rows if r.status == "completed" and not r.ok]
    if bad or not any(r.label == "dwcp" and r.ok for r in rows):
        raise click.ClickException("dwcp did not complete with identical RAM and a verified "
                                   "guest (see the table)")


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
