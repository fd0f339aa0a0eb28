"""How many TCP connections a session should use: a pure policy over goodput measurements.

Hill climbing with memory. The driver measures goodput (bytes the peer acknowledged) over
fixed intervals and records whether the sender was *backlogged* (data waiting for the window:
only then can more connections help). The policy doubles the count while doubling raises
goodput by more than ``gain``; when a step does not pay, it goes back to the count before (the
fewer connections that carry as much are kinder to the path and cheaper to run); it re-probes
after ``probe_every`` intervals at one count, since paths change. The first interval after a
change is not judged: new connections are still in slow start.

It lives beside the transport because it needs nothing but these samples; mode detection
(policies/) may choose its range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamRange:
    min_streams: int = 1
    max_streams: int = 16
    gain: float = 0.10  # a step must raise goodput by this fraction to be kept
    probe_every: int = 15  # intervals at one count before trying more again

    def __post_init__(self) -> None:
        if not 1 <= self.min_streams <= self.max_streams:
            raise ValueError(f"need 1 <= min_streams <= max_streams, got {self.min_streams}, "
                             f"{self.max_streams}")

    def clamp(self, n: int) -> int:
        return max(self.min_streams, min(self.max_streams, n))


@dataclass(frozen=True)
class GoodputSample:
    streams: int  # connections open during the interval
    mbit_s: float  # goodput over the interval
    backlogged: bool  # the sender had data waiting for the window


def _run(history: Sequence[GoodputSample], end: int) -> tuple[int, int]:
    """[start, end) of the samples before ``end`` that share the count of ``history[end-1]``."""
    n = history[end - 1].streams
    start = end - 1
    while start > 0 and history[start - 1].streams == n:
        start -= 1
    return start, end


def _judged(samples: Sequence[GoodputSample]) -> float | None:
    """Mean goodput of a run, without its first (settling) sample; None if too short."""
    usable = [s.mbit_s for s in samples[1:] if s.backlogged]
    return sum(usable) / len(usable) if usable else None


def next_stream_count(history: Sequence[GoodputSample], policy: StreamRange) -> int:
    """The connection count for the next interval, from the samples so far (oldest first)."""
    if not history:
        return policy.min_streams
    cur = history[-1]
    n = policy.clamp(cur.streams)
    if n != cur.streams:
        return n
    start, end = _run(history, len(history))
    here = _judged(history[start:end])
    if here is None or not cur.backlogged:
        return n  # still settling, or application-limited: more connections cannot help
    up = policy.clamp(2 * n)
    if start == 0:  # nothing to compare with yet: try more
        return up
    pstart, pend = _run(history, start)
    before = _judged(history[pstart:pend])
    m = history[start - 1].streams
    if before is None:
        return up if up != m else n
    if m < n:  # we stepped up from m
        if here >= before * (1 + policy.gain):
            return up
        if end - start == 2:  # judged once: the step did not pay, go back
            return policy.clamp(m)
    elif here < before * (1 - policy.gain):  # we stepped down from m and lost goodput
        return policy.clamp(m)
    if end - start >= policy.probe_every:
        return up
    return n
