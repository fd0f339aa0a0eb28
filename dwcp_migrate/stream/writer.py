"""Records back to bytes.

The writer is stateless: every record carries what it needs to be written exactly (the raw
flag word of a RAM record, CONTINUE included; the raw bytes of multifd headers). So records
from different parsers, or records rebuilt by a page decoder on the far side, can be written
in any grouping, and ``write_records(parse(x)) == x`` for every byte string ``x``.
"""

from __future__ import annotations

from collections.abc import Iterable

from dwcp_migrate.stream.records import ByteData, Record


def write_records(records: Iterable[Record]) -> bytes:
    """The bytes of ``records``, concatenated."""
    parts: list[ByteData] = []
    emit = parts.append
    for record in records:
        record.write_to(emit)
    return b"".join(parts)


def write_into(records: Iterable[Record], out: bytearray) -> int:
    """Append the bytes of ``records`` to ``out``; returns how many bytes were added."""
    before = len(out)
    emit = out.extend
    for record in records:
        record.write_to(emit)
    return len(out) - before


def encode(record: Record) -> bytes:
    """The bytes of one record."""
    return write_records((record,))


__all__ = ["encode", "write_into", "write_records"]
