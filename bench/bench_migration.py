"""Plain QEMU against dwcp, live migrations of the same guest measured in the same run.

Usage (as root, after scripts/setup.sh):

    .venv/bin/python bench/bench_migration.py [--write-doc] [--links lan,wan,wanloss]
        [--memory 1024] [--working-set 512] [--dirty 8] [--plain-timeout 120]

For each link (LAN; WAN 50 ms RTT, 1 Gbit/s; the same WAN with 0.1% loss) a two-host bed
with stock host TCP settings (cubic, 4 MiB send buffer) is built, and the bare-metal test
guest (1 GiB RAM, 512 MiB working set dirtying 8 MiB/s) is migrated by:
- plain QEMU direct (one TCP connection),
- plain QEMU multifd (4 channels) + zstd,
- plain QEMU xbzrle,
- dwcp: plain QEMU on both hosts, the stream carried by the agents (unix sockets).
Bytes on the wire are counted by the WAN emulator (both directions, IP packets), so every
row is measured the same way; on the LAN, QEMU's own ram.transferred (plain) and the agents'
wire bytes (dwcp) are reported. Agent CPU is user+system seconds of both agent processes.
Every run checks RAM identity at switchover and the guest's verification afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dwcp_migrate.errors import MigrationError  # noqa: E402
from dwcp_migrate.testbed.agents import TestAgent  # noqa: E402
from dwcp_migrate.testbed.bed import TestBed  # noqa: E402
from dwcp_migrate.testbed.guests import WorkloadSpec  # noqa: E402
from dwcp_migrate.testbed.netns import TcpSettings  # noqa: E402
from dwcp_migrate.testbed.scenario import (  # noqa: E402
    GuestSetup,
    ScenarioResult,
    agent_migration,
    plain_migration,
)
from dwcp_migrate.testbed.wan import WanSpec  # noqa: E402

DOC = REPO / "docs" / "BENCHMARKS.md"
START, END = "<!-- bench_migration:start -->", "<!-- bench_migration:end -->"

PLAIN_CONFIGS: list[tuple[str, dict[str, bool], dict[str, Any]]] = [
    ("plain QEMU direct", {}, {}),
    ("plain QEMU multifd 4 + zstd", {"multifd": True},
     {"multifd-channels": 4, "multifd-compression": "zstd"}),
    ("plain QEMU xbzrle", {"xbzrle": True}, {}),
]


@dataclass
class Row:
    link: str
    label: str
    status: str  # completed | failed | timeout
    total_s: float | None
    downtime_ms: int | None
    wire_bytes: int | None
    iterations: int | None
    agent_cpu_s: float | None
    ram_identical: bool | None
    verified: bool | None
    note: str = ""


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wire_counter(bed: TestBed) -> int | None:
    if bed.wan is None:
        return None
    c = bed.wan.counters()
    return c.ab.fwd_bytes + c.ba.fwd_bytes


def row_from(link: str, result: ScenarioResult, wire: int | None, cpu: float | None,
             note: str = "") -> Row:
    o = result.outcome
    return Row(link, result.label, o.status, (o.total_time_ms or 0) / 1000, o.downtime_ms,
               wire if wire is not None else o.transferred_bytes, o.iterations, cpu,
               result.ram_identical, result.guest_verified, note)


def run_link(link: str, setup: GuestSetup, plain_timeout: float) -> list[Row]:
    wan = {"lan": None, "wan": WanSpec.from_rtt(rtt_ms=50, rate_mbit=1000),
           "wanloss": WanSpec.from_rtt(rtt_ms=50, rate_mbit=1000, loss=0.001)}[link]
    route = "lan" if wan is None else "wan"
    rows: list[Row] = []
    with TestBed(("a", "b"), wan=wan, tcp=TcpSettings.stock()) as bed:
        for label, caps, params in PLAIN_CONFIGS:
            before = wire_counter(bed)
            print(f"[{link}] {label} ...", flush=True)
            try:
                result = plain_migration(bed, setup, link=route, capabilities=caps,
                                         parameters=params, timeout_s=plain_timeout,
                                         label=label)
            except MigrationError as exc:
                rows.append(Row(link, label, "timeout" if "did not complete" in str(exc)
                                else "failed", None, None, None, None, None, None, None,
                                str(exc)[:160]))
                print(f"    {rows[-1].status}: {exc}", flush=True)
                continue
            after = wire_counter(bed)
            wire = after - before if after is not None and before is not None else None
            rows.append(row_from(link, result, wire, None))
            print(f"    {rows[-1]}", flush=True)
        agents = {h: TestAgent(bed, h, link=route) for h in ("a", "b")}
        for agent in agents.values():
            agent.start()
        cpu0 = sum(proc_cpu_seconds(a.process.pid) for a in agents.values())
        before = wire_counter(bed)
        print(f"[{link}] dwcp ...", flush=True)
        try:
            result = agent_migration(bed, setup, str(agents["a"].outgoing_socket("b")),
                                     str(agents["b"].outgoing_socket("b")),
                                     timeout_s=plain_timeout, label="dwcp")
        except MigrationError as exc:
            rows.append(Row(link, "dwcp", "failed", None, None, None, None, None, None, None,
                            str(exc)[:160]))
            print(agents["a"].log_tail(), agents["b"].log_tail())
            return rows
        time.sleep(0.5)
        cpu = sum(proc_cpu_seconds(a.process.pid) for a in agents.values()) - cpu0
        after = wire_counter(bed)
        recent = agents["a"].client().call("status")["recent"]
        mode = recent[-1].get("mode") if recent else "?"
        wire = after - before if after is not None and before is not None else \
            (recent[-1].get("wire_bytes") if recent else None)
        rows.append(row_from(link, result, wire, cpu, f"data path: {mode}"))
        print(f"    {rows[-1]}", flush=True)
    return rows


def fmt(rows: list[Row]) -> str:
    out = ["| link | run | result | total time | downtime | bytes on the wire | iterations "
           "| agent CPU | RAM identical | guest verified | note |",
           "|---|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        def yn(v: bool | None) -> str:
            return "-" if v is None else ("yes" if v else "NO")
        out.append(
            f"| {r.link} | {r.label} | {r.status} | "
            f"{f'{r.total_s:.2f} s' if r.total_s is not None else '-'} | "
            f"{f'{r.downtime_ms} ms' if r.downtime_ms is not None else '-'} | "
            f"{f'{r.wire_bytes / 1e6:.0f} MB' if r.wire_bytes else '-'} | "
            f"{r.iterations if r.iterations is not None else '-'} | "
            f"{f'{r.agent_cpu_s:.1f} s' if r.agent_cpu_s is not None else '-'} | "
            f"{yn(r.ram_identical)} | {yn(r.verified)} | {r.note} |")
    return "\n".join(out)


def ratios(rows: list[Row], plain_timeout: float) -> list[str]:
    lines = []
    for link in dict.fromkeys(r.link for r in rows):
        mine = [r for r in rows if r.link == link]
        dwcp = next((r for r in mine if r.label == "dwcp" and r.total_s), None)
        plain = [r for r in mine if r.label != "dwcp"]
        done = [r for r in plain if r.status == "completed" and r.total_s]
        direct = next((r for r in plain if r.label == "plain QEMU direct"), None)
        if dwcp is None or dwcp.total_s is None:
            lines.append(f"- {link}: dwcp did not complete")
            continue
        if done:
            best = min(done, key=lambda r: r.total_s or 0)
            assert best.total_s is not None
            lines.append(f"- {link}: dwcp total time = {dwcp.total_s / best.total_s:.2f}x the "
                         f"best plain QEMU configuration ({best.label}, {best.total_s:.2f} s)")
        else:
            lines.append(f"- {link}: no plain QEMU configuration completed within "
                         f"{plain_timeout:.0f} s; dwcp took {dwcp.total_s:.2f} s, i.e. < "
                         f"{dwcp.total_s / plain_timeout:.3f}x any of them")
        if direct and direct.status == "completed" and direct.total_s and dwcp.total_s:
            lines.append(f"  - vs plain QEMU direct: time {dwcp.total_s / direct.total_s:.2f}x"
                         + (f", bytes on the wire {dwcp.wire_bytes / direct.wire_bytes:.2f}x"
                            if dwcp.wire_bytes and direct.wire_bytes else ""))
    return lines


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default="lan,wan,wanloss")
    parser.add_argument("--memory", type=int, default=1024)
    parser.add_argument("--working-set", type=int, default=512)
    parser.add_argument("--dirty", type=float, default=8)
    parser.add_argument("--plain-timeout", type=float, default=120)
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    setup = GuestSetup("baremetal", args.memory, WorkloadSpec(
        working_set_mib=args.working_set, dirty_mib_per_s=args.dirty))
    rows: list[Row] = []
    for link in args.links.split(","):
        rows += run_link(link, setup, args.plain_timeout)
    table = fmt(rows)
    summary = "\n".join(ratios(rows, args.plain_timeout))
    print(table)
    print(summary)
    if args.write_doc:
        cmd = "sudo .venv/bin/python bench/bench_migration.py --write-doc" + \
            ("" if args.links == "lan,wan,wanloss" else f" --links {args.links}")
        section = (
            "## Live migration: plain QEMU against dwcp (bench/bench_migration.py)\n\n"
            f"Command: `{cmd}`  \n"
            f"Measured {datetime.date.today()} on {platform.node()}, "
            f"{os.cpu_count()} CPUs, QEMU 10.0 (TCG), bare-metal test guest: {args.memory} MiB "
            f"RAM, {args.working_set} MiB working set dirtying {args.dirty:g} MiB/s. Stock "
            "host TCP settings (cubic, 4 MiB send buffer) on both hosts; the agents set their "
            "own sockets (bbr, up to 16 connections). Plain runs are given "
            f"{args.plain_timeout:.0f} s.\n\n{table}\n\n{summary}\n")
        write_doc(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
