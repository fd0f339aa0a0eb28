"""The page codec (dwcp_migrate.pagecodec): round trips of every item kind and compression,
cache eviction and lockstep, hypothesis properties (random items round-trip; any damaged or
truncated batch is rejected with PageCodecError, never wrong output), session header checks,
statistics."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dwcp_migrate.errors import ConfigError, DwcpError
from dwcp_migrate.pagecodec import (
    CodecStats,
    Compression,
    CorruptBatchError,
    InvalidItemError,
    Item,
    OpaqueItem,
    PageBatch,
    PageCodecConfig,
    PageCodecError,
    PageDecoder,
    PageEncoder,
    PageItem,
    SessionMismatchError,
    memory,
    parse_session_header,
)
from dwcp_migrate.pagecodec import format as fmt

P = 4096
SMALL = 512  # page size for the property tests: same code paths, less hashing
COMPRESSIONS = ["none", "lz4", "lz4:9", "zstd:1", "zstd:-3", "zstd:19"]
HYPO = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pair(config: PageCodecConfig | None = None, session_id: int = 42
         ) -> tuple[PageEncoder, PageDecoder]:
    config = config or PageCodecConfig(cache_bytes=1 << 20)
    enc = PageEncoder(config, session_id=session_id)
    dec = PageDecoder(config)
    dec.accept_session_header(enc.session_header)
    return enc, dec


def same(got: Sequence[Item], want: Sequence[Item]) -> None:
    """Items equal, with page data compared as bytes (inputs may be memoryviews)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)
        assert bytes(g.data) == bytes(w.data)
        if isinstance(g, PageItem) and isinstance(w, PageItem):
            assert (g.block, g.offset, g.tag) == (w.block, w.offset, w.tag)


def roundtrip(enc: PageEncoder, dec: PageDecoder, items: list[Item],
              how: Compression | None = None) -> bytes:
    data = enc.encode_batch(items, how)
    same(dec.decode_batch(data), items)
    assert enc.cache_fingerprint() == dec.cache_fingerprint()
    return data


def page(seed: int, size: int = P) -> bytes:
    return random.Random(seed).randbytes(size)


def text(seed: int, size: int = P) -> bytes:
    rng = random.Random(seed)
    words = [b"cache", b"miss", b"request", b"user", b"2025-06-14", b"ok", b"id=", b"\n"]
    out = b" ".join(rng.choice(words) for _ in range(size))
    return out[:size]


def changed(data: bytes, *where: int) -> bytes:
    out = bytearray(data)
    for at in where:
        out[at] ^= 0x5A
    return bytes(out)


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", COMPRESSIONS)
def test_round_trip_all_kinds(how: str) -> None:
    enc, dec = pair()
    comp = Compression.parse(how)
    a, b, t = page(1), page(2), text(3)
    first: list[Item] = [
        OpaqueItem(b"\x02\x00\x00\x00\x07"),
        PageItem(b"pc.ram", 0, bytes(P), 2),  # zero
        PageItem(b"pc.ram", P, a, 8),  # literal
        PageItem(b"pc.ram", 2 * P, memoryview(bytearray(a))),  # duplicate in the same batch
        PageItem(b"vga.vram", 0, t, 0xFFFF),  # second block, literal text
        OpaqueItem(b""),
        PageItem(b"pc.ram", (1 << 64) - P, b),  # highest offset
        OpaqueItem(os.urandom(3000)),
    ]
    roundtrip(enc, dec, first, comp)
    assert enc.last_stats.ref.count == 1
    second: list[Item] = [
        PageItem(b"pc.ram", P, changed(a, 0, 1, 2, 4095)),  # delta, runs at both ends
        PageItem(b"vga.vram", 0, changed(t, 100, 2000)),  # delta
        PageItem(b"pc.ram", 3 * P, t),  # dedup of a page sent in the first batch
        PageItem(b"pc.ram", (1 << 64) - P, bytes(P)),  # was b, now zero
        PageItem(b"pc.ram", 5 * P, page(9)),  # literal
        PageItem(b"rom", 7, b),  # dedup, new block, unaligned offset
    ]
    roundtrip(enc, dec, second, comp)
    st_ = enc.last_stats
    assert (st_.zero.count, st_.ref.count, st_.delta.count, st_.literal.count) == (1, 2, 2, 1)
    assert enc.stats == dec.stats


def test_page_size_64k_and_512() -> None:
    for size in (512, 65536):
        enc, dec = pair(PageCodecConfig(page_size=size, cache_bytes=8 * size))
        a = page(5, size)
        roundtrip(enc, dec, [PageItem(b"b", 0, a), PageItem(b"b", size, bytes(size))])
        roundtrip(enc, dec, [PageItem(b"b", 0, changed(a, 0, size - 1))])
        assert enc.last_stats.delta.count == 1


def test_kind_decisions_and_delta_limit() -> None:
    enc, dec = pair()
    a = page(1)
    roundtrip(enc, dec, [PageItem(b"r", 0, a)])
    # Many scattered changes cost more than delta_max_bytes: the page goes literal.
    roundtrip(enc, dec, [PageItem(b"r", 0, changed(a, *range(0, P, 8)))])
    assert (enc.last_stats.delta.count, enc.last_stats.literal.count) == (0, 1)
    # A delta against the version just sent (the cache keeps the newest one per location).
    roundtrip(enc, dec, [PageItem(b"r", 0, changed(changed(a, *range(0, P, 8)), 77))])
    assert enc.last_stats.delta.count == 1
    assert enc.last_stats.delta.bytes_out == 6 + 4 + 1  # base + run count, one run, one byte
    # Same location twice in one batch: the second may not use the first as delta base.
    b = page(2)
    roundtrip(enc, dec, [PageItem(b"r", P, b), PageItem(b"r", P, changed(b, 3))])
    assert (enc.last_stats.delta.count, enc.last_stats.literal.count) == (0, 2)


def test_dedup_and_delta_can_be_switched_off() -> None:
    enc, dec = pair(PageCodecConfig(cache_bytes=1 << 20, dedup=False, delta=False))
    a = page(1)
    roundtrip(enc, dec, [PageItem(b"r", 0, a), PageItem(b"r", P, a)])
    roundtrip(enc, dec, [PageItem(b"r", 0, changed(a, 5))])
    assert enc.stats.ref.count == enc.stats.delta.count == 0
    assert enc.stats.literal.count == 3


def test_incompressible_batch_goes_uncompressed() -> None:
    enc, dec = pair()
    data = roundtrip(enc, dec, [PageItem(b"r", 0, page(1))], Compression("zstd", 3))
    assert data[3] == fmt.CODEC_NONE
    data = roundtrip(enc, dec, [PageItem(b"r", P, text(1))], Compression("zstd", 3))
    assert data[3] == fmt.CODEC_ZSTD


def test_batches_finished_in_parallel_threads() -> None:
    """prepare_batch in order, finish() in any order on a thread pool, send in order."""
    enc, dec = pair()
    rng = random.Random(5)
    batches: list[list[Item]] = [
        [PageItem(b"r", rng.randrange(64) * P, text(rng.randrange(8))) for _ in range(20)]
        for _ in range(12)]
    prepared = [enc.prepare_batch(items, Compression("zstd", 3)) for items in batches]
    with ThreadPoolExecutor(4) as pool:
        done = dict(pool.map(lambda b: (b.seq, b.finish()), reversed(prepared)))
    for n, items in enumerate(batches):
        same(dec.decode_batch(done[n]), items)
    assert enc.cache_fingerprint() == dec.cache_fingerprint()
    assert enc.stats == dec.stats
    with pytest.raises(PageCodecError, match="already finished"):
        prepared[0].finish()


# ---- the column form (PageBatch) --------------------------------------------------------------
def test_pages_in_columns_round_trip_with_pages_without_data() -> None:
    """encode_pages/decode_pages: zero pages need no data, block runs and opaque runs are
    placed by page number, and the result equals the same batch given as items."""
    enc, dec = pair()
    twin, twin_dec = pair()
    a, t = page(1), text(2)
    batch = PageBatch(offsets=[0, P, 2 * P, 0, 5 * P], tags=[8, 0x22, 0x28, 2, 0x28],
                      data_at=[0, 2, 4], datas=[a, memoryview(t), a],
                      blocks=[(0, b"pc.ram"), (3, b"vga"), (4, b"pc.ram")],
                      opaque_at=[0, 3, 3, 5], opaques=[b"head", b"x", memoryview(b"yz"), b"t"])
    items = batch.items(P)
    assert [type(i).__name__ for i in items] == [
        "OpaqueItem", "PageItem", "PageItem", "PageItem", "OpaqueItem", "OpaqueItem",
        "PageItem", "PageItem", "OpaqueItem"]
    data = enc.encode_pages(batch, Compression("zstd", 1))
    same(dec.decode_batch(data), items)
    assert data == twin.encode_batch(items, Compression("zstd", 1))  # the same bytes
    got = twin_dec.decode_pages(data)
    assert (got.offsets, got.tags, got.opaque_at) == (batch.offsets, batch.tags, batch.opaque_at)
    assert [bytes(d) for d in got.datas] == [a, bytes(P), t, bytes(P), a]
    assert got.blocks == [(0, b"pc.ram"), (3, b"vga"), (4, b"pc.ram")]
    st_ = enc.last_stats
    assert (st_.zero.count, st_.literal.count, st_.ref.count, st_.opaque.count) == (2, 2, 1, 4)
    assert PageBatch.from_items(items).items(P) == items


@pytest.mark.parametrize("bad", [
    PageBatch(offsets=[0], tags=[], blocks=[(0, b"r")]),  # a tag missing
    PageBatch(offsets=[0], tags=[0]),  # a page without a block
    PageBatch(offsets=[0, P], tags=[0, 0], blocks=[(1, b"r")]),  # first run not at page 0
    PageBatch(offsets=[0, P], tags=[0, 0], blocks=[(0, b"r")], data_at=[1, 0],
              datas=[page(1), page(2)]),  # data pages out of order
    PageBatch(offsets=[0], tags=[0], blocks=[(0, b"r")], data_at=[1], datas=[page(1)]),
    PageBatch(offsets=[0], tags=[0], blocks=[(0, b"r")], opaque_at=[2], opaques=[b"x"]),
    PageBatch(offsets=[0], tags=[0], blocks=[(0, b"r")], data_at=[0],
              datas=[memoryview(page(1) * 2)[::2]]),  # not contiguous
    PageBatch(offsets=[0], tags=[0], blocks=[(0, b"r")], data_at=[0],
              datas=[bytearray(P)]),  # type: ignore[list-item]  # not bytes or a memoryview
])
def test_inconsistent_columns_are_refused(bad: PageBatch) -> None:
    enc, _ = pair()
    with pytest.raises(InvalidItemError):
        enc.encode_pages(bad)
    with pytest.raises(PageCodecError, match="unusable"):
        enc.encode_pages(PageBatch())


def test_a_zero_page_swapped_with_a_page_fails_the_content_check() -> None:
    """Format 2 hashes no bytes for zero pages; the kinds in the check still pin them: a
    batch whose kinds say ZERO, LITERAL where the encoder wrote LITERAL, ZERO is refused
    even behind a valid frame check (a buggy encoder, or a codec bug)."""
    enc, dec = pair()
    data = enc.encode_batch([PageItem(b"r", 0, page(1)), PageItem(b"r", P, bytes(P))],
                            Compression("none"))
    header = fmt.BATCH_HEADER.unpack_from(data)
    payload = bytearray(data[fmt.BATCH_HEADER_SIZE:])
    kinds_at = fmt.SECTION_TABLE.size
    assert payload[kinds_at:kinds_at + 2] == bytes((fmt.LITERAL, fmt.ZERO))
    payload[kinds_at:kinds_at + 2] = bytes((fmt.ZERO, fmt.LITERAL))
    with pytest.raises(CorruptBatchError, match="content check"):
        dec.decode_batch(forge(enc.session_id, bytes(payload), header[6], header[3]))


def test_cache_memory_is_reused_by_the_next_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page cache's mapping goes to the next encoder or decoder of its size, with the old
    session's pages still in it: they must not leak into the new session."""
    monkeypatch.setattr(memory, "_pool", [])  # other tests' caches, bigger, would be kept
    config = PageCodecConfig(page_size=SMALL, cache_bytes=64 * SMALL)
    enc = PageEncoder(config, session_id=1)
    enc.encode_batch([PageItem(b"r", i * SMALL, page(i, SMALL)) for i in range(64)])
    arena = enc._arena
    del enc
    enc2, dec = pair(config)
    assert enc2._arena is arena or dec._arena is arena
    # The stale pages are not in the new cache: sending them again makes literals.
    roundtrip(enc2, dec, [PageItem(b"r", i * SMALL, page(i, SMALL)) for i in range(64)])
    assert enc2.last_stats.literal.count == 64
    roundtrip(enc2, dec, [PageItem(b"s", 0, page(3, SMALL))])
    assert enc2.last_stats.ref.count == 1
    assert memory.tune_allocator() in (True, False)


def test_delta_hints_for_unaligned_offsets_and_beyond_the_location_arrays() -> None:
    """Locations are remembered in per-block arrays for aligned offsets, in a dict for
    unaligned ones and once the arrays' budget is spent: deltas are found either way."""
    enc, dec = pair(PageCodecConfig(page_size=SMALL, cache_bytes=64 * SMALL))
    enc._loc_budget = 4  # the arrays cover 4 pages of the first block only
    offsets = [0, SMALL, 3, 100 * SMALL, 1 << 40]
    pages = [page(i, SMALL) for i in range(len(offsets))]
    roundtrip(enc, dec, [PageItem(b"r", off, p) for off, p in zip(offsets, pages, strict=True)])
    roundtrip(enc, dec, [PageItem(b"r", off, changed(p, 7))
                         for off, p in zip(offsets, pages, strict=True)])
    assert enc.last_stats.delta.count == len(offsets)


# ---- the cache ------------------------------------------------------------------------------
def test_eviction_with_a_tiny_cache() -> None:
    enc, dec = pair(PageCodecConfig(cache_bytes=4 * P))
    pages = [page(i) for i in range(6)]
    roundtrip(enc, dec, [PageItem(b"r", i * P, p) for i, p in enumerate(pages)])
    # Slots 0 and 1 were overwritten by pages 4 and 5 (the cache holds slots 2..5). The delta
    # against slot 2 comes first, while slot 2 is still cached; inserting it evicts slot 2.
    # Page 0 must go literal again (no reference to an evicted slot), page 5 is a reference,
    # page 1's previous version (slot 1) is gone, so it goes literal too.
    roundtrip(enc, dec, [PageItem(b"r", 2 * P, changed(pages[2], 9)),
                         PageItem(b"s", 0, pages[0]), PageItem(b"s", P, pages[5]),
                         PageItem(b"r", P, changed(pages[1], 9))])
    st_ = enc.last_stats
    assert (st_.literal.count, st_.ref.count, st_.delta.count) == (2, 1, 1)
    # Page 2 itself is evicted now: a page equal to it is a literal, not a reference.
    roundtrip(enc, dec, [PageItem(b"t", 0, pages[2])])
    assert enc.last_stats.literal.count == 1


def test_caches_stay_identical_over_many_batches() -> None:
    rng = random.Random(11)
    enc, dec = pair(PageCodecConfig(page_size=SMALL, cache_bytes=32 * SMALL))
    known: dict[int, bytes] = {}
    for n in range(60):
        items: list[Item] = []
        for _ in range(rng.randrange(1, 40)):
            off = rng.randrange(64) * SMALL
            r = rng.random()
            if r < 0.2:
                data = bytes(SMALL)
            elif r < 0.5 and off in known:
                data = changed(known[off], *rng.sample(range(SMALL), rng.randrange(1, 6)))
            elif r < 0.7 and known:
                data = rng.choice(list(known.values()))
            else:
                data = rng.randbytes(SMALL) if r < 0.85 else text(rng.randrange(1000), SMALL)
            known[off] = data
            items.append(PageItem(b"ram", off, data, rng.randrange(1 << 16)))
            if rng.random() < 0.1:
                items.append(OpaqueItem(rng.randbytes(rng.randrange(20))))
        roundtrip(enc, dec, items, Compression.parse(rng.choice(COMPRESSIONS)))
        assert enc.cache_fingerprint() == dec.cache_fingerprint(), f"batch {n}"
    assert enc.stats == dec.stats
    kinds = enc.stats
    assert min(kinds.zero.count, kinds.ref.count, kinds.delta.count, kinds.literal.count) > 0


def test_lookup_tables_stay_bounded() -> None:
    enc, dec = pair(PageCodecConfig(page_size=SMALL, cache_bytes=8 * SMALL))
    for n in range(40):
        roundtrip(enc, dec, [PageItem(b"r", (n * 300 + i) * SMALL, page(n * 300 + i, SMALL))
                             for i in range(300)])
    limit = 2 * 8 + 4096
    assert len(enc._by_content) <= limit and len(enc._by_location) <= limit


# ---- properties -----------------------------------------------------------------------------
BASES = [bytes(SMALL), page(1, SMALL), page(2, SMALL), text(3, SMALL)]


@st.composite
def pages_(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(BASES))
    edits = draw(st.lists(st.tuples(st.integers(0, SMALL - 1), st.integers(0, 255)),
                          max_size=draw(st.sampled_from([0, 3, 600]))))
    out = bytearray(base)
    for at, value in edits:
        out[at] = value
    return bytes(out)


item_ = st.one_of(
    st.builds(PageItem, st.sampled_from([b"pc.ram", b"vga", b""]),
              st.integers(0, 7).map(lambda i: i * SMALL) | st.integers(0, (1 << 64) - 1),
              pages_(), st.integers(0, 0xFFFF)),
    st.builds(OpaqueItem, st.binary(max_size=300)),
)
batches_ = st.lists(st.lists(item_, max_size=24), min_size=1, max_size=4)


@HYPO
@given(batches=batches_, how=st.sampled_from(COMPRESSIONS), slots=st.integers(1, 6))
def test_property_round_trip(batches: list[list[Item]], how: str, slots: int) -> None:
    enc, dec = pair(PageCodecConfig(page_size=SMALL, cache_bytes=slots * SMALL))
    for items in batches:
        roundtrip(enc, dec, items, Compression.parse(how))
    assert enc.stats == dec.stats


def _primed() -> tuple[PageDecoder, list[Item], bytes, bytes, int]:
    """A decoder after one batch, and a second batch that uses every kind.

    Returns the decoder, the items, the batch compressed with zstd and the same batch
    uncompressed (from a twin encoder in the same state), and the session id.
    """
    config = PageCodecConfig(page_size=SMALL, cache_bytes=16 * SMALL)
    enc, dec = pair(config)
    twin = PageEncoder(config, session_id=enc.session_id)
    a, b, t = page(1, SMALL), page(2, SMALL), text(3, SMALL)
    first: list[Item] = [PageItem(b"ram", 0, a), PageItem(b"ram", SMALL, b),
                         PageItem(b"ram", 2 * SMALL, t)]
    roundtrip(enc, dec, first)
    twin.encode_batch(first)
    items: list[Item] = [
        OpaqueItem(b"section"), PageItem(b"ram", 0, changed(a, 1, 2, 300), 8),
        PageItem(b"ram", 3 * SMALL, bytes(SMALL), 2), PageItem(b"vga", 0, b, 8),
        PageItem(b"ram", 2 * SMALL, changed(t, 7), 8), PageItem(b"ram", 4 * SMALL, page(4, SMALL)),
        PageItem(b"ram", 5 * SMALL, page(4, SMALL)), OpaqueItem(b"eos")]
    packed = enc.encode_batch(items, Compression("zstd", 1))
    raw = twin.encode_batch(items, Compression("none"))
    st_ = enc.last_stats
    assert min(st_.zero.count, st_.ref.count, st_.delta.count, st_.literal.count,
               st_.opaque.count) >= 1
    return dec, items, packed, raw, enc.session_id


PRIMED = {name: _primed() for name in ("mutate", "forge")}


def test_primed_batches_decode() -> None:
    dec, items, packed, raw, _ = _primed()
    assert raw[3] == fmt.CODEC_NONE and packed[3] == fmt.CODEC_ZSTD
    same(dec.decode_batch(packed), items)
    dec, items, packed, raw, _ = _primed()
    same(dec.decode_batch(raw), items)


@HYPO
@given(at=st.integers(0, 10**6), value=st.integers(1, 255), raw=st.booleans())
def test_property_any_byte_mutation_is_rejected(at: int, value: int, raw: bool) -> None:
    dec, _, packed, plain, _ = PRIMED["mutate"]
    data = plain if raw else packed
    damaged = bytearray(data)
    damaged[at % len(data)] ^= value
    before = dec.cache_fingerprint()
    with pytest.raises(CorruptBatchError):
        dec.decode_batch(bytes(damaged))
    assert dec.cache_fingerprint() == before  # a rejected batch changes nothing


@HYPO
@given(cut=st.integers(0, 10**6), extra=st.binary(max_size=3))
def test_property_truncation_is_rejected(cut: int, extra: bytes) -> None:
    dec, _, packed, _, _ = PRIMED["mutate"]
    damaged = packed[:cut % len(packed)] + extra
    assume(damaged != packed)
    with pytest.raises(CorruptBatchError):
        dec.decode_batch(damaged)


def forge(session_id: int, payload: bytes, content: int, seq: int) -> bytes:
    """A batch around ``payload`` with a *valid* frame check, as a buggy encoder could send."""
    head = fmt.BATCH_HEADER.pack(fmt.BATCH_MAGIC, fmt.FORMAT_VERSION, fmt.CODEC_NONE, seq,
                                 len(payload), len(payload), content, 0)[:fmt.FRAME_CHECKED]
    frame = xxhash.xxh3_64(head, seed=session_id)
    frame.update(payload)
    return head + frame.intdigest().to_bytes(8, "little") + payload


@HYPO
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                      max_size=3),
       cut=st.none() | st.integers(0, 10**6))
def test_property_damaged_payload_behind_a_valid_frame(edits: list[tuple[int, int]],
                                                       cut: int | None) -> None:
    """The bounds checks, not just the frame check: damage inside a well-framed batch must
    end in CorruptBatchError (never another exception), or in exactly the right items."""
    dec, items, _, raw, session_id = PRIMED["forge"]
    header = fmt.BATCH_HEADER.unpack_from(raw)
    payload = bytearray(raw[fmt.BATCH_HEADER_SIZE:])
    for at, value in edits:
        payload[at % len(payload)] ^= value
    if cut is not None:
        del payload[cut % len(payload):]
    before = dec.cache_fingerprint()
    try:
        got = dec.decode_batch(forge(session_id, bytes(payload), header[6], header[3]))
    except CorruptBatchError:
        assert dec.cache_fingerprint() == before
        return
    # Accepted (say, a byte of a merged delta run changed to what the base holds anyway):
    # then the output must be exactly right. The decoder moved on; prime a fresh one.
    same(got, items)
    PRIMED["forge"] = _primed()


# ---- session header and batch order -----------------------------------------------------
def test_session_header_must_match() -> None:
    enc = PageEncoder(PageCodecConfig(cache_bytes=1 << 20), session_id=7)
    assert parse_session_header(enc.session_header) == (P, 256, 7)
    for config in (PageCodecConfig(cache_bytes=2 << 20),
                   PageCodecConfig(page_size=8192, cache_bytes=1 << 20)):
        with pytest.raises(SessionMismatchError, match="configuration differs"):
            PageDecoder(config).accept_session_header(enc.session_header)
    head = enc.session_header
    for bad in (head[:-1], b"X" + head[1:], head[:20] + b"\xff" + head[21:]):
        with pytest.raises(SessionMismatchError):
            PageDecoder(PageCodecConfig(cache_bytes=1 << 20)).accept_session_header(bad)
    # A newer format version, with a valid check: "upgrade the older agent".
    newer = bytearray(head)
    struct.pack_into("<H", newer, 8, fmt.FORMAT_VERSION + 1)
    newer[-8:] = xxhash.xxh3_64_intdigest(bytes(newer[:-8])).to_bytes(8, "little")
    with pytest.raises(SessionMismatchError, match="upgrade"):
        PageDecoder(PageCodecConfig(cache_bytes=1 << 20)).accept_session_header(bytes(newer))
    dec = PageDecoder(PageCodecConfig(cache_bytes=1 << 20))
    with pytest.raises(PageCodecError, match="before the session header"):
        dec.decode_batch(enc.encode_batch([]))
    dec.accept_session_header(head)
    with pytest.raises(SessionMismatchError, match="second session header"):
        dec.accept_session_header(head)


def test_batches_out_of_order_or_from_another_session() -> None:
    enc, dec = pair()
    first = enc.encode_batch([PageItem(b"r", 0, page(1))])
    second = enc.encode_batch([PageItem(b"r", P, page(1))])
    with pytest.raises(CorruptBatchError, match="batch 1 arrived where batch 0"):
        dec.decode_batch(second)
    other, _ = pair(session_id=43)
    with pytest.raises(CorruptBatchError, match="another session"):
        dec.decode_batch(other.encode_batch([PageItem(b"r", 0, page(1))]))
    dec.decode_batch(first)
    with pytest.raises(CorruptBatchError, match="batch 0 arrived where batch 1"):
        dec.decode_batch(first)
    assert isinstance(dec.decode_batch(second)[0], PageItem)


def test_caches_out_of_step_fail_the_content_check() -> None:
    """A decoder whose cache differs (here: it saw another encoder's first batch) refuses."""
    enc, dec = pair(session_id=1)
    twin = PageEncoder(enc.config, session_id=1)
    a = page(1)
    dec.decode_batch(twin.encode_batch([PageItem(b"r", 0, changed(a, 5))]))
    enc.encode_batch([PageItem(b"r", 0, a)])
    before = dec.cache_fingerprint()
    with pytest.raises(CorruptBatchError, match="content check"):
        dec.decode_batch(enc.encode_batch([PageItem(b"r", P, a)]))  # a reference to slot 0
    assert dec.cache_fingerprint() == before


# ---- bad input and configuration ----------------------------------------------------------
@pytest.mark.parametrize("bad", [
    PageItem(b"r", 0, bytes(100)),
    PageItem(b"r", -P, page(1)),
    PageItem(b"r", 1 << 64, page(1)),
    PageItem(b"r", 0, page(1), 1 << 16),
    PageItem(b"x" * 256, 0, page(1)),
    PageItem("r", 0, page(1)),  # type: ignore[arg-type]
    b"not an item",
])
def test_invalid_items_are_refused_and_the_encoder_stops(bad: object) -> None:
    enc, _ = pair()
    with pytest.raises(InvalidItemError):
        enc.encode_batch([PageItem(b"r", 0, page(2)), bad])  # type: ignore[list-item]
    with pytest.raises(PageCodecError, match="unusable"):
        enc.encode_batch([])


def test_compression_parsing() -> None:
    assert Compression.parse("zstd:3") == Compression("zstd", 3)
    assert Compression.parse(" ZSTD ") == Compression("zstd", 1)
    assert Compression.parse("zstd:-5") == Compression("zstd", -5)
    assert Compression.parse("lz4") == Compression("lz4", 0)
    assert Compression.parse("lz4:9") == Compression("lz4", 9)
    assert Compression.parse("none") == Compression("none")
    for text_ in ("zstd:3", "zstd:-5", "lz4", "lz4:9", "none"):
        assert str(Compression.parse(text_)) == text_
    for bad in ("gzip", "zstd:x", "zstd:23", "zstd:-8", "lz4:13", "none:1", ""):
        with pytest.raises(ConfigError):
            Compression.parse(bad)


def test_config_validation() -> None:
    for kwargs in ({"page_size": 3000}, {"page_size": 256}, {"page_size": 1 << 17},
                   {"cache_bytes": 100}, {"delta_max_bytes": 4096}):
        with pytest.raises(ConfigError):
            PageCodecConfig(**kwargs)  # type: ignore[arg-type]
    assert issubclass(PageCodecError, DwcpError)


# ---- statistics -------------------------------------------------------------------------
def test_stats_count_kinds_and_bytes() -> None:
    enc, dec = pair()
    a = page(1)
    roundtrip(enc, dec, [PageItem(b"r", 0, a), PageItem(b"r", P, bytes(P)),
                         OpaqueItem(b"0123456789")], Compression("none"))
    s = enc.last_stats
    assert (s.literal.count, s.literal.bytes_in, s.literal.bytes_out) == (1, P, P)
    assert (s.zero.count, s.zero.bytes_in, s.zero.bytes_out) == (1, P, 0)
    assert (s.opaque.count, s.opaque.bytes_in, s.opaque.bytes_out) == (1, 10, 14)
    data = roundtrip(enc, dec, [PageItem(b"r", 0, changed(a, 10, 11, 200)),
                                PageItem(b"r", 2 * P, a)], Compression("none"))
    s = enc.last_stats
    assert (s.delta.count, s.delta.bytes_in, s.delta.bytes_out) == (1, P, 6 + 2 * 4 + 3)
    assert (s.ref.count, s.ref.bytes_in, s.ref.bytes_out) == (1, P, 4)
    assert s.wire_bytes == len(data) and s.batches == 1
    assert s.payload_bytes == len(data) - fmt.BATCH_HEADER_SIZE
    assert s.payload_bytes == sum(k.bytes_out for k in s.kinds().values()) + s.metadata_bytes
    assert s.pages == 2 and s.bytes_in == 2 * P
    assert dec.last_stats == s
    total = CodecStats()
    total.add(enc.stats)
    assert total == dec.stats and total.batches == 2
    flat = enc.stats.as_dict()
    assert flat["items_literal"] == 1 and flat["bytes_in_opaque"] == 10
    assert enc.stats.ratio == enc.stats.bytes_in / enc.stats.wire_bytes
