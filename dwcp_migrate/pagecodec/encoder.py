"""The page encoder: items in, encoded batches out (no I/O).

Per page, in this order (the first that applies wins):

1. a page of zeros becomes a ZERO item (no body);
2. a page whose content is in the cache becomes a REF naming that cache slot. The xxh3-64 of
   the page only *finds* the candidate slot; the encoder then compares the full page with the
   slot's bytes, so a hash collision costs a missed dedup, never a wrong page;
3. a page whose location (block, offset) was sent before, and whose previous version is still
   cached, is a delta candidate: the batched numpy pass (``delta.py``) sends it as a DELTA
   (changed runs) if that is small, else as a LITERAL;
4. anything else is a LITERAL page.

LITERAL and DELTA pages enter the cache as its next slot, evicting the oldest (a ring: FIFO by
slot number). The decoder applies the same rule, so both caches hold the same pages without
talking. FIFO works well here because a re-sent page re-enters the cache as a new slot: pages
the guest keeps dirtying stay cached, pages written once age out.

Each page with data is read once before it is copied: its xxh3-64 digest (unseeded: the
content check uses the same digests, see ``format.metadata_check``) finds duplicates, and
then the page goes into the cache (one mapping, ``memory.py``) and the payload. The batch is
given in columns (``PageBatch``); zero pages that come without data cost nothing here.

The lookup tables exist only on this side: digest (mixed with secrets of this encoder) ->
slot, a dict; location -> slot, per block an array indexed by page number (a dict for
unaligned offsets and beyond the arrays' budget). They are cleaned lazily: an entry naming
an evicted slot is simply ignored, and the dicts are swept when they grow past twice the
number of slots.
"""

from __future__ import annotations

import mmap
import secrets
import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

import numpy as np
import xxhash

from dwcp_migrate.pagecodec import format as fmt
from dwcp_migrate.pagecodec.delta import find_deltas
from dwcp_migrate.pagecodec.errors import InvalidItemError, PageCodecError
from dwcp_migrate.pagecodec.format import DELTA, LITERAL, OPAQUE, REF, ZERO
from dwcp_migrate.pagecodec.memory import new_arena, tune_allocator
from dwcp_migrate.pagecodec.types import (
    MAX_BLOCK_NAME,
    MAX_BLOCKS,
    ByteData,
    CodecStats,
    Compression,
    Item,
    KindStats,
    PageBatch,
    PageCodecConfig,
)

_NO_LOCATIONS: Final = array("q")


def cache_fingerprint(arena: mmap.mmap, page_size: int, next_slot: int) -> int:
    """xxh3-64 over the slot counter and every live slot, oldest first (for tests and logs)."""
    h = xxhash.xxh3_64(next_slot.to_bytes(8, "little"))
    cap = len(arena) // page_size
    for slot in range(max(0, next_slot - cap), next_slot):
        at = slot % cap * page_size
        h.update(arena[at:at + page_size])
    return h.intdigest()


@dataclass(slots=True)
class PreparedBatch:
    """A batch encoded up to compression; :meth:`finish` compresses and frames it."""

    encoder: PageEncoder
    seq: int
    payload: bytes
    content: int  # the content check
    compression: Compression
    stats: CodecStats  # wire_bytes is filled in by finish()
    finished: bool = False

    def finish(self) -> bytes:
        """Compress and frame the batch, once (thread-safe; see PageEncoder.prepare_batch)."""
        if self.finished:
            raise PageCodecError(f"page codec batch {self.seq} was already finished")
        self.finished = True
        return self.encoder._finish(self)


class PageEncoder:
    """Encodes batches of items for one migration channel; pair it with one PageDecoder.

    Send :attr:`session_header` first, then the batches in the order they were made.
    """

    def __init__(self, config: PageCodecConfig | None = None, *,
                 session_id: int | None = None) -> None:
        self.config = config = config or PageCodecConfig()
        tune_allocator()
        self.session_id = secrets.randbits(64) if session_id is None else session_id
        if not 0 <= self.session_id < 1 << 64:
            raise ValueError("session_id must be a 64-bit unsigned integer")
        self.stats = CodecStats()  # the whole session
        self.last_stats = CodecStats()  # the last batch
        self._page_size = config.page_size
        self._zero = bytes(config.page_size)
        self._cap = config.cache_slots
        # The cache: slot s is the page at (s % cap) * page size of one anonymous mapping (no
        # object per page, no memory handed back and forth with the allocator; the kernel
        # gives it memory as the cache fills).
        self._arena, self._touched = new_arena(self, self._cap * self._page_size)
        self._next = 0  # number of the next cache slot
        self._by_content: dict[int, int] = {}  # index key of a page (below) -> slot
        # The index key is the page's xxh3-64 mixed with secrets of this encoder (the decoder
        # never sees them; the high half of (digest ^ a) * b, b odd), so that a guest cannot
        # precompute pages whose keys pile up in one dict bucket.
        self._index_key = (secrets.randbits(64), secrets.randbits(64) | 1)
        self._zero_hash = xxhash.xxh3_64_intdigest(self._zero)
        # Location -> slot of its last version, a hint for deltas: per block an array indexed
        # by page number (slot + 1, 0 for none) for aligned offsets, as far as the arrays'
        # budget goes (16 entries per cache slot, at least 1 Mi); a dict for the rest.
        self._loc_arrays: dict[int, array[int]] = {}
        self._loc_budget = max(16 * self._cap, 1 << 20)
        self._by_location: dict[int, int] = {}  # offset << 16 | block id -> slot
        self._block_ids: dict[bytes, int] = {}
        self._seq = 0
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        self._broken: str | None = None

    @property
    def session_header(self) -> bytes:
        """The bytes the decoder needs before the first batch (format, config, session id)."""
        return fmt.session_header(self.config, self.session_id)

    def cache_fingerprint(self) -> int:
        return cache_fingerprint(self._arena, self._page_size, self._next)

    def encode_batch(self, items: Iterable[Item], compression: Compression | None = None
                     ) -> bytes:
        """Encode items (pages and opaque runs, in stream order) into one batch.

        An error leaves the encoder unusable (its cache may hold part of the batch), so the
        session must restart; :class:`InvalidItemError` says which item was wrong.
        """
        return self.prepare_batch(items, compression).finish()

    def encode_pages(self, batch: PageBatch, compression: Compression | None = None) -> bytes:
        """:meth:`encode_batch` for a batch in columns (no object per page: the fast path)."""
        return self.prepare_pages(batch, compression).finish()

    def prepare_batch(self, items: Iterable[Item], compression: Compression | None = None
                      ) -> PreparedBatch:
        """The first half of :meth:`encode_batch`: everything but compression.

        ``finish()`` of the result compresses and frames the batch. Compression releases the
        GIL, so one thread can prepare the next batch while others finish earlier ones; the
        batches must still reach the decoder in the order they were prepared.
        """
        return self._guarded(items, compression)

    def prepare_pages(self, batch: PageBatch, compression: Compression | None = None
                      ) -> PreparedBatch:
        """:meth:`prepare_batch` for a batch in columns."""
        return self._guarded(batch, compression)

    def _guarded(self, batch: PageBatch | Iterable[Item], compression: Compression | None
                 ) -> PreparedBatch:
        if self._broken is not None:
            raise PageCodecError(f"page encoder is unusable after an earlier error "
                                 f"({self._broken}); start a new migration session")
        try:
            if not isinstance(batch, PageBatch):
                batch = PageBatch.from_items(batch)
            return self._prepare(batch, compression or self.config.compression)
        except PageCodecError as exc:
            self._broken = str(exc)
            raise
        except (TypeError, ValueError, OverflowError, AttributeError, IndexError) as exc:
            self._broken = f"bad item: {exc}"
            raise InvalidItemError(f"page encoder, batch {self._seq}: an item cannot be "
                                   f"encoded ({exc}); pages need bytes data, an int offset "
                                   f"in 0..2^64-1 and a tag in 0..65535") from exc
        except Exception as exc:
            self._broken = repr(exc)
            raise PageCodecError(f"page encoder failed in batch {self._seq}: {exc!r}") from exc

    def _new_block(self, block: bytes, new_blocks: list[bytes]) -> int:
        if not isinstance(block, bytes) or len(block) > MAX_BLOCK_NAME:
            raise InvalidItemError(f"page encoder, batch {self._seq}: block name {block!r} "
                                   f"must be bytes of at most {MAX_BLOCK_NAME}")
        if len(self._block_ids) >= MAX_BLOCKS:
            raise InvalidItemError(f"page encoder: more than {MAX_BLOCKS} block names")
        sid = self._block_ids[block] = len(self._block_ids)
        new_blocks.append(block)
        return sid

    def _check_layout(self, batch: PageBatch) -> None:
        """The columns must describe a batch (the scanner makes them right; others may not)."""
        n = len(batch.offsets)
        nd = len(batch.data_at)
        firsts = [first for first, _ in batch.blocks]
        ok = (len(batch.tags) == n and len(batch.datas) == nd
              and len(batch.opaque_at) == len(batch.opaques)
              and (not n or (bool(firsts) and firsts[0] == 0))
              and all(a <= b for a, b in pairwise(firsts))
              and (not nd or (batch.data_at[0] >= 0 and batch.data_at[-1] < n))
              and all(a < b for a, b in pairwise(batch.data_at))
              and all(0 <= a <= b <= n for a, b in pairwise([*batch.opaque_at, n])))
        if not ok:
            raise InvalidItemError(f"page encoder, batch {self._seq}: the page columns are "
                                   f"inconsistent (lengths, order or ranges)")

    def _prepare(self, batch: PageBatch, how: Compression) -> PreparedBatch:
        self._check_layout(batch)
        size = self._page_size
        zero = self._zero
        zero_hash = self._zero_hash
        cap = self._cap
        arena = self._arena
        shift = size.bit_length() - 1
        mask = size - 1
        content = self._by_content
        where = self._by_location
        block_ids = self._block_ids
        dedup = self.config.dedup
        use_delta = self.config.delta
        start = nxt = self._next
        hash64 = xxhash.xxh3_64_intdigest
        key_xor, key_mul = self._index_key

        offsets = batch.offsets
        n = len(offsets)
        data_at, datas = batch.data_at, batch.datas
        kinds = bytearray(n)  # ZERO (0) unless a page with data says otherwise
        block_col = np.empty(n, fmt.U16)
        digests: list[int] = []  # xxh3-64 of every page that is not ZERO, for the check
        add_digest = digests.append
        refs: list[int] = []
        add_ref = refs.append
        # Literal pages and delta candidates, in page order (the caller's buffers), for the
        # payload; they are copied into the cache as they come.
        bodies: list[ByteData] = []
        add_body = bodies.append
        cand_new: list[ByteData] = []
        cand_old: list[ByteData] = []
        cand_rel: list[int] = []
        cand_page: list[int] = []
        cand_body: list[int] = []
        new_blocks: list[bytes] = []
        key = 0
        lo = 0  # first data page of the run
        for first, stop, block in batch.spans():
            if stop <= first:
                continue  # a run without pages
            bid = block_ids.get(block)
            if bid is None:
                bid = self._new_block(block, new_blocks)
            block_col[first:stop] = bid
            hi = bisect_left(data_at, stop, lo)
            loc = self._locations(bid, offsets[first:stop]) if use_delta else _NO_LOCATIONS
            nloc = len(loc)
            for i, data in zip(data_at[lo:hi], datas[lo:hi]):  # noqa: B905 - same length
                if isinstance(data, memoryview):
                    length = data.nbytes if data.c_contiguous else -1
                else:
                    length = len(data) if type(data) is bytes else -1
                if length != size:
                    raise InvalidItemError(
                        f"page encoder, batch {self._seq}, page {i}: page data must be "
                        f"{size} bytes (bytes or a contiguous memoryview), not "
                        f"{type(data).__name__} of {len(data)}")
                digest = hash64(data)  # the only pass over the page before the payload's
                if digest == zero_hash and zero.startswith(data):
                    continue  # a ZERO item, like the pages that came without data
                add_digest(digest)
                if dedup:
                    # The index key: the digest mixed with a secret of this encoder, so that
                    # a guest cannot aim pages at one dict bucket.
                    key = ((digest ^ key_xor) * key_mul) >> 64
                    slot = content.get(key)
                    # Full comparison: the hash only finds the candidate (see module doc).
                    if (slot is not None and nxt - slot <= cap
                            and arena[(at := slot % cap << shift):at + size].startswith(data)):
                        kinds[i] = REF
                        add_ref(nxt - slot)
                        if use_delta:
                            off = offsets[i]
                            if not off & mask and off >> shift < nloc:
                                loc[off >> shift] = slot + 1
                            else:
                                where[off << 16 | bid] = slot
                        continue
                if use_delta:
                    off = offsets[i]
                    if not off & mask and off >> shift < nloc:
                        base = loc[off >> shift] - 1
                        loc[off >> shift] = nxt + 1
                    else:
                        base = where.get(off << 16 | bid, -1)
                        where[off << 16 | bid] = nxt
                    # Bases from this batch are refused so that the decoder can rebuild all
                    # deltas of a batch in one pass before it touches its cache.
                    if 0 <= base < start and nxt - base <= cap:
                        at = base % cap << shift
                        cand_new.append(data)
                        # A copy: the batch may overwrite the base's place before the deltas
                        # are made (when it wraps around the cache).
                        cand_old.append(arena[at:at + size])
                        cand_rel.append(nxt - base)
                        cand_page.append(i)
                        cand_body.append(len(bodies))
                kinds[i] = LITERAL
                add_body(data)
                at = nxt % cap << shift
                arena[at:at + size] = data
                if dedup:
                    content[key] = nxt
                nxt += 1
            lo = hi
        self._next = nxt
        if self._touched[0] < len(self._arena):
            self._touched[0] = max(self._touched[0], min(self._next, self._cap) * self._page_size)

        page_kinds = np.frombuffer(kinds, fmt.U8)
        if cand_new:
            deltas = find_deltas(cand_new, cand_old, size, self.config.delta_limit)
            chosen = deltas.chosen
            page_kinds[np.asarray(cand_page)[chosen]] = DELTA
            for body in np.asarray(cand_body)[chosen].tolist():
                bodies[body] = b""
            delta_rel = np.asarray(cand_rel, fmt.U32)[chosen]
            nruns, run_off, run_len, delta_data = (
                deltas.nruns, deltas.run_off, deltas.run_len, deltas.data)
        else:
            delta_rel = np.zeros(0, fmt.U32)
            nruns = run_off = run_len = np.zeros(0, fmt.U16)
            delta_data = b""

        check = xxhash.xxh3_64(np.asarray(digests, fmt.U64).tobytes())
        opaque_data = [d if type(d) is bytes else bytes(d) for d in batch.opaques]
        for data in opaque_data:
            check.update(data)
        opaque_lens = [len(d) for d in opaque_data]
        kind_arr = (np.insert(page_kinds, batch.opaque_at, OPAQUE) if opaque_data
                    else page_kinds)
        offset_arr = np.asarray(offsets, fmt.U64)
        prev = np.empty_like(offset_arr)
        if n:
            prev[0] = (1 << 64) - size  # so that a first page at offset 0 is stored as 0
            prev[1:] = offset_arr[:-1]
        # Offsets go as "distance from where the previous page ended": 0 for consecutive
        # pages, which is what the first pass over RAM mostly sends. Wraps modulo 2^64.
        offset_delta = offset_arr - prev - np.uint64(size)
        names = b"".join(bytes((len(name),)) + name for name in new_blocks)
        block_bytes = block_col.tobytes()
        tag_col = np.asarray(batch.tags, fmt.U16).tobytes()
        opaque_col = np.asarray(opaque_lens, fmt.U32).tobytes()
        kind_bytes = kind_arr.tobytes()
        fmt.metadata_check(check, kind_bytes, block_bytes, offset_arr.tobytes(), tag_col,
                           opaque_col, names)
        table = fmt.SECTION_TABLE.pack(len(kind_arr), len(refs), len(delta_rel), len(run_off),
                                       len(opaque_lens), len(new_blocks))
        head = b"".join([
            table, kind_bytes, block_bytes, offset_delta.tobytes(), tag_col,
            np.asarray(refs, fmt.U32).tobytes(), delta_rel.tobytes(),
            nruns.tobytes(), run_off.tobytes(), run_len.tobytes(), opaque_col, names])
        payload = b"".join([head, *bodies, delta_data, *opaque_data])
        if len(payload) > fmt.MAX_PAYLOAD:
            raise InvalidItemError(f"page encoder, batch {self._seq}: {len(payload)} bytes of "
                                   f"payload exceed the format's 4 GiB; send smaller batches")
        counts = np.bincount(kind_arr, minlength=fmt.KIND_COUNT).tolist()
        opaque_bytes = sum(opaque_lens)
        stats = CodecStats(
            zero=KindStats(counts[ZERO], counts[ZERO] * size, 0),
            ref=KindStats(counts[REF], counts[REF] * size, 4 * counts[REF]),
            delta=KindStats(counts[DELTA], counts[DELTA] * size,
                            6 * counts[DELTA] + fmt.RUN_HEADER * len(run_off) + len(delta_data)),
            literal=KindStats(counts[LITERAL], counts[LITERAL] * size, counts[LITERAL] * size),
            opaque=KindStats(counts[OPAQUE], opaque_bytes, opaque_bytes + 4 * counts[OPAQUE]),
            batches=1, payload_bytes=len(payload))
        stats.metadata_bytes = len(payload) - sum(k.bytes_out for k in stats.kinds().values())
        self._sweep()
        self._seq += 1
        return PreparedBatch(self, self._seq - 1, payload, check.intdigest(), how, stats)

    def _finish(self, batch: PreparedBatch) -> bytes:
        if self._broken is not None:
            raise PageCodecError(f"page encoder is unusable after an earlier error "
                                 f"({self._broken}); start a new migration session")
        try:
            compressors = getattr(self._local, "compressors", None)
            if compressors is None:  # one set per thread: compressor objects are not shared
                compressors = self._local.compressors = fmt.Compressors()
            codec, packed = compressors.compress(batch.payload, batch.compression)
        except Exception as exc:
            self._broken = f"compressing batch {batch.seq}: {exc!r}"
            raise PageCodecError(f"page encoder could not compress batch {batch.seq}: "
                                 f"{exc!r}") from exc
        head = fmt.BATCH_HEADER.pack(fmt.BATCH_MAGIC, fmt.FORMAT_VERSION, codec, batch.seq,
                                     len(batch.payload), len(packed), batch.content, 0)
        head = head[:fmt.FRAME_CHECKED]
        frame = xxhash.xxh3_64(head, seed=self.session_id)
        frame.update(packed)
        out = b"".join((head, frame.intdigest().to_bytes(8, "little"), packed))
        batch.stats.wire_bytes = len(out)
        with self._stats_lock:
            self.last_stats = batch.stats
            self.stats.add(batch.stats)
        return out

    def _locations(self, bid: int, offsets: list[int]) -> array[int]:
        """The location array of a block, grown to cover ``offsets`` if the budget allows."""
        loc = self._loc_arrays.get(bid)
        if loc is None:
            loc = self._loc_arrays[bid] = array("q")
        top = (max(offsets) >> (self._page_size.bit_length() - 1)) + 1 if offsets else 0
        if top > len(loc):
            grow = min(max(top, 2 * len(loc)), len(loc) + self._loc_budget) - len(loc)
            if grow > 0:
                loc.frombytes(bytes(8 * grow))
                self._loc_budget -= grow
        return loc

    def _sweep(self) -> None:
        """Drop lookup entries that name evicted slots, once the tables outgrow the cache."""
        limit = 2 * self._cap + 4096
        oldest = self._next - self._cap
        if len(self._by_content) > limit:
            self._by_content = {h: s for h, s in self._by_content.items() if s >= oldest}
        if len(self._by_location) > limit:
            where = {k: s for k, s in self._by_location.items() if s >= oldest}
            # Many locations can name one live slot (dedup references); past the limit they
            # are forgotten, which only costs delta opportunities.
            self._by_location = where if len(where) <= limit else {}
