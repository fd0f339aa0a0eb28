"""Processes and namespaces a test bed creates, and their guaranteed teardown.

Every process is recorded with its PID *and* its kernel start time, so teardown ends exactly
the processes it started (a recycled PID is never signalled). The records are written to a
state directory, one per bed, so that a later run can clean up what an interrupted run (a
killed pytest, a Ctrl-C, a crashed CI job) left behind: :func:`reap_stale_beds`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dwcp_migrate.errors import TestbedError
from dwcp_migrate.paths import testbed_state_dir

log = logging.getLogger(__name__)


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def _alive(pid: int, start_time: int) -> bool:
    if process_start_time(pid) != start_time:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return state[state.rfind(")") + 2] != "Z"


@dataclass(frozen=True)
class TrackedProcess:
    pid: int
    start_time: int
    name: str


def netns_exec_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


class Reaper:
    """Starts and records processes, network namespaces and mounts; tears them all down.

    ``teardown`` is idempotent and never raises for things already gone: it is called from
    ``finally`` blocks and from pytest fixtures on every exit path.
    """

    def __init__(self, bed_id: str, state_root: Path | None = None) -> None:
        self.bed_id = bed_id
        root = state_root or testbed_state_dir()
        self.state_dir = root / bed_id
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._record_path = self.state_dir / "record.json"
        self._processes: list[TrackedProcess] = []
        self._netns: list[str] = []
        self._mounts: list[str] = []  # unmounted in reverse order
        self._paths: list[str] = []  # removed at teardown
        self._popens: list[subprocess.Popen[bytes]] = []
        self._save()

    # ---- recording -------------------------------------------------------------------------
    def _save(self) -> None:
        record: dict[str, Any] = {
            "owner_pid": os.getpid(),
            "owner_start": process_start_time(os.getpid()),
            "processes": [p.__dict__ for p in self._processes],
            "netns": self._netns,
            "mounts": self._mounts,
            "paths": self._paths,
        }
        tmp = self._record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._record_path)

    def track_pid(self, pid: int, name: str) -> TrackedProcess:
        start = process_start_time(pid)
        if start is None:
            raise TestbedError(f"{name} (pid {pid}) exited before it could be tracked")
        proc = TrackedProcess(pid, start, name)
        self._processes.append(proc)
        self._save()
        return proc

    def track_netns(self, name: str) -> None:
        self._netns.append(name)
        self._save()

    def track_mount(self, path: str) -> None:
        self._mounts.append(path)
        self._save()

    def track_path(self, path: str) -> None:
        self._paths.append(path)
        self._save()

    # ---- starting --------------------------------------------------------------------------
    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (inside ``netns`` if given, else after ``prefix``) and track it.

        ``ip netns exec`` execs the command in place, so the tracked PID is the program's own.
        """
        full = [*(prefix or netns_exec_prefix(netns)), *argv]
        merged_env = {**os.environ, **(env or {})}
        try:
            popen = subprocess.Popen(
                full, stdin=stdin, stdout=stdout, stderr=stderr, env=merged_env,
                start_new_session=True,  # a Ctrl-C to pytest does not hit it before teardown
            )
        except OSError as exc:
            raise TestbedError(f"cannot start {name} ({full[0]}): {exc}") from exc
        self._popens.append(popen)
        self.track_pid(popen.pid, name)
        return popen

    # ---- teardown --------------------------------------------------------------------------
    def teardown(self, grace_s: float = 3.0) -> list[str]:
        """End every tracked process (by PID), delete namespaces, unmount. Returns problems."""
        problems = _teardown_record(
            {
                "processes": [p.__dict__ for p in self._processes],
                "netns": self._netns,
                "mounts": self._mounts,
                "paths": self._paths,
            },
            grace_s,
        )
        for popen in self._popens:  # collect exit statuses so no zombie stays behind
            with contextlib.suppress(Exception):
                popen.wait(timeout=0.5)
        self._processes.clear()
        self._netns.clear()
        self._mounts.clear()
        self._paths.clear()
        self._popens.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        for problem in problems:
            log.warning("teardown of %s: %s", self.bed_id, problem)
        return problems


def _end_processes(processes: list[TrackedProcess], grace_s: float) -> list[str]:
    problems: list[str] = []
    live = [p for p in processes if _alive(p.pid, p.start_time)]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        for proc in live:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)
        live = [p for p in live if _alive(p.pid, p.start_time)]
        time.sleep(0.05)
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.1)
    for proc in live:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, os.WNOHANG)
        if _alive(proc.pid, proc.start_time):
            problems.append(f"{proc.name} (pid {proc.pid}) survived SIGKILL")
    return problems


def _netns_pids(netns: str) -> list[TrackedProcess]:
    """Processes still inside a namespace (daemons' children such as libvirt's QEMU)."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                         check=False)
    found = []
    for token in out.stdout.split():
        pid = int(token)
        start = process_start_time(pid)
        if start is not None and pid != os.getpid():
            found.append(TrackedProcess(pid, start, f"process in netns {netns}"))
    return found


def _teardown_record(record: dict[str, Any], grace_s: float) -> list[str]:
    processes = [TrackedProcess(**p) for p in record.get("processes", [])]
    problems = _end_processes(list(reversed(processes)), grace_s)
    netns_list = [ns for ns in reversed(record.get("netns", []))
                  if Path(f"/run/netns/{ns}").exists()]
    for netns in netns_list:
        # Whatever is still inside (for example QEMU started by a libvirtd of this bed).
        problems += _end_processes(_netns_pids(netns), grace_s)
    # Persistent mount namespaces go first: they hold copies of the /run/netns mounts, and
    # a file that is a mount point in any namespace cannot be unlinked (EBUSY).
    for mount in reversed(record.get("mounts", [])):
        if Path(mount).exists():
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    for netns in netns_list:
        res = subprocess.run(["ip", "netns", "delete", netns], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0 or Path(f"/run/netns/{netns}").exists():
            problems.append(f"ip netns delete {netns} failed: {res.stderr.strip()}")
    for path in record.get("paths", []):
        p = Path(path)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return problems


def reap_stale_beds(state_root: Path | None = None) -> list[str]:
    """Tear down every bed whose owning process is gone (an interrupted earlier run)."""
    root = state_root or testbed_state_dir()
    reaped: list[str] = []
    if not root.is_dir():
        return reaped
    for bed_dir in sorted(root.iterdir()):
        record_path = bed_dir / "record.json"
        try:
            record = json.loads(record_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            shutil.rmtree(bed_dir, ignore_errors=True)
            continue
        owner_pid, owner_start = record.get("owner_pid"), record.get("owner_start")
        if owner_pid is not None and owner_start is not None and _alive(owner_pid, owner_start):
            continue  # still in use by a live process
        _teardown_record(record, grace_s=2.0)
        shutil.rmtree(bed_dir, ignore_errors=True)
        reaped.append(bed_dir.name)
    return reaped
