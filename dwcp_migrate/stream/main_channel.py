"""Parser of QEMU's main migration channel (the ``QEVM`` stream).

What it parses, in the order QEMU sends it (``qemu_savevm_state_header``,
``qemu_savevm_state_setup``, ``..._iterate``, ``..._complete_precopy`` in savevm.c):

* the file header and the CONFIGURATION section (machine type + known subsections);
* COMMANDs (be16 cmd, be16 len, data; PACKAGED is followed by its package as Opaque);
* sections of the iterative ``"ram"`` device (START/PART/END headers, the RAM records up to
  EOS, the optional section footer);
* EOF and, after it, VMDESCRIPTION (its JSON as Opaque).

The passthrough rule: device sections (FULL, or START of any iterative device other than
``"ram"``) carry no length, so their end cannot be found with certainty; the parser emits
their header and passes everything after it through verbatim. So does it from the first byte
it cannot parse with certainty (unknown section types, unknown RAM flags, unknown commands,
unknown configuration subsections, a MEM_SIZE list whose layout depends on things the stream
does not say). QEMU sends all RAM before the device state, so in practice every page of a
precopy migration is still seen as a record.
"""

from __future__ import annotations

from typing import Final

from dwcp_migrate.stream._incremental import Cursor, IncrementalParser, NeedMore, Uncertain
from dwcp_migrate.stream.records import (
    BE32,
    BE64,
    MIG_CMD_INVALID,
    MIG_CMD_MAX_KNOWN,
    MIG_CMD_PACKAGED,
    MIG_CMD_POSTCOPY_ADVISE,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RAM_SECTION_VERSION,
    Command,
    CompressedPage,
    ConfigSubsection,
    Configuration,
    Eof,
    FileHeader,
    MemSize,
    MultifdFlush,
    Opaque,
    RamBlockSize,
    RamEos,
    RamPage,
    Record,
    SectionFooter,
    SectionHeader,
    VmDescription,
    XbzrlePage,
    ZeroPage,
    parse_capabilities,
)

# Parser states.
_HEADER: Final = 0  # expecting the file header
_FIRST: Final = 1  # after the header: CONFIGURATION is allowed only here
_TOP: Final = 2  # expecting a section type byte
_RAM: Final = 3  # inside a RAM section's payload
_RAM_FOOTER: Final = 4  # after RAM EOS: an optional section footer
_BLOB: Final = 5  # inside bytes of known length (VMDESCRIPTION JSON, PACKAGED package)
_AFTER_EOF: Final = 6  # after QEMU_VM_EOF: only VMDESCRIPTION is defined
_DONE: Final = 7  # after VMDESCRIPTION: the stream should end here

_STATE_NAMES: Final = {
    _HEADER: "the file header", _FIRST: "a section header", _TOP: "a section header",
    _RAM: "a RAM record", _RAM_FOOTER: "a section footer", _BLOB: "bytes of known length",
    _AFTER_EOF: "the VMDESCRIPTION", _DONE: "nothing",
}

# Sanity limits: beyond them QEMU would refuse the stream anyway, and buffering an "item" of
# gigabytes would break the parser's memory bound.
_MAX_MACHINE_NAME: Final = 4096
_MAX_RAM_BLOCKS: Final = 4096
_KNOWN_CAPABILITIES_FOR_MEM_SIZE: Final = frozenset({b"x-ignore-shared"})

_NOT_CONTINUE: Final = ~RAM_SAVE_FLAG_CONTINUE
# Records that name a block (ram.c ram_block_from_stream) and carry a page's worth of data.
_PAGE_KINDS: Final = frozenset({RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_XBZRLE,
                                RAM_SAVE_FLAG_COMPRESS_PAGE})
_BE64_UNPACK = BE64.unpack_from
_BE32_UNPACK = BE32.unpack_from


class MainChannelParser(IncrementalParser):
    """Incremental parser of a main migration channel: ``feed(bytes) -> list[Record]``.

    ``page_size`` is the target page size (4096 on x86); a ``configuration/target-page-bits``
    subsection in the stream overrides it. The parser never raises while fed; see
    :meth:`end_of_stream` for truncated streams.
    """

    def __init__(self, page_size: int = 4096) -> None:
        super().__init__()
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self._page_size = page_size
        self._state = _HEADER
        self._blob_left = 0
        self._blob_next = _TOP
        self._last_block: bytes | None = None
        self._ram_section: int | None = None
        self._eof_seen = False
        # MEM_SIZE layout: extra be64 per block (x-ignore-shared), or why it is unknowable.
        self._mem_size_extra = 0
        self._mem_size_doubt: str | None = None
        self.sections: dict[int, bytes] = {}
        """Section id -> idstr of every START/FULL seen (to name PART/END sections)."""
        self.configuration: Configuration | None = None

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def complete(self) -> bool:
        """True once QEMU's EOF marker was parsed."""
        return self._eof_seen

    # ---- end of stream -------------------------------------------------------------------
    def _incomplete(self, has_tail: bool) -> str | None:
        state = self._state
        if self._passthrough and not has_tail:
            return None  # from there on the parser does not know; nothing it can check
        if state == _BLOB and self._blob_left:
            return f"{self._blob_left} bytes of a VMDESCRIPTION/PACKAGED body missing"
        if has_tail:
            return f"incomplete {_STATE_NAMES[state]}"
        if state in (_AFTER_EOF, _DONE):
            return None
        return f"no QEMU_VM_EOF yet (the stream stopped before {_STATE_NAMES[state]})"

    # ---- the state machine -----------------------------------------------------------------
    def _run(self, buf: bytes, mv: memoryview, pos: int, out: list[Record]) -> tuple[int, int]:
        end = len(buf)
        while True:
            state = self._state
            if state == _RAM:
                pos, need = self._run_ram(buf, mv, pos, end, out)
            elif state == _BLOB:
                take = min(self._blob_left, end - pos)
                if take:
                    out.append(Opaque(mv[pos:pos + take]))
                    pos += take
                    self._blob_left -= take
                if self._blob_left:
                    return pos, end + 1
                self._state = self._blob_next
                need = 0
            elif state == _DONE:
                if pos < end:
                    self._start_passthrough(pos, "data after VMDESCRIPTION")
                return pos, end + 1
            else:
                cur = Cursor(buf, pos, end)
                try:
                    self._parse_item(cur, out)
                except NeedMore as more:
                    return pos, more.end
                except Uncertain as doubt:
                    self._start_passthrough(pos, str(doubt))
                    return pos, 0
                pos, need = cur.pos, 0
            if need:
                return pos, need
            if self._passthrough:
                return pos, 0

    def _parse_item(self, cur: Cursor, out: list[Record]) -> None:
        """One non-RAM item. Records are appended only once the item is complete."""
        state = self._state
        if state == _HEADER:
            magic, version = cur.be32(), cur.be32()
            if magic != QEMU_VM_FILE_MAGIC:
                raise Uncertain(f"not a QEMU migration stream (magic {magic:#010x})")
            if version != QEMU_VM_FILE_VERSION:
                raise Uncertain(f"QEMU stream version {version} (only 3 is known)")
            out.append(FileHeader(magic, version))
            self._state = _FIRST
            return
        if state == _RAM_FOOTER:
            if cur.peek() != QEMU_VM_SECTION_FOOTER:
                self._state = _TOP  # no footer (machine types before 2.3 do not send it)
                return
            cur.u8()
            out.append(SectionFooter(cur.be32()))
            self._state = _TOP
            return
        if state == _AFTER_EOF:
            kind = cur.u8()
            if kind != QEMU_VM_VMDESCRIPTION:
                raise Uncertain(f"byte {kind:#04x} after QEMU_VM_EOF")
            length = cur.be32()
            out.append(VmDescription(length))
            self._enter_blob(length, _DONE)
            return
        kind = cur.u8()
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            self._section_start(cur, kind, out)
        elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            section_id = cur.be32()
            if section_id != self._ram_section:
                raise Uncertain(f"section {section_id} is not the RAM section")
            out.append(SectionHeader(kind, section_id))
            self._state = _RAM
        elif kind == QEMU_VM_COMMAND:
            self._command(cur, out)
        elif kind == QEMU_VM_CONFIGURATION and state == _FIRST:
            self._configuration(cur, out)
        elif kind == QEMU_VM_EOF:
            out.append(Eof())
            self._eof_seen = True
            self._state = _AFTER_EOF
        else:
            raise Uncertain(f"section type {kind:#04x} not expected here")
        if self._state == _FIRST:
            self._state = _TOP

    def _section_start(self, cur: Cursor, kind: int, out: list[Record]) -> None:
        section_id = cur.be32()
        idstr = cur.take(cur.u8())
        instance_id, version_id = cur.be32(), cur.be32()
        out.append(SectionHeader(kind, section_id, idstr, instance_id, version_id))
        self.sections[section_id] = idstr
        self._state = _TOP
        name = idstr.decode("ascii", "replace")
        if kind == QEMU_VM_SECTION_FULL:
            self._start_passthrough(cur.pos, f"device section FULL {name!r} has no length")
        elif idstr != b"ram":
            self._start_passthrough(cur.pos, f"iterative section {name!r} is not RAM")
        elif version_id != RAM_SECTION_VERSION:
            self._start_passthrough(cur.pos, f"RAM section version {version_id} is unknown")
        else:
            self._ram_section = section_id
            self._state = _RAM

    def _command(self, cur: Cursor, out: list[Record]) -> None:
        cmd, length = cur.be16(), cur.be16()
        if cmd == MIG_CMD_INVALID or cmd > MIG_CMD_MAX_KNOWN:
            raise Uncertain(f"unknown command {cmd} (length {length})")
        if cmd == MIG_CMD_PACKAGED and length != 4:
            raise Uncertain(f"PACKAGED command with length {length} (not 4)")
        data = cur.take(length)
        out.append(Command(cmd, data))
        if cmd == MIG_CMD_PACKAGED:
            self._enter_blob(int(_BE32_UNPACK(data)[0]), _TOP)
        elif cmd == MIG_CMD_POSTCOPY_ADVISE:
            # MEM_SIZE carries each block's page size when postcopy-ram is on and the block's
            # pages differ from the host's (savevm.c ram_save_setup). The advise says the OR
            # of all block page sizes and the target page size: equal means no extra field.
            if length == 16:
                summary, target = BE64.unpack_from(data, 0)[0], BE64.unpack_from(data, 8)[0]
                if summary != target:
                    self._mem_size_doubt = (
                        f"postcopy with RAM blocks of other page sizes ({summary:#x})")
            elif length != 0:
                self._mem_size_doubt = f"POSTCOPY_ADVISE of length {length}"

    def _configuration(self, cur: Cursor, out: list[Record]) -> None:
        length = cur.be32()
        if length > _MAX_MACHINE_NAME:
            raise Uncertain(f"machine type name of {length} bytes")
        machine = cur.take(length)
        subsections: list[ConfigSubsection] = []
        # Subsections follow while the next byte is QEMU_VM_SUBSECTION; no section type has
        # that value, so the peek is decisive (vmstate.c vmstate_subsection_load).
        while cur.peek() == QEMU_VM_SUBSECTION:
            cur.u8()
            name = cur.take(cur.u8())
            version_id = cur.be32()
            if version_id != 1:
                raise Uncertain(f"configuration subsection {name!r} version {version_id}")
            start = cur.pos
            if name == b"configuration/target-page-bits":
                cur.be32()
            elif name == b"configuration/capabilities":
                for _ in range(cur.be32()):
                    cur.take(cur.u8())
            elif name == b"configuration/uuid":
                cur.take(16)
            else:
                raise Uncertain(f"unknown configuration subsection {name!r}")
            subsections.append(ConfigSubsection(name, version_id, cur.buf[start:cur.pos]))
        config = Configuration(machine, tuple(subsections))
        bits = config.target_page_bits
        if bits is not None:
            if not 10 <= bits <= 16:
                raise Uncertain(f"target page bits {bits}")
            self._page_size = 1 << bits
        for sub in subsections:
            if sub.name == b"configuration/capabilities":
                caps = set(parse_capabilities(sub.body))
                if b"x-ignore-shared" in caps:
                    self._mem_size_extra = 1  # the block's guest address follows its length
                unknown = caps - _KNOWN_CAPABILITIES_FOR_MEM_SIZE
                if unknown:
                    self._mem_size_doubt = f"capabilities {sorted(unknown)} may change MEM_SIZE"
        out.append(config)
        self.configuration = config

    def _enter_blob(self, length: int, then: int) -> None:
        self._blob_left = length
        self._blob_next = then
        self._state = _BLOB

    # ---- RAM: the hot loop ----------------------------------------------------------------
    def _run_ram(self, buf: bytes, mv: memoryview, pos: int, end: int, out: list[Record]
                 ) -> tuple[int, int]:
        """RAM records until EOS or the end of ``buf`` (ram.c ram_load_precopy)."""
        page_size = self._page_size
        mask = page_size - 1
        unpack = _BE64_UNPACK
        append = out.append
        block = self._last_block
        try:
            while True:
                if end - pos < 8:
                    return pos, pos + 8
                raw = unpack(buf, pos)[0]
                flags = raw & mask
                kind = flags & _NOT_CONTINUE
                p = pos + 8
                if kind in _PAGE_KINDS:
                    if flags & RAM_SAVE_FLAG_CONTINUE:
                        if block is None:
                            self._start_passthrough(pos, "CONTINUE before any RAM block name")
                            return pos, 0
                        name = block
                    else:
                        if p >= end:
                            return pos, p + 1
                        n = buf[p]
                        p += 1
                        if end - p < n:
                            return pos, p + n
                        name = buf[p:p + n]
                        p += n
                    if kind == RAM_SAVE_FLAG_PAGE:
                        q = p + page_size
                        if q > end:
                            return pos, q
                        append(RamPage(name, raw ^ flags, mv[p:q], flags))
                    elif kind == RAM_SAVE_FLAG_ZERO:
                        if p >= end:
                            return pos, p + 1
                        append(ZeroPage(name, raw ^ flags, buf[p], flags))
                        q = p + 1
                    elif kind == RAM_SAVE_FLAG_XBZRLE:
                        if end - p < 3:
                            return pos, p + 3
                        q = p + 3 + ((buf[p + 1] << 8) | buf[p + 2])
                        if q > end:
                            return pos, q
                        append(XbzrlePage(name, raw ^ flags, mv[p + 3:q], buf[p], flags))
                    else:
                        if end - p < 4:
                            return pos, p + 4
                        length = _BE32_UNPACK(buf, p)[0]
                        if length > 2 * page_size + 64:  # QEMU: > compressBound(page) fails
                            raise Uncertain(f"compressed page of {length} bytes")
                        q = p + 4 + length
                        if q > end:
                            return pos, q
                        append(CompressedPage(name, raw ^ flags, mv[p + 4:q], flags))
                    block = name
                    pos = q
                elif kind == RAM_SAVE_FLAG_EOS:
                    append(RamEos(raw))
                    self._state = _RAM_FOOTER
                    return p, 0
                elif kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                    append(MultifdFlush(raw))
                    pos = p
                elif kind == RAM_SAVE_FLAG_MEM_SIZE:
                    cur = Cursor(buf, p, end)
                    append(self._mem_size(cur, raw ^ flags, flags))
                    pos = cur.pos
                else:
                    raise Uncertain(f"RAM record with flags {flags:#x}")
        except NeedMore as more:
            return pos, more.end
        except Uncertain as doubt:
            self._start_passthrough(pos, str(doubt))
            return pos, 0
        finally:
            self._last_block = block

    def _mem_size(self, cur: Cursor, total: int, flags: int) -> MemSize:
        """The RAM block list: entries until their lengths add up to ``total``."""
        if self._mem_size_doubt:
            raise Uncertain(f"MEM_SIZE layout unknown: {self._mem_size_doubt}")
        extra_fields = self._mem_size_extra
        remaining = total
        blocks: list[RamBlockSize] = []
        while remaining:
            if len(blocks) >= _MAX_RAM_BLOCKS:
                raise Uncertain(f"more than {_MAX_RAM_BLOCKS} RAM blocks in MEM_SIZE")
            name = cur.take(cur.u8())
            used_length = cur.be64()
            extra = tuple(cur.be64() for _ in range(extra_fields))
            if used_length > remaining:
                raise Uncertain(f"RAM block {name!r} of {used_length} bytes exceeds the total")
            remaining -= used_length
            blocks.append(RamBlockSize(name, used_length, extra))
        return MemSize(total, tuple(blocks), flags)


__all__ = ["MainChannelParser"]
