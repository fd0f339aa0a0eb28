"""The page decoder: encoded batches in, items out (no I/O).

A batch is released only whole and only once it has been checked twice:

* the frame check (xxh3-64, seeded with the session id, over the batch header and the
  compressed payload) rejects any damaged, truncated or foreign batch before it is
  decompressed;
* the content check (xxh3-64 of the original bytes: every page and opaque byte the batch
  rebuilds to, in order, then the items' metadata: blocks, offsets, tags, opaque lengths)
  rejects a batch that was rebuilt wrongly, whatever the cause (caches out of step, a bug,
  damage that the frame check missed). Nothing of such a batch is released.

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
from dwcp_migrate.pagecodec.types import (
    MAX_BLOCKS,
    CodecStats,
    Item,
    KindStats,
    OpaqueItem,
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
        self.max_batch_bytes = max_batch_bytes  # a local memory guard, not negotiated
        self.stats = CodecStats()
        self.last_stats = CodecStats()
        self.session_id: int | None = None
        self._page_size = config.page_size
        self._zero = bytes(config.page_size)
        self._cap = config.cache_slots
        self._ring: list[bytes] = [b""] * self._cap
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
        return cache_fingerprint(self._ring, self._next)

    def decode_batch(self, data: bytes | memoryview) -> list[Item]:
        """Check and decode the next batch; return its items in stream order."""
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
        items, pending, new_blocks, stats = self._decode_payload(payload, content, where)
        # Both checks passed: commit the batch to the cache and the block table.
        cap, ring, start = self._cap, self._ring, self._next
        for i, page in enumerate(pending):
            ring[(start + i) % cap] = page
        self._next = start + len(pending)
        self._blocks += new_blocks
        self._seq += 1
        stats.wire_bytes = len(view)
        self.last_stats = stats
        self.stats.add(stats)
        return items

    def _decode_payload(self, payload: bytes, content: int, where: str
                        ) -> tuple[list[Item], list[bytes], list[bytes], CodecStats]:
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
        lit_at = rd.take(counts[LITERAL] * size, "literal pages")
        delta_bytes = int(run_len.sum(dtype=np.int64))
        delta_at = rd.take(delta_bytes, "delta bytes")
        opaque_bytes = int(opaque_col.sum(dtype=np.int64))
        opaque_at = rd.take(opaque_bytes, "opaque bytes")
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
        delta_pages: list[bytes] = []
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
            ring = self._ring
            bases = [ring[s % cap] for s in (at + start - rel).tolist()]
            delta_pages = apply_deltas(bases, nruns, run_off, run_len,
                                       memoryview(payload)[delta_at:delta_at + delta_bytes], size)
        elif n_runs:
            raise CorruptBatchError(f"{where}: delta runs without deltas")

        offsets = np.cumsum(offset_col + np.uint64(size), dtype=fmt.U64) - np.uint64(size)
        items, pending, check = self._rebuild(
            kinds, payload, lit_at, opaque_at, delta_pages, names, block_col.tolist(),
            offsets.tolist(), tag_col.tolist(), ref_col.tolist(), opaque_col.tolist())
        fmt.metadata_check(check, (kind_arr == OPAQUE).tobytes(), block_col.tobytes(),
                           offsets.astype(fmt.U64).tobytes(), tag_col.tobytes(),
                           opaque_col.tobytes(), payload[names_at:lit_at])
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
        return items, pending, new_blocks, stats

    def _rebuild(self, kinds: bytes, payload: bytes, lit_at: int, opaque_at: int,
                 delta_pages: list[bytes], names: list[bytes], blocks: list[int],
                 offsets: list[int], tags: list[int], refs: list[int], opaque_lens: list[int]
                 ) -> tuple[list[Item], list[bytes], xxhash.xxh3_64]:
        """Walk the items in order; return them, the pages that enter the cache, and the
        content check over their bytes."""
        size, zero, cap, ring, start = (
            self._page_size, self._zero, self._cap, self._ring, self._next)
        check = xxhash.xxh3_64()
        update = check.update
        out: list[Item] = []
        append = out.append
        pending: list[bytes] = []
        add_pending = pending.append
        lit = lit_at
        opaque = opaque_at
        page_i = ref_i = delta_i = opaque_i = 0
        for kind in kinds:
            if kind == LITERAL:
                page = payload[lit:lit + size]
                lit += size
                add_pending(page)
            elif kind == ZERO:
                page = zero
            elif kind == DELTA:
                page = delta_pages[delta_i]
                delta_i += 1
                add_pending(page)
            elif kind == REF:
                slot = start + len(pending) - refs[ref_i]  # range checked before
                ref_i += 1
                page = pending[slot - start] if slot >= start else ring[slot % cap]
            else:
                length = opaque_lens[opaque_i]
                opaque_i += 1
                data = payload[opaque:opaque + length]
                opaque += length
                update(data)
                append(OpaqueItem(data))
                continue
            update(page)
            append(PageItem(names[blocks[page_i]], offsets[page_i], page, tags[page_i]))
            page_i += 1
        return out, pending, check
