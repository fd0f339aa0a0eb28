"""StreamEncoder: one channel's raw QEMU stream in, encoded page-codec batches out (no I/O)."""

from __future__ import annotations

from dwcp_migrate.codec.scan import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_PAGES,
    ChannelScanner,
    ScannedBatch,
)
from dwcp_migrate.codec.stats import ChannelStats
from dwcp_migrate.pagecodec import CodecStats, Compression, PageCodecConfig, PageEncoder
from dwcp_migrate.stream import ChannelKind, StreamTruncatedError


class StreamEncoder:
    """Encodes one migration channel (main or multifd; told apart by its first bytes).

    Send :attr:`session_header` first, then every batch returned by :meth:`feed`,
    :meth:`flush` and :meth:`finish`, in order, to one :class:`StreamDecoder`; it returns the
    exact bytes that were fed. ``compression`` may be changed between calls (a policy
    choosing per batch); the decoder needs no setting for it.

    Batches close when full (``batch_pages`` / ``batch_bytes``), at iteration boundaries, and
    with ``auto_flush`` at the end of a ``feed`` that reached a point where QEMU may wait for
    the destination (a multifd SYNC packet; the device state at switchover, which the stream
    codec passes through). Otherwise up to one batch waits here: a driver should call
    :meth:`flush` when the source goes quiet.

    ``feed`` never raises for bad data: bytes the stream codec cannot parse with certainty
    travel as opaque bytes, compressed but otherwise untouched (it raises
    :class:`~dwcp_migrate.codec.errors.PageSizeMismatchError` for a stream of another target
    page size). :meth:`finish` says in :attr:`truncation` whether the channel ended where a
    QEMU stream cannot end.
    """

    def __init__(self, config: PageCodecConfig | None = None, *,
                 compression: Compression | None = None,
                 batch_pages: int = DEFAULT_BATCH_PAGES, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 auto_flush: bool = True, session_id: int | None = None) -> None:
        self.config = config = config or PageCodecConfig()
        self.compression = compression or config.compression
        self.codec = PageEncoder(config, session_id=session_id)
        self.scanner = ChannelScanner(config.page_size, batch_pages=batch_pages,
                                      batch_bytes=batch_bytes, auto_flush=auto_flush)
        self.bytes_in = 0
        self.bytes_out = 0  # batches only (not the session header)
        self.batches = 0

    @property
    def session_header(self) -> bytes:
        return self.codec.session_header

    @property
    def kind(self) -> ChannelKind | None:
        """MAIN, MULTIFD or UNKNOWN once 4 bytes were fed."""
        return self.scanner.kind

    @property
    def stats(self) -> ChannelStats:
        """Per iteration: QEMU's pages and bytes, and the page codec's kinds and sizes."""
        return self.scanner.stats

    @property
    def codec_stats(self) -> CodecStats:
        return self.codec.stats

    @property
    def truncation(self) -> StreamTruncatedError | None:
        """After :meth:`finish`: why the channel is incomplete, or None."""
        return self.scanner.truncation

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[bytes]:
        """Parse and encode a chunk; returns the batches it completed (often none)."""
        self.bytes_in += len(chunk)
        return self._encode(self.scanner.feed(chunk))

    def flush(self) -> list[bytes]:
        """Encode what is pending now, even if the batch is not full."""
        return self._encode(self.scanner.flush())

    def finish(self) -> list[bytes]:
        """The channel ended: encode everything left (an incomplete tail goes opaque)."""
        return self._encode(self.scanner.finish())

    def _encode(self, batches: list[ScannedBatch]) -> list[bytes]:
        out: list[bytes] = []
        codec = self.codec
        iterations = self.scanner.iterations
        for batch in batches:
            data = codec.encode_batch(batch.items, self.compression)
            # A batch never spans two iterations (the scanner cuts there), so its stats
            # belong to one.
            iterations[batch.iteration - 1].codec.add(codec.last_stats)
            self.bytes_out += len(data)
            out.append(data)
        self.batches += len(out)
        return out


__all__ = ["StreamEncoder"]
