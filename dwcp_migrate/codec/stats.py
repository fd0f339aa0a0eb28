"""Per-migration statistics of one channel, per iteration.

**Iteration.** QEMU sends guest RAM in passes: it syncs its dirty bitmap (at setup, whenever
the pages still dirty fall below bandwidth x downtime-limit, and at completion) and then sends
the pages the bitmap holds, walking the RAM blocks in list order, each by ascending offset,
wrapping around at the end. The stream does not mark a sync, but one consequence is visible:
between two syncs a page is sent at most once (its dirty bit is cleared when it is sent and
set again only by the next sync). So:

* a new iteration starts at the RAM section (``PART``/``END`` header, main channel) or multifd
  packet (multifd channel) holding the first page that was already sent in the current
  iteration; QEMU syncs only between two sections, so this is the section after the sync as
  soon as the new pass re-sends a page sent in the previous one;
* the RAM ``END`` section (stop-and-copy, after the final sync) starts an iteration if it
  holds any page.

When the section or packet began in a batch that is already closed, the boundary moves to the
start of the open batch (at most one batch later). Pages that QEMU finds dirty ahead of its
scan right after a sync, and that were not sent yet in that pass, stay in the previous
iteration; on a multifd channel each channel sees its own share of each pass.

How this relates to ``query-migrate``'s ``dirty-sync-count``: every boundary follows a sync
(a page is sent twice only with a sync in between), in the same sweep of the scan, and the
setup sync starts iteration 1, so iterations <= dirty-sync-count. When QEMU completes on its
own, the sync that lets it complete and the one in ``ram_save_complete`` both precede the
``END`` section, so iterations <= dirty-sync-count - 1. Syncs and iterations are one to one
while QEMU syncs once per sweep, which it does until the dirty pages left are near bandwidth x
downtime-limit; from then on it syncs after every section, and those syncs fall into one
iteration until the scan comes back to pages it already sent. Measured (see
docs/ENCODED-STREAM.md): the 64 MiB bandwidth-capped test captures, 6 syncs and 5 iterations;
a 1 GiB guest at 32 MiB/s with the default 300 ms downtime limit, 8 syncs and 5 iterations,
each boundary 0 to 3 sections (up to 7 MB of stream) after its sync.

**Re-sent pages** are pages whose location (block, offset) was sent before in this migration,
tracked with one byte per guest page (the iteration that last sent it): 1 MiB per 4 GiB of
guest RAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dwcp_migrate.pagecodec import CodecStats


@dataclass(slots=True)
class IterationStats:
    """One iteration of one channel: what QEMU sent, and what the page codec made of it.

    The stream counts are QEMU's records: ``page_records`` pages with data (RAM PAGE records
    on the main channel, pages of multifd packets), ``zero_records`` ZERO records (fill 0),
    ``header_zero_pages`` zero pages that QEMU 9.0+ lists in multifd packet headers (no data
    on the wire). ``stream_bytes`` is the QEMU stream of this channel in this iteration,
    ``opaque_bytes`` the part of it that is not a page (headers, device state...),
    ``resent`` the pages whose location was sent before in this migration.
    ``codec`` is the page codec's view (zero / ref / delta / literal / opaque items, bytes in
    and out by kind, wire bytes) of the batches of this iteration.
    """

    number: int
    stream_bytes: int = 0
    opaque_bytes: int = 0
    page_records: int = 0
    zero_records: int = 0
    header_zero_pages: int = 0
    resent: int = 0
    codec: CodecStats = field(default_factory=CodecStats)

    @property
    def pages(self) -> int:
        """Every page QEMU sent in this iteration, with or without data."""
        return self.page_records + self.zero_records + self.header_zero_pages

    def add(self, other: IterationStats) -> None:
        self.stream_bytes += other.stream_bytes
        self.opaque_bytes += other.opaque_bytes
        self.page_records += other.page_records
        self.zero_records += other.zero_records
        self.header_zero_pages += other.header_zero_pages
        self.resent += other.resent
        self.codec.add(other.codec)

    def as_dict(self) -> dict[str, int]:
        out = {"iteration": self.number, "stream_bytes": self.stream_bytes,
               "opaque_bytes": self.opaque_bytes, "pages": self.pages, "resent": self.resent,
               "page_records": self.page_records, "zero_records": self.zero_records,
               "header_zero_pages": self.header_zero_pages}
        out.update(self.codec.as_dict())
        return out


@dataclass(slots=True)
class ChannelStats:
    """All iterations of one channel (``kind``: "main", "multifd" or "unknown")."""

    kind: str
    iterations: list[IterationStats]

    def total(self) -> IterationStats:
        """The sum over all iterations (``number`` 0)."""
        out = IterationStats(0)
        for it in self.iterations:
            out.add(it)
        return out

    def as_dict(self) -> dict[str, object]:
        total = self.total().as_dict()
        total.pop("iteration")
        return {"channel": self.kind, "iterations": [it.as_dict() for it in self.iterations],
                "total": total}


__all__ = ["ChannelStats", "IterationStats"]
