"""Shared fixtures. Tests run as root on Debian 12 after scripts/setup.sh (scripts/test does
both); they build real guests, namespaces and daemons, and tear them down on every exit path.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed.build import BuildProducts, build_all
from dwcp_migrate.testbed.procs import reap_stale_beds

BED_NAMESPACE = re.compile(r"^dw[0-9a-f]{6}-")  # TestBed's namespace names


@pytest.fixture(scope="session")
def products() -> BuildProducts:
    return build_all(build_dir())


@pytest.fixture(scope="session")
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (namespaces, libvirtd): run it through scripts/test")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture
def leak_check(root: None) -> Iterator[None]:
    """Fail the test if it leaves a namespace of its own behind."""
    reap_stale_beds()
    before = _namespaces()
    yield
    left = {ns for ns in _namespaces() - before if BED_NAMESPACE.match(ns)}
    assert not left, f"namespaces left behind: {sorted(left)}"
