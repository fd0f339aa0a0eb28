"""Which data path a migration channel takes: full encoding or near-zero-cost passthrough.

Encoding (stream codec + page codec + compression) costs CPU, roughly 2-3 ms per MiB of
stream in Python; it pays wherever the link is slower than that, which every WAN is. On a
LAN that is faster than encoding, passthrough forwards bytes untouched. A pure function of
the configured mode and a link sample, so it is trivially testable and replaceable.
"""

from __future__ import annotations

from dataclasses import dataclass

LAN_RTT_MS = 2.0  # below this round trip the path is a LAN: passthrough wins


@dataclass(frozen=True)
class LinkSample:
    rtt_ms: float
    bandwidth_mbit: float | None = None  # None: not measured yet


def choose_data_mode(configured: str, link: LinkSample,
                     lan_rtt_ms: float = LAN_RTT_MS) -> tuple[str, str]:
    """(mode, reason): mode is "encode" or "passthrough"; reason explains it for the record."""
    if configured in ("encode", "passthrough"):
        return configured, f"codec.mode is {configured} in the configuration"
    if configured != "auto":
        raise ValueError(f"unknown codec mode {configured!r}")
    if link.rtt_ms < lan_rtt_ms:
        return "passthrough", (f"RTT {link.rtt_ms:.2f} ms < {lan_rtt_ms:g} ms: a LAN, faster "
                               "than encoding")
    return "encode", f"RTT {link.rtt_ms:.1f} ms >= {lan_rtt_ms:g} ms: a WAN, encoding pays"
