"""StreamEncoder: one channel's raw QEMU stream in, encoded page-codec batches out (no I/O)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from dwcp_migrate.codec.scan import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_PAGES,
    ChannelScanner,
    ScannedBatch,
)
from dwcp_migrate.codec.stats import ChannelStats
from dwcp_migrate.pagecodec import (
    CodecStats,
    Compression,
    PageCodecConfig,
    PageEncoder,
    PreparedBatch,
)
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
                 auto_flush: bool = True, session_id: int | None = None,
                 compress_thread: bool = False) -> None:
        self.config = config = config or PageCodecConfig()
        self.compression = compression or config.compression
        self.codec = PageEncoder(config, session_id=session_id)
        self.scanner = ChannelScanner(config.page_size, batch_pages=batch_pages,
                                      batch_bytes=batch_bytes, auto_flush=auto_flush)
        self.bytes_in = 0
        self.bytes_out = 0  # batches only (not the session header)
        self.batches = 0
        # compress_thread: batches are compressed on a second thread while this one parses
        # and prepares the next (zstd and lz4 release the GIL); see _encode.
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="dwcp-compress")
                      if compress_thread else None)
        self._inflight: deque[tuple[PreparedBatch, int, Future[bytes]]] = deque()

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
        """Parse and encode a chunk; returns the batches it completed (often none).

        With ``compress_thread``, the last batch completed may still be compressing: it
        comes with the next call (or :meth:`flush`), unless the chunk ended where QEMU may
        wait for the destination (then everything completed is returned).
        """
        self.bytes_in += len(chunk)
        batches = self.scanner.feed(chunk)
        return self._encode(batches, wait=self.scanner.waiting)

    def flush(self) -> list[bytes]:
        """Encode what is pending now, even if the batch is not full."""
        return self._encode(self.scanner.flush(), wait=True)

    def finish(self) -> list[bytes]:
        """The channel ended: encode everything left (an incomplete tail goes opaque)."""
        out = self._encode(self.scanner.finish(), wait=True)
        if self._pool is not None:
            self._pool.shutdown()
        return out

    def _encode(self, batches: list[ScannedBatch], *, wait: bool) -> list[bytes]:
        codec = self.codec
        iterations = self.scanner.iterations
        out: list[bytes] = []
        if self._pool is None:
            for batch in batches:
                data = codec.encode_pages(batch.pages, self.compression)
                # A batch never spans two iterations (the scanner cuts there), so its stats
                # belong to one.
                iterations[batch.iteration - 1].codec.add(codec.last_stats)
                out.append(data)
        else:
            inflight = self._inflight
            for batch in batches:
                prepared = codec.prepare_pages(batch.pages, self.compression)
                inflight.append((prepared, batch.iteration, self._pool.submit(prepared.finish)))
            # Hand over every batch that is done, in order, and the rest too if asked to
            # wait; else at most one stays in flight, compressing while the caller goes on.
            while inflight and (wait or len(inflight) > 1 or inflight[0][2].done()):
                prepared, iteration, done = inflight.popleft()
                out.append(done.result())
                iterations[iteration - 1].codec.add(prepared.stats)
        self.bytes_out += sum(map(len, out))
        self.batches += len(out)
        return out


__all__ = ["StreamEncoder"]
