"""Errors of the stream codec.

::

    DwcpError
     └── StreamError            the codec met something it cannot accept
          ├── StreamTruncatedError   the stream ended inside a record, or before QEMU's EOF marker
          └── StreamClosedError      feed() was called after end_of_stream()

The parsers never raise while data is being fed: bytes they cannot parse with certainty are
passed through verbatim as :class:`~dwcp_migrate.stream.records.Opaque` records. Only the end
of a stream can be wrong (it may stop half-way), which :class:`StreamTruncatedError` reports; it
carries the records that flush the incomplete tail, so a caller that forwards the stream can
still forward every byte it received.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dwcp_migrate.errors import DwcpError

if TYPE_CHECKING:
    from dwcp_migrate.stream.records import Record


class StreamError(DwcpError):
    """The stream codec met something it cannot accept."""


class StreamTruncatedError(StreamError):
    """The stream ended before it was complete.

    ``offset`` is the stream offset where the incomplete part starts, ``missing`` what was
    being read there, and ``records`` the records (Opaque bytes) that still have to be written
    so that the output is byte-identical to the input.
    """

    def __init__(self, offset: int, missing: str, records: Sequence[Record] = ()) -> None:
        self.offset = offset
        self.missing = missing
        self.records: list[Record] = list(records)
        super().__init__(
            f"migration stream truncated at byte offset {offset}: {missing}. The sender "
            "stopped early (the migration failed or was cancelled on the source); check the "
            "source QEMU's query-migrate error")


class StreamClosedError(StreamError):
    """``feed()`` was called after ``end_of_stream()``."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"feed() after end_of_stream() (stream closed at byte offset "
                         f"{offset}); create a new parser for a new connection")
