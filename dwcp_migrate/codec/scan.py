"""One channel's raw QEMU stream in, batches of page-codec items out (no I/O).

:class:`ChannelScanner` is the stream side of the pipeline: it parses a channel (main or
multifd, told apart by the first 4 bytes), turns every page into a page of a
:class:`~dwcp_migrate.pagecodec.PageBatch` (batch columns: no object per page) and everything
else into opaque bytes, cuts them into batches, and counts iterations (see
:mod:`dwcp_migrate.codec.stats`). Below, "item" means an entry of those columns.

How records become items (so that :mod:`dwcp_migrate.codec.decoder` can rebuild the exact
bytes from the items alone, statelessly):

* RAM ``PAGE`` record -> ``PageItem(block, offset, page, tag=flags)``; ``flags`` is QEMU's
  flag word as it was on the wire (``PAGE``, CONTINUE or not), so the decoder knows whether
  the block name was written;
* RAM ``ZERO`` record with fill byte 0 -> ``PageItem(block, offset, 4 KiB of zeros,
  tag=flags)``, as a page without data (nothing is made, hashed or compared for it); the
  page codec sends it as a flag. A ZERO record with another fill byte (QEMU never writes
  one) stays opaque: the page would not be its content;
* multifd page -> ``PageItem(block, offset, page, tag=0)``: a multifd page is only its data
  on the wire (block and offset are in the packet header, which is opaque); tag 0 says so;
* every other record (section headers, EOS, MEM_SIZE, multifd packet headers, XBZRLE,
  device state passed through) -> its exact bytes (``write_to``), consecutive ones merged
  into one OpaqueItem.

Cost per page is what matters (100k-250k pages/s): on the main channel :meth:`_ram` replaces
the parser's RAM loop (``_FusedParser``) and parses PAGE and ZERO records straight into the
batch columns, without a record object; other records take the parser's way and
:meth:`_take`. Both loops keep their counters in locals and do one bytearray lookup for the
iteration bookkeeping; everything else (a block change, a page already sent in this
iteration, opaque bytes, a full batch) takes a slow path that saves and reloads the locals.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np

from dwcp_migrate.codec.errors import PageSizeMismatchError
from dwcp_migrate.codec.stats import ChannelStats, IterationStats
from dwcp_migrate.pagecodec import Item, PageBatch
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
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    ByteData,
)

DEFAULT_BATCH_PAGES: Final = 1024
DEFAULT_BATCH_BYTES: Final = 4 << 20
_RAM_HEADER: Final = 8  # be64 offset | flags before every RAM record
_PAGE: Final = RAM_SAVE_FLAG_PAGE
_ZERO: Final = RAM_SAVE_FLAG_ZERO
_PAGE_CONT: Final = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_ZERO_CONT: Final = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_BE64_UNPACK: Final = struct.Struct(">Q").unpack_from
_ZERO_RUN: Final = 32  # ZERO|CONTINUE records in a row before _zero_run tries a numpy step
_ZERO_RECORD: Final = np.dtype([("word", ">u8"), ("fill", "u1")])  # 9 bytes, packed
# Generation arrays (one byte per guest page, for iterations and re-sent pages): a block of
# unknown size grows its array up to 64 Mi pages (256 GiB), all blocks together to 1 Gi pages
# (4 TiB of guest RAM, 1 GiB of memory here); beyond that, statistics blur (see _gen_slot).
_MAX_BLOCK_PAGES: Final = 1 << 26
_MAX_TRACKED_PAGES: Final = 1 << 30


@dataclass(slots=True)
class ScannedBatch:
    """One page-codec batch in columns, all of one iteration (``IterationStats.number``).

    QEMU's ZERO records are pages without data in ``pages`` (see
    :class:`~dwcp_migrate.pagecodec.PageBatch`): no page of zeros is made for them.
    """

    pages: PageBatch
    iteration: int
    page_size: int = 4096

    @property
    def items(self) -> list[Item]:
        """The batch as items (slower; for callers of ``PageEncoder.encode_batch``)."""
        return self.pages.items(self.page_size)


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
        # After a feed: it reached a point where the sender may wait for the far side (a
        # multifd SYNC packet, or the stream is passed through): what is ready should go now.
        self.waiting = False
        self._sync_seen = False
        self.kind: ChannelKind | None = None
        self.parser: MainChannelParser | MultifdChannelParser | None = None
        self.iterations: list[IterationStats] = [IterationStats(1)]
        self.truncation: StreamTruncatedError | None = None
        self._head = b""  # the first bytes, until 4 tell the channel kind
        self._ready: list[ScannedBatch] = []
        self._closed = False
        self._shift = page_size.bit_length() - 1
        # The open batch, in columns. Its page counters live in locals of _take while it runs.
        self._batch = PageBatch()
        self._run_block: bytes | None = None  # the block of the batch's last block run
        self._n = 0  # pages in the batch
        self._w = 0  # their weight: 8 per page with data, 1 per page without (a zero page)
        self._z = 0  # of which ZERO records
        self._named = 0  # bytes of block names written by RAM records without CONTINUE
        self._resent = 0  # of which pages sent before
        self._opaque_bytes = 0  # bytes of OpaqueItems in the batch
        # Close the batch when _w reaches _limit: batch_pages pages with data (a page without
        # data, a zero page, costs almost nothing in a batch: it counts an eighth), or fewer
        # when the batch's bytes (pages and opaque) would pass batch_bytes.
        self._page_limit = 8 * min(batch_pages, -(-batch_bytes // page_size))
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
        # Where the current RAM section began in the open batch: (_n, _w, data pages, opaque
        # runs, _z, _named, _resent, _opaque_bytes) there.
        self._mark: tuple[int, int, int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0, 0, 0)

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
        self.waiting = self._sync_seen or self.parser.passthrough
        if self.auto_flush and self.waiting:
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
            self.parser = _FusedParser(self, self.page_size)

    def _take_ready(self) -> list[ScannedBatch]:
        ready, self._ready = self._ready, []
        return ready

    def _appenders(self) -> tuple[Any, Any, Any, Any]:
        b = self._batch
        return b.offsets.append, b.tags.append, b.data_at.append, b.datas.append

    def _counters(self) -> tuple[int, int, int, int, int, int]:
        return self._n, self._w, self._z, self._named, self._resent, self._limit

    def _take(self, records: list[Record]) -> None:
        """Records to batch columns: multifd pages, and the RAM records that the fused loop
        (:meth:`_ram`) left to the parser. Keep it flat: locals, no calls on the common
        path."""
        cont = RAM_SAVE_FLAG_CONTINUE
        shift = self._shift
        pending = self._pending  # cleared in place, so this name stays valid
        off_add, tag_add, at_add, data_add = self._appenders()
        n, w, z, named, resent, limit = self._counters()
        cur, gen, cg = self._cur_block, self._cur_gen, self._gen
        mblock = self._run_block  # multifd: the block of the last page
        # Any: the dispatch is on type(r) held in a local (one call per record), which mypy
        # cannot narrow through.
        for r in cast("list[Any]", records):
            t = type(r)
            if t is RamPage:
                data = r.data
            elif t is MultifdPage:
                if pending or r.block is not mblock:
                    self._n = n
                    self._multifd_slow(r.block)
                    mblock = r.block
                off_add(r.offset)
                tag_add(0)
                at_add(n)
                data_add(r.data)
                n += 1
                w += 8
                if w >= limit:
                    self._n, self._w, self._z, self._named, self._resent = (
                        n, w, z, named, resent)
                    self._close_batch()
                    off_add, tag_add, at_add, data_add = self._appenders()
                    n, w, z, named, resent, limit = self._counters()
                continue
            elif t is ZeroPage and not r.fill:
                data = None
            else:
                self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
                self._other(r)
                off_add, tag_add, at_add, data_add = self._appenders()
                n, w, z, named, resent, limit = self._counters()
                cur, gen, cg = self._cur_block, self._cur_gen, self._gen
                mblock = self._run_block
                continue
            # A RAM page or zero page (both RAM records of the main channel).
            block = r.block
            off = r.offset
            if block is not cur or pending:
                self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
                self._page_slow(block)
                off_add, tag_add, at_add, data_add = self._appenders()
                n, w, z, named, resent, limit = self._counters()
                cur, gen, cg = self._cur_block, self._cur_gen, self._gen
            i = off >> shift
            try:
                g = gen[i]
            except IndexError:
                gen, i = self._gen_slot(block, i)
                g = gen[i]
            if g:
                if g == cg:  # sent before in this iteration: QEMU synced since
                    self._n, self._w, self._z, self._named, self._resent = (
                        n, w, z, named, resent)
                    self._split_at_mark()
                    off_add, tag_add, at_add, data_add = self._appenders()
                    n, w, z, named, resent, limit = self._counters()
                    cg = self._gen
                resent += 1
            gen[i] = cg
            flags = r.flags
            off_add(off)
            tag_add(flags)
            if data is None:
                z += 1
                w += 1
            else:
                at_add(n)
                data_add(data)
                w += 8
            if not flags & cont:
                named += 1 + len(block)
            n += 1
            if w >= limit:
                self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
                self._close_batch()
                off_add, tag_add, at_add, data_add = self._appenders()
                n, w, z, named, resent, limit = self._counters()
        self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
        self._cur_block = cur

    def _ram(self, parser: MainChannelParser, buf: bytes, mv: memoryview, pos: int, end: int,
             out: list[Record]) -> tuple[int, int]:
        """The hot loop: a RAM section's PAGE and ZERO records parsed straight into the
        batch columns, with no record object (``_FusedParser._run_ram``).

        Same contract as ``MainChannelParser._run_ram``, whose code it mirrors for those
        records; at any other record (EOS, XBZRLE, a ZERO record with another fill byte,
        CONTINUE before any block name, ...) it hands the rest of the section to that method,
        whose records then go through :meth:`_take`.
        """
        if out:  # records before this point (the section header...) come first
            self._take(out)
            out.clear()
        size = parser.page_size
        mask = size - 1
        unpack = _BE64_UNPACK
        block = parser._last_block
        cont = RAM_SAVE_FLAG_CONTINUE
        shift = self._shift
        pending = self._pending
        off_add, tag_add, at_add, data_add = self._appenders()
        n, w, z, named, resent, limit = self._counters()
        cur, gen, cg = self._cur_block, self._cur_gen, self._gen
        need = 0
        zrun = 0  # ZERO|CONTINUE records in a row
        data: memoryview | None
        while True:
            if end - pos < 8:
                need = pos + 8
                break
            raw = unpack(buf, pos)[0]
            flags = raw & mask
            if flags == _PAGE_CONT:
                q = pos + 8 + size
                if q > end:
                    need = q
                    break
                if block is None:
                    need = -1
                    break
                data = mv[pos + 8:q]
            elif flags == _ZERO_CONT:
                q = pos + 9
                if q > end:
                    need = q
                    break
                if buf[pos + 8] or block is None:
                    need = -1
                    break
                data = None
            elif flags in (_PAGE, _ZERO):
                p = pos + 9
                if p > end:
                    need = p
                    break
                p += buf[pos + 8]
                if flags == _PAGE:
                    q = p + size
                    if q > end:
                        need = q
                        break
                    data = mv[p:q]
                else:
                    q = p + 1
                    if q > end:
                        need = q
                        break
                    if buf[p]:
                        need = -1
                        break
                    data = None
                name = buf[pos + 9:p]
                block = cur if name == cur else name  # keep one object per block
            else:
                need = -1
                break
            if block is not cur or pending:
                self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
                assert block is not None
                self._page_slow(block)
                off_add, tag_add, at_add, data_add = self._appenders()
                n, w, z, named, resent, limit = self._counters()
                cur, gen, cg = self._cur_block, self._cur_gen, self._gen
            off = raw ^ flags
            i = off >> shift
            try:
                g = gen[i]
            except IndexError:
                assert block is not None
                gen, i = self._gen_slot(block, i)
                g = gen[i]
            if g:
                if g == cg:  # sent before in this iteration: QEMU synced since
                    self._n, self._w, self._z, self._named, self._resent = (
                        n, w, z, named, resent)
                    self._split_at_mark()
                    off_add, tag_add, at_add, data_add = self._appenders()
                    n, w, z, named, resent, limit = self._counters()
                    cg = self._gen
                resent += 1
            gen[i] = cg
            off_add(off)
            tag_add(flags)
            if data is None:
                z += 1
                w += 1
            else:
                at_add(n)
                data_add(data)
                w += 8
            if not flags & cont:
                named += 1 + len(cur)  # type: ignore[arg-type]  # cur is block here
            n += 1
            pos = q
            if flags == _ZERO_CONT:
                # A long run of zero pages (a guest's untouched RAM) goes in one numpy step.
                zrun += 1
                if zrun >= _ZERO_RUN and w < limit:
                    k, sent = self._zero_run(buf, pos, end, limit - w, gen, cg)
                    if k:
                        n += k
                        w += k
                        z += k
                        resent += sent
                        pos += 9 * k
                    else:
                        zrun = 0  # not here: try again after another _ZERO_RUN records
            else:
                zrun = 0
            if w >= limit:
                self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
                self._close_batch()
                off_add, tag_add, at_add, data_add = self._appenders()
                n, w, z, named, resent, limit = self._counters()
        self._n, self._w, self._z, self._named, self._resent = n, w, z, named, resent
        self._cur_block = cur
        parser._last_block = block
        if need < 0:
            return MainChannelParser._run_ram(parser, buf, mv, pos, end, out)
        return pos, need

    def _zero_run(self, buf: bytes, pos: int, end: int, room: int, gen: bytearray, cg: int
                  ) -> tuple[int, int]:
        """ZERO|CONTINUE records (fill 0) from ``pos`` in one go, up to ``room`` of them, when
        at least _ZERO_RUN follow and they are plain: ascending pages inside the block's
        generation array, none sent in this iteration yet. Returns (records taken, of which
        re-sent), (0, 0) when the caller should go on record by record."""
        count = min((end - pos) // 9, room, 1 << 16)
        if count < _ZERO_RUN:
            return 0, 0
        records = np.frombuffer(buf, _ZERO_RECORD, count, pos)
        words = records["word"]
        plain = ((words & np.uint64(self.page_size - 1)) == _ZERO_CONT) & (records["fill"] == 0)
        k = count if plain.all() else int(np.argmin(plain))
        if k < _ZERO_RUN:
            return 0, 0
        offsets = words[:k] & np.uint64(~(self.page_size - 1) & 0xFFFF_FFFF_FFFF_FFFF)
        pages = (offsets >> np.uint64(self._shift)).astype(np.int64)
        if (np.diff(pages) <= 0).any() or pages[0] < 0 or pages[-1] >= len(gen):
            return 0, 0
        generations = np.frombuffer(gen, np.uint8)
        seen = generations[pages]
        if (seen == cg).any():
            return 0, 0
        generations[pages] = cg
        del generations  # release the view: the array may grow later
        batch = self._batch
        batch.offsets += offsets.tolist()
        batch.tags += [_ZERO_CONT] * k
        return k, int(np.count_nonzero(seen))

    def _new_run(self, block: bytes) -> None:
        """Pages of ``block`` follow in the open batch."""
        runs = self._batch.blocks
        if not runs or runs[-1][1] != block:
            runs.append((self._n, block))
        self._run_block = block

    def _multifd_slow(self, block: bytes) -> None:
        """Before a multifd page of another block, or with opaque bytes pending."""
        self._flush_pending()
        self._new_run(block)

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
        self._new_run(block)
        self._seen_page = True

    def _set_mark(self) -> None:
        """A RAM section begins here: where its iteration begins if it re-sends a page."""
        self._flush_pending()
        b = self._batch
        self._mark = (self._n, self._w, len(b.data_at), len(b.opaques), self._z, self._named,
                      self._resent, self._opaque_bytes)

    def _split_at_mark(self) -> None:
        """Start a new iteration at the mark: pages and opaque runs before it close the old
        iteration's batch, those after it open the new one."""
        self._flush_pending()
        at, weight, datas, opaques, z, named, resent, opaque = self._mark
        old = self._batch
        new = PageBatch()
        # The block in effect at the mark goes on in the new batch.
        runs = old.blocks
        keep = [run for run in runs if run[0] < at]
        here = [run for run in runs if run[0] <= at]
        new.blocks = [(0, here[-1][1])] if here else []
        new.blocks += [(first - at, block) for first, block in runs if first > at]
        old.blocks = keep
        new.offsets, new.tags = old.offsets[at:], old.tags[at:]
        del old.offsets[at:], old.tags[at:]
        new.data_at = [i - at for i in old.data_at[datas:]]
        new.datas = old.datas[datas:]
        del old.data_at[datas:], old.datas[datas:]
        new.opaque_at = [i - at for i in old.opaque_at[opaques:]]
        new.opaques = old.opaques[opaques:]
        del old.opaque_at[opaques:], old.opaques[opaques:]
        if at or opaques:
            rest = (self._n - at, self._w - weight, self._z - z, self._named - named,
                    self._resent - resent, self._opaque_bytes - opaque)
            self._n, self._w, self._z, self._named, self._resent, self._opaque_bytes = (
                at, weight, z, named, resent, opaque)
            self._close_batch()
            self._batch = new
            self._run_block = new.blocks[-1][1] if new.blocks else None
            self._n, self._w, self._z, self._named, self._resent, self._opaque_bytes = rest
            self._recompute_limit()
        else:
            # Nothing before the mark: the batch stays as it is (put back together).
            self._batch = new
        self._mark = (0, 0, 0, 0, 0, 0, 0, 0)
        self._next_iteration()
        # Pages of the new iteration that came before the one that showed the sync.
        gen = self._gen
        shift = self._shift
        for first, stop, block in new.spans():
            for off in new.offsets[first:stop]:
                gens, i = self._gen_slot(block, off >> shift)
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
        return self._w * self.page_size // 8 + self._opaque_bytes

    def _after_opaque(self) -> None:
        """Close the batch if it is full, else recompute how many pages still fit."""
        if self._batch_bytes() + self._pending_len >= self.batch_bytes:
            self._close_batch()
        else:
            self._recompute_limit()

    def _recompute_limit(self) -> None:
        room = self.batch_bytes - self._batch_bytes() - self._pending_len
        fit = max(1, -(-room * 8 // self.page_size))
        self._limit = min(self._page_limit, self._w + fit)

    def _flush_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._batch.opaque_at.append(self._n)
        self._batch.opaques.append(data)
        self._opaque_bytes += self._pending_len
        pending.clear()
        self._pending_len = 0

    def _close_batch(self) -> None:
        """Turn the open batch into a ScannedBatch and account for it."""
        self._flush_pending()
        batch = self._batch
        if not batch.offsets and not batch.opaques:
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
        self._ready.append(ScannedBatch(batch, it.number, size))
        # The block goes on in the next batch until a page says otherwise.
        block = self._run_block
        self._batch = PageBatch(blocks=[] if block is None else [(0, block)])
        self._n = self._w = self._z = self._named = self._resent = self._opaque_bytes = 0
        self._limit = self._page_limit
        self._mark = (0, 0, 0, 0, 0, 0, 0, 0)


class _FusedParser(MainChannelParser):
    """The main-channel parser with its RAM loop replaced by the scanner's (no record object
    per page). Everything else, and the records it returns, is MainChannelParser's."""

    def __init__(self, scanner: ChannelScanner, page_size: int) -> None:
        super().__init__(page_size)
        self._scanner = scanner

    def _run_ram(self, buf: bytes, mv: memoryview, pos: int, end: int, out: list[Record]
                 ) -> tuple[int, int]:
        return self._scanner._ram(self, buf, mv, pos, end, out)


__all__ = ["DEFAULT_BATCH_BYTES", "DEFAULT_BATCH_PAGES", "ChannelScanner", "ScannedBatch"]
