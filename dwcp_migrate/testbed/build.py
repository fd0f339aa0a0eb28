"""Build the test bed's compiled parts: both test guests and the WAN forwarder.

``scripts/setup.sh`` runs ``python -m dwcp_migrate.testbed.build``; tests call
:func:`build_all` too, which is quick when everything is up to date.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from dwcp_migrate.errors import DwcpError
from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed.guests import GuestImages, build_guests
from dwcp_migrate.testbed.wan import build_wanlink


@dataclass(frozen=True)
class BuildProducts:
    guests: GuestImages
    wanlink: Path


def build_all(out_dir: Path | None = None, *, force: bool = False) -> BuildProducts:
    out = out_dir or build_dir()
    out.mkdir(parents=True, exist_ok=True)
    return BuildProducts(build_guests(out, force=force), build_wanlink(out, force=force))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        products = build_all(force=args.force)
    except DwcpError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"guests: {products.guests}\nwanlink: {products.wanlink}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
