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

The lookup tables (content hash -> slot, location -> slot) exist only on this side and are
cleaned lazily: an entry naming an evicted slot is simply ignored, and the tables are swept
when they grow past twice the number of slots.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import xxhash

from dwcp_migrate.pagecodec import format as fmt
from dwcp_migrate.pagecodec.delta import find_deltas
from dwcp_migrate.pagecodec.errors import InvalidItemError, PageCodecError
from dwcp_migrate.pagecodec.format import DELTA, LITERAL, OPAQUE, REF, ZERO
from dwcp_migrate.pagecodec.types import (
    MAX_BLOCK_NAME,
    MAX_BLOCKS,
    ByteData,
    CodecStats,
    Compression,
    Item,
    KindStats,
    OpaqueItem,
    PageCodecConfig,
    PageItem,
)


def cache_fingerprint(ring: list[bytes], next_slot: int) -> int:
    """xxh3-64 over the slot counter and every live slot, oldest first (for tests and logs)."""
    h = xxhash.xxh3_64(next_slot.to_bytes(8, "little"))
    cap = len(ring)
    for slot in range(max(0, next_slot - cap), next_slot):
        h.update(ring[slot % cap])
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
        self.session_id = secrets.randbits(64) if session_id is None else session_id
        if not 0 <= self.session_id < 1 << 64:
            raise ValueError("session_id must be a 64-bit unsigned integer")
        self.stats = CodecStats()  # the whole session
        self.last_stats = CodecStats()  # the last batch
        self._page_size = config.page_size
        self._zero = bytes(config.page_size)
        self._cap = config.cache_slots
        self._ring: list[bytes] = [b""] * self._cap
        self._next = 0  # number of the next cache slot (slot s lives in ring[s % cap])
        self._by_content: dict[int, int] = {}  # xxh3-64 of a page -> slot
        # The index hash is seeded with a secret of this encoder (the decoder never sees it),
        # so a guest cannot precompute pages whose hashes pile up in one dict bucket.
        self._index_seed = secrets.randbits(64)
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
        return cache_fingerprint(self._ring, self._next)

    def encode_batch(self, items: Iterable[Item], compression: Compression | None = None
                     ) -> bytes:
        """Encode items (pages and opaque runs, in stream order) into one batch.

        An error leaves the encoder unusable (its cache may hold part of the batch), so the
        session must restart; :class:`InvalidItemError` says which item was wrong.
        """
        return self.prepare_batch(items, compression).finish()

    def prepare_batch(self, items: Iterable[Item], compression: Compression | None = None
                      ) -> PreparedBatch:
        """The first half of :meth:`encode_batch`: everything but compression.

        ``finish()`` of the result compresses and frames the batch. Compression releases the
        GIL, so one thread can prepare the next batch while others finish earlier ones; the
        batches must still reach the decoder in the order they were prepared.
        """
        if self._broken is not None:
            raise PageCodecError(f"page encoder is unusable after an earlier error "
                                 f"({self._broken}); start a new migration session")
        try:
            return self._prepare(items, compression or self.config.compression)
        except PageCodecError as exc:
            self._broken = str(exc)
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
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

    def _prepare(self, items: Iterable[Item], how: Compression) -> PreparedBatch:
        size = self._page_size
        zero = self._zero
        cap = self._cap
        ring = self._ring
        content = self._by_content
        where = self._by_location
        block_ids = self._block_ids
        dedup = self.config.dedup
        use_delta = self.config.delta
        start = nxt = self._next
        check = xxhash.xxh3_64()
        update = check.update
        hash64 = xxhash.xxh3_64_intdigest
        seed = self._index_seed

        kinds = bytearray()
        add_kind = kinds.append
        blocks: list[int] = []
        offsets: list[int] = []
        tags: list[int] = []
        refs: list[int] = []
        bodies: list[ByteData] = []  # literal pages and delta candidates, in item order
        cand_new: list[bytes] = []
        cand_old: list[bytes] = []
        cand_rel: list[int] = []
        cand_item: list[int] = []
        cand_body: list[int] = []
        opaque_lens: list[int] = []
        opaque_data: list[ByteData] = []
        new_blocks: list[bytes] = []
        hv = 0

        for item in items:
            if type(item) is PageItem:
                data = item.data
                if type(data) is not bytes:
                    # The cache owns its pages, never a view of a caller's buffer; and bytes
                    # compare with memcmp, memoryviews element by element (3 us a page).
                    data = bytes(data)
                if len(data) != size:
                    raise InvalidItemError(
                        f"page encoder, batch {self._seq}, item {len(kinds)}: page has "
                        f"{len(data)} bytes, the session's page size is {size}")
                block = item.block
                bid = block_ids.get(block)
                if bid is None:
                    bid = self._new_block(block, new_blocks)
                offset = item.offset
                blocks.append(bid)
                offsets.append(offset)
                tags.append(item.tag)
                update(data)
                key = offset << 16 | bid
                if data == zero:
                    add_kind(ZERO)
                    if use_delta:
                        where.pop(key, None)  # its previous content is no delta base now
                    continue
                if dedup:
                    hv = hash64(data, seed)
                    slot = content.get(hv)
                    # Full comparison: the hash only finds the candidate (see module doc).
                    if slot is not None and nxt - slot <= cap and ring[slot % cap] == data:
                        add_kind(REF)
                        refs.append(nxt - slot)
                        if use_delta:
                            where[key] = slot
                        continue
                if use_delta:
                    base = where.get(key)
                    # Bases from this batch are refused so that the decoder can rebuild all
                    # deltas of a batch in one pass before it touches its cache.
                    if base is not None and base < start and nxt - base <= cap:
                        cand_new.append(data)
                        cand_old.append(ring[base % cap])
                        cand_rel.append(nxt - base)
                        cand_item.append(len(kinds))
                        cand_body.append(len(bodies))
                    where[key] = nxt
                add_kind(LITERAL)
                bodies.append(data)
                ring[nxt % cap] = data
                if dedup:
                    content[hv] = nxt
                nxt += 1
            elif type(item) is OpaqueItem:
                data = item.data
                if type(data) is not bytes:
                    data = bytes(data)  # len() of a non-byte memoryview counts elements
                add_kind(OPAQUE)
                update(data)
                opaque_lens.append(len(data))
                opaque_data.append(data)
            else:
                raise InvalidItemError(f"page encoder, batch {self._seq}, item {len(kinds)}: "
                                       f"{type(item).__name__} is neither PageItem nor "
                                       f"OpaqueItem")
        self._next = nxt

        kind_arr = np.frombuffer(kinds, fmt.U8)
        if cand_new:
            deltas = find_deltas(cand_new, cand_old, size, self.config.delta_limit)
            chosen = deltas.chosen
            kind_arr[np.asarray(cand_item)[chosen]] = DELTA
            for body in np.asarray(cand_body)[chosen].tolist():
                bodies[body] = b""
            delta_rel = np.asarray(cand_rel, fmt.U32)[chosen]
            nruns, run_off, run_len, delta_data = (
                deltas.nruns, deltas.run_off, deltas.run_len, deltas.data)
        else:
            delta_rel = np.zeros(0, fmt.U32)
            nruns = run_off = run_len = np.zeros(0, fmt.U16)
            delta_data = b""

        offset_arr = np.asarray(offsets, fmt.U64)
        prev = np.empty_like(offset_arr)
        if offsets:
            prev[0] = (1 << 64) - size  # so that a first page at offset 0 is stored as 0
            prev[1:] = offset_arr[:-1]
        # Offsets go as "distance from where the previous page ended": 0 for consecutive
        # pages, which is what the first pass over RAM mostly sends. Wraps modulo 2^64.
        offset_delta = offset_arr - prev - np.uint64(size)
        names = b"".join(bytes((len(n),)) + n for n in new_blocks)
        block_col = np.asarray(blocks, fmt.U16).tobytes()
        tag_col = np.asarray(tags, fmt.U16).tobytes()
        opaque_col = np.asarray(opaque_lens, fmt.U32).tobytes()
        fmt.metadata_check(check, (kind_arr == OPAQUE).tobytes(), block_col,
                           offset_arr.tobytes(), tag_col, opaque_col, names)
        table = fmt.SECTION_TABLE.pack(len(kinds), len(refs), len(delta_rel), len(run_off),
                                       len(opaque_lens), len(new_blocks))
        payload = b"".join([
            table, kinds, block_col, offset_delta.tobytes(), tag_col,
            np.asarray(refs, fmt.U32).tobytes(), delta_rel.tobytes(),
            nruns.tobytes(), run_off.tobytes(), run_len.tobytes(), opaque_col, names,
            *bodies, delta_data, *opaque_data])
        if len(payload) > fmt.MAX_PAYLOAD:
            raise InvalidItemError(f"page encoder, batch {self._seq}: {len(payload)} bytes of "
                                   f"payload exceed the format's 4 GiB; send smaller batches")
        counts = np.bincount(kind_arr, minlength=fmt.KIND_COUNT).tolist()
        stats = CodecStats(
            zero=KindStats(counts[ZERO], counts[ZERO] * size, 0),
            ref=KindStats(counts[REF], counts[REF] * size, 4 * counts[REF]),
            delta=KindStats(counts[DELTA], counts[DELTA] * size,
                            6 * counts[DELTA] + fmt.RUN_HEADER * len(run_off) + len(delta_data)),
            literal=KindStats(counts[LITERAL], counts[LITERAL] * size, counts[LITERAL] * size),
            opaque=KindStats(counts[OPAQUE], sum(opaque_lens),
                             sum(opaque_lens) + 4 * counts[OPAQUE]),
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
