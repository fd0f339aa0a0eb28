"""The QEMU migration stream codec (dwcp_migrate.stream): synthetic streams, properties
(hypothesis) and real captures of QEMU 7.2 and 10.0, including multifd channels, replayed
into a destination QEMU after a parse/write round trip."""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp_migrate.errors import DwcpError
from dwcp_migrate.stream import (
    ChannelKind,
    Command,
    CompressedPage,
    Configuration,
    Eof,
    FileHeader,
    MainChannelParser,
    MemSize,
    MultifdChannelParser,
    MultifdDeviceStateHeader,
    MultifdFlush,
    MultifdInit,
    MultifdPacketHeader,
    MultifdPage,
    Opaque,
    RamEos,
    RamPage,
    Record,
    SectionFooter,
    SectionHeader,
    StreamClosedError,
    StreamError,
    StreamTruncatedError,
    VmDescription,
    XbzrlePage,
    ZeroPage,
    classify_channel,
    encode,
    write_into,
    write_records,
)
from dwcp_migrate.stream import records as rec
from tests.stream_fixtures import (
    CAPTURES,
    PAGE,
    Capture,
    StreamBuilder,
    multifd_init,
    multifd_packet,
    page_bytes,
    replay,
    typical_multifd,
    typical_stream,
)

Parser = MainChannelParser | MultifdChannelParser


def _feed_all(parser: Parser, data: bytes, chunks: Sequence[int] | None) -> list[Record]:
    """Feed ``data`` cut into ``chunks`` (sizes, cycled)."""
    out: list[Record] = []
    pos, i = 0, 0
    sizes = list(chunks or [len(data) or 1])
    while pos < len(data):
        size = max(1, sizes[i % len(sizes)])
        out += parser.feed(data[pos:pos + size])
        pos += size
        i += 1
    return out


def parse(data: bytes, chunks: Sequence[int] | None = None, *, strict: bool = False
          ) -> tuple[list[Record], MainChannelParser]:
    parser = MainChannelParser()
    out = _feed_all(parser, data, chunks)
    return out + parser.end_of_stream(strict=strict), parser


def parse_multifd(data: bytes, chunks: Sequence[int] | None = None, *, strict: bool = False
                  ) -> tuple[list[Record], MultifdChannelParser]:
    parser = MultifdChannelParser()
    out = _feed_all(parser, data, chunks)
    return out + parser.end_of_stream(strict=strict), parser


def roundtrip(data: bytes, chunks: Sequence[int] | None = None, *, multifd: bool = False
              ) -> list[Record]:
    """Parse, rewrite, compare; StreamError is allowed only from end_of_stream."""
    parser: Parser = MultifdChannelParser() if multifd else MainChannelParser()
    out = _feed_all(parser, data, chunks)
    try:
        out += parser.end_of_stream()
    except StreamTruncatedError as exc:
        assert parser.truncation is exc
        out += exc.records
    assert write_records(out) == data
    return out


def kinds(records: Sequence[Record]) -> list[str]:
    return [type(r).__name__ for r in records]


# ---- synthetic main-channel streams --------------------------------------------------------
def test_typical_stream_records() -> None:
    data = typical_stream()
    records, parser = parse(data, strict=True)
    assert write_records(records) == data
    # EOF lies in the opaque tail after the FULL section: not seen, but no truncation either.
    assert not parser.complete and parser.truncation is None
    assert isinstance(records[0], FileHeader)
    assert isinstance(records[1], Configuration) and records[1].machine == b"pc-i440fx-7.2"
    start = records[2]
    assert isinstance(start, SectionHeader) and start.idstr == b"ram" and start.version_id == 4
    mem = records[3]
    assert isinstance(mem, MemSize)
    assert [(b.name, b.used_length) for b in mem.blocks] == [
        (b"pc.ram", 64 * PAGE), (b"pc.bios", 16 * PAGE)]
    pages = [r for r in records if isinstance(r, RamPage)]
    zeros = [r for r in records if isinstance(r, ZeroPage)]
    assert [(p.block, p.offset) for p in pages] == [
        (b"pc.ram", 0), (b"pc.ram", PAGE), (b"pc.ram", 3 * PAGE), (b"pc.ram", 4 * PAGE),
        (b"pc.bios", 0), (b"pc.bios", 2 * PAGE)]
    assert bytes(pages[2].data) == page_bytes(3)
    assert pages[0].flags == rec.RAM_SAVE_FLAG_PAGE
    assert pages[1].flags == rec.RAM_SAVE_FLAG_PAGE | rec.RAM_SAVE_FLAG_CONTINUE
    assert [(z.block, z.offset, z.fill) for z in zeros] == [
        (b"pc.ram", 2 * PAGE, 0), (b"pc.ram", 5 * PAGE, 0), (b"pc.bios", PAGE, 0)]
    assert Counter(kinds(records)) >= Counter({"RamEos": 3, "SectionFooter": 3, "MultifdFlush": 1})
    assert any(isinstance(r, Command) and r.cmd == rec.MIG_CMD_SWITCHOVER_START for r in records)
    # The FULL device section: header parsed, then everything verbatim (its end is unknowable)
    full = next(i for i, r in enumerate(records)
                if isinstance(r, SectionHeader) and r.section_type == rec.QEMU_VM_SECTION_FULL)
    assert records[full].idstr == b"timer"  # type: ignore[union-attr]
    assert all(isinstance(r, Opaque) for r in records[full + 1:])
    assert parser.passthrough and parser.passthrough_reason is not None
    assert "timer" in parser.passthrough_reason


def test_eof_and_vmdescription_are_parsed_when_no_device_section_precedes() -> None:
    text = b'{"devices": []}'
    data = StreamBuilder().header().configuration().eof().vmdescription(text).build()
    records, parser = parse(data, strict=True)
    assert kinds(records) == ["FileHeader", "Configuration", "Eof", "VmDescription", "Opaque"]
    assert records[3] == VmDescription(len(text)) and bytes(records[4].data) == text  # type: ignore[union-attr]
    assert parser.complete and not parser.passthrough
    # Anything after VMDESCRIPTION is passed through, and the stream still counts as complete.
    records, parser = parse(data + b"junk", strict=True)
    assert write_records(records) == data + b"junk" and parser.passthrough


def test_stream_without_footers() -> None:
    data = typical_stream(footers=False)
    records = roundtrip(data)
    assert "SectionFooter" not in kinds(records)
    assert sum(isinstance(r, RamPage) for r in records) == 6


def test_every_split_point_of_a_small_stream() -> None:
    data = typical_stream(pages=3)
    expected, _ = parse(data)
    for cut in range(0, len(data), 7):
        parser = MainChannelParser()
        records = parser.feed(data[:cut]) + parser.feed(data[cut:])
        records += parser.end_of_stream()
        assert write_records(records) == data
        assert [r for r in records if not isinstance(r, Opaque)] == [
            r for r in expected if not isinstance(r, Opaque)]


def test_byte_by_byte_feeding() -> None:
    data = typical_stream(pages=4)
    records = roundtrip(data, [1])
    assert sum(isinstance(r, RamPage) for r in records) == 3 + 2  # pc.ram 0, 1, 3; pc.bios 0, 2


def test_iterative_section_other_than_ram_is_passed_through() -> None:
    b = StreamBuilder().header().configuration()
    b.start(1, b"block", version=1).raw(b"\x00" * 20)  # block migration: a format we don't parse
    b.start(2, b"ram").mem_size([(b"pc.ram", 16 * PAGE)]).eos().footer(2)
    data = b.build()
    records = roundtrip(data)
    assert kinds(records) == ["FileHeader", "Configuration", "SectionHeader", "Opaque"]
    assert records[2].idstr == b"block"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [
    struct.pack(">Q", rec.RAM_SAVE_FLAG_HOOK),  # RDMA
    struct.pack(">Q", rec.RAM_SAVE_FLAG_FULL),  # obsolete
    struct.pack(">Q", 0x8 | 0x2),  # two kinds at once
    struct.pack(">Q", 0x400),  # above MULTIFD_FLUSH: undefined
])
def test_unknown_ram_flags_start_passthrough_at_that_record(bad: bytes) -> None:
    b = StreamBuilder().header().configuration().start(1).mem_size([(b"pc.ram", 16 * PAGE)])
    b.eos().footer(1).part(1).page(b"pc.ram", 0, page_bytes(1))
    prefix = b.build()
    data = prefix + bad + page_bytes(2)
    records, parser = parse(data)
    assert write_records(records) == data
    assert parser.passthrough_offset == len(prefix)
    assert isinstance(records[-1], Opaque) and bytes(records[-1].data) == bad + page_bytes(2)
    assert sum(isinstance(r, RamPage) for r in records) == 1


def test_continue_without_a_previous_block_is_passed_through() -> None:
    b = StreamBuilder().header().configuration().start(1).mem_size([(b"pc.ram", 4 * PAGE)])
    data = b.page(b"pc.ram", 0, page_bytes(1), cont=True).eos().build()
    records, parser = parse(data)
    assert write_records(records) == data and parser.passthrough
    assert "CONTINUE" in (parser.passthrough_reason or "")


def test_xbzrle_compressed_and_flush_records() -> None:
    b = StreamBuilder().header().configuration().start(1).mem_size([(b"pc.ram", 8 * PAGE)])
    b.eos().part(1).xbzrle(b"pc.ram", PAGE, b"\x05\x01abc").compressed(
        b"pc.ram", 2 * PAGE, b"zlib-bytes", cont=True).multifd_flush().eos()
    data = b.build()
    records = roundtrip(data)
    x = next(r for r in records if isinstance(r, XbzrlePage))
    assert (x.block, x.offset, x.encoding, bytes(x.data)) == (b"pc.ram", PAGE, 1, b"\x05\x01abc")
    c = next(r for r in records if isinstance(r, CompressedPage))
    assert (c.block, c.offset, bytes(c.data)) == (b"pc.ram", 2 * PAGE, b"zlib-bytes")
    assert MultifdFlush() in records


def test_configuration_subsections() -> None:
    caps = struct.pack(">I", 1) + b"\x0fx-ignore-shared"
    uuid = bytes(range(16))
    b = StreamBuilder().header().configuration(b"pc-q35-10.0", [
        (b"configuration/capabilities", caps), (b"configuration/uuid", uuid)])
    # x-ignore-shared adds each block's guest address to the MEM_SIZE list (ram.c)
    b.start(1).mem_size([(b"pc.ram", 4 * PAGE), (b"pc.rom", PAGE)], extra=[[0], [0xC0000]])
    b.eos().part(1).page(b"pc.rom", 0, page_bytes(5)).eos()
    data = b.build()
    records = roundtrip(data)
    config = records[1]
    assert isinstance(config, Configuration)
    assert config.capabilities == ("x-ignore-shared",) and config.uuid == uuid
    assert config.target_page_bits is None
    mem = records[3]
    assert isinstance(mem, MemSize) and [blk.extra for blk in mem.blocks] == [(0,), (0xC0000,)]
    assert sum(isinstance(r, RamPage) for r in records) == 1


def test_target_page_bits_sets_the_page_size() -> None:
    bits = struct.pack(">I", 13)
    b = StreamBuilder(page_size=8192).header().configuration(
        b"virt", [(b"configuration/target-page-bits", bits)])
    b.start(1).mem_size([(b"mach-virt.ram", 4 * 8192)]).eos().part(1)
    data = b.page(b"mach-virt.ram", 8192, page_bytes(3, 8192)).eos().build()
    records, parser = parse(data)
    assert parser.page_size == 8192 and write_records(records) == data
    page = next(r for r in records if isinstance(r, RamPage))
    assert page.offset == 8192 and len(page.data) == 8192


def test_unknown_configuration_subsection_passes_everything_through() -> None:
    b = StreamBuilder().header().configuration(subsections=[(b"configuration/new", b"\x01")])
    data = b.start(1).mem_size([(b"pc.ram", PAGE)]).eos().build()
    records, parser = parse(data)
    assert kinds(records) == ["FileHeader", "Opaque"] and write_records(records) == data
    assert parser.passthrough_offset == 8


def test_postcopy_with_huge_pages_makes_mem_size_uncertain() -> None:
    advise = struct.pack(">QQ", 0x201000, 0x1000)  # 2 MiB and 4 KiB blocks
    b = StreamBuilder().header().configuration().command(rec.MIG_CMD_POSTCOPY_ADVISE, advise)
    b.start(1).mem_size([(b"pc.ram", PAGE)]).eos()
    data = b.build()
    records, parser = parse(data)
    assert write_records(records) == data and parser.passthrough
    assert "MEM_SIZE" in (parser.passthrough_reason or "")
    # Same page sizes everywhere: no extra field, MEM_SIZE is parsed.
    same = struct.pack(">QQ", 0x1000, 0x1000)
    b = StreamBuilder().header().configuration().command(rec.MIG_CMD_POSTCOPY_ADVISE, same)
    records = roundtrip(b.start(1).mem_size([(b"pc.ram", PAGE)]).eos().build())
    assert any(isinstance(r, MemSize) for r in records)


def test_packaged_command_is_followed_by_its_package_and_parsing_resumes() -> None:
    package = b"\x04whatever device state the package holds" * 10
    b = StreamBuilder().header().configuration().start(1).mem_size([(b"pc.ram", 4 * PAGE)])
    b.eos().command(rec.MIG_CMD_PACKAGED, struct.pack(">I", len(package))).raw(package)
    data = b.part(1).page(b"pc.ram", 0, page_bytes(1)).eos().build()
    for chunks in ([len(data)], [5], [333]):
        records = roundtrip(data, chunks)
        assert b"".join(bytes(r.data) for r in records if isinstance(r, Opaque)) == package
        assert sum(isinstance(r, RamPage) for r in records) == 1


def test_unknown_command_and_unknown_section_type() -> None:
    base = StreamBuilder().header().configuration().build()
    for tail in (struct.pack(">BHH", 8, 99, 0), b"\x09\x00", b"\x7e\x00", b"\x06\x00\x00"):
        records, parser = parse(base + tail)
        assert write_records(records) == base + tail
        assert parser.passthrough_offset == len(base)


@pytest.mark.parametrize("data", [b"", b"x", b"not a qemu stream at all" * 50,
                                  struct.pack(">II", rec.QEMU_VM_FILE_MAGIC, 2) + b"old"])
def test_garbage_is_passed_through(data: bytes) -> None:
    records, parser = parse(data)
    assert write_records(records) == data
    assert all(isinstance(r, Opaque) for r in records)
    # Shorter than a file header, it may still be the start of a QEMU stream: truncated.
    assert (parser.truncation is None) == (len(data) >= 8)


def test_truncated_stream_reports_and_flushes() -> None:
    data = typical_stream()
    cut = data.index(page_bytes(3)) + 100  # inside a page body
    parser = MainChannelParser()
    records = parser.feed(data[:cut])
    with pytest.raises(StreamTruncatedError) as info:
        parser.end_of_stream()
    err = info.value
    assert isinstance(err, StreamError) and isinstance(err, DwcpError)
    assert parser.truncation is err
    assert write_records(records + err.records) == data[:cut]
    assert err.offset == data.index(page_bytes(3)) - 8  # the page record's be64
    assert str(err.offset) in str(err) and "RAM record" in str(err)
    # A stream cut between records, before EOF, is truncated too (the migration is incomplete)
    parser = MainChannelParser()
    parser.feed(data[:data.index(page_bytes(3)) - 8])
    assert parser.end_of_stream(strict=False) == []
    assert parser.truncation is not None and "EOF" in parser.truncation.missing
    with pytest.raises(StreamClosedError):
        parser.feed(b"more")


def test_mutable_input_is_copied() -> None:
    data = bytearray(typical_stream(pages=2))
    parser = MainChannelParser()
    records = parser.feed(data) + parser.end_of_stream()
    expected = bytes(data)
    data[:] = b"\xff" * len(data)
    assert write_records(records) == expected


def test_writer_helpers() -> None:
    page = RamPage(b"pc.ram", 3 * PAGE, page_bytes(1))
    assert encode(page) == struct.pack(">Q", 3 * PAGE | 8) + b"\x06pc.ram" + page_bytes(1)
    cont = RamPage(b"pc.ram", 3 * PAGE, page_bytes(1), rec.RAM_SAVE_FLAG_PAGE | 0x20)
    assert encode(cont) == struct.pack(">Q", 3 * PAGE | 0x28) + page_bytes(1)
    out = bytearray(b"x")
    assert write_into([ZeroPage(b"a", 0), Eof()], out) == 8 + 2 + 1 + 1
    assert out == b"x" + struct.pack(">Q", 2) + b"\x01a\x00\x00"
    assert encode(SectionFooter(7)) == b"\x7e\x00\x00\x00\x07"
    assert encode(RamEos()) == struct.pack(">Q", 0x10)


# ---- multifd ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qemu72", [False, True])
def test_multifd_channel_records(qemu72: bool) -> None:
    data = typical_multifd(qemu72=qemu72)
    records, parser = parse_multifd(data, strict=True)
    assert write_records(records) == data and not parser.passthrough
    init = records[0]
    assert isinstance(init, MultifdInit) and init.channel_id == 1 and init.uuid == bytes(16)
    headers = [r for r in records if isinstance(r, MultifdPacketHeader)]
    assert len(headers) == 3 and len(headers[0].raw) == parser.header_len == 1344
    assert headers[0].block == b"pc.ram" and headers[0].normal_offsets == (0, PAGE, 2 * PAGE)
    assert headers[0].zero_offsets == (() if qemu72 else (40 * PAGE, 41 * PAGE))
    assert headers[1].sync and headers[1].normal_pages == 0
    pages = [r for r in records if isinstance(r, MultifdPage)]
    assert [(p.block, p.offset) for p in pages] == [(b"pc.ram", i * PAGE) for i in range(5)]
    assert bytes(pages[4].data) == page_bytes(104)
    devices = [r for r in records if isinstance(r, MultifdDeviceStateHeader)]
    if not qemu72:
        assert devices[0].idstr == b"0000:00:02.0/vfio" and devices[0].length == 100


def test_multifd_chunkings() -> None:
    data = typical_multifd()
    for chunks in ([1], [7, 4096], [1344], [1343, 2], [4097]):
        roundtrip(data, chunks, multifd=True)


@pytest.mark.parametrize("flags", [2, 4, 0x80, 0x40 | 1])  # zlib, zstd, unknown, bad device
def test_multifd_compressed_or_unknown_packets_pass_through(flags: int) -> None:
    head = multifd_init(0) + multifd_packet(b"pc.ram", [(0, page_bytes(1))])
    bad = multifd_packet(b"pc.ram", [(PAGE, page_bytes(2))], flags=flags)
    records, parser = parse_multifd(head + bad)
    assert write_records(records) == head + bad
    assert parser.passthrough_offset == len(head)
    assert sum(isinstance(r, MultifdPage) for r in records) == 1


def test_multifd_bad_counts_and_bad_init() -> None:
    too_many = multifd_init(0) + multifd_packet(b"pc.ram", [(0, page_bytes(1))], page_count=129)
    records, parser = parse_multifd(too_many)
    assert write_records(records) == too_many and parser.passthrough_offset == 64
    records, parser = parse_multifd(b"QEVM" + bytes(100))
    assert parser.passthrough_offset == 0 and kinds(records) == ["Opaque"]
    records, parser = parse_multifd(multifd_init(0)[:40])
    assert parser.truncation is not None and "initial" in parser.truncation.missing
    cut = typical_multifd()[:64 + 1344 + 100]
    _, parser = parse_multifd(cut)
    assert parser.truncation is not None and "pages" in parser.truncation.missing


def test_classify_channel() -> None:
    assert classify_channel(b"QEV") is None
    assert classify_channel(b"QEVM\x00\x00\x00\x03") is ChannelKind.MAIN
    assert classify_channel(multifd_init(3)) is ChannelKind.MULTIFD
    assert classify_channel(b"\x00\x00\x00\x00") is ChannelKind.UNKNOWN


# ---- properties -------------------------------------------------------------------------------
def _valid_streams() -> st.SearchStrategy[bytes]:
    return st.sampled_from([typical_stream(3), typical_stream(5, footers=False),
                            StreamBuilder().header().configuration().eof().build()])


_chunkings = st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=8)
_fast = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_fast
@given(st.binary(max_size=3000), st.booleans(), _chunkings)
def test_random_bytes_round_trip(data: bytes, multifd: bool, chunks: list[int]) -> None:
    roundtrip(data, chunks, multifd=multifd)


@_fast
@given(st.binary(max_size=2000), _chunkings)
def test_random_bytes_after_a_valid_prefix(tail: bytes, chunks: list[int]) -> None:
    """Garbage where the parser is deep in a RAM section, or right after a header."""
    prefix = StreamBuilder().header().configuration().start(1).mem_size(
        [(b"pc.ram", 16 * PAGE)]).eos().part(1).build()
    roundtrip(prefix + tail, chunks)
    roundtrip(multifd_init(0) + tail, chunks, multifd=True)


@_fast
@given(_valid_streams(), _chunkings)
def test_valid_streams_any_chunking(data: bytes, chunks: list[int]) -> None:
    records = roundtrip(data, chunks)
    whole, _ = parse(data)
    assert [r for r in records if not isinstance(r, Opaque)] == [
        r for r in whole if not isinstance(r, Opaque)]


@_fast
@given(_valid_streams(), st.data(), _chunkings)
def test_truncations(data: bytes, draw: st.DataObject, chunks: list[int]) -> None:
    cut = draw.draw(st.integers(min_value=0, max_value=len(data)))
    roundtrip(data[:cut], chunks)


@_fast
@given(_valid_streams(), st.data(), _chunkings)
def test_single_byte_mutations(data: bytes, draw: st.DataObject, chunks: list[int]) -> None:
    at = draw.draw(st.integers(min_value=0, max_value=len(data) - 1))
    value = draw.draw(st.integers(min_value=0, max_value=255))
    mutated = data[:at] + bytes((value,)) + data[at + 1:]
    roundtrip(mutated, chunks)


@_fast
@given(st.booleans(), st.data(), _chunkings)
def test_multifd_truncations_and_mutations(qemu72: bool, draw: st.DataObject,
                                           chunks: list[int]) -> None:
    data = typical_multifd(qemu72)
    cut = draw.draw(st.integers(min_value=0, max_value=len(data)))
    roundtrip(data[:cut], chunks, multifd=True)
    at = draw.draw(st.integers(min_value=0, max_value=len(data) - 1))
    mutated = data[:at] + bytes((draw.draw(st.integers(0, 255)),)) + data[at + 1:]
    roundtrip(mutated, chunks, multifd=True)


# ---- real captures ------------------------------------------------------------------------
# (fixtures: tests/conftest.py)


def _chunked_parse(data: bytes, parser: Parser, seed: int) -> list[Record]:
    """Feed in random chunk sizes like a socket would (1 byte .. 256 KiB)."""
    rng = random.Random(seed)
    out: list[Record] = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 7, 4095, 4097, 65536, 262144, rng.randint(1, 200000)))
        out += parser.feed(data[pos:pos + size])
        pos += size
    return out + parser.end_of_stream()


@pytest.mark.guest
@pytest.mark.parametrize(("qemu", "scenario"), CAPTURES)
def test_real_capture_round_trip_and_destination_accepts(
        qemu: str, scenario: str, captures: Callable[[str, str], Capture], tmp_path: Path
) -> None:
    cap = captures(qemu, scenario)
    major = cap.version[0]
    assert (major == 7) == (qemu == "7.2")
    main_data = cap.main.read_bytes()
    main_records = _chunked_parse(main_data, MainChannelParser(), seed=len(main_data))
    rewritten = [write_records(main_records)]
    assert rewritten[0] == main_data
    counts = Counter(type(r) for r in main_records)
    # Everything up to the first device section is parsed; only the device state is opaque.
    assert isinstance(main_records[0], FileHeader) and counts[Eof] == 0
    opaque = sum(len(r.data) for r in main_records if isinstance(r, Opaque))
    assert opaque < 200_000, f"{opaque} opaque bytes: the device state should be ~110 KB"
    normal, zero = counts[RamPage], counts[ZeroPage]
    for path in cap.multifd:
        data = path.read_bytes()
        records = _chunked_parse(data, MultifdChannelParser(), seed=len(data))
        rewritten.append(write_records(records))
        assert rewritten[-1] == data
        assert not any(isinstance(r, Opaque) for r in records)
        normal += sum(isinstance(r, MultifdPage) for r in records)
        zero += sum(r.zero_pages for r in records if isinstance(r, MultifdPacketHeader))
    ram = cap.info["ram"]
    print(f"\nQEMU {'.'.join(map(str, cap.version))} {scenario}: {len(main_data)} bytes main, "
          f"{[p.stat().st_size for p in cap.multifd]} multifd; pages {normal} normal, "
          f"{zero} zero; QEMU says {ram['normal']} / {ram['duplicate']}, "
          f"{ram['dirty-sync-count']} syncs")
    assert zero == ram["duplicate"]
    if scenario == "multifd" and major == 7:
        # QEMU 7.2's normal-page counter falls short with multifd (seen: 9719 counted and 9726
        # on the wire; 9692 and 9743), all accepted by the destination: the pages of packets
        # sent with a SYNC are not all counted. At most one packet (128 pages) per channel.
        assert ram["normal"] <= normal <= ram["normal"] + 128 * len(cap.multifd)
    else:
        assert normal == ram["normal"]
    if scenario == "multi":
        assert ram["dirty-sync-count"] >= 4
        assert normal > 11000  # pages were re-sent: a single pass sends about 9600
    if scenario == "multifd":
        assert len(cap.multifd) == 2 and counts[RamPage] == 0
    info = replay(cap, rewritten, tmp_path / "replay")
    assert info["status"] == "completed", f"destination: {info}"


@pytest.mark.guest
def test_real_capture_multifd_channels_classify(captures: Callable[[str, str], Capture]
                                                ) -> None:
    for qemu in ("7.2", "10"):
        cap = captures(qemu, "multifd")
        assert classify_channel(cap.main.read_bytes()[:4]) is ChannelKind.MAIN
        ids = set()
        for path in cap.multifd:
            head = path.read_bytes()[:64]
            assert classify_channel(head) is ChannelKind.MULTIFD
            ids.add(MultifdInit(head).channel_id)
        assert ids == {0, 1}


def test_records_are_exported() -> None:
    assert {Opaque, RamPage, ZeroPage, MemSize, SectionHeader, SectionFooter, FileHeader,
            Configuration, Command, Eof, VmDescription, RamEos, MultifdFlush} <= set(
        rec.Record.__args__)


@pytest.mark.guest
@pytest.mark.parametrize("qemu", ["7.2", "10"])
def test_destination_refuses_a_truncated_capture(
        qemu: str, captures: Callable[[str, str], Capture], tmp_path: Path) -> None:
    """The control for the acceptance test: a broken stream does not reach 'completed'."""
    cap = captures(qemu, "single")
    data = cap.main.read_bytes()
    info = replay(cap, [data[:len(data) // 2]], tmp_path / "replay", timeout=30)
    assert info["status"] != "completed"
