"""Run and judge a live migration between two test guests.

The judge is strict because a per-page checksum inside the guest catches torn pages but not
stale ones (an old page with its old checksum is self-consistent). So every migration test
starts the destination with ``-S``, waits until the source has switched over (source paused,
destination loaded but not running), compares both guests' RAM byte for byte with
``pmemsave``, and only then lets the destination run and watches its in-guest verification.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp_migrate.errors import MigrationError
from dwcp_migrate.testbed.qemu import GuestVM

PAGE = 4096
CHUNK = 1 << 20  # compare a MiB at a time; pages are located only in chunks that differ


@dataclass
class RamComparison:
    identical: bool
    size: int
    differing_pages: list[int] = field(default_factory=list)  # guest-physical page numbers

    def describe(self) -> str:
        if self.identical:
            return f"RAM identical ({self.size >> 20} MiB)"
        shown = ", ".join(hex(p * PAGE) for p in self.differing_pages[:8])
        extra = len(self.differing_pages) - 8
        more = f" and {extra} more" if extra > 0 else ""
        return f"RAM differs in {len(self.differing_pages)} pages: {shown}{more}"


def compare_ram_files(a: Path, b: Path) -> RamComparison:
    size_a, size_b = a.stat().st_size, b.stat().st_size
    if size_a != size_b:
        return RamComparison(False, max(size_a, size_b), [-1])
    differing: list[int] = []
    with a.open("rb") as fa, b.open("rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if not ca:
                break
            if ca != cb:
                for page_off in range(0, len(ca), PAGE):
                    if ca[page_off:page_off + PAGE] != cb[page_off:page_off + PAGE]:
                        differing.append((offset + page_off) // PAGE)
            offset += len(ca)
    return RamComparison(not differing, size_a, differing)


def compare_guest_ram(src: GuestVM, dst: GuestVM, workdir: Path, keep: bool = False
                      ) -> RamComparison:
    """pmemsave both (both must be paused) and compare byte for byte."""
    a, b = workdir / f"{src.name}.ram", workdir / f"{dst.name}.ram"
    src.pmemsave(a)
    dst.pmemsave(b)
    try:
        return compare_ram_files(a, b)
    finally:
        if not keep:
            a.unlink(missing_ok=True)
            b.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class MigrationOutcome:
    """What a migration did, read from the source's ``query-migrate`` at the end."""

    status: str
    total_time_ms: int | None
    downtime_ms: int | None
    setup_time_ms: int | None
    transferred_bytes: int | None
    iterations: int | None  # ram.dirty-sync-count: 1 for a single pass
    error: str | None
    ram: RamComparison | None = None
    wall_time_s: float = 0.0
    # Measured end to end from QMP event timestamps (one clock: both QEMUs run on this
    # machine). QEMU's own total-time and downtime stop when the source has written its last
    # byte into the socket; data still buffered on the way (socket buffers, a relay's queues,
    # the link) is not counted there, but the guest cannot run on the destination before it
    # has arrived. ``end_to_end_ms``: ``migrate`` issued -> destination has loaded the whole
    # stream. ``switchover_ms``: source vCPUs stopped -> destination has loaded the stream.
    end_to_end_ms: int | None = None
    switchover_ms: int | None = None

    @classmethod
    def from_query(cls, info: Mapping[str, Any], wall_time_s: float) -> MigrationOutcome:
        ram = info.get("ram", {})
        return cls(
            status=str(info.get("status")),
            total_time_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"),
            setup_time_ms=info.get("setup-time"),
            transferred_bytes=ram.get("transferred"),
            iterations=ram.get("dirty-sync-count"),
            error=info.get("error-desc"),
            wall_time_s=wall_time_s,
        )


ProgressCallback = Callable[[Mapping[str, Any]], None]


def run_migration(
    src: GuestVM,
    dst: GuestVM,
    uri: str,
    *,
    capabilities: Mapping[str, bool] | None = None,
    parameters: Mapping[str, Any] | None = None,
    min_iterations: int = 0,
    timeout_s: float = 300.0,
    on_progress: ProgressCallback | None = None,
    poll_s: float = 0.1,
) -> MigrationOutcome:
    """Migrate ``src`` to ``dst`` (already listening on ``uri``) and wait for the end.

    ``min_iterations`` forces at least that many passes over RAM: the downtime limit is held
    at 1 ms (so QEMU cannot converge) until ``dirty-sync-count`` reaches it, then restored.
    On failure or timeout the migration is cancelled, the source keeps running, and
    :class:`MigrationError` says why.
    """
    src.set_migration(capabilities=capabilities)  # dst: see prepare_incoming
    params = dict(parameters or {})
    wanted_downtime = int(params.get("downtime-limit", 300))
    if min_iterations > 1:
        params["downtime-limit"] = 1
    if params:
        src.set_migration(parameters=params)
    src.take_events()
    dst.take_events()
    started = time.monotonic()
    started_wall = time.time()
    src.qmp("migrate", uri=uri)
    released = min_iterations <= 1
    deadline = started + timeout_s
    while True:
        info = src.query_migrate()
        status = info.get("status")
        if on_progress is not None:
            on_progress(info)
        if status in ("completed", "failed", "cancelled"):
            break
        if not released and info.get("ram", {}).get("dirty-sync-count", 0) >= min_iterations:
            src.set_migration(parameters={"downtime-limit": wanted_downtime})
            released = True
        if time.monotonic() > deadline:
            src.qmp("migrate_cancel")
            raise MigrationError(
                f"migration of {src.name} did not complete in {timeout_s:.0f} s "
                f"(status {status}, {info.get('ram', {}).get('dirty-sync-count')} iterations); "
                "cancelled, the guest keeps running on the source")
        time.sleep(poll_s)
    outcome = MigrationOutcome.from_query(info, time.monotonic() - started)
    if outcome.status != "completed":
        raise MigrationError(f"migration of {src.name} ended {outcome.status}: "
                             f"{outcome.error or 'no reason given by QEMU'}")
    wait_incoming_complete(dst, timeout_s=60)
    loaded = _event_time(dst.take_events(), "MIGRATION", status="completed")
    stopped = _event_time(src.take_events(), "STOP")
    if loaded is not None:
        outcome.end_to_end_ms = round((loaded - started_wall) * 1000)
        if stopped is not None:
            outcome.switchover_ms = round((loaded - stopped) * 1000)
    return outcome


def _event_time(events: list[dict[str, Any]], name: str, **data: str) -> float | None:
    """Wall-clock time (s) of the last event ``name`` whose data has these values."""
    found = None
    for event in events:
        if event.get("event") == name and all(
                event.get("data", {}).get(k) == v for k, v in data.items()):
            stamp = event["timestamp"]
            found = stamp["seconds"] + stamp["microseconds"] / 1e6
    return found


def prepare_incoming(dst: GuestVM, uri: str, *, capabilities: Mapping[str, bool] | None = None,
                     parameters: Mapping[str, Any] | None = None) -> None:
    """Configure a destination started with ``-incoming defer`` and let it listen on ``uri``.

    Capabilities such as multifd must be set before the incoming side starts listening.
    ``events`` is always on: the destination's MIGRATION "completed" event times the end.
    """
    dst.set_migration(capabilities={**(capabilities or {}), "events": True})
    multifd = {k: v for k, v in (parameters or {}).items() if k.startswith("multifd")}
    if multifd:
        dst.set_migration(parameters=multifd)
    dst.qmp("migrate-incoming", uri=uri)


def wait_incoming_complete(dst: GuestVM, timeout_s: float) -> None:
    """The destination has loaded the whole stream (it stays paused when started with -S)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = dst.status()
        if status in ("paused", "running", "postmigrate") and \
                dst.query_migrate().get("status") in ("completed", None):
            return
        if status in ("inmigrate", "prelaunch") and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        if time.monotonic() >= deadline:
            raise MigrationError(f"destination {dst.name} still {status} after {timeout_s} s")
        time.sleep(0.05)
