"""Shared fixtures. Tests run as root on Debian 12 after scripts/setup.sh (scripts/test does
both); they build real guests, namespaces and daemons, and tear them down on every exit path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from dwcp_migrate import paths
from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed.build import BuildProducts, build_all
from dwcp_migrate.testbed.procs import reap_stale_beds


@pytest.fixture(scope="session")
def products() -> BuildProducts:
    return build_all(build_dir())


@pytest.fixture(scope="session")
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (namespaces, libvirtd): run it through scripts/test")


def _own_beds() -> list[str]:
    """Beds whose records say this process owns them (other processes may run beds too)."""
    root = paths.testbed_state_dir()
    own = []
    for record in root.glob("*/record.json") if root.is_dir() else []:
        try:
            if json.loads(record.read_text()).get("owner_pid") == os.getpid():
                own.append(record.parent.name)
        except (OSError, json.JSONDecodeError):
            continue
    return own


@pytest.fixture
def leak_check(root: None) -> Iterator[None]:
    """Fail the test if a bed it made was not torn down (namespaces, processes, records)."""
    reap_stale_beds()
    before = set(_own_beds())
    yield
    left = set(_own_beds()) - before
    assert not left, f"test beds left behind: {sorted(left)}"
