"""Migration scenarios shared by the demo, the tests and the benchmarks.

A scenario boots a test guest on one host, waits until it has filled its working set,
starts a paused destination on another host, migrates, compares RAM byte for byte at
switchover, then lets the destination run and waits for its own memory verification.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dwcp_migrate.errors import GuestError
from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.guests import SerialLog, WorkloadSpec, build_guests, guest_boot_args
from dwcp_migrate.testbed.migration import (
    MigrationOutcome,
    ProgressCallback,
    compare_guest_ram,
    prepare_incoming,
    run_migration,
)
from dwcp_migrate.testbed.qemu import GuestVM, QemuBinary

GuestKind = Literal["baremetal", "linux"]
MIGRATION_PORT = 49152


@dataclass(frozen=True)
class GuestSetup:
    kind: GuestKind = "baremetal"
    memory_mib: int = 1024
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(
        working_set_mib=512, dirty_mib_per_s=8))
    binary: QemuBinary | None = None  # None: the system QEMU (10.0 from backports)

    def fill_timeout_s(self) -> float:
        # TCG fills a few hundred MiB/s bare-metal, tens of MiB/s under Linux; be generous.
        per_mib = 0.05 if self.kind == "baremetal" else 0.3
        return 60 + self.workload.working_set_mib * per_mib


@dataclass
class ScenarioResult:
    label: str
    outcome: MigrationOutcome
    ram_identical: bool
    ram_detail: str
    guest_verified: bool
    verify_detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.ram_identical and self.guest_verified


def boot_source(bed: TestBed, host: str, setup: GuestSetup, name: str = "src") -> GuestVM:
    images = build_guests(build_dir())
    assert bed.reaper is not None
    vm = GuestVM(bed.reaper, name, bed.workdir, memory_mib=setup.memory_mib,
                 boot_args=guest_boot_args(setup.kind, images, setup.workload),
                 binary=setup.binary, netns=bed.host(host).netns)
    vm.start()
    log = SerialLog(vm.serial_path)
    log.wait_for_fill(timeout=setup.fill_timeout_s())
    log.wait_for_passes(1, timeout=setup.fill_timeout_s())
    return vm


def start_destination(bed: TestBed, host: str, setup: GuestSetup, incoming: str,
                      name: str = "dst", *, capabilities: Mapping[str, bool] | None = None,
                      parameters: Mapping[str, Any] | None = None) -> GuestVM:
    """A paused destination (``-S``) listening on ``incoming`` with these capabilities."""
    images = build_guests(build_dir())
    assert bed.reaper is not None
    vm = GuestVM(bed.reaper, name, bed.workdir, memory_mib=setup.memory_mib,
                 boot_args=guest_boot_args(setup.kind, images, setup.workload),
                 binary=setup.binary, netns=bed.host(host).netns, incoming="defer",
                 paused=True)
    vm.start()
    prepare_incoming(vm, incoming, capabilities=capabilities, parameters=parameters)
    return vm


def verify_destination(dst: GuestVM, passes: int = 2, timeout_s: float = 120) -> tuple[bool, str]:
    """Let the destination run and wait for ``passes`` clean verification passes."""
    dst.qmp("cont")
    log = SerialLog(dst.serial_path)
    try:
        log.wait_for_passes(passes, timeout=timeout_s)
    except GuestError as exc:
        return False, str(exc)
    if log.corruptions:
        shown = "; ".join(str(c) for c in log.corruptions[:5])
        return False, f"{len(log.corruptions)} corrupted pages reported by the guest: {shown}"
    return True, f"{passes} verification passes after switchover, no corruption"


def judge(bed: TestBed, src: GuestVM, dst: GuestVM, outcome: MigrationOutcome,
          label: str) -> ScenarioResult:
    """After switchover: RAM compared byte for byte, then the destination runs and verifies."""
    ram = compare_guest_ram(src, dst, bed.workdir)
    verified, detail = verify_destination(dst)
    src.stop_process()
    dst.stop_process()
    return ScenarioResult(label, outcome, ram.identical, ram.describe(), verified, detail)


def plain_migration(
    bed: TestBed,
    setup: GuestSetup,
    *,
    src_host: str = "a",
    dst_host: str = "b",
    link: str = "lan",
    capabilities: Mapping[str, bool] | None = None,
    parameters: Mapping[str, Any] | None = None,
    min_iterations: int = 0,
    timeout_s: float = 300,
    label: str = "plain QEMU",
    on_progress: ProgressCallback | None = None,
) -> ScenarioResult:
    """Plain QEMU migration over the bed's ``link``, judged by RAM compare and the guest."""
    src = boot_source(bed, src_host, setup)
    address = bed.address(dst_host, link)
    uri = f"tcp:{address}:{MIGRATION_PORT}"
    dst = start_destination(bed, dst_host, setup, uri, capabilities=capabilities,
                            parameters=parameters)
    started = time.monotonic()
    with _stopped_on_failure(src, dst):
        outcome = run_migration(src, dst, uri, capabilities=capabilities,
                                parameters=parameters, min_iterations=min_iterations,
                                timeout_s=timeout_s, on_progress=on_progress)
    outcome.wall_time_s = time.monotonic() - started
    return judge(bed, src, dst, outcome, label)


@contextlib.contextmanager
def _stopped_on_failure(src: GuestVM, dst: GuestVM) -> Iterator[None]:
    """A migration that failed or timed out must not go on in the background: its guest's
    vCPU would take a core from the next run (and its destination would keep its port)."""
    try:
        yield
    except BaseException:
        for vm in (src, dst):
            with contextlib.suppress(Exception):
                vm.stop_process()
        raise


def agent_migration(
    bed: TestBed,
    setup: GuestSetup,
    src_socket: str,
    dst_socket: str,
    *,
    src_host: str = "a",
    dst_host: str = "b",
    capabilities: Mapping[str, bool] | None = None,
    parameters: Mapping[str, Any] | None = None,
    min_iterations: int = 0,
    timeout_s: float = 300,
    label: str = "dwcp",
    on_progress: ProgressCallback | None = None,
    during: Callable[[GuestVM, GuestVM], None] | None = None,
) -> ScenarioResult:
    """Plain QEMU on both hosts, the stream carried by the agents over unix sockets.

    The source QEMU connects to its agent's ``to/<dst>.sock`` (``src_socket``); the
    destination QEMU listens at ``dst_socket``, the same name on the destination host.
    ``during`` runs once the migration has started (to inject failures).
    """
    src = boot_source(bed, src_host, setup)
    dst = start_destination(bed, dst_host, setup, f"unix:{dst_socket}",
                            capabilities=capabilities, parameters=parameters)
    started = time.monotonic()
    hook = on_progress
    if during is not None:
        fired = [False]

        def hook_with_failure(info: Mapping[str, Any]) -> None:
            if not fired[0] and info.get("status") == "active":
                fired[0] = True
                during(src, dst)
            if on_progress is not None:
                on_progress(info)
        hook = hook_with_failure
    with _stopped_on_failure(src, dst):
        outcome = run_migration(src, dst, f"unix:{src_socket}", capabilities=capabilities,
                                parameters=parameters, min_iterations=min_iterations,
                                timeout_s=timeout_s, on_progress=hook)
    outcome.wall_time_s = time.monotonic() - started
    return judge(bed, src, dst, outcome, label)


def format_results(results: list[ScenarioResult]) -> str:
    """A markdown table, one row per scenario."""
    head = ("| run | total time | downtime | bytes sent | iterations | RAM identical "
            "| guest verified |\n|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        o = r.outcome
        total = f"{o.total_time_ms / 1000:.2f} s" if o.total_time_ms is not None else "-"
        down = f"{o.downtime_ms} ms" if o.downtime_ms is not None else "-"
        sent = f"{o.transferred_bytes / 2**20:.0f} MiB" if o.transferred_bytes else "-"
        rows.append(f"| {r.label} | {total} | {down} | {sent} | {o.iterations or '-'} "
                    f"| {'yes' if r.ram_identical else 'NO'} "
                    f"| {'yes' if r.guest_verified else 'NO'} |")
    return "\n".join([head, *rows])
