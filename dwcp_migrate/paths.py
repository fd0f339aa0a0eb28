"""Where dwcp-migrate keeps build products and run-time state.

The cache (built guests, the WAN forwarder, QEMU 7.2 unpacked) lives in ``<repo>/.cache`` for a
source checkout, which is what ``scripts/setup.sh`` fills; ``DWCP_CACHE`` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def cache_dir() -> Path:
    override = os.environ.get("DWCP_CACHE")
    if override:
        return Path(override)
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / ".cache"
    return Path("/var/cache/dwcp-migrate")


def build_dir() -> Path:
    """Compiled test guests and tools (filled by ``python -m dwcp_migrate.testbed.build``)."""
    return cache_dir() / "build"


def qemu72_root() -> Path:
    """QEMU 7.2 unpacked beside the system QEMU, for stream-format tests."""
    return cache_dir() / "qemu72"


def testbed_state_dir() -> Path:
    """Records of what a test bed created (PIDs, namespaces), so teardown can always find it."""
    return Path(os.environ.get("DWCP_TESTBED_STATE", "/run/dwcp-testbed"))
