"""The reaper ends what it started, by PID, also for a bed whose owner died."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dwcp_migrate.testbed.procs import Reaper, process_start_time, reap_stale_beds


def test_teardown_ends_tracked_processes(tmp_path: Path) -> None:
    reaper = Reaper("t1", state_root=tmp_path)
    proc = reaper.spawn(["sleep", "300"], name="sleeper")
    # A process that ignores SIGTERM must still be ended (by SIGKILL after the grace period).
    stubborn = reaper.spawn(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
        name="stubborn", stdout=subprocess.PIPE)
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline().strip() == b"ready"
    assert reaper.teardown(grace_s=0.5) == []
    assert proc.poll() is not None
    assert stubborn.poll() is not None
    assert not (tmp_path / "t1").exists()


def test_recycled_pid_is_not_signalled(tmp_path: Path) -> None:
    Reaper("t2", state_root=tmp_path)
    victim = subprocess.Popen(["sleep", "300"])
    try:
        # Record the victim's PID with a wrong start time: as if the PID had been reused.
        record_path = tmp_path / "t2" / "record.json"
        record = json.loads(record_path.read_text())
        start = process_start_time(victim.pid)
        assert start is not None
        record["processes"] = [{"pid": victim.pid, "start_time": start + 1, "name": "old"}]
        record["owner_pid"] = 999_999_999  # owner gone: reap_stale_beds takes the bed
        record_path.write_text(json.dumps(record))
        assert reap_stale_beds(tmp_path) == ["t2"]
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_stale_bed_of_dead_owner_is_reaped(tmp_path: Path) -> None:
    # A child process makes a bed, starts a sleeper and dies without teardown.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dwcp_migrate.testbed.procs import Reaper\n"
        f"r = Reaper('t3', state_root=Path({str(tmp_path)!r}))\n"
        "p = r.spawn(['sleep', '300'], name='orphan')\n"
        "print(p.pid, flush=True)\n"
        "import os; os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    orphan = int(out.stdout.strip())
    assert process_start_time(orphan) is not None
    assert reap_stale_beds(tmp_path) == ["t3"]
    assert process_start_time(orphan) is None or _is_zombie(orphan)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def test_live_owner_bed_is_left_alone(tmp_path: Path) -> None:
    reaper = Reaper("t4", state_root=tmp_path)
    try:
        assert reap_stale_beds(tmp_path) == []  # our own process owns it
        assert (tmp_path / "t4").exists()
    finally:
        reaper.teardown()
    assert not (tmp_path / "t4").exists()
