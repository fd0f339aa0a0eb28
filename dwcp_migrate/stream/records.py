"""Records of the QEMU migration stream, and the constants of its format.

Every record knows how to write itself back (``write_to``), byte for byte: a record keeps
every bit of what it was parsed from (raw flag words, the CONTINUE bit, stale bytes in
multifd headers), so ``write(parse(x)) == x`` holds for any input.

Records that occur once per page (:class:`RamPage`, :class:`ZeroPage`, :class:`MultifdPage`)
are slots dataclasses that are *not* frozen: a frozen dataclass costs three times as much to
create (it goes through ``object.__setattr__``), and the parser makes up to a few hundred
thousand of them per second. Treat them as immutable all the same. Page bodies are
``memoryview`` slices of the buffers handed to ``feed()``, so a page is never copied by the
parser.

Format references (QEMU source): ``migration/savevm.c`` (file header, section types, footer,
configuration, commands), ``migration/ram.c`` / ``migration/ram.h`` (RAM_SAVE_FLAG_*),
``migration/multifd.h`` / ``migration/multifd.c`` / ``migration/multifd-nocomp.c`` (multifd
channels), ``scripts/analyze-migration.py`` (QEMU's own reference reader).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

ByteData: TypeAlias = bytes | memoryview
Emit: TypeAlias = Callable[[ByteData], object]
"""Where a record writes its bytes: typically ``list.append`` (then ``b"".join``)."""

# ---- main channel (migration/savevm.c) ---------------------------------------------------
QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3
QEMU_VM_EOF: Final = 0x00
QEMU_VM_SECTION_START: Final = 0x01
QEMU_VM_SECTION_PART: Final = 0x02
QEMU_VM_SECTION_END: Final = 0x03
QEMU_VM_SECTION_FULL: Final = 0x04
QEMU_VM_SUBSECTION: Final = 0x05
QEMU_VM_VMDESCRIPTION: Final = 0x06
QEMU_VM_CONFIGURATION: Final = 0x07
QEMU_VM_COMMAND: Final = 0x08
QEMU_VM_SECTION_FOOTER: Final = 0x7E

SECTION_TYPE_NAMES: Final = {
    QEMU_VM_SECTION_START: "START", QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END", QEMU_VM_SECTION_FULL: "FULL",
}

# enum qemu_vm_cmd (savevm.c). The order is not the one of the numbers' meaning: PACKAGED is 7.
MIG_CMD_INVALID: Final = 0
MIG_CMD_OPEN_RETURN_PATH: Final = 1
MIG_CMD_PING: Final = 2
MIG_CMD_POSTCOPY_ADVISE: Final = 3
MIG_CMD_POSTCOPY_LISTEN: Final = 4
MIG_CMD_POSTCOPY_RUN: Final = 5
MIG_CMD_POSTCOPY_RAM_DISCARD: Final = 6
MIG_CMD_PACKAGED: Final = 7
MIG_CMD_ENABLE_COLO: Final = 8
MIG_CMD_POSTCOPY_RESUME: Final = 9
MIG_CMD_RECV_BITMAP: Final = 10
MIG_CMD_SWITCHOVER_START: Final = 11  # QEMU 10.0 and later, sent by default on 10.0 machines
MIG_CMD_MAX_KNOWN: Final = MIG_CMD_SWITCHOVER_START

# ---- RAM section payload (migration/ram.c, ram.h) ----------------------------------------
RAM_SAVE_FLAG_FULL: Final = 0x01  # obsolete since 2009; QEMU rejects it
RAM_SAVE_FLAG_ZERO: Final = 0x02
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x04
RAM_SAVE_FLAG_PAGE: Final = 0x08
RAM_SAVE_FLAG_EOS: Final = 0x10
RAM_SAVE_FLAG_CONTINUE: Final = 0x20
RAM_SAVE_FLAG_XBZRLE: Final = 0x40
RAM_SAVE_FLAG_HOOK: Final = 0x80  # RDMA only
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100  # removed in QEMU 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200  # QEMU 8.1 and later
ENCODING_FLAG_XBZRLE: Final = 0x1
RAM_SECTION_VERSION: Final = 4  # register_savevm_live("ram", 0, 4, ...) in every version

# ---- multifd channels (migration/multifd.h, multifd.c) -----------------------------------
MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_VERSION: Final = 1
MULTIFD_INIT_SIZE: Final = 64  # MultiFDInit_t: magic, version, uuid[16], id, unused1[7], unused2[4]
MULTIFD_FLAG_SYNC: Final = 0x01
MULTIFD_FLAG_COMPRESSION_MASK: Final = 0x1F << 1  # 10.0: zlib 1, zstd 2, qpl 4, uadk 8, qatzip 16
MULTIFD_FLAG_DEVICE_STATE: Final = 32 << 1  # QEMU 10.0 (VFIO device state over multifd)
MULTIFD_PACKET_SIZE: Final = 512 * 1024
MULTIFD_PACKET_FIXED: Final = 320  # MultiFDPacket_t without offset[]: same size in 7.2 and 10.0
MULTIFD_DEVICE_STATE_HEADER: Final = 276  # MultiFDPacketDeviceState_t (12 + 256 + 4 + 4)

BE16: Final = struct.Struct(">H")
BE32: Final = struct.Struct(">I")
BE64: Final = struct.Struct(">Q")
_HEADER = struct.Struct(">II")
_SECTION_SHORT = struct.Struct(">BI")
_COMMAND = struct.Struct(">BHH")
_SUBSECTION_VERSION = BE32


def _name(name: bytes) -> bytes:
    """``u8 len`` + bytes, the way QEMU writes idstrs and RAM block names."""
    return bytes((len(name),)) + name


# ---- generic ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Opaque:
    """Bytes passed through verbatim: not understood, or deliberately not parsed."""

    data: ByteData

    def write_to(self, emit: Emit) -> None:
        emit(self.data)


# ---- main channel: framing ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FileHeader:
    """``be32 "QEVM"``, ``be32 3``."""

    magic: int = QEMU_VM_FILE_MAGIC
    version: int = QEMU_VM_FILE_VERSION

    def write_to(self, emit: Emit) -> None:
        emit(_HEADER.pack(self.magic, self.version))


@dataclass(frozen=True, slots=True)
class ConfigSubsection:
    """One VMState subsection of the configuration (``QEMU_VM_SUBSECTION`` + name + version)."""

    name: bytes
    version_id: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Configuration:
    """``QEMU_VM_CONFIGURATION``: the machine type and the subsections that QEMU sent.

    Known subsections (savevm.c ``vmstate_configuration``): ``configuration/target-page-bits``
    (be32), ``configuration/capabilities`` (be32 count, then u8-length strings: the validated
    capabilities, x-ignore-shared and, from 9.0, mapped-ram) and ``configuration/uuid`` (16
    bytes, with validate-uuid). Unknown subsections cannot be delimited, so the parser passes
    such a configuration and everything after it through as Opaque.
    """

    machine: bytes
    subsections: tuple[ConfigSubsection, ...] = ()

    def write_to(self, emit: Emit) -> None:
        parts = [bytes((QEMU_VM_CONFIGURATION,)), BE32.pack(len(self.machine)), self.machine]
        for sub in self.subsections:
            parts += [bytes((QEMU_VM_SUBSECTION,)), _name(sub.name),
                      _SUBSECTION_VERSION.pack(sub.version_id), sub.body]
        emit(b"".join(parts))

    def _sub(self, name: bytes) -> ConfigSubsection | None:
        for sub in self.subsections:
            if sub.name == name:
                return sub
        return None

    @property
    def capabilities(self) -> tuple[str, ...]:
        sub = self._sub(b"configuration/capabilities")
        if sub is None:
            return ()
        return tuple(name.decode("ascii", "replace") for name in parse_capabilities(sub.body))

    @property
    def target_page_bits(self) -> int | None:
        sub = self._sub(b"configuration/target-page-bits")
        return None if sub is None else int(BE32.unpack_from(sub.body)[0])

    @property
    def uuid(self) -> bytes | None:
        sub = self._sub(b"configuration/uuid")
        return None if sub is None else sub.body


def parse_capabilities(body: bytes) -> list[bytes]:
    """The capability names of a ``configuration/capabilities`` body (already delimited)."""
    (count,) = BE32.unpack_from(body)
    names, pos = [], 4
    for _ in range(count):
        n = body[pos]
        names.append(body[pos + 1:pos + 1 + n])
        pos += 1 + n
    return names


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """A section start: START/FULL carry idstr, instance and version; PART/END only the id."""

    section_type: int
    section_id: int
    idstr: bytes | None = None
    instance_id: int = 0
    version_id: int = 0

    def write_to(self, emit: Emit) -> None:
        head = _SECTION_SHORT.pack(self.section_type, self.section_id)
        if self.idstr is None:
            emit(head)
        else:
            emit(head + _name(self.idstr) + _HEADER.pack(self.instance_id, self.version_id))

    @property
    def type_name(self) -> str:
        return SECTION_TYPE_NAMES.get(self.section_type, hex(self.section_type))


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """``QEMU_VM_SECTION_FOOTER`` + be32 section id (sent after every section by default)."""

    section_id: int

    def write_to(self, emit: Emit) -> None:
        emit(_SECTION_SHORT.pack(QEMU_VM_SECTION_FOOTER, self.section_id))


@dataclass(frozen=True, slots=True)
class Eof:
    """``QEMU_VM_EOF``: the end of the device state."""

    def write_to(self, emit: Emit) -> None:
        emit(b"\x00")


@dataclass(frozen=True, slots=True)
class VmDescription:
    """``QEMU_VM_VMDESCRIPTION`` + be32 length; the JSON follows as Opaque records."""

    length: int

    def write_to(self, emit: Emit) -> None:
        emit(bytes((QEMU_VM_VMDESCRIPTION,)) + BE32.pack(self.length))


@dataclass(frozen=True, slots=True)
class Command:
    """``QEMU_VM_COMMAND``: be16 command, be16 length, data.

    For ``MIG_CMD_PACKAGED`` the data is a be32 length and that many bytes of packaged stream
    follow as Opaque records (postcopy wraps the device state this way).
    """

    cmd: int
    data: bytes

    def write_to(self, emit: Emit) -> None:
        emit(_COMMAND.pack(QEMU_VM_COMMAND, self.cmd, len(self.data)) + self.data)


# ---- main channel: RAM section payload ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class RamBlockSize:
    """One entry of the MEM_SIZE list: block idstr, used length, and extra be64 fields.

    ``extra`` holds what capabilities add per block: the block's page size (postcopy with
    huge pages) and its guest address (x-ignore-shared).
    """

    name: bytes
    used_length: int
    extra: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MemSize:
    """``RAM_SAVE_FLAG_MEM_SIZE``: total RAM, then the RAM block list (setup section)."""

    total: int
    blocks: tuple[RamBlockSize, ...]
    flags: int = RAM_SAVE_FLAG_MEM_SIZE

    def write_to(self, emit: Emit) -> None:
        parts = [BE64.pack(self.total | self.flags)]
        for blk in self.blocks:
            parts += [_name(blk.name), BE64.pack(blk.used_length)]
            parts += [BE64.pack(v) for v in blk.extra]
        emit(b"".join(parts))


@dataclass(slots=True)
class RamPage:
    """``RAM_SAVE_FLAG_PAGE``: one target page of ``block`` at ``offset``.

    ``block`` is always the block the page belongs to; it is written to the stream only when
    ``flags`` lacks ``RAM_SAVE_FLAG_CONTINUE`` (QEMU sets CONTINUE when the block is the same
    as the previous page record's on this channel).
    """

    block: bytes
    offset: int
    data: ByteData
    flags: int = RAM_SAVE_FLAG_PAGE

    def write_to(self, emit: Emit) -> None:
        flags = self.flags
        if flags & RAM_SAVE_FLAG_CONTINUE:
            emit(BE64.pack(self.offset | flags))
        else:
            emit(BE64.pack(self.offset | flags) + _name(self.block))
        emit(self.data)


@dataclass(slots=True)
class ZeroPage:
    """``RAM_SAVE_FLAG_ZERO``: a page filled with ``fill`` (QEMU only sends 0 nowadays)."""

    block: bytes
    offset: int
    fill: int = 0
    flags: int = RAM_SAVE_FLAG_ZERO

    def write_to(self, emit: Emit) -> None:
        flags = self.flags
        if flags & RAM_SAVE_FLAG_CONTINUE:
            emit(BE64.pack(self.offset | flags) + bytes((self.fill,)))
        else:
            emit(BE64.pack(self.offset | flags) + _name(self.block) + bytes((self.fill,)))


@dataclass(frozen=True, slots=True)
class XbzrlePage:
    """``RAM_SAVE_FLAG_XBZRLE``: u8 encoding (1), be16 length, XBZRLE delta of a page."""

    block: bytes
    offset: int
    data: ByteData
    encoding: int = ENCODING_FLAG_XBZRLE
    flags: int = RAM_SAVE_FLAG_XBZRLE

    def write_to(self, emit: Emit) -> None:
        head = BE64.pack(self.offset | self.flags)
        if not self.flags & RAM_SAVE_FLAG_CONTINUE:
            head += _name(self.block)
        emit(head + bytes((self.encoding,)) + BE16.pack(len(self.data)))
        emit(self.data)


@dataclass(frozen=True, slots=True)
class CompressedPage:
    """``RAM_SAVE_FLAG_COMPRESS_PAGE`` (legacy compress capability, gone in 9.1): be32 len, zlib."""

    block: bytes
    offset: int
    data: ByteData
    flags: int = RAM_SAVE_FLAG_COMPRESS_PAGE

    def write_to(self, emit: Emit) -> None:
        head = BE64.pack(self.offset | self.flags)
        if not self.flags & RAM_SAVE_FLAG_CONTINUE:
            head += _name(self.block)
        emit(head + BE32.pack(len(self.data)))
        emit(self.data)


@dataclass(frozen=True, slots=True)
class RamEos:
    """``RAM_SAVE_FLAG_EOS``: the end of one RAM section's payload (``value`` is the raw be64)."""

    value: int = RAM_SAVE_FLAG_EOS

    def write_to(self, emit: Emit) -> None:
        emit(BE64.pack(self.value))


@dataclass(frozen=True, slots=True)
class MultifdFlush:
    """``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (8.1+): wait for every multifd channel's SYNC packet."""

    value: int = RAM_SAVE_FLAG_MULTIFD_FLUSH

    def write_to(self, emit: Emit) -> None:
        emit(BE64.pack(self.value))


# ---- multifd channels ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MultifdInit:
    """The first packet of a multifd channel (``MultiFDInit_t``, 64 bytes, kept raw)."""

    raw: bytes

    def write_to(self, emit: Emit) -> None:
        emit(self.raw)

    @property
    def magic(self) -> int:
        return int(BE32.unpack_from(self.raw, 0)[0])

    @property
    def version(self) -> int:
        return int(BE32.unpack_from(self.raw, 4)[0])

    @property
    def uuid(self) -> bytes:
        return self.raw[8:24]

    @property
    def channel_id(self) -> int:
        return self.raw[24]


@dataclass(frozen=True, slots=True)
class MultifdPacketHeader:
    """A multifd RAM packet header (``MultiFDPacket_t`` + offset[page_count]), kept raw.

    The header has a fixed size (320 + 8 * pages per packet: 1344 bytes with 4 KiB pages);
    offsets past ``normal_pages + zero_pages`` are stale bytes QEMU leaves there, which
    ``raw`` preserves. ``normal_pages`` :class:`MultifdPage` records follow (no compression);
    zero pages (QEMU 9.0+) are only listed in ``zero_offsets`` and carry no data.
    """

    raw: bytes
    flags: int
    pages_alloc: int
    normal_pages: int
    zero_pages: int
    next_packet_size: int
    packet_num: int
    block: bytes
    offsets: tuple[int, ...]

    def write_to(self, emit: Emit) -> None:
        emit(self.raw)

    @property
    def normal_offsets(self) -> tuple[int, ...]:
        return self.offsets[:self.normal_pages]

    @property
    def zero_offsets(self) -> tuple[int, ...]:
        return self.offsets[self.normal_pages:]

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)


@dataclass(slots=True)
class MultifdPage:
    """One page of a multifd packet: only ``data`` is on the wire (block and offset are in
    the packet header)."""

    block: bytes
    offset: int
    data: ByteData

    def write_to(self, emit: Emit) -> None:
        emit(self.data)


@dataclass(frozen=True, slots=True)
class MultifdDeviceStateHeader:
    """A QEMU 10.0 device-state packet header (VFIO); its ``length`` bytes follow as Opaque."""

    raw: bytes
    idstr: bytes
    instance_id: int
    length: int

    def write_to(self, emit: Emit) -> None:
        emit(self.raw)


Record: TypeAlias = (
    Opaque | FileHeader | Configuration | SectionHeader | SectionFooter | Eof | VmDescription
    | Command | MemSize | RamPage | ZeroPage | XbzrlePage | CompressedPage | RamEos
    | MultifdFlush | MultifdInit | MultifdPacketHeader | MultifdPage | MultifdDeviceStateHeader
)
