"""Shared fixtures. Tests run as root on Debian 12 after scripts/setup.sh (scripts/test does
both); they build real guests, namespaces and daemons, and tear them down on every exit path.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dwcp_migrate import paths
from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed.build import BuildProducts, build_all
from dwcp_migrate.testbed.guests import GuestImages, build_guests
from dwcp_migrate.testbed.procs import reap_stale_beds
from tests.stream_fixtures import Capture, CaptureSpec, load_or_capture


@pytest.fixture(scope="session")
def products() -> BuildProducts:
    return build_all(build_dir())


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    return build_guests(build_dir())


@pytest.fixture(scope="session")
def captures(guest_images: GuestImages) -> Iterator[Callable[[str, str], Capture]]:
    """Real captures of QEMU 7.2 and 10.0 by scenario (tests/stream_fixtures.py; cached
    under .cache/captures), made once per test session."""
    made: dict[tuple[str, str], Capture] = {}
    with tempfile.TemporaryDirectory(prefix="dwcp-captures-") as tmp:
        def get(qemu: str, scenario: str) -> Capture:
            if (qemu, scenario) not in made:
                spec = CaptureSpec(qemu, scenario)
                try:
                    made[qemu, scenario] = load_or_capture(spec, guest_images, Path(tmp))
                except Exception:  # TCG guests are sometimes slow: one retry
                    made[qemu, scenario] = load_or_capture(spec, guest_images, Path(tmp))
            return made[qemu, scenario]
        yield get


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
