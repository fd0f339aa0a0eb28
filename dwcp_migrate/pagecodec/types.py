"""Items, configuration, compression choice and statistics of the page codec.

The codec does not know the QEMU stream: it sees pages, named by a RAM block name and a byte
offset in that block, and opaque byte runs that it carries verbatim. The stream layer maps its
records onto these items (and puts whatever it needs to rebuild a record, such as QEMU's RAM
flag word, into the page's 16-bit ``tag``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from dwcp_migrate.errors import ConfigError

ByteData: TypeAlias = bytes | memoryview

MIN_PAGE_SIZE: Final = 512
# Run offsets and lengths of a delta are 16-bit fields, so a page may not exceed 64 KiB (the
# biggest target page size QEMU has, on arm64 and ppc64).
MAX_PAGE_SIZE: Final = 65536
MAX_BLOCKS: Final = 65535  # block names are 16-bit session-wide ids
MAX_BLOCK_NAME: Final = 255  # QEMU's RAM block idstr is u8-length-prefixed


# Not frozen on purpose: a frozen dataclass costs about three times as much to create, and the
# decoder makes one per page (up to a few hundred thousand per second). Treat as immutable.
@dataclass(slots=True)
class PageItem:
    """One guest page: ``data`` is exactly ``page_size`` bytes.

    ``tag`` is a 16-bit value carried verbatim for the caller (the stream layer keeps QEMU's
    RAM flag word there); the codec gives it no meaning.
    """

    block: bytes
    offset: int
    data: ByteData
    tag: int = 0


@dataclass(slots=True)
class OpaqueItem:
    """Bytes carried verbatim, in order with the pages around them (section headers etc.)."""

    data: ByteData


Item: TypeAlias = PageItem | OpaqueItem


@dataclass(slots=True)
class PageBatch:
    """A batch in columns: the same content as a list of items, without an object per page.

    The fast input of :meth:`PageEncoder.prepare_pages` (``prepare_batch`` turns items into
    one) and the output of :meth:`PageDecoder.decode_pages`. Pages are numbered from 0 in
    stream order:

    * ``offsets`` and ``tags``: one entry per page;
    * ``data_at`` (ascending page numbers) and ``datas``: the pages that have data; every
      other page is a page of zeros that needs no data at all (QEMU's ZERO records). A page
      with data may still be all zeros (the encoder checks);
    * ``blocks``: ``(first page, block name)``, in page order: the pages from ``first page``
      up to the next entry's belong to that block (entries that cover no page are allowed);
    * ``opaque_at`` and ``opaques``: opaque runs, each placed before page ``opaque_at[i]``
      (after all pages when it equals the page count), in order.

    The decoder fills ``datas`` for every page (``data_at`` is then ``range(pages)``), zero
    pages included (one shared page of zeros), with ``bytes`` or read-only ``memoryview``.
    """

    offsets: list[int] = field(default_factory=list)
    tags: list[int] = field(default_factory=list)
    data_at: list[int] = field(default_factory=list)
    datas: list[ByteData] = field(default_factory=list)
    blocks: list[tuple[int, bytes]] = field(default_factory=list)
    opaque_at: list[int] = field(default_factory=list)
    opaques: list[ByteData] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return len(self.offsets)

    def spans(self) -> list[tuple[int, int, bytes]]:
        """``(first page, stop page, block name)`` of each block run."""
        runs = self.blocks
        stops = [first for first, _ in runs[1:]]
        stops.append(len(self.offsets))
        return [(first, stop, block) for (first, block), stop in zip(runs, stops, strict=False)]

    @classmethod
    def from_items(cls, items: Iterable[Item]) -> PageBatch:
        """The columns of a list of items (raises TypeError for anything else)."""
        batch = cls()
        offsets, tags, data_at, datas = batch.offsets, batch.tags, batch.data_at, batch.datas
        blocks = batch.blocks
        cur: object = None
        for item in items:
            if type(item) is PageItem:
                n = len(offsets)
                block = item.block
                if block is not cur:
                    blocks.append((n, block))
                    cur = block
                offsets.append(item.offset)
                tags.append(item.tag)
                data_at.append(n)
                datas.append(item.data)
            elif type(item) is OpaqueItem:
                batch.opaque_at.append(len(offsets))
                batch.opaques.append(item.data)
            else:
                raise TypeError(f"{type(item).__name__} is neither PageItem nor OpaqueItem")
        return batch

    def items(self, page_size: int) -> list[Item]:
        """The same batch as items (pages without data become ``page_size`` zero bytes)."""
        out: list[Item] = []
        append = out.append
        zero: ByteData | None = None
        datas: list[ByteData | None] = [None] * len(self.offsets)
        for at, given in zip(self.data_at, self.datas, strict=True):
            datas[at] = given
        op = 0
        op_at, opaques = self.opaque_at, self.opaques
        for first, stop, block in self.spans():
            for i in range(first, stop):
                while op < len(op_at) and op_at[op] <= i:
                    append(OpaqueItem(opaques[op]))
                    op += 1
                page = datas[i]
                if page is None:
                    if zero is None:
                        zero = bytes(page_size)
                    page = zero
                append(PageItem(block, self.offsets[i], page, self.tags[i]))
        out += [OpaqueItem(rest) for rest in opaques[op:]]
        return out

CodecName: TypeAlias = Literal["none", "zstd", "lz4"]
ZSTD_MIN_LEVEL: Final = -7  # zstd's "fast" levels; below -7 the ratio collapses on RAM pages
ZSTD_MAX_LEVEL: Final = 22
LZ4_MAX_LEVEL: Final = 12  # lz4 high-compression levels; 0 is the fast default mode


@dataclass(frozen=True, slots=True)
class Compression:
    """How one batch is compressed: ``Compression("zstd", 1)``, ``Compression("lz4")``, ...

    ``level`` is the zstd level (-7..22), or for lz4 0 (fast mode) or 1..12 (high-compression
    mode); it is ignored for ``none``. The decoder needs no level, so the level is the
    encoder's choice per batch.
    """

    codec: CodecName
    level: int = 0

    def __post_init__(self) -> None:
        if self.codec == "zstd":
            ok = ZSTD_MIN_LEVEL <= self.level <= ZSTD_MAX_LEVEL
            want = f"{ZSTD_MIN_LEVEL}..{ZSTD_MAX_LEVEL}"
        elif self.codec == "lz4":
            ok = 0 <= self.level <= LZ4_MAX_LEVEL
            want = f"0..{LZ4_MAX_LEVEL}"
        elif self.codec == "none":
            ok, want = self.level == 0, "0"
        else:
            raise ConfigError(f"unknown compression {self.codec!r}: use zstd:N, lz4 or none")
        if not ok:
            raise ConfigError(f"{self.codec} level {self.level} is out of range: use {want}")

    @classmethod
    def parse(cls, text: str) -> Compression:
        """Parse ``zstd:N``, ``zstd`` (level 1), ``lz4``, ``lz4:N`` or ``none``."""
        name, _, level = text.strip().lower().partition(":")
        if name not in ("zstd", "lz4", "none"):
            raise ConfigError(f"unknown compression {text!r}: use zstd:N, lz4 or none")
        if not level:
            return cls(name, 1 if name == "zstd" else 0)  # type: ignore[arg-type]
        try:
            value = int(level)
        except ValueError:
            raise ConfigError(f"compression level in {text!r} is not an integer") from None
        return cls(name, value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.codec == "none" or (self.codec == "lz4" and self.level == 0):
            return self.codec
        return f"{self.codec}:{self.level}"


# The setting for fast links (the "datacenter" mode): lz4 is ~40% of the encode path's CPU
# on one core; zstd:1 makes ~10% smaller output at ~20% less throughput, zstd:3 ~13% smaller
# at ~38% less (1 GiB-guest captures, docs/BENCHMARKS.md, bench_codec). The WAN preset is
# zstd:3; zstd:1 is 3% larger at ~1.3x its speed.
DATACENTER: Final = Compression("lz4")
WAN: Final = Compression("zstd", 3)


@dataclass(frozen=True, slots=True)
class PageCodecConfig:
    """Configuration of a codec session.

    ``page_size`` and ``cache_bytes`` must be the same on both sides: they go into the session
    header and the decoder checks them. The rest steers only the encoder.

    ``cache_bytes`` bounds the page cache that both sides keep (``cache_bytes // page_size``
    slots of one page). The encoder's lookup tables add roughly 5-10% on top of that.
    """

    page_size: int = 4096
    cache_bytes: int = 256 << 20
    dedup: bool = True
    delta: bool = True
    # A re-sent page is sent as a delta when its changed runs (bytes plus 4 bytes per run)
    # take at most this many bytes (None: a quarter page); otherwise it goes as a literal
    # page, which the batch compressor handles better than a dense delta.
    delta_max_bytes: int | None = None
    compression: Compression = field(default=DATACENTER)

    def __post_init__(self) -> None:
        size = self.page_size
        if not MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE or size & (size - 1):
            raise ConfigError(f"page size {size} is not a power of two in "
                              f"{MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}")
        if self.cache_bytes < size or self.cache_slots >= 1 << 32:
            raise ConfigError(f"cache size {self.cache_bytes} must hold at least one page "
                              f"of {size} bytes and fewer than 2^32 pages")
        if not 0 <= self.delta_limit <= size // 2:
            raise ConfigError(f"delta_max_bytes {self.delta_max_bytes} must be in "
                              f"0..{size // 2} (half a page)")

    @property
    def delta_limit(self) -> int:
        """The effective ``delta_max_bytes``."""
        return self.page_size // 4 if self.delta_max_bytes is None else self.delta_max_bytes

    @property
    def cache_slots(self) -> int:
        """How many pages the cache holds."""
        return self.cache_bytes // self.page_size


KIND_NAMES: Final = ("zero", "ref", "delta", "literal", "opaque")


@dataclass(slots=True)
class KindStats:
    """Items of one kind: how many, original bytes, and encoded bytes before compression."""

    count: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, other: KindStats) -> None:
        self.count += other.count
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out


@dataclass(slots=True)
class CodecStats:
    """What a batch, or a whole session, was made of.

    ``bytes_out`` of a kind is what its items take in the payload *before* the batch is
    compressed (a literal page: the page; a delta: its runs; a reference: 4 bytes; a zero page:
    nothing). Per-page metadata (kind, block, offset, tag) is counted in ``metadata_bytes``.
    ``payload_bytes`` is the whole payload before compression, ``wire_bytes`` what was sent
    (batch headers plus compressed payloads).
    """

    zero: KindStats = field(default_factory=KindStats)
    ref: KindStats = field(default_factory=KindStats)
    delta: KindStats = field(default_factory=KindStats)
    literal: KindStats = field(default_factory=KindStats)
    opaque: KindStats = field(default_factory=KindStats)
    batches: int = 0
    metadata_bytes: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0

    def kinds(self) -> dict[str, KindStats]:
        return {"zero": self.zero, "ref": self.ref, "delta": self.delta,
                "literal": self.literal, "opaque": self.opaque}

    @property
    def pages(self) -> int:
        return self.zero.count + self.ref.count + self.delta.count + self.literal.count

    @property
    def bytes_in(self) -> int:
        """Original bytes: every page and every opaque byte."""
        return sum(k.bytes_in for k in self.kinds().values())

    @property
    def ratio(self) -> float:
        """Original bytes per byte sent (higher is better); 0 before anything was sent."""
        return self.bytes_in / self.wire_bytes if self.wire_bytes else 0.0

    def add(self, other: CodecStats) -> None:
        for name, mine in self.kinds().items():
            mine.add(other.kinds()[name])
        self.batches += other.batches
        self.metadata_bytes += other.metadata_bytes
        self.payload_bytes += other.payload_bytes
        self.wire_bytes += other.wire_bytes

    def as_dict(self) -> dict[str, int]:
        """Flat counters for metrics: ``pages_zero``, ``bytes_in_zero``, ``bytes_out_zero``..."""
        out: dict[str, int] = {}
        for name, k in self.kinds().items():
            out[f"items_{name}"] = k.count
            out[f"bytes_in_{name}"] = k.bytes_in
            out[f"bytes_out_{name}"] = k.bytes_out
        out.update(batches=self.batches, metadata_bytes=self.metadata_bytes,
                   payload_bytes=self.payload_bytes, wire_bytes=self.wire_bytes)
        return out
