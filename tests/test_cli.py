"""The ``dwcp`` command as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DWCP = str(Path(sys.executable).with_name("dwcp"))


def test_help_lists_commands() -> None:
    out = subprocess.run([DWCP, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "testbed"):
        assert f"  {command} " in out


def test_bad_option_is_a_clear_error() -> None:
    res = subprocess.run([DWCP, "demo", "--loss", "2"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 2
    assert "--loss" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.guest
@pytest.mark.netns
def test_demo_migrates_and_verifies(leak_check: None) -> None:
    # A small guest over a short WAN: the same code path as the README's main command.
    res = subprocess.run(
        [DWCP, "demo", "--memory", "256", "--working-set", "64", "--rtt", "10",
         "--rate", "500", "--plain", "direct"],
        capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {}
    for line in res.stdout.splitlines():
        if line.startswith("| wan |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[1]] = cells
    assert set(rows) == {"plain QEMU direct", "dwcp"}, res.stdout
    for cells in rows.values():
        assert cells[2] == "completed" and cells[9] == "yes" and cells[10] == "yes", cells
    assert "data path: encode" in rows["dwcp"][11]
    assert "against plain QEMU direct" in res.stdout


def test_demo_rejects_unknown_plain_configuration(root: None) -> None:
    res = subprocess.run([DWCP, "demo", "--plain", "fast"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 2 and "unknown plain configuration" in res.stderr
