"""Plain QEMU against dwcp on one bed: the demo's and the benchmark's shared core.

The same guest setup is migrated by each plain QEMU configuration and then through the dwcp
agents, on one bed, one after the other. Bytes on the wire are counted by the WAN emulator
(both directions, IP packets) so every row is measured the same way; on the LAN (no
emulator) QEMU's own ``ram.transferred`` (plain) and the agents' wire bytes (dwcp) are used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp_migrate.errors import MigrationError
from dwcp_migrate.testbed.agents import TestAgent
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.migration import ProgressCallback
from dwcp_migrate.testbed.netns import TcpSettings
from dwcp_migrate.testbed.scenario import (
    GuestSetup,
    ScenarioResult,
    agent_migration,
    plain_migration,
)
from dwcp_migrate.testbed.wan import WanSpec


@dataclass(frozen=True)
class PlainConfig:
    label: str
    capabilities: Mapping[str, bool] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)


# QEMU throttles a migration to 128 MiB/s (max-bandwidth) unless told otherwise; libvirt
# lifts that by default, so every run here does too (the throttle would cap a one-channel
# migration, plain or through the agents, at about 134 MB/s of stream even on the LAN).
UNTHROTTLED: Mapping[str, Any] = {"max-bandwidth": 1 << 40}

PLAIN_DIRECT = PlainConfig("plain QEMU direct")
PLAIN_MULTIFD = PlainConfig("plain QEMU multifd 4 + zstd", {"multifd": True},
                            {"multifd-channels": 4, "multifd-compression": "zstd"})
PLAIN_XBZRLE = PlainConfig("plain QEMU xbzrle", {"xbzrle": True})
ALL_PLAIN = (PLAIN_DIRECT, PLAIN_MULTIFD, PLAIN_XBZRLE)


@dataclass
class Row:
    link: str
    label: str
    status: str  # completed | failed | timeout
    total_s: float | None = None
    downtime_ms: int | None = None
    wire_bytes: int | None = None
    iterations: int | None = None
    agent_cpu_s: float | None = None
    ram_identical: bool | None = None
    verified: bool | None = None
    note: str = ""
    # QEMU's own figures from the source (they end when the source has written its last byte);
    # total_s and downtime_ms above are end to end, up to the destination having loaded it all.
    qemu_total_s: float | None = None
    qemu_downtime_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed" and bool(self.ram_identical and self.verified)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wire(bed: TestBed) -> int | None:
    if bed.wan is None:
        return None
    c = bed.wan.counters()
    return c.ab.fwd_bytes + c.ba.fwd_bytes


def _row(link: str, result: ScenarioResult, wire: int | None, cpu: float | None,
         note: str = "") -> Row:
    o = result.outcome
    if o.end_to_end_ms is None or o.switchover_ms is None:
        raise MigrationError(f"{result.label}: the QMP events that time the migration end to "
                             "end are missing (destination MIGRATION completed, source STOP)")
    return Row(link, result.label, o.status, o.end_to_end_ms / 1000, o.switchover_ms,
               wire if wire is not None else o.transferred_bytes, o.iterations, cpu,
               result.ram_identical, result.guest_verified, note,
               qemu_total_s=(o.total_time_ms or 0) / 1000, qemu_downtime_ms=o.downtime_ms)


def _failed(link: str, label: str, exc: MigrationError) -> Row:
    status = "timeout" if "did not complete" in str(exc) else "failed"
    return Row(link, label, status, note=str(exc).split(";")[0][:160])


def run_comparison(
    link: str,
    wan: WanSpec | None,
    setup: GuestSetup,
    plain: Sequence[PlainConfig] = ALL_PLAIN,
    *,
    with_dwcp: bool = True,
    timeout_s: float = 120,
    agent_settings: Mapping[str, Any] | None = None,
    dwcp_label: str = "dwcp",
    say: Callable[[str], None] = print,
    progress: Callable[[str], ProgressCallback | None] = lambda _label: None,
) -> list[Row]:
    """Run each plain configuration, then dwcp, on one bed with stock host TCP settings."""
    route = "lan" if wan is None else "wan"
    rows: list[Row] = []
    with TestBed(("a", "b"), wan=wan, tcp=TcpSettings.stock()) as bed:
        for config in plain:
            say(f"[{link}] {config.label}: booting the guest, then migrating...")
            before = _wire(bed)
            try:
                result = plain_migration(bed, setup, link=route,
                                         capabilities=config.capabilities,
                                         parameters={**UNTHROTTLED, **config.parameters},
                                         timeout_s=timeout_s,
                                         label=config.label, on_progress=progress(config.label))
            except MigrationError as exc:
                rows.append(_failed(link, config.label, exc))
                say(f"[{link}] {config.label}: {rows[-1].status}: {rows[-1].note}")
                continue
            after = _wire(bed)
            rows.append(_row(link, result, after - before
                             if after is not None and before is not None else None, None))
        if not with_dwcp:
            return rows
        agents = {h: TestAgent(bed, h, link=route, settings=agent_settings) for h in ("a", "b")}
        for agent in agents.values():
            agent.start()
        say(f"[{link}] dwcp: booting the guest, then migrating through the agents...")
        cpu0 = {h: proc_cpu_seconds(a.process.pid) for h, a in agents.items()}
        before = _wire(bed)
        try:
            result = agent_migration(bed, setup, str(agents["a"].outgoing_socket("b")),
                                     str(agents["b"].outgoing_socket("b")), timeout_s=timeout_s,
                                     parameters=UNTHROTTLED, label=dwcp_label,
                                     on_progress=progress(dwcp_label))
        except MigrationError as exc:
            rows.append(_failed(link, dwcp_label, exc))
            rows[-1].note += f" | agent a: {agents['a'].log_tail(400)}"
            return rows
        deadline = time.monotonic() + 10
        recent: list[dict[str, Any]] = []
        while time.monotonic() < deadline:  # the agents close their sessions after QEMU
            status = agents["a"].client().call("status")
            recent = status["recent"]
            if recent and not status["active"]:
                break
            time.sleep(0.1)
        cpu = sum(proc_cpu_seconds(a.process.pid) - cpu0[h] for h, a in agents.items())
        after = _wire(bed)
        record = recent[-1] if recent else {}
        wire = after - before if after is not None and before is not None \
            else record.get("wire_bytes")
        lane = (record.get("transport") or {}).get("0", {}).get("lane")
        path = f"{record.get('mode', '?')}" + (f" over the {lane} lane" if lane else "")
        rows.append(_row(link, result, wire, cpu, f"data path: {path}"))
    return rows


def median_rows(rows: Sequence[Row]) -> list[Row]:
    """One row per (link, run) over repeated runs: the run with the median total time among
    those that completed (a real run, not averaged), its note listing every run; a
    configuration that never completed keeps its first row."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.link, r.label), []).append(r)
    out: list[Row] = []
    for group in groups.values():
        done = sorted((r for r in group if r.status == "completed" and r.total_s is not None),
                      key=lambda r: r.total_s or 0.0)
        if len(group) == 1:
            out.append(group[0])
            continue
        pick = done[(len(done) - 1) // 2] if done else group[0]
        runs = ", ".join(f"{r.total_s:.2f} s" if r.status == "completed" and r.total_s
                         is not None else r.status for r in group)
        note = f"median of {len(group)} runs: {runs}"
        out.append(Row(**{**pick.__dict__, "note": f"{note}; {pick.note}" if pick.note
                          else note}))
    return out


def format_rows(rows: Sequence[Row]) -> str:
    def yn(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "NO")

    out = ["| link | run | result | total time | downtime | QEMU's total / downtime "
           "| bytes on the wire | iterations | agent CPU | RAM identical | guest verified "
           "| note |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        qemu = "-" if r.qemu_total_s is None else \
            f"{r.qemu_total_s:.2f} s / {r.qemu_downtime_ms} ms"
        out.append(
            f"| {r.link} | {r.label} | {r.status} | "
            f"{f'{r.total_s:.2f} s' if r.total_s is not None else '-'} | "
            f"{f'{r.downtime_ms} ms' if r.downtime_ms is not None else '-'} | {qemu} | "
            f"{f'{r.wire_bytes / 1e6:.0f} MB' if r.wire_bytes else '-'} | "
            f"{r.iterations if r.iterations is not None else '-'} | "
            f"{f'{r.agent_cpu_s:.1f} s' if r.agent_cpu_s is not None else '-'} | "
            f"{yn(r.ram_identical)} | {yn(r.verified)} | {r.note} |")
    return "\n".join(out)


def summarize(rows: Sequence[Row], timeout_s: float) -> list[str]:
    """Each dwcp run (label starting "dwcp") against the best plain configuration and against
    plain direct, per link."""
    lines = []
    for link in dict.fromkeys(r.link for r in rows):
        mine = [r for r in rows if r.link == link]
        plain = [r for r in mine if not r.label.startswith("dwcp")]
        done = [r for r in plain if r.status == "completed" and r.total_s]
        direct = next((r for r in plain if r.label == PLAIN_DIRECT.label), None)
        for dwcp in (r for r in mine if r.label.startswith("dwcp")):
            name = f"{link}: {dwcp.label}"
            if dwcp.total_s is None or dwcp.status != "completed":
                lines.append(f"- {name} did not complete")
                continue
            if done:
                best = min(done, key=lambda r: r.total_s or 0.0)
                assert best.total_s is not None
                lines.append(f"- {name} total time {dwcp.total_s:.2f} s = "
                             f"{dwcp.total_s / best.total_s:.2f}x the best plain QEMU "
                             f"configuration ({best.label}, {best.total_s:.2f} s)")
            elif plain:
                lines.append(f"- {name}: no plain QEMU configuration completed within "
                             f"{timeout_s:.0f} s; dwcp took {dwcp.total_s:.2f} s, < "
                             f"{dwcp.total_s / timeout_s:.3f}x any of them")
            if direct and direct.status == "completed" and direct.total_s:
                extra = ""
                if dwcp.wire_bytes and direct.wire_bytes:
                    extra = f", bytes on the wire {dwcp.wire_bytes / direct.wire_bytes:.2f}x"
                lines.append(f"  - against plain QEMU direct: time "
                             f"{dwcp.total_s / direct.total_s:.2f}x{extra}")
    return lines
