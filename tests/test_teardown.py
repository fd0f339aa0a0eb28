"""Nothing is left behind: not after a normal exit, not after Ctrl-C, not after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dwcp_migrate import paths
from dwcp_migrate.testbed.procs import process_start_time, reap_stale_beds

pytestmark = [pytest.mark.netns]

# A child builds a bed with a WAN link and a libvirt daemon, prints what it made, then waits.
CHILD = """
import faulthandler, json, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a stuck teardown hangs
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.testbed.wan import WanSpec
with TestBed(("a", "b"), wan=WanSpec.from_rtt(rtt_ms=10, rate_mbit=100),
             libvirt=%(libvirt)s) as bed:
    assert bed.reaper is not None and bed.wan is not None
    pids = [p.pid for p in bed.reaper._processes]
    print(json.dumps({"bed": bed.bed_id, "netns": [h.netns for h in bed.network.hosts.values()],
                      "pids": pids}), flush=True)
    time.sleep(300)
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _start_child(libvirt: bool, stderr_path: Path | None = None
                 ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    # stderr to a file, not a pipe: a pipe nobody reads could itself stall the child.
    with open(stderr_path or os.devnull, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD % {"libvirt": libvirt}],
                                 stdout=subprocess.PIPE,
                                 stderr=None if stderr_path is None else err, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, "the child failed to build its bed"
    made: dict[str, Any] = json.loads(line)
    return child, made


def _assert_gone(made: dict[str, Any]) -> None:
    assert not set(made["netns"]) & _namespaces()
    for pid in made["pids"]:
        assert process_start_time(pid) is None or _zombie(pid), f"pid {pid} still alive"
    assert not (paths.testbed_state_dir() / str(made["bed"])).exists()


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def _wait_or_explain(child: subprocess.Popen[str], timeout: float, stderr_path: Path) -> None:
    """Wait for the child; if it hangs, fail with its stack (faulthandler) and stderr."""
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGUSR1)
        time.sleep(2)
        child.kill()
        child.wait()
        err = stderr_path.read_text(errors="replace")
        pytest.fail(f"the child did not end within {timeout:g} s of SIGINT; its stack and "
                    f"stderr:\n{err}")


def test_ctrl_c_tears_down(root: None, tmp_path: Path) -> None:
    child, made = _start_child(libvirt=True, stderr_path=tmp_path / "child.stderr")
    assert set(made["netns"]) <= _namespaces()
    child.send_signal(signal.SIGINT)
    # Once seen to hang (a fresh-clone CI run, not reproduced): the next time says where.
    _wait_or_explain(child, 60, tmp_path / "child.stderr")
    _assert_gone(made)


def test_sigkill_leftovers_are_reaped_by_the_next_run(root: None) -> None:
    child, made = _start_child(libvirt=False)
    child.kill()
    child.wait(timeout=10)
    assert set(made["netns"]) <= _namespaces()
    assert str(made["bed"]) in reap_stale_beds()
    _assert_gone(made)
