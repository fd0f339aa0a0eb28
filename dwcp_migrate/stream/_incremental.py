"""The feeding machinery shared by the main-channel and multifd parsers.

A parser's ``_run(buf, mv, pos, out)`` parses complete records from ``buf[pos:]`` and stops
at the first record that is not complete, returning where that record starts and how long
``buf`` would have to be for the next step to make progress. This class turns arbitrary
chunks into such calls:

* bytes that are not part of an incomplete record are parsed straight from the chunk the
  caller gave (pages become ``memoryview`` slices of it: no copy);
* a record split across chunks is completed in a small side buffer (the *tail*) with just the
  bytes it needs from the next chunk, and parsing then goes on in that chunk. So the parser
  never holds more than one incomplete record, and never copies a whole chunk.

Once a parser meets bytes it cannot parse with certainty it switches to *passthrough*: from
that byte on, everything is emitted as Opaque, unchanged.
"""

from __future__ import annotations

import struct

from dwcp_migrate.stream.errors import StreamClosedError, StreamTruncatedError
from dwcp_migrate.stream.records import Opaque, Record


class NeedMore(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by :class:`Cursor` when ``buf`` ends before the item does."""

    def __init__(self, end: int) -> None:
        self.end = end


class Uncertain(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The bytes at hand cannot be parsed with certainty: pass the rest through."""


_BE16 = struct.Struct(">H").unpack_from
_BE32 = struct.Struct(">I").unpack_from
_BE64 = struct.Struct(">Q").unpack_from


class Cursor:
    """Reads fields of a rarely-seen item; raises :class:`NeedMore` at the end of ``buf``.

    Exceptions are fine here: this serves headers, configuration and block lists, not pages.
    """

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def _advance(self, n: int) -> int:
        start = self.pos
        if start + n > self.end:
            raise NeedMore(start + n)
        self.pos = start + n
        return start

    def u8(self) -> int:
        return self.buf[self._advance(1)]

    def peek(self) -> int:
        if self.pos >= self.end:
            raise NeedMore(self.pos + 1)
        return self.buf[self.pos]

    def be16(self) -> int:
        return int(_BE16(self.buf, self._advance(2))[0])

    def be32(self) -> int:
        return int(_BE32(self.buf, self._advance(4))[0])

    def be64(self) -> int:
        return int(_BE64(self.buf, self._advance(8))[0])

    def take(self, n: int) -> bytes:
        start = self._advance(n)
        return self.buf[start:start + n]


class IncrementalParser:
    """Chunks in, records out. Subclasses implement ``_run`` and ``_incomplete``."""

    def __init__(self) -> None:
        self._tail = b""
        self._need = 0  # length the tail must reach before _run can make progress
        self._offset = 0  # stream offset of the first byte not yet turned into records
        self._base = 0  # stream offset of buf[0] during a _run call
        self._passthrough = False
        self._closed = False
        self.passthrough_offset: int | None = None
        self.passthrough_reason: str | None = None
        self.truncation: StreamTruncatedError | None = None

    # ---- for subclasses -----------------------------------------------------------------
    def _run(self, buf: bytes, mv: memoryview, pos: int, out: list[Record]) -> tuple[int, int]:
        """Parse from ``pos``; return ``(pos, need)`` with ``need > len(buf)``, or call
        :meth:`_start_passthrough` and return the position where passthrough starts."""
        raise NotImplementedError

    def _incomplete(self, has_tail: bool) -> str | None:
        """At the end of the stream: what is missing, or None if the stream is complete."""
        raise NotImplementedError

    def _start_passthrough(self, pos: int, reason: str) -> None:
        self._passthrough = True
        self.passthrough_offset = self._base + pos
        self.passthrough_reason = reason

    # ---- public -----------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes of the stream accepted so far (records emitted plus the pending tail)."""
        return self._offset + len(self._tail)

    @property
    def passthrough(self) -> bool:
        """True once the parser passes everything through verbatim."""
        return self._passthrough

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Parse a chunk; returns the records completed by it (possibly none).

        Never raises for bad data: what cannot be parsed with certainty comes back as Opaque.
        ``data`` is copied only if it is mutable: records may keep views of it.
        """
        if self._closed:
            raise StreamClosedError(self.offset)
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[Record] = []
        n = len(data)
        if not n:
            return out
        if self._passthrough:
            out.append(Opaque(data))
            self._offset += n
            return out
        dpos = 0
        tail = self._tail
        while tail:
            missing = self._need - len(tail)
            if n - dpos < missing:
                self._tail = tail + data[dpos:]
                return out
            tail += data[dpos:dpos + missing]
            dpos += missing
            self._base = self._offset
            pos, need = self._run(tail, memoryview(tail), 0, out)
            self._offset += pos
            if self._passthrough:
                self._tail = b""
                rest = tail[pos:] + data[dpos:]
                if rest:
                    out.append(Opaque(rest))
                    self._offset += len(rest)
                return out
            tail = tail[pos:]
            self._need = need - pos
        self._tail = b""
        if dpos == n:
            return out
        self._base = self._offset - dpos
        pos, need = self._run(data, memoryview(data), dpos, out)
        self._offset = self._base + pos
        if self._passthrough:
            if pos < n:
                out.append(Opaque(memoryview(data)[pos:]))
                self._offset = self._base + n
        elif pos < n:
            self._tail = data[pos:]
            self._need = need - pos
        return out

    def end_of_stream(self, *, strict: bool = True) -> list[Record]:
        """The connection has ended: flush the incomplete tail (as Opaque) and check it.

        If the stream is incomplete, :attr:`truncation` is set and, with ``strict``, raised as
        :class:`StreamTruncatedError` whose ``records`` are the flushed ones (write them too, to
        forward every byte received). Without ``strict`` the flushed records are returned.
        """
        if self._closed:
            return []
        self._closed = True
        out: list[Record] = []
        tail = self._tail
        if tail:
            out.append(Opaque(tail))
            self._tail = b""
        missing = self._incomplete(bool(tail))
        start = self._offset
        self._offset += len(tail)
        if missing is None:
            return out
        self.truncation = StreamTruncatedError(start, missing, out)
        if strict:
            raise self.truncation
        return out
