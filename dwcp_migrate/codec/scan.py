"""One channel's raw QEMU stream in, batches of page-codec items out (no I/O).

:class:`ChannelScanner` is the stream side of the pipeline: it parses a channel (main or
multifd, told apart by the first 4 bytes), turns every page into a
:class:`~dwcp_migrate.pagecodec.PageItem` and everything else into
:class:`~dwcp_migrate.pagecodec.OpaqueItem` bytes, cuts the items into batches, and counts
iterations (see :mod:`dwcp_migrate.codec.stats`).

How records become items (so that :mod:`dwcp_migrate.codec.decoder` can rebuild the exact
bytes from the items alone, statelessly):

* RAM ``PAGE`` record -> ``PageItem(block, offset, page, tag=flags)``; ``flags`` is QEMU's
  flag word as it was on the wire (``PAGE``, CONTINUE or not), so the decoder knows whether
  the block name was written;
* RAM ``ZERO`` record with fill byte 0 -> ``PageItem(block, offset, 4 KiB of zeros,
  tag=flags)``; the page codec sends it as a flag. A ZERO record with another fill byte (QEMU
  never writes one) stays opaque: the page would not be its content;
* multifd page -> ``PageItem(block, offset, page, tag=0)``: a multifd page is only its data
  on the wire (block and offset are in the packet header, which is opaque); tag 0 says so;
* every other record (section headers, EOS, MEM_SIZE, multifd packet headers, XBZRLE,
  device state passed through) -> its exact bytes (``write_to``), consecutive ones merged
  into one OpaqueItem.

Cost per page is what matters (30k-250k pages/s): the loop below makes one PageItem per page,
keeps its counters in locals and does one bytearray lookup for the iteration bookkeeping;
everything else (a block change, a page already sent in this iteration, opaque bytes, a full
batch) takes a slow path that saves and reloads the locals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, cast

from dwcp_migrate.codec.errors import PageSizeMismatchError
from dwcp_migrate.codec.stats import ChannelStats, IterationStats
from dwcp_migrate.pagecodec import Item, OpaqueItem, PageItem
from dwcp_migrate.stream import (
    ChannelKind,
    Configuration,
    MainChannelParser,
    MemSize,
    MultifdChannelParser,
    MultifdPacketHeader,
    MultifdPage,
    Opaque,
    RamPage,
    Record,
    SectionHeader,
    StreamClosedError,
    StreamTruncatedError,
    ZeroPage,
    classify_channel,
)
from dwcp_migrate.stream.records import (
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    RAM_SAVE_FLAG_CONTINUE,
    ByteData,
)

DEFAULT_BATCH_PAGES: Final = 1024
DEFAULT_BATCH_BYTES: Final = 4 << 20
_RAM_HEADER: Final = 8  # be64 offset | flags before every RAM record
# Generation arrays (one byte per guest page, for iterations and re-sent pages): a block of
# unknown size grows its array up to 64 Mi pages (256 GiB), all blocks together to 1 Gi pages
# (4 TiB of guest RAM, 1 GiB of memory here); beyond that, statistics blur (see _gen_slot).
_MAX_BLOCK_PAGES: Final = 1 << 26
_MAX_TRACKED_PAGES: Final = 1 << 30


@dataclass(slots=True)
class ScannedBatch:
    """Items for one page-codec batch, all of one iteration (``IterationStats.number``)."""

    items: list[Item]
    iteration: int


class ChannelScanner:
    """Raw chunks of one channel in, batches of items (:class:`ScannedBatch`) out.

    A batch is closed when it holds ``batch_pages`` pages, when its pages and opaque bytes
    reach ``batch_bytes`` (opaque data longer than that is split), at every iteration boundary
    (so that a batch belongs to one iteration), on :meth:`flush` and on :meth:`finish`.

    With ``auto_flush`` (the default) a ``feed`` also closes the open batch at its end when
    the sender may now wait for the far side: after a multifd SYNC packet (QEMU's round or
    completion sync, which the destination waits for) and once the stream is passed through
    (the device state at switchover, or a stream the parser does not know). Holding those
    bytes back until the batch fills would add to the guest's downtime, or stall a
    migration whose source waits for the destination.
    """

    def __init__(self, page_size: int = 4096, *, batch_pages: int = DEFAULT_BATCH_PAGES,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, auto_flush: bool = True) -> None:
        if batch_pages < 1 or batch_bytes < page_size:
            raise ValueError(f"batches need at least 1 page and {page_size} bytes, not "
                             f"{batch_pages} pages / {batch_bytes} bytes")
        self.page_size = page_size
        self.batch_pages = batch_pages
        self.batch_bytes = batch_bytes
        self.auto_flush = auto_flush
        self._sync_seen = False
        self.kind: ChannelKind | None = None
        self.parser: MainChannelParser | MultifdChannelParser | None = None
        self.iterations: list[IterationStats] = [IterationStats(1)]
        self.truncation: StreamTruncatedError | None = None
        self._head = b""  # the first bytes, until 4 tell the channel kind
        self._ready: list[ScannedBatch] = []
        self._closed = False
        self._zero_page = bytes(page_size)
        self._shift = page_size.bit_length() - 1
        # The open batch. Its page counters live in locals of _take while it runs.
        self._items: list[Item] = []
        self._n = 0  # pages in the batch
        self._z = 0  # of which ZERO records
        self._named = 0  # bytes of block names written by RAM records without CONTINUE
        self._resent = 0  # of which pages sent before
        self._opaque_bytes = 0  # bytes of OpaqueItems in the batch
        # Close the batch when _n reaches _limit: batch_pages, or fewer when the batch's bytes
        # (pages and opaque) would pass batch_bytes.
        self._page_limit = min(batch_pages, -(-batch_bytes // page_size))
        self._limit = self._page_limit
        self._pending: list[ByteData] = []  # opaque bytes not yet turned into an item
        self._pending_len = 0
        # Iterations: per block and page, the iteration (mod 255, 0: never) that last sent it.
        self._gen = 1
        self._gen_arrays: dict[bytes, bytearray] = {}
        self._known_pages: dict[bytes, int] = {}  # block -> pages, from MEM_SIZE
        self._tracked = 0
        self._cur_block: bytes | None = None
        self._cur_gen = bytearray()
        self._seen_page = False
        self._last_packet: frozenset[int] = frozenset()  # offsets of the previous packet
        self._last_packet_block = b""
        self._force = False  # a RAM END section began: its first page starts an iteration
        # Where the current RAM section began in the open batch: (item index, _n, _z, _named,
        # _resent, _opaque_bytes) there.
        self._mark: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)

    # ---- public ----------------------------------------------------------------------------
    @property
    def stats(self) -> ChannelStats:
        kind = self.kind.value if self.kind is not None else "unknown"
        return ChannelStats(kind, self.iterations)

    @property
    def complete(self) -> bool:
        """After :meth:`finish`: the channel ended where a QEMU stream may end."""
        return self._closed and self.truncation is None

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[ScannedBatch]:
        """Parse a chunk; returns the batches it completed."""
        if self._closed:
            raise StreamClosedError(self.parser.offset if self.parser else len(self._head))
        if self.parser is None:
            if not self._head and len(chunk) >= 4:
                self._start(bytes(chunk[:4]))
            else:
                self._head += bytes(chunk)
                if len(self._head) < 4:
                    return []
                chunk, self._head = self._head, b""
                self._start(chunk[:4])
        assert self.parser is not None
        self._take(self.parser.feed(chunk))
        if self.auto_flush and (self._sync_seen or self.parser.passthrough):
            self._sync_seen = False
            self._close_batch()
        return self._take_ready()

    def flush(self) -> list[ScannedBatch]:
        """Close the open batch now (e.g. when the sender goes quiet); returns what is ready.

        Bytes of a record that is not complete yet stay in the parser.
        """
        self._close_batch()
        return self._take_ready()

    def finish(self) -> list[ScannedBatch]:
        """The channel ended: flush everything. Sets :attr:`truncation` if it ended early."""
        if self._closed:
            return []
        if self.parser is None:  # fewer than 4 bytes in all: not a QEMU stream
            self._start(self._head.ljust(4, b"\0"))
            assert self.parser is not None
            self._take(self.parser.feed(self._head))
        assert self.parser is not None
        self._take(self.parser.end_of_stream(strict=False))
        self.truncation = self.parser.truncation
        self._close_batch()
        self._closed = True
        return self._take_ready()

    # ---- internals -------------------------------------------------------------------------
    def _start(self, prefix: bytes) -> None:
        kind = classify_channel(prefix)
        assert kind is not None
        self.kind = kind
        # A channel of unknown kind goes to the main parser, which passes it through whole.
        if kind is ChannelKind.MULTIFD:
            self.parser = MultifdChannelParser(self.page_size)
        else:
            self.parser = MainChannelParser(self.page_size)

    def _take_ready(self) -> list[ScannedBatch]:
        ready, self._ready = self._ready, []
        return ready

    def _take(self, records: list[Record]) -> None:
        """The hot loop. Keep it flat: locals, no calls on the common path."""
        cont = RAM_SAVE_FLAG_CONTINUE
        shift = self._shift
        zero_page = self._zero_page
        pending = self._pending  # cleared in place, so this name stays valid
        items = self._items
        append = items.append
        n, z, named, resent, limit = self._n, self._z, self._named, self._resent, self._limit
        cur, gen, cg = self._cur_block, self._cur_gen, self._gen
        # Any: the dispatch is on type(r) held in a local (one call per record), which mypy
        # cannot narrow through.
        for r in cast("list[Any]", records):
            t = type(r)
            if t is RamPage:
                data = r.data
                zf = 0
            elif t is MultifdPage:
                if pending:
                    self._flush_pending()
                append(PageItem(r.block, r.offset, r.data, 0))
                n += 1
                if n >= limit:
                    self._n, self._z, self._named, self._resent = n, z, named, resent
                    self._close_batch()
                    items = self._items
                    append = items.append
                    n, z, named, resent, limit = 0, 0, 0, 0, self._limit
                continue
            elif t is ZeroPage and not r.fill:
                data = zero_page
                zf = 1
            else:
                self._n, self._z, self._named, self._resent = n, z, named, resent
                self._other(r)
                items = self._items
                append = items.append
                n, z, named, resent, limit = (self._n, self._z, self._named, self._resent,
                                              self._limit)
                cur, gen, cg = self._cur_block, self._cur_gen, self._gen
                continue
            # A RAM page or zero page (both RAM records of the main channel).
            block = r.block
            off = r.offset
            if block is not cur or pending:
                self._n, self._z, self._named, self._resent = n, z, named, resent
                self._page_slow(block)
                items = self._items
                append = items.append
                n, z, named, resent, limit = (self._n, self._z, self._named, self._resent,
                                              self._limit)
                cur, gen, cg = self._cur_block, self._cur_gen, self._gen
            i = off >> shift
            try:
                g = gen[i]
            except IndexError:
                gen, i = self._gen_slot(block, i)
                g = gen[i]
            if g:
                if g == cg:  # sent before in this iteration: QEMU synced since
                    self._n, self._z, self._named, self._resent = n, z, named, resent
                    self._split_at_mark()
                    items = self._items
                    append = items.append
                    n, z, named, resent, limit = (self._n, self._z, self._named, self._resent,
                                                  self._limit)
                    cg = self._gen
                resent += 1
            gen[i] = cg
            flags = r.flags
            append(PageItem(block, off, data, flags))
            if not flags & cont:
                named += 1 + len(block)
            n += 1
            z += zf
            if n >= limit:
                self._n, self._z, self._named, self._resent = n, z, named, resent
                self._close_batch()
                items = self._items
                append = items.append
                n, z, named, resent, limit = 0, 0, 0, 0, self._limit
        self._n, self._z, self._named, self._resent = n, z, named, resent
        self._cur_block = cur

    # ---- iterations ------------------------------------------------------------------------
    def _gens(self, block: bytes) -> bytearray:
        """The generation array of a block: per page, the iteration (mod 255) that last sent
        it, 0 for never."""
        gens = self._gen_arrays.get(block)
        if gens is None:
            gens = self._gen_arrays[block] = bytearray(self._known_pages.get(block, 0))
        return gens

    def _gen_slot(self, block: bytes, index: int) -> tuple[bytearray, int]:
        """Where page ``index`` of ``block`` keeps its generation. An array grows on demand
        when the block's size is unknown (multifd channels) up to a cap; an index beyond a
        known size (QEMU would refuse it) or beyond the cap is folded into the array, which
        can only blur the statistics of such a stream."""
        gens = self._gens(block)
        if index < len(gens):
            return gens, index
        if (block not in self._known_pages and index < _MAX_BLOCK_PAGES
                and self._tracked + index < _MAX_TRACKED_PAGES):
            grow = max(index + 1, 2 * len(gens)) - len(gens)
            gens.extend(bytes(grow))
            self._tracked += grow
            return gens, index
        if not gens:
            gens.append(0)
        return gens, index % len(gens)

    def _page_slow(self, block: bytes) -> None:
        """Before a RAM page of another block, or with opaque bytes pending."""
        self._flush_pending()
        if block is not self._cur_block:
            self._cur_block = block
            self._cur_gen = self._gens(block)
            if self._force:
                self._force = False
                if self._seen_page:
                    self._split_at_mark()
        self._seen_page = True

    def _set_mark(self) -> None:
        """A RAM section begins here: where its iteration begins if it re-sends a page."""
        self._flush_pending()
        self._mark = (len(self._items), self._n, self._z, self._named, self._resent,
                      self._opaque_bytes)

    def _split_at_mark(self) -> None:
        """Start a new iteration at the mark: items before it close the old iteration's
        batch, items after it open the new one."""
        self._flush_pending()
        at, n, z, named, resent, opaque = self._mark
        items = self._items
        tail = items[at:]
        if at:
            del items[at:]
            rest = (self._n - n, self._z - z, self._named - named, self._resent - resent,
                    self._opaque_bytes - opaque)
            self._n, self._z, self._named, self._resent, self._opaque_bytes = (
                n, z, named, resent, opaque)
            self._close_batch()
            self._items = tail
            self._n, self._z, self._named, self._resent, self._opaque_bytes = rest
            self._recompute_limit()
        self._mark = (0, 0, 0, 0, 0, 0)
        self._next_iteration()
        # Pages of the new iteration that came before the one that showed the sync.
        gen = self._gen
        for item in tail:
            if type(item) is PageItem:
                gens, i = self._gen_slot(item.block, item.offset >> self._shift)
                gens[i] = gen

    def _next_iteration(self) -> None:
        self.iterations.append(IterationStats(len(self.iterations) + 1))
        self._gen += 1
        if self._gen > 255:
            # Renumber: every page sent before becomes "an earlier iteration" (1).
            table = bytes((0,)) + bytes((1,)) * 255
            for gens in self._gen_arrays.values():
                gens[:] = gens.translate(table)
            self._gen = 2

    def _packet_position(self, header: MultifdPacketHeader) -> None:
        """A multifd packet: does it re-send a page of the current iteration?

        A page of the previous packet on this channel does not count: QEMU 7.2 sends the page
        that fills a packet again as the first page of the next one (seen on the captures:
        its own counter is short by those pages), with no sync in between.
        """
        shift = self._shift
        block = header.block
        pages: list[tuple[bytearray, int]] = []
        repeat = False
        resent = 0
        cg = self._gen
        previous = self._last_packet if block == self._last_packet_block else frozenset()
        for off in header.offsets:
            gens, i = self._gen_slot(block, off >> shift)
            g = gens[i]
            if g:
                resent += 1
                repeat = repeat or (g == cg and off not in previous)
            pages.append((gens, i))
        if repeat:
            self._flush_pending()
            self._close_batch()
            self._next_iteration()
            cg = self._gen
        for gens, i in pages:
            gens[i] = cg
        self._last_packet = frozenset(header.offsets)
        self._last_packet_block = block
        it = self.iterations[-1]
        it.resent += resent
        it.header_zero_pages += header.zero_pages

    def _other(self, r: Record) -> None:
        """Any record that is not a page in the hot loop: its bytes become opaque."""
        t = type(r)
        if t is Opaque:
            self._add_opaque(r.data)  # type: ignore[union-attr]
            return
        if t is MultifdPacketHeader:
            assert isinstance(r, MultifdPacketHeader)
            self._packet_position(r)
            self._sync_seen = self._sync_seen or r.sync
        elif t is SectionHeader:
            assert isinstance(r, SectionHeader)
            if r.section_type in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                self._set_mark()
            if r.section_type == QEMU_VM_SECTION_END:
                self._force = True
                self._cur_block = None
        elif t is MemSize:
            assert isinstance(r, MemSize)
            for block in r.blocks:
                pages = -(-block.used_length // self.page_size)
                if self._tracked + pages <= _MAX_TRACKED_PAGES:
                    gens = self._gens(block.name)
                    self._known_pages[block.name] = max(pages, len(gens))
                    gens.extend(bytes(self._known_pages[block.name] - len(gens)))
                    self._tracked += pages
        elif t is Configuration:
            assert isinstance(self.parser, MainChannelParser)
            if self.parser.page_size != self.page_size:
                raise PageSizeMismatchError(
                    f"the QEMU stream uses {self.parser.page_size}-byte target pages, the page "
                    f"codec is configured for {self.page_size}: configure the codec's page "
                    f"size to match the guest architecture")
        pending = self._pending
        before = len(pending)
        r.write_to(pending.append)
        for piece in pending[before:]:
            self._pending_len += len(piece)
        self._after_opaque()

    def _add_opaque(self, data: ByteData) -> None:
        """Opaque bytes of any size: split so that no batch grows past ``batch_bytes``."""
        view = memoryview(data)
        while view:
            room = self.batch_bytes - self._batch_bytes() - self._pending_len
            if room <= 0:
                self._close_batch()
                continue
            if len(view) < room:
                self._pending.append(view)
                self._pending_len += len(view)
                break
            self._pending.append(view[:room])
            self._pending_len += room
            view = view[room:]
            self._close_batch()
        self._after_opaque()

    def _batch_bytes(self) -> int:
        return self._n * self.page_size + self._opaque_bytes

    def _after_opaque(self) -> None:
        """Close the batch if it is full, else recompute how many pages still fit."""
        if self._batch_bytes() + self._pending_len >= self.batch_bytes:
            self._close_batch()
        else:
            self._recompute_limit()

    def _recompute_limit(self) -> None:
        room = self.batch_bytes - self._batch_bytes() - self._pending_len
        fit = max(1, -(-room // self.page_size))
        self._limit = min(self._page_limit, self._n + fit)

    def _flush_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._items.append(OpaqueItem(data))
        self._opaque_bytes += self._pending_len
        pending.clear()
        self._pending_len = 0

    def _close_batch(self) -> None:
        """Turn the open batch into a ScannedBatch and account for it."""
        self._flush_pending()
        items = self._items
        if not items:
            return
        it = self.iterations[-1]
        n, z = self._n, self._z
        size = self.page_size
        if self.kind is ChannelKind.MULTIFD:
            it.page_records += n
            page_bytes = n * size
        else:
            it.page_records += n - z
            it.zero_records += z
            page_bytes = (n - z) * (_RAM_HEADER + size) + z * (_RAM_HEADER + 1) + self._named
        it.stream_bytes += page_bytes + self._opaque_bytes
        it.opaque_bytes += self._opaque_bytes
        it.resent += self._resent
        self._ready.append(ScannedBatch(items, it.number))
        self._items = []
        self._n = self._z = self._named = self._resent = self._opaque_bytes = 0
        self._limit = self._page_limit
        self._mark = (0, 0, 0, 0, 0, 0)


__all__ = ["DEFAULT_BATCH_BYTES", "DEFAULT_BATCH_PAGES", "ChannelScanner", "ScannedBatch"]
