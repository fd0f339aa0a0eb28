"""Benchmark of the emulated WAN link: can it carry what the project's benchmarks ask of it?

Run as root from the repository, after scripts/setup.sh:

    .venv/bin/python bench/bench_wan.py                # print the table
    .venv/bin/python bench/bench_wan.py --write-doc    # also rewrite its docs/BENCHMARKS.md part

On a 50 ms RTT, 1 Gbit/s WAN (MTU 1500 unless --mtu), without loss and with 0.1 % loss per
direction, it measures idle ping RTT and iperf3 goodput for 8 and 1 TCP streams, cubic and bbr.
Both hosts get TCP buffers sized for the link (WanSpec.tcp_settings: 32 MiB here), since the
stock 4 MiB send buffer caps one stream at about half of 1 Gbit/s at 50 ms. Every run also
reports the forwarder's CPU use and how busy the whole machine was, to spot a CPU-starved run
(the machine has two cores, possibly shared with a QEMU guest). Takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dwcp_migrate.errors import DwcpError
from dwcp_migrate.paths import REPO_ROOT
from dwcp_migrate.testbed.benchdoc import write_section
from dwcp_migrate.testbed.netns import Network
from dwcp_migrate.testbed.procs import Reaper
from dwcp_migrate.testbed.wan import (
    WanCounters,
    WanLink,
    WanSpec,
    measure_rtt_ms,
    run_iperf3,
)

DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"
CASES = [(8, "cubic"), (8, "bbr"), (1, "cubic"), (1, "bbr")]


@dataclass(frozen=True)
class Row:
    setting: str
    streams: int
    cc: str
    mbit_s: float
    rate_mbit: float
    retransmits: int
    queue_drops: int
    forwarder_cpu: float  # percent of one core
    forwarder_user: float  # the part of it spent in the forwarder's own code
    machine_busy: float  # percent of all cores


def _cpu_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _queue_drops(before: WanCounters, after: WanCounters) -> int:
    return after.ab.drop_queue - before.ab.drop_queue


def run(seconds: int, omit_s: int, mtu: int, rtt_ms: float, rate_mbit: float) -> tuple[
        list[Row], list[str]]:
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
    if "cubic" not in allowed or "bbr" not in allowed:
        raise DwcpError(f"namespaces may only use {allowed}: run scripts/setup.sh (it allows "
                        f"reno, cubic and bbr)")
    bed_id = uuid.uuid4().hex[:6]
    reaper = Reaper(f"bench-wan-{bed_id}")
    rows: list[Row] = []
    notes: list[str] = []
    try:
        net = Network(reaper, f"dwb{bed_id}")
        a, b = net.add_host("a"), net.add_host("b")
        base = WanSpec.from_rtt(rtt_ms, rate_mbit, mtu=mtu)
        tcp = base.tcp_settings()
        for host in (a, b):
            host.apply_tcp(tcp)
        assert tcp.tcp_wmem is not None
        notes.append(f"TCP buffers on both hosts: tcp_rmem/tcp_wmem max "
                     f"{tcp.tcp_wmem[2] // 2**20} MiB; drop-tail queue "
                     f"{base.queue_limit_bytes / 1e6:.2f} MB (one BDP)")
        link = WanLink(reaper, a, b, base)
        for loss in (0.0, 0.001):
            spec = WanSpec.from_rtt(rtt_ms, rate_mbit, loss=loss, mtu=mtu)
            link.set_spec(spec)
            setting = (f"{rtt_ms:g} ms RTT, {rate_mbit:g} Mbit/s, MTU {mtu}"
                       + (f", {loss:.1%} loss" if loss else ""))
            if loss == 0:
                rtt = measure_rtt_ms(a, link.peer_address(a), count=20, interval_s=0.05)
                notes.append(f"idle ping RTT: {rtt:.2f} ms for {rtt_ms:g} ms set "
                             f"({(rtt - rtt_ms) / rtt_ms:+.1%})")
            for streams, cc in CASES:
                before, (user0, sys0) = link.counters(), link.cpu_times()
                busy0, total0 = _cpu_busy_ticks()
                wall0 = time.monotonic()
                res = run_iperf3(reaper, a, b, streams=streams, seconds=seconds,
                                 omit_s=omit_s, congestion_control=cc)
                wall = time.monotonic() - wall0
                busy1, total1 = _cpu_busy_ticks()
                after, (user1, sys1) = link.counters(), link.cpu_times()
                row = Row(setting, streams, cc, res.mbit_s, rate_mbit, res.retransmits,
                          _queue_drops(before, after),
                          100 * (user1 - user0 + sys1 - sys0) / wall, 100 * (user1 - user0) / wall,
                          100 * (busy1 - busy0) / max(1, total1 - total0))
                rows.append(row)
                print(f"  {setting}: {streams} x {cc}: {row.mbit_s:.0f} Mbit/s "
                      f"(forwarder {row.forwarder_cpu:.0f} % of a core, machine "
                      f"{row.machine_busy:.0f} % busy)", file=sys.stderr, flush=True)
        first = rows[0]
        notes.append(f"forwarder CPU in the first run ({first.streams} x {first.cc}): "
                     f"{first.forwarder_cpu:.0f} % of a core, of which {first.forwarder_user:.0f} "
                     "% in its own code; the rest is system time: writing a packet into a TUN "
                     "device runs the receiving namespace's stack (TCP receive and copy, the "
                     "sender's ACK processing and next transmissions) in the writing thread")
    finally:
        problems = reaper.teardown()
        if problems:
            print(f"teardown problems: {problems}", file=sys.stderr)
    return rows, notes


def table(rows: list[Row]) -> str:
    lines = ["| setting | streams | cc | goodput Mbit/s | % of link rate | retransmits "
             "| queue drops | forwarder CPU (% of a core) | machine CPU busy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.setting} | {r.streams} | {r.cc} | {r.mbit_s:.0f} | "
              f"{100 * r.mbit_s / r.rate_mbit:.1f} % | {r.retransmits} | {r.queue_drops} | "
              f"{r.forwarder_cpu:.0f} % | {r.machine_busy:.0f} % |" for r in rows]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_section("bench_wan", section, DOC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="measured seconds per run")
    parser.add_argument("--omit", type=int, default=2,
                        help="seconds of slow start left out of each run")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--rtt-ms", type=float, default=50)
    parser.add_argument("--rate-mbit", type=float, default=1000)
    parser.add_argument("--write-doc", action="store_true",
                        help=f"rewrite the bench_wan section of {DOC.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_wan needs root (network namespaces)", file=sys.stderr)
        return 1
    load = os.getloadavg()
    try:
        rows, notes = run(args.seconds, args.omit, args.mtu, args.rtt_ms, args.rate_mbit)
    except DwcpError as exc:
        print(f"bench_wan failed: {exc}", file=sys.stderr)
        return 1
    command = ".venv/bin/python bench/bench_wan.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    section = "\n".join([
        "## Emulated WAN link (bench/bench_wan.py)",
        "",
        f"Command (as root): `{command.strip()}`  ",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: kernel "
        f"{platform.release()}, {os.cpu_count()} CPUs, load average before the run "
        f"{load[0]:.2f}. iperf3 runs of {args.seconds:g} s after {args.omit:g} s of warm-up; "
        "goodput is what the receiver got. The forwarder is `wanlink` "
        "(dwcp_migrate/testbed/csrc/wanlink.c), one thread per direction, plain read/write on "
        "the TUN devices, no offloads, no jumbo frames. \"machine CPU busy\" is all CPU use on "
        "the machine during the run (both cores), unrelated work included: another test's "
        "QEMU guest may run at the same time.",
        "",
        *(f"- {n}" for n in notes),
        "",
        table(rows),
    ])
    print(section)
    if args.write_doc:
        write_doc(section)
        print(f"\nwrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
