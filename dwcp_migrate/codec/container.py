"""The encoded-stream container: one channel's page-codec batches in a file (no I/O here).

Layout (all integers little-endian, like the page codec's; described in
``docs/ENCODED-STREAM.md``)::

    file header   "DWCP-ENC" | u16 version 1 | u16 flags 0 | u32 n | session header (n bytes)
                  | u64 xxh3-64 of everything before
    batch frame   "B" | u32 length | one page-codec batch (length bytes)      ... repeated
    end frame     "E" | u64 batches | u64 stream bytes | u64 xxh3-64 of the stream
                  | u64 xxh3-64 of the 25 bytes before

Nothing may follow the end frame. Each batch carries the page codec's own checks (frame check
over the batch, content check over what it rebuilds to, batch number); the end frame's totals
catch a file cut at a frame boundary and a stream put together wrongly from valid batches.

:class:`EncodedStreamWriter` turns raw QEMU stream chunks into container bytes,
:class:`EncodedStreamReader` turns container bytes back into the stream, releasing each batch
only after its checks passed and raising at the end if the totals do not match; a caller that
must never leave wrong output (the ``dwcp stream decode`` command) keeps what it got aside
until :meth:`EncodedStreamReader.finish` has returned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import xxhash

from dwcp_migrate.codec.decoder import StreamDecoder
from dwcp_migrate.codec.encoder import StreamEncoder
from dwcp_migrate.codec.errors import (
    EncodedCorruptError,
    EncodedTruncatedError,
    NotAStreamError,
)
from dwcp_migrate.codec.scan import ChannelScanner
from dwcp_migrate.codec.stats import ChannelStats
from dwcp_migrate.pagecodec import CodecStats, PageCodecError, parse_session_header
from dwcp_migrate.pagecodec.decoder import DEFAULT_MAX_BATCH

MAGIC: Final = b"DWCP-ENC"
VERSION: Final = 1
_HEAD: Final = struct.Struct("<8sHHI")  # magic, version, flags, session header length
_CHECK: Final = struct.Struct("<Q")
_BATCH: Final = struct.Struct("<cI")  # "B", length
_END: Final = struct.Struct("<cQQQ")  # "E", batches, stream bytes, stream xxh3-64
BATCH_FRAME: Final = b"B"
END_FRAME: Final = b"E"
END_SIZE: Final = _END.size + _CHECK.size
MAX_SESSION_HEADER: Final = 4096
_BATCH_HEADER_SLACK: Final = 64  # the page codec's batch header, on top of the payload
DEFAULT_MAX_CACHE: Final = 64 << 30


def is_encoded(prefix: bytes) -> bool:
    """Whether ``prefix`` (at least 8 bytes) starts an encoded stream."""
    return bytes(prefix[:len(MAGIC)]) == MAGIC


@dataclass(frozen=True, slots=True)
class EndMarker:
    batches: int
    stream_bytes: int
    stream_hash: int


def file_header(session_header: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, len(session_header)) + session_header
    return head + _CHECK.pack(xxhash.xxh3_64_intdigest(head))


def batch_frame(batch: bytes) -> bytes:
    return _BATCH.pack(BATCH_FRAME, len(batch)) + batch


def end_frame(end: EndMarker) -> bytes:
    body = _END.pack(END_FRAME, end.batches, end.stream_bytes, end.stream_hash)
    return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))


class ContainerReader:
    """Container bytes in (any chunking), batch frames out; checks the framing only."""

    def __init__(self, *, max_batch_bytes: int = DEFAULT_MAX_BATCH) -> None:
        self.max_frame = max_batch_bytes + _BATCH_HEADER_SLACK
        self.session_header: bytes | None = None
        self.end: EndMarker | None = None
        self.batches = 0
        self._buf = bytearray()
        self._at = 0  # first unread byte of _buf
        self._base = 0  # file offset of _buf[0]

    @property
    def offset(self) -> int:
        """File offset of the first byte not yet consumed."""
        return self._base + self._at

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Add bytes; returns the complete batch frames as (file offset, batch bytes)."""
        if self.end is not None and data:
            raise EncodedCorruptError(f"encoded stream: data after the end marker at byte "
                                      f"{self.offset}: the file was appended to or damaged")
        self._buf += data
        out: list[tuple[int, bytes]] = []
        if self.session_header is None and not self._header():
            return out
        while self.end is None:
            frame = self._frame()
            if frame is None:
                break
            out.append(frame)
        if self.end is not None and self._at < len(self._buf):
            raise EncodedCorruptError(f"encoded stream: data after the end marker at byte "
                                      f"{self.offset}: the file was appended to or damaged")
        if self._at > (1 << 20) and self._at * 2 > len(self._buf):
            del self._buf[:self._at]
            self._base += self._at
            self._at = 0
        return out

    def finish(self) -> EndMarker:
        """The input ended: returns the end marker, or raises if it is missing."""
        if self.session_header is None:
            if len(self._buf) < len(MAGIC):
                raise NotAStreamError(f"not an encoded stream: {len(self._buf)} bytes, shorter "
                                      f"than the container's file header")
            raise EncodedTruncatedError("encoded stream ends inside its file header: the file "
                                        "is truncated")
        if self.end is None:
            left = len(self._buf) - self._at
            where = f"inside a frame ({left} bytes of it)" if left else "after a frame"
            raise EncodedTruncatedError(
                f"encoded stream ends at byte {self.offset} {where}, after {self.batches} "
                f"batches, without its end marker: the file is truncated (the encoder did not "
                f"finish, or the copy was cut)")
        return self.end

    def _header(self) -> bool:
        buf = self._buf
        probe = bytes(buf[:len(MAGIC)])
        if probe != MAGIC[:len(probe)]:
            raise NotAStreamError(f"not an encoded stream: it starts with {probe!r}, not "
                                  f"{MAGIC!r} (dwcp stream encode writes those)")
        if len(buf) < _HEAD.size:
            return False
        _, version, flags, length = _HEAD.unpack_from(buf)
        if length > MAX_SESSION_HEADER:
            raise EncodedCorruptError(f"encoded stream: session header of {length} bytes: the "
                                      f"file header is damaged")
        end = _HEAD.size + length + _CHECK.size
        if len(buf) < end:
            return False
        (check,) = _CHECK.unpack_from(buf, end - _CHECK.size)
        if check != xxhash.xxh3_64_intdigest(bytes(buf[:end - _CHECK.size])):
            raise EncodedCorruptError("encoded stream: the file header fails its check: the "
                                      "file is damaged")
        if version != VERSION or flags:
            raise EncodedCorruptError(f"encoded stream of container version {version} (flags "
                                      f"{flags:#x}); this dwcp reads version {VERSION}: use "
                                      f"the dwcp that wrote it, or a newer one")
        self.session_header = bytes(buf[_HEAD.size:_HEAD.size + length])
        self._at = end
        return True

    def _frame(self) -> tuple[int, bytes] | None:
        buf, at = self._buf, self._at
        left = len(buf) - at
        if not left:
            return None
        kind = buf[at:at + 1]
        if kind == BATCH_FRAME:
            if left < _BATCH.size:
                return None
            _, length = _BATCH.unpack_from(buf, at)
            if length > self.max_frame:
                raise EncodedCorruptError(
                    f"encoded stream: batch frame of {length} bytes at byte {self.offset} "
                    f"exceeds the limit of {self.max_frame}: the file is damaged")
            end = at + _BATCH.size + length
            if len(buf) < end:
                return None
            with memoryview(buf) as view:  # one copy, not two (a bytearray slice copies)
                frame = (self.offset, bytes(view[at + _BATCH.size:end]))
            self._at = end
            self.batches += 1
            return frame
        if kind == END_FRAME:
            if left < END_SIZE:
                return None
            body = bytes(buf[at:at + _END.size])
            (check,) = _CHECK.unpack_from(buf, at + _END.size)
            if check != xxhash.xxh3_64_intdigest(body):
                raise EncodedCorruptError(f"encoded stream: the end marker at byte "
                                          f"{self.offset} fails its check: the file is damaged")
            _, batches, stream_bytes, stream_hash = _END.unpack(body)
            self.end = EndMarker(batches, stream_bytes, stream_hash)
            self._at = at + END_SIZE
            return None
        raise EncodedCorruptError(f"encoded stream: unknown frame type {bytes(kind)!r} at byte "
                                  f"{self.offset}: the file is damaged")


class EncodedStreamWriter:
    """Raw QEMU stream chunks of one channel in, container bytes out."""

    def __init__(self, encoder: StreamEncoder | None = None) -> None:
        self.encoder = encoder or StreamEncoder()
        self.stream_bytes = 0
        self._hash = xxhash.xxh3_64()

    def header(self) -> bytes:
        return file_header(self.encoder.session_header)

    def feed(self, chunk: bytes | memoryview) -> bytes:
        self.stream_bytes += len(chunk)
        self._hash.update(chunk)
        return b"".join(batch_frame(b) for b in self.encoder.feed(chunk))

    def finish(self) -> bytes:
        """The last batches and the end frame."""
        frames = b"".join(batch_frame(b) for b in self.encoder.finish())
        end = EndMarker(self.encoder.batches, self.stream_bytes, self._hash.intdigest())
        return frames + end_frame(end)


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """The stream bytes of one batch, and the page codec's account of it."""

    data: bytes
    stats: CodecStats


class EncodedStreamReader:
    """Container bytes in, the checked QEMU stream out, batch by batch.

    ``max_cache_bytes`` bounds the page cache a file may ask for (the decoder allocates its
    slot table up front), ``max_batch_bytes`` the size of one batch: memory guards against a
    damaged or hostile file, not part of the format.
    """

    def __init__(self, *, max_batch_bytes: int = DEFAULT_MAX_BATCH,
                 max_cache_bytes: int = DEFAULT_MAX_CACHE) -> None:
        self.container = ContainerReader(max_batch_bytes=max_batch_bytes)
        self.decoder: StreamDecoder | None = None
        self.stream_bytes = 0
        self._max_batch = max_batch_bytes
        self._max_cache = max_cache_bytes
        self._hash = xxhash.xxh3_64()

    def feed(self, data: bytes | bytearray | memoryview) -> list[DecodedBatch]:
        out: list[DecodedBatch] = []
        for offset, batch in self.container.feed(data):
            if self.decoder is None:
                assert self.container.session_header is not None
                self.decoder = self._session(self.container.session_header)
            try:
                stream = self.decoder.decode(batch)
            except (PageCodecError, EncodedCorruptError) as exc:
                raise EncodedCorruptError(f"encoded stream, batch frame at byte {offset}: "
                                          f"{exc}") from exc
            self.stream_bytes += len(stream)
            self._hash.update(stream)
            out.append(DecodedBatch(stream, self.decoder.last_stats))
        if self.decoder is None and self.container.session_header is not None:
            self.decoder = self._session(self.container.session_header)
        return out

    def finish(self) -> EndMarker:
        """Check the end marker against what was decoded; raises if anything is off."""
        end = self.container.finish()
        decoded = self.decoder.batches if self.decoder else 0
        if end.batches != decoded:
            raise EncodedCorruptError(f"encoded stream: the end marker counts {end.batches} "
                                      f"batches, the file holds {decoded}: the file is damaged")
        if end.stream_bytes != self.stream_bytes or end.stream_hash != self._hash.intdigest():
            raise EncodedCorruptError(
                f"encoded stream: decoded {self.stream_bytes} bytes that do not match the end "
                f"marker ({end.stream_bytes} bytes and their checksum): the file is damaged")
        return end

    def _session(self, header: bytes) -> StreamDecoder:
        try:
            page_size, slots, _ = parse_session_header(header)
            if page_size * slots > self._max_cache:
                raise EncodedCorruptError(
                    f"encoded stream asks for a {page_size * slots >> 20} MiB page cache, "
                    f"more than this reader allows ({self._max_cache >> 20} MiB): the file "
                    f"is damaged, or decode it on a machine configured for that much")
            return StreamDecoder.for_session(header, max_batch_bytes=self._max_batch)
        except PageCodecError as exc:
            raise EncodedCorruptError(f"encoded stream: bad page codec session header: "
                                      f"{exc}") from exc


class DecodedStreamStats:
    """Per-iteration statistics of a decoded channel, equal to the encoder's.

    The decoded bytes go through the same scanner as on the encoding side, cut where the
    encoder cut (after every batch), so it finds the same iterations; each batch's page codec
    stats go to the iteration of its pages (the encoder cuts batches at iteration boundaries,
    so a batch belongs to one).
    """

    def __init__(self, page_size: int = 4096) -> None:
        self.scanner = ChannelScanner(page_size, batch_pages=1 << 62, batch_bytes=1 << 62,
                                      auto_flush=False)

    def add(self, batch: DecodedBatch) -> None:
        self.scanner.feed(batch.data)
        self.scanner.flush()
        self.scanner.iterations[-1].codec.add(batch.stats)

    def finish(self) -> ChannelStats:
        self.scanner.finish()
        return self.scanner.stats


__all__ = [
    "MAGIC", "VERSION", "ContainerReader", "DecodedBatch", "DecodedStreamStats",
    "EncodedStreamReader", "EncodedStreamWriter", "EndMarker", "batch_frame", "end_frame",
    "file_header", "is_encoded",
]
