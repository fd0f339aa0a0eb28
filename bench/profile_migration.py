"""Where the CPU goes during one migration: per-thread CPU seconds of both QEMUs, both agents
and the WAN emulator, sampled from /proc, for plain QEMU and dwcp's data paths on one bed.

Usage (as root, after scripts/setup.sh):

    .venv/bin/python bench/profile_migration.py [--write-doc] [--link lan|wan]
        [--runs plain,tls,session,direct] [--repeats 2] [--memory 1024] [--working-set 512]
        [--dirty 8] [--perf DIR]

Why: the LAN benchmark (bench_migration.py) shows dwcp's relay far slower than plain QEMU
direct, and its agent CPU alone does not explain by how much. This splits every CPU second
of the migration window (``migrate`` to the destination's MIGRATION completed event) among:
the guest's vCPU thread (TCG: it runs as long as it is scheduled), the source QEMU's other
threads (its migration thread), the destination QEMU's main thread (it loads the stream),
the destination's other threads, each agent (process totals: they include threads that
ended in the window), the WAN emulator (``--link wan``: 50 ms RTT, 1 Gbit/s, the bench's WAN)
and what the machine left idle. ``--perf DIR`` also records
``perf record -a`` of each window into DIR, for ``perf report --sort comm,dso,sym``.

The runs share one bed and alternate (``--runs`` in order, ``--repeats`` times; on the LAN
plain,tls,session,direct by default, on the WAN plain,multifd,dwcp; ``lz4`` is dwcp with
lz4 instead of zstd:1 on the WAN), so that a slow phase of the machine hits each kind alike.
Every run is printed, not a median: this is a profile, not a benchmark; bench_migration.py
gives the times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dwcp_migrate.testbed.agents import TestAgent  # noqa: E402
from dwcp_migrate.testbed.bed import TestBed  # noqa: E402
from dwcp_migrate.testbed.benchdoc import write_section  # noqa: E402
from dwcp_migrate.testbed.compare import PLAIN_MULTIFD, UNTHROTTLED  # noqa: E402
from dwcp_migrate.testbed.guests import WorkloadSpec  # noqa: E402
from dwcp_migrate.testbed.netns import TcpSettings  # noqa: E402
from dwcp_migrate.testbed.scenario import (  # noqa: E402
    GuestSetup,
    ScenarioResult,
    agent_migration,
    plain_migration,
)
from dwcp_migrate.testbed.wan import WanSpec  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.02
# kind -> (label, agent settings; None for plain QEMU)
KINDS: Mapping[str, tuple[str, dict[str, Any] | None]] = {
    "plain": ("plain QEMU direct", None),
    "multifd": ("plain QEMU multifd 4 + zstd", None),
    "tls": ("dwcp, TLS lane (default)", {}),
    "dwcp": ("dwcp, default settings (WAN: encoded)", {}),  # the same as tls, named for a WAN
    "lz4": ("dwcp, lz4 on the WAN (codec.wan: lz4)", {"codec": {"wan": "lz4"}}),
    "session": ("dwcp, through the session", {"transport": {"tls_lane": False}}),
    "direct": ("dwcp, direct lane (plaintext)", {"transport": {"direct_lane": True}}),
}
DEFAULT_RUNS = {"lan": "plain,tls,session,direct", "wan": "plain,multifd,dwcp"}
WAN = WanSpec.from_rtt(rtt_ms=50, rate_mbit=1000)
COLUMNS = ("guest vCPU", "src QEMU other", "dst QEMU main", "dst QEMU other", "src agent",
           "dst agent", "WAN emulator", "idle")
NOT_WORK = ("guest vCPU", "idle", "window", "huge pages")


@dataclass
class Snapshot:
    at: float  # wall clock, as QMP's event timestamps
    process: dict[str, int] = field(default_factory=dict)  # label -> ticks (all threads)
    thread: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (label, comm, tid)
    idle: int = 0  # the machine's idle ticks, all CPUs
    huge_faults: int = 0  # /proc/vmstat thp_fault_alloc: 2 MiB pages faulted in (zeroed)


def _ticks(stat_text: str) -> int:
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class Sampler:
    """Reads /proc every SAMPLE_S for the watched processes (QEMUs are found by their
    ``-name``, agents are added by pid)."""

    def __init__(self) -> None:
        self.watched: dict[int, str] = {}
        self.snapshots: list[Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _find_qemus(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in self.watched:
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if argv and b"qemu-system" in argv[0] and b"-name" in argv:
                    name = argv[argv.index(b"-name") + 1].decode().split(",")[0]
                    self.watched[int(entry)] = f"qemu:{name}"

    def _run(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            if rounds % 10 == 0:
                self._find_qemus()
            rounds += 1
            snap = Snapshot(time.time())
            for pid, label in list(self.watched.items()):
                with contextlib.suppress(OSError, ValueError):
                    snap.process[label] = _ticks(Path(f"/proc/{pid}/stat").read_text())
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                        comm = text[text.index("(") + 1:text.rindex(")")]
                        snap.thread[(label, comm, tid)] = _ticks(text)
            with open("/proc/stat") as stat:
                snap.idle = int(stat.readline().split()[4])
            with open("/proc/vmstat") as vmstat:
                for line in vmstat:
                    if line.startswith("thp_fault_alloc "):
                        snap.huge_faults = int(line.split()[1])
            self.snapshots.append(snap)
            self._stop.wait(SAMPLE_S)

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per column between the snapshots nearest to ``start`` and ``end``."""
        first = min(self.snapshots, key=lambda s: abs(s.at - start))
        last = min(self.snapshots, key=lambda s: abs(s.at - end))

        def proc(label: str) -> float:
            return (last.process.get(label, 0) - first.process.get(label, 0)) / TICK

        def threads(label: str, comm_test: Any) -> float:
            total = 0
            for key, ticks in last.thread.items():
                owner, comm, _tid = key
                if owner == label and comm_test(comm):
                    total += ticks - first.thread.get(key, 0)
            return total / TICK

        vcpu = threads("qemu:src", lambda c: c.startswith("CPU "))
        dst_main = threads("qemu:dst", lambda c: c.startswith("qemu-system"))
        return {
            "guest vCPU": vcpu,
            "src QEMU other": proc("qemu:src") - vcpu,
            "dst QEMU main": dst_main,
            "dst QEMU other": proc("qemu:dst") - dst_main,
            "src agent": proc("agent:a"),
            "dst agent": proc("agent:b"),
            "WAN emulator": proc("wanlink"),
            "idle": (last.idle - first.idle) / TICK,
            "huge pages": last.huge_faults - first.huge_faults,
            "window": last.at - first.at,
        }


@dataclass
class Profile:
    kind: str
    result: ScenarioResult
    cpu: dict[str, float]


@contextlib.contextmanager
def _perf(directory: Path | None, name: str, graph: bool) -> Iterator[None]:
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen(["perf", "record", "-a", "-F", "999", *(["-g"] if graph else []),
                                 "-o", str(directory / f"{name}.data")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)


def profile_one(bed: TestBed, sampler: Sampler, setup: GuestSetup, link: str, kind: str,
                n: int, perf_dir: Path | None, perf_graph: bool) -> Profile:
    started: list[float] = []
    perf: contextlib.ExitStack = contextlib.ExitStack()

    def on_progress(info: Mapping[str, Any]) -> None:
        if not started:  # the first call comes right after ``migrate`` was issued
            started.append(time.time())
            perf.enter_context(_perf(perf_dir, f"{n:02d}-{kind}", perf_graph))
        if info.get("status") == "completed":
            perf.close()

    label, settings = KINDS[kind]
    with perf:
        if settings is None:
            config = PLAIN_MULTIFD if kind == "multifd" else None
            result = plain_migration(
                bed, setup, link=link, timeout_s=120, label=label, on_progress=on_progress,
                capabilities=config.capabilities if config else None,
                parameters={**UNTHROTTLED, **(config.parameters if config else {})})
        else:
            agents = {h: TestAgent(bed, h, link=link, settings=settings) for h in ("a", "b")}
            for host, agent in agents.items():
                agent.start()
                sampler.watched[agent.process.pid] = f"agent:{host}"
            try:
                result = agent_migration(
                    bed, setup, str(agents["a"].outgoing_socket("b")),
                    str(agents["b"].outgoing_socket("b")), parameters=UNTHROTTLED,
                    timeout_s=120, label=label, on_progress=on_progress)
            finally:
                for agent in agents.values():
                    agent.stop()
                    sampler.watched.pop(agent.process.pid, None)
    end_to_end = result.outcome.end_to_end_ms
    if not started or end_to_end is None:
        raise SystemExit(f"{label}: no migration window ({result.outcome})")
    return Profile(kind, result, sampler.window(started[0], started[0] + end_to_end / 1000))


def format_profiles(profiles: list[Profile]) -> str:
    lines = ["| run | total time | " + " | ".join(COLUMNS) +
             " | migration work | 2 MiB pages faulted | RAM identical |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|---:|---|"]
    for p in profiles:
        work = sum(v for k, v in p.cpu.items() if k not in NOT_WORK)
        cells = " | ".join(f"{p.cpu[c]:.2f}" for c in COLUMNS)
        total = (p.result.outcome.end_to_end_ms or 0) / 1000
        lines.append(f"| {KINDS[p.kind][0]} | {total:.2f} s | "
                     f"{cells} | {work:.2f} | {p.cpu['huge pages']:.0f} | "
                     f"{'yes' if p.result.ram_identical else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--link", choices=sorted(DEFAULT_RUNS), default="lan")
    parser.add_argument("--runs", default=None, help="default: " + "; ".join(
        f"{link}: {runs}" for link, runs in DEFAULT_RUNS.items()))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory", type=int, default=1024)
    parser.add_argument("--working-set", type=int, default=512)
    parser.add_argument("--dirty", type=float, default=8)
    parser.add_argument("--perf", type=Path, default=None, metavar="DIR")
    parser.add_argument("--perf-graph", action="store_true",
                        help="with --perf: record call graphs too (perf record -g)")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    if args.perf is not None and shutil.which("perf") is None:
        parser.error("--perf needs perf(1): apt-get install linux-perf")
    runs = args.runs or DEFAULT_RUNS[args.link]
    kinds = runs.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}: choose from {', '.join(KINDS)}")
    setup = GuestSetup("baremetal", args.memory, WorkloadSpec(
        working_set_mib=args.working_set, dirty_mib_per_s=args.dirty))
    profiles: list[Profile] = []
    wan = WAN if args.link == "wan" else None
    with Sampler() as sampler, TestBed(("a", "b"), wan=wan, tcp=TcpSettings.stock()) as bed:
        if bed.wan is not None and bed.wan.pid is not None:
            sampler.watched[bed.wan.pid] = "wanlink"
        for _ in range(args.repeats):
            for kind in kinds:
                print(f"{KINDS[kind][0]}: booting the guest, then migrating...", flush=True)
                profiles.append(profile_one(bed, sampler, setup, args.link, kind,
                                            len(profiles), args.perf, args.perf_graph))
                print(format_profiles(profiles[-1:]).splitlines()[-1], flush=True)
    table = format_profiles(profiles)
    print(table)
    if args.write_doc:
        cmd = "sudo .venv/bin/python bench/profile_migration.py --write-doc" + \
            ("" if args.link == "lan" else f" --link {args.link}") + \
            ("" if runs == DEFAULT_RUNS[args.link] else f" --runs {runs}") + \
            ("" if args.repeats == 2 else f" --repeats {args.repeats}")
        where = "LAN" if args.link == "lan" else "WAN (50 ms RTT, 1 Gbit/s)"
        section = "profile_migration" + ("" if args.link == "lan" else f"_{args.link}")
        write_section(section, (
            f"## Where the CPU goes in a {where} migration (bench/profile_migration.py)\n\n"
            f"Command: `{cmd}`  \n"
            f"Measured {datetime.date.today()} on {platform.node()}, {os.cpu_count()} CPUs, "
            f"one {where} bed, the runs alternating; bare-metal test guest {args.memory} MiB, "
            f"{args.working_set} MiB working set dirtying {args.dirty:g} MiB/s. CPU seconds "
            "in the migration window (`migrate` to the destination's MIGRATION completed "
            f"event), sampled from /proc every {SAMPLE_S * 1000:.0f} ms. 'migration work' "
            "is everything but the guest's vCPU and idle. Every run is shown.\n\n"
            f"{table}\n"), REPO / "docs" / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
