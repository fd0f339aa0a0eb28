"""The agent's use of the stream pipeline (dwcp_migrate.codec) on a migration channel.

The source makes a :class:`ChannelEncoder` per channel and announces its page-codec session
header in OPEN; the destination makes the matching :class:`ChannelDecoder`, after checking
that the cache the source asks for fits its own configured limit (a peer must not be able to
make this host allocate unbounded memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dwcp_migrate.agent.config import CodecSettings
from dwcp_migrate.codec import StreamDecoder, StreamEncoder
from dwcp_migrate.errors import MigrationError
from dwcp_migrate.pagecodec import Compression, PageCodecConfig
from dwcp_migrate.policies.mode import Mode
from dwcp_migrate.stream import (
    ChannelKind,
    MainChannelParser,
    MemSize,
    StreamError,
    classify_channel,
)

PAGE_SIZE = 4096  # x86 target pages; the stream codec refuses a stream of another size


def compression_for(settings: CodecSettings, mode: Mode) -> Compression:
    """The WAN setting (zstd) on internet paths, slow enough to repay it; lz4 elsewhere."""
    return settings.wan if mode is Mode.INTERNET else settings.datacenter


def guest_ram_bytes(prefix: bytes) -> int | None:
    """The guest's RAM size from the MEM_SIZE record near the start of a main channel
    (``prefix``: its first bytes); None if ``prefix`` does not reach it or is no main
    channel."""
    if classify_channel(prefix) is not ChannelKind.MAIN:
        return None
    try:
        records = MainChannelParser(PAGE_SIZE).feed(prefix)
    except StreamError:
        return None
    return next((r.total for r in records if isinstance(r, MemSize)), None)


def cache_bytes_for(settings: CodecSettings, guest_ram: int | None) -> int:
    """The page cache of one channel: ``codec.cache_mib`` at most, and no bigger than the
    guest's RAM when that is known (more could only hold older versions of pages)."""
    limit = settings.cache_mib << 20
    if guest_ram is None or guest_ram <= 0:
        return limit
    pages = -(-guest_ram // PAGE_SIZE)
    return min(limit, max(1, pages) * PAGE_SIZE)


class ChannelEncoder:
    def __init__(self, settings: CodecSettings, mode: Mode, guest_ram: int | None = None
                 ) -> None:
        self.config = PageCodecConfig(page_size=PAGE_SIZE,
                                      cache_bytes=cache_bytes_for(settings, guest_ram),
                                      compression=compression_for(settings, mode))
        self.encoder = StreamEncoder(self.config)
        self.cpu_s = 0.0  # thread CPU spent encoding (for the record and for tuning)

    def _timed(self, work: Callable[[], list[bytes]]) -> list[bytes]:
        started = time.thread_time()
        try:
            return work()
        finally:
            self.cpu_s += time.thread_time() - started

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        return self._timed(lambda: self.encoder.feed(data))

    def flush(self) -> list[bytes]:
        return self._timed(self.encoder.flush)

    def finish(self) -> list[bytes]:
        return self._timed(self.encoder.finish)

    def describe(self) -> dict[str, Any]:
        return {"session_header": self.encoder.session_header.hex(),
                "page_size": self.config.page_size, "cache_bytes": self.config.cache_bytes,
                "compression": f"{self.encoder.compression.codec}:"
                               f"{self.encoder.compression.level}"}

    def iterations(self) -> int:
        return len(self.encoder.stats.iterations)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes_in": self.encoder.bytes_in,
                               "bytes_out": self.encoder.bytes_out,
                               "encode_cpu_s": round(self.cpu_s, 3),
                               "batches": self.encoder.batches,
                               "compression": self.describe()["compression"],
                               "cache_bytes": self.config.cache_bytes,
                               **self.encoder.stats.as_dict()}
        return out


class ChannelDecoder:
    def __init__(self, settings: CodecSettings, description: Any) -> None:
        if not isinstance(description, dict):
            raise MigrationError("OPEN for an encoded channel lacks the codec description")
        try:
            header = bytes.fromhex(str(description["session_header"]))
            page_size = int(description["page_size"])
            cache_bytes = int(description["cache_bytes"])
        except (KeyError, ValueError, TypeError) as exc:
            raise MigrationError(f"OPEN has a malformed codec description: {exc}") from exc
        limit = settings.cache_mib << 20
        if cache_bytes > limit:
            raise MigrationError(f"the source asks for a {cache_bytes >> 20} MiB page cache; "
                                 f"this agent allows {settings.cache_mib} MiB (codec.cache_mib)")
        self.decoder = StreamDecoder(PageCodecConfig(page_size=page_size,
                                                     cache_bytes=cache_bytes))
        self.decoder.accept_session_header(header)
        self.cpu_s = 0.0

    def decode(self, batch: bytes | memoryview) -> bytes:
        started = time.thread_time()
        try:
            return self.decoder.decode(batch)
        finally:
            self.cpu_s += time.thread_time() - started


def make_encoder(settings: CodecSettings, mode: Mode, guest_ram: int | None = None
                 ) -> ChannelEncoder:
    return ChannelEncoder(settings, mode, guest_ram)


def make_decoder(settings: CodecSettings, description: Any) -> ChannelDecoder:
    return ChannelDecoder(settings, description)
