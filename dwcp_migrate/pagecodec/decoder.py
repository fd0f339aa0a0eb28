"""The page decoder: encoded batches in, items out (no I/O).

A batch is released only whole and only once it has been checked twice:

* the frame check (xxh3-64, seeded with the session id, over the batch header and the
  compressed payload) rejects any damaged, truncated or foreign batch before it is
  decompressed;
* the content check (xxh3-64 of the xxh3-64 of every page that is not a zero page, then of
  every opaque byte, then of the items' metadata: kinds, blocks, offsets, tags, opaque
  lengths; see ``format.metadata_check``) rejects a batch that was rebuilt wrongly, whatever
  the cause (caches out of step, a bug, damage that the frame check missed). Nothing of such
  a batch is released.

Every count, length, offset and slot reference is checked before it is used, so damaged input
ends in :class:`CorruptBatchError` and never in another exception or in wrong pages. The
cache and the sequence number change only after both checks have passed, so a rejected batch
leaves the decoder as it was.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt
import xxhash

from dwcp_migrate.pagecodec import format as fmt
from dwcp_migrate.pagecodec.delta import apply_deltas
from dwcp_migrate.pagecodec.encoder import cache_fingerprint
from dwcp_migrate.pagecodec.errors import CorruptBatchError, PageCodecError, SessionMismatchError
from dwcp_migrate.pagecodec.format import DELTA, LITERAL, OPAQUE, REF, ZERO
from dwcp_migrate.pagecodec.memory import new_arena, tune_allocator
from dwcp_migrate.pagecodec.types import (
    MAX_BLOCKS,
    ByteData,
    CodecStats,
    Item,
    KindStats,
    OpaqueItem,
    PageBatch,
    PageCodecConfig,
    PageItem,
)

DEFAULT_MAX_BATCH = 1 << 30
ScalarT = TypeVar("ScalarT", bound=np.generic)


class _Reader:
    """Cuts the sections of a payload, checking that each one is inside it."""

    def __init__(self, payload: bytes, where: str) -> None:
        self.payload = payload
        self.pos = fmt.SECTION_TABLE.size
        self.where = where

    def take(self, length: int, what: str) -> int:
        """Reserve ``length`` bytes; return where they start."""
        start = self.pos
        if length < 0 or start + length > len(self.payload):
            raise CorruptBatchError(f"{self.where}: {what} ({length} bytes at payload offset "
                                    f"{start}) runs past the payload's {len(self.payload)}")
        self.pos = start + length
        return start

    def array(self, dtype: np.dtype[ScalarT], count: int, what: str) -> npt.NDArray[ScalarT]:
        start = self.take(count * dtype.itemsize, what)
        return np.frombuffer(self.payload, dtype, count, start)


class PageDecoder:
    """Decodes the batches of one PageEncoder, in order, after its session header."""

    def __init__(self, config: PageCodecConfig | None = None, *,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH) -> None:
        self.config = config = config or PageCodecConfig()
        tune_allocator()
        self.max_batch_bytes = max_batch_bytes  # a local memory guard, not negotiated
        self.stats = CodecStats()
        self.last_stats = CodecStats()
        self.session_id: int | None = None
        self._page_size = config.page_size
        self._zero = bytes(config.page_size)
        self._cap = config.cache_slots
        # The cache: slot s is the page at (s % cap) * page size of one mapping (as in the
        # encoder), written only once a batch has passed its checks.
        self._arena, self._touched = new_arena(self, self._cap * self._page_size)
        self._next = 0
        self._blocks: list[bytes] = []
        self._seq = 0
        self._decompressor = fmt.Decompressor()

    def accept_session_header(self, data: bytes) -> None:
        """Check the encoder's session header against this decoder's configuration."""
        if self.session_id is not None:
            raise SessionMismatchError("page decoder got a second session header; a session "
                                       "has exactly one")
        page_size, slots, session_id = fmt.parse_session_header(bytes(data))
        if page_size != self._page_size or slots != self._cap:
            raise SessionMismatchError(
                f"page codec configuration differs: the encoder uses {page_size}-byte pages "
                f"and {slots} cache slots, this decoder {self._page_size}-byte pages and "
                f"{self._cap} slots; give both agents the same page size and cache size")
        self.session_id = session_id

    def cache_fingerprint(self) -> int:
        return cache_fingerprint(self._arena, self._page_size, self._next)

    def decode_batch(self, data: bytes | memoryview) -> list[Item]:
        """Check and decode the next batch; return its items in stream order."""
        batch = self._decode(data, as_bytes=True)
        out: list[Item] = []
        append = out.append
        op, op_at, opaques = 0, batch.opaque_at, batch.opaques
        for first, stop, block in batch.spans():
            for i in range(first, stop):
                while op < len(op_at) and op_at[op] <= i:
                    append(OpaqueItem(opaques[op]))
                    op += 1
                page = batch.datas[i]
                append(PageItem(block, batch.offsets[i],
                                page if type(page) is bytes else bytes(page), batch.tags[i]))
        out += [OpaqueItem(rest) for rest in opaques[op:]]
        return out

    def decode_pages(self, data: bytes | memoryview) -> PageBatch:
        """:meth:`decode_batch` in columns: every page in ``datas`` (``bytes`` or read-only
        ``memoryview``; zero pages share one page of zeros), opaque runs as ``bytes``."""
        return self._decode(data, as_bytes=False)

    def _decode(self, data: bytes | memoryview, *, as_bytes: bool) -> PageBatch:
        if self.session_id is None:
            raise PageCodecError("page decoder got a batch before the session header; send "
                                 "PageEncoder.session_header first")
        where = f"page codec batch {self._seq}"
        view = memoryview(data).cast("B")
        if len(view) < fmt.BATCH_HEADER_SIZE:
            raise CorruptBatchError(f"{where}: {len(view)} bytes is shorter than a batch "
                                    f"header ({fmt.BATCH_HEADER_SIZE})")
        magic, version, codec, seq, raw_len, enc_len, content, frame = (
            fmt.BATCH_HEADER.unpack_from(view))
        if magic != fmt.BATCH_MAGIC:
            raise CorruptBatchError(f"{where}: starts with {magic!r}, not a batch header")
        packed = view[fmt.BATCH_HEADER_SIZE:]
        if enc_len != len(packed):
            raise CorruptBatchError(f"{where}: header announces {enc_len} payload bytes, "
                                    f"{len(packed)} arrived (truncated or padded)")
        check = xxhash.xxh3_64(view[:fmt.FRAME_CHECKED], seed=self.session_id)
        check.update(packed)
        if check.intdigest() != frame:
            raise CorruptBatchError(f"{where}: frame check failed: the batch was damaged on "
                                    f"the way, or belongs to another session")
        if version != fmt.FORMAT_VERSION:
            raise CorruptBatchError(f"{where}: format version {version}, expected "
                                    f"{fmt.FORMAT_VERSION}")
        if seq != self._seq:
            raise CorruptBatchError(f"page codec: batch {seq} arrived where batch {self._seq} "
                                    f"was expected: batches were lost, repeated or reordered")
        if raw_len > self.max_batch_bytes:
            raise CorruptBatchError(f"{where}: {raw_len} bytes of payload exceed this "
                                    f"decoder's limit of {self.max_batch_bytes}")
        if codec == fmt.CODEC_NONE:
            if raw_len != enc_len:
                raise CorruptBatchError(f"{where}: uncompressed payload of {enc_len} bytes, "
                                        f"header says {raw_len}")
            payload = bytes(packed)
        else:
            payload = self._decompressor.decompress(codec, packed, raw_len, where)
        batch, pending, new_blocks, stats = self._decode_payload(payload, content, where,
                                                                 as_bytes)
        # Both checks passed: commit the batch to the cache and the block table.
        self._commit(payload, *pending)
        self._blocks += new_blocks
        self._seq += 1
        stats.wire_bytes = len(view)
        self.last_stats = stats
        self.stats.add(stats)
        return batch

    def _decode_payload(self, payload: bytes, content: int, where: str, as_bytes: bool
                        ) -> tuple[PageBatch, tuple[list[ByteData], list[int]], list[bytes],
                                   CodecStats]:
        size = self._page_size
        if len(payload) < fmt.SECTION_TABLE.size:
            raise CorruptBatchError(f"{where}: payload of {len(payload)} bytes has no section "
                                    f"table")
        n_items, n_refs, n_deltas, n_runs, n_opaque, n_names = (
            fmt.SECTION_TABLE.unpack_from(payload))
        rd = _Reader(payload, where)
        kinds = payload[rd.take(n_items, "kinds"):rd.pos]
        counts = np.bincount(np.frombuffer(kinds, fmt.U8), minlength=fmt.KIND_COUNT).tolist()
        if len(counts) > fmt.KIND_COUNT:
            raise CorruptBatchError(f"{where}: unknown item kind {len(counts) - 1}")
        if (counts[REF], counts[DELTA], counts[OPAQUE]) != (n_refs, n_deltas, n_opaque):
            raise CorruptBatchError(f"{where}: item kinds do not match the section table")
        n_pages = n_items - n_opaque
        block_col = rd.array(fmt.U16, n_pages, "block column")
        offset_col = rd.array(fmt.U64, n_pages, "offset column")
        tag_col = rd.array(fmt.U16, n_pages, "tag column")
        ref_col = rd.array(fmt.U32, n_refs, "reference column")
        delta_col = rd.array(fmt.U32, n_deltas, "delta base column")
        nruns = rd.array(fmt.U16, n_deltas, "delta run counts")
        run_off = rd.array(fmt.U16, n_runs, "run offsets")
        run_len = rd.array(fmt.U16, n_runs, "run lengths")
        opaque_col = rd.array(fmt.U32, n_opaque, "opaque lengths")
        new_blocks: list[bytes] = []
        names_at = rd.pos
        for _ in range(n_names):
            length = payload[rd.take(1, "block name length")]
            new_blocks.append(payload[rd.take(length, "block name"):rd.pos])
        names = self._blocks + new_blocks
        if len(names) > MAX_BLOCKS:
            raise CorruptBatchError(f"{where}: more than {MAX_BLOCKS} block names")
        if n_pages and int(block_col.max()) >= len(names):
            raise CorruptBatchError(f"{where}: a page names block {int(block_col.max())}, "
                                    f"only {len(names)} are known")
        lit_at = lit_at_payload = rd.take(counts[LITERAL] * size, "literal pages")
        delta_bytes = int(run_len.sum(dtype=np.int64))
        delta_at = rd.take(delta_bytes, "delta bytes")
        opaque_bytes = int(opaque_col.sum(dtype=np.int64))
        opaque_at_byte = rd.take(opaque_bytes, "opaque bytes")
        if rd.pos != len(payload):
            raise CorruptBatchError(f"{where}: {len(payload) - rd.pos} bytes left over after "
                                    f"the last section")

        # Slot references are relative to the slot counter at the item: slot = next - rel.
        kind_arr = np.frombuffer(kinds, fmt.U8)
        inserts = (kind_arr == LITERAL) | (kind_arr == DELTA)
        before = np.cumsum(inserts, dtype=np.int64) - inserts  # inserts earlier in the batch
        start, cap = self._next, self._cap
        if n_refs:
            rel = ref_col.astype(np.int64)
            limit = np.minimum(before[kind_arr == REF] + start, cap)
            if bool(((rel < 1) | (rel > limit)).any()):
                raise CorruptBatchError(f"{where}: a reference names a slot that is not in the "
                                        f"cache")
        delta_pages: list[ByteData] = []
        if n_deltas:
            rel = delta_col.astype(np.int64)
            at = before[kind_arr == DELTA]
            # The base must precede the batch (rel > inserts before it) and still be cached.
            if bool(((rel <= at) | (rel > np.minimum(at + start, cap))).any()):
                raise CorruptBatchError(f"{where}: a delta names a base that is not in the "
                                        f"cache before this batch")
            if int(nruns.sum(dtype=np.int64)) != n_runs:
                raise CorruptBatchError(f"{where}: delta run counts do not add up to the run "
                                        f"table")
            if n_runs and bool(((run_len == 0) | (run_off.astype(np.int64) + run_len > size)
                                ).any()):
                raise CorruptBatchError(f"{where}: a delta run lies outside its page")
            arena = self._arena
            bases: list[ByteData] = [arena[s % cap * size:(s % cap + 1) * size]
                                     for s in (at + start - rel).tolist()]
            delta_pages = apply_deltas(bases, nruns, run_off, run_len,
                                       memoryview(payload)[delta_at:delta_at + delta_bytes], size)
        elif n_runs:
            raise CorruptBatchError(f"{where}: delta runs without deltas")

        offsets = np.cumsum(offset_col + np.uint64(size), dtype=fmt.U64) - np.uint64(size)
        is_opaque = kind_arr == OPAQUE
        if n_opaque:
            page_kinds = kind_arr[~is_opaque]
            opaque_at = (np.flatnonzero(is_opaque) - np.arange(n_opaque)).tolist()
        else:
            page_kinds = kind_arr
            opaque_at = []
        pages, pending, sources, check = self._rebuild(
            page_kinds, payload if as_bytes else memoryview(payload), lit_at, delta_pages,
            ref_col.tolist())
        opaques: list[ByteData] = []
        for length in opaque_col.tolist():
            data = payload[opaque_at_byte:opaque_at_byte + length]
            opaque_at_byte += length
            check.update(data)
            opaques.append(data)
        fmt.metadata_check(check, kinds, block_col.tobytes(),
                           offsets.astype(fmt.U64).tobytes(), tag_col.tobytes(),
                           opaque_col.tobytes(), payload[names_at:lit_at_payload])
        if check.intdigest() != content:
            raise CorruptBatchError(
                f"{where}: rebuilt items fail the content check (xxh3 {check.intdigest():#018x}"
                f", expected {content:#018x}): encoder and decoder caches are out of step or a "
                f"codec bug; the batch was not released")
        stats = CodecStats(
            zero=KindStats(counts[ZERO], counts[ZERO] * size, 0),
            ref=KindStats(n_refs, n_refs * size, 4 * n_refs),
            delta=KindStats(n_deltas, n_deltas * size,
                            6 * n_deltas + fmt.RUN_HEADER * n_runs + delta_bytes),
            literal=KindStats(counts[LITERAL], counts[LITERAL] * size, counts[LITERAL] * size),
            opaque=KindStats(n_opaque, opaque_bytes, opaque_bytes + 4 * n_opaque),
            batches=1, payload_bytes=len(payload))
        stats.metadata_bytes = len(payload) - sum(k.bytes_out for k in stats.kinds().values())
        block_list = block_col.tolist()
        runs: list[tuple[int, bytes]] = []
        if block_list:
            change = (np.flatnonzero(block_col[1:] != block_col[:-1]) + 1).tolist()
            runs = [(first, names[block_list[first]]) for first in [0, *change]]
        batch = PageBatch(offsets.tolist(), tag_col.tolist(), list(range(len(pages))), pages,
                          runs, opaque_at, opaques)
        return batch, (pending, sources), new_blocks, stats

    def _rebuild(self, page_kinds: npt.NDArray[np.uint8], lit: ByteData, lit_at: int,
                 delta_pages: list[ByteData], refs: list[int]
                 ) -> tuple[list[ByteData], list[ByteData], list[int], xxhash.xxh3_64]:
        """Rebuild the pages in order; return them, the pages that enter the cache and their
        sources (see _commit), and the content check so far: over the xxh3-64 of every page
        that is not a zero page.

        Literal pages are slices of ``lit`` (the payload: copies as bytes, else views), delta
        pages views of the rebuilt buffer; a page named by a reference to an earlier batch is
        copied out of the cache (which later batches overwrite)."""
        size, zero, cap, arena, start = (
            self._page_size, self._zero, self._cap, self._arena, self._next)
        hash64 = xxhash.xxh3_64_intdigest
        nonzero = np.flatnonzero(page_kinds)
        nz_kinds = page_kinds[nonzero]
        pages: list[ByteData]
        pending: list[ByteData]
        sources: list[int]
        page: ByteData
        if not (nz_kinds != LITERAL).any():
            # Pages of zeros and literal pages only (most of a first pass): no walk needed.
            sources = list(range(lit_at, lit_at + len(nonzero) * size, size))
            pending = [lit[at:at + size] for at in sources]
            if len(pending) == len(page_kinds):
                pages = pending.copy()
            else:
                pages = [zero] * len(page_kinds)
                for i, page in zip(nonzero.tolist(), pending, strict=True):
                    pages[i] = page
            digests = list(map(hash64, pending))
            return (pages, pending, sources,
                    xxhash.xxh3_64(np.asarray(digests, fmt.U64).tobytes()))
        digests = []
        add_digest = digests.append
        pages = [zero] * len(page_kinds)
        pending = []
        add_pending = pending.append
        sources = []
        add_source = sources.append
        ref_i = delta_i = 0
        for i, kind in zip(nonzero.tolist(), nz_kinds.tobytes(), strict=True):
            if kind == LITERAL:
                page = lit[lit_at:lit_at + size]
                add_source(lit_at)
                lit_at += size
                add_pending(page)
            elif kind == DELTA:
                page = delta_pages[delta_i]
                delta_i += 1
                add_pending(page)
                add_source(-1)
            else:  # REF
                slot = start + len(pending) - refs[ref_i]  # range checked before
                ref_i += 1
                if slot >= start:
                    page = pending[slot - start]
                else:
                    at = slot % cap * size
                    page = arena[at:at + size]  # a copy: later batches overwrite the cache
            add_digest(hash64(page))
            pages[i] = page
        return pages, pending, sources, xxhash.xxh3_64(np.asarray(digests, fmt.U64).tobytes())

    def _commit(self, payload: bytes, pending: list[ByteData], sources: list[int]) -> None:
        """Write a checked batch's new pages into the cache, in slot order. ``sources``: per
        page its offset in the payload (a literal page), or -1 (a delta page)."""
        size, cap, arena, start = self._page_size, self._cap, self._arena, self._next
        total = len(pending)
        view = memoryview(payload)
        k = 0
        while k < total:
            at = (start + k) % cap
            source = sources[k]
            run = 1
            if source >= 0:
                # Literal pages that follow each other go in one copy (up to the cache's end).
                limit = min(total - k, cap - at)
                while run < limit and sources[k + run] == source + run * size:
                    run += 1
                data: ByteData = view[source:source + run * size]
            else:
                data = pending[k]
            arena[at * size:(at + run) * size] = data
            k += run
        self._next = start + total
        if self._touched[0] < len(self._arena):
            self._touched[0] = max(self._touched[0], min(self._next, self._cap) * self._page_size)
