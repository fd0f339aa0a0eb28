"""Parser of a multifd channel, and telling channels apart.

A multifd channel (migration/multifd.c, multifd-nocomp.c) is its own connection:

* ``MultiFDInit_t`` (64 bytes): be32 magic 0x11223344, be32 version 1, uuid[16], u8 channel
  id, 39 bytes of padding. The same in QEMU 7.2 and 10.0.
* then packets. A RAM packet header has a fixed size: ``MultiFDPacket_t`` (320 bytes) plus
  ``offset[page_count]`` with page_count = 512 KiB / page size (1344 bytes with 4 KiB
  pages), followed by ``normal_pages`` raw pages when there is no compression.

  - QEMU 7.2: magic, version, flags, pages_alloc, normal_pages, next_packet_size,
    packet_num, unused[4] (zeroed), ramblock[256], offsets. Zero pages travel on the main
    channel as ZERO records.
  - QEMU 9.0+ (so 10.0): the first 4 bytes of ``unused`` became ``zero_pages``; zero pages
    are detected by the multifd sender and only listed after the normal offsets, without
    data. In a 7.2 stream the field reads 0, so one parser fits both.
  - QEMU 10.0: a packet whose flags have ``MULTIFD_FLAG_DEVICE_STATE`` is a 276-byte
    ``MultiFDPacketDeviceState_t`` (idstr[256], instance_id, next_packet_size) followed by
    next_packet_size bytes of device state (VFIO).

Compressed packets (zlib, zstd, qpl, uadk, qatzip) carry per-channel compressor state, and
unknown flags may mean anything: the parser passes the rest of the channel through verbatim.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from dwcp_migrate.stream._incremental import IncrementalParser
from dwcp_migrate.stream.records import (
    MULTIFD_DEVICE_STATE_HEADER,
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_SYNC,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_FIXED,
    MULTIFD_PACKET_SIZE,
    MULTIFD_VERSION,
    QEMU_VM_FILE_MAGIC,
    MultifdDeviceStateHeader,
    MultifdInit,
    MultifdPacketHeader,
    MultifdPage,
    Opaque,
    Record,
)

_INIT: Final = 0
_PACKET: Final = 1
_PAGES: Final = 2
_BLOB: Final = 3

_HDR = struct.Struct(">III")  # MultiFDPacketHdr_t: magic, version, flags
_HEADER_FIELDS = struct.Struct(">IIIIIIQI")  # magic .. packet_num, zero_pages (9.0+)
_DEVICE_FIELDS = struct.Struct(">II")  # instance_id, next_packet_size


class ChannelKind(enum.Enum):
    MAIN = "main"
    MULTIFD = "multifd"
    UNKNOWN = "unknown"  # e.g. a postcopy preempt channel, or not QEMU at all


_MAIN_MAGIC: Final = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")
_MULTIFD_MAGIC: Final = MULTIFD_MAGIC.to_bytes(4, "big")


def classify_channel(prefix: bytes) -> ChannelKind | None:
    """Which kind of migration connection starts with ``prefix`` (None: need 4 bytes).

    QEMU 8.0 and later tell channels apart the same way (migration.c
    ``migration_ioc_process_incoming`` peeks at the magic). QEMU 7.2 does not look: its
    destination takes the *first* connection as the main channel and every later one as
    multifd, so a proxy in front of a 7.2 destination must open the main connection first
    and the multifd ones only after it.
    """
    if len(prefix) < 4:
        return None
    head = bytes(prefix[:4])
    if head == _MAIN_MAGIC:
        return ChannelKind.MAIN
    if head == _MULTIFD_MAGIC:
        return ChannelKind.MULTIFD
    return ChannelKind.UNKNOWN


class MultifdChannelParser(IncrementalParser):
    """Incremental parser of one multifd channel: ``feed(bytes) -> list[Record]``.

    Records: :class:`MultifdInit`, then per packet a :class:`MultifdPacketHeader` followed by
    one :class:`MultifdPage` per normal page (each page is emitted as soon as it is complete,
    so at most one page is buffered), or a :class:`MultifdDeviceStateHeader` followed by its
    data as Opaque. ``zero_pages_field=False`` ignores the 9.0+ zero_pages field (for a
    sender that left garbage in 7.2's unused bytes; QEMU zeroes them).
    """

    def __init__(self, page_size: int = 4096, *, zero_pages_field: bool = True) -> None:
        super().__init__()
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self._page_size = page_size
        self._page_count = MULTIFD_PACKET_SIZE // page_size
        self._header_len = MULTIFD_PACKET_FIXED + 8 * self._page_count
        self._zero_pages_field = zero_pages_field
        self._state = _INIT
        self._block = b""
        self._offsets: tuple[int, ...] = ()
        self._page_index = 0
        self._pages_left = 0
        self._blob_left = 0
        self.init: MultifdInit | None = None

    @property
    def header_len(self) -> int:
        """Size of a RAM packet header on this channel (1344 bytes with 4 KiB pages)."""
        return self._header_len

    def _incomplete(self, has_tail: bool) -> str | None:
        if self._passthrough and not has_tail:
            return None
        if self._state == _INIT:
            return "incomplete multifd initial packet"
        if self._state == _PAGES:
            return f"{self._pages_left} pages of a multifd packet missing"
        if self._state == _BLOB and self._blob_left:
            return f"{self._blob_left} bytes of multifd device state missing"
        if has_tail:
            return "incomplete multifd packet header"
        return None

    def _run(self, buf: bytes, mv: memoryview, pos: int, out: list[Record]) -> tuple[int, int]:
        end = len(buf)
        append = out.append
        page_size = self._page_size
        while True:
            state = self._state
            if state == _PAGES:
                # The hot loop: pages of the current packet.
                block, offsets = self._block, self._offsets
                i, left = self._page_index, self._pages_left
                while left:
                    q = pos + page_size
                    if q > end:
                        self._page_index, self._pages_left = i, left
                        return pos, q
                    append(MultifdPage(block, offsets[i], mv[pos:q]))
                    pos = q
                    i += 1
                    left -= 1
                self._pages_left = 0
                self._state = _PACKET
            elif state == _PACKET:
                if end - pos < 12:
                    return pos, pos + 12
                magic, version, flags = _HDR.unpack_from(buf, pos)
                if magic != MULTIFD_MAGIC or version != MULTIFD_VERSION:
                    self._start_passthrough(
                        pos, f"multifd packet magic {magic:#x} version {version}")
                    return pos, 0
                if flags & MULTIFD_FLAG_DEVICE_STATE:
                    if flags != MULTIFD_FLAG_DEVICE_STATE:
                        self._start_passthrough(pos, f"device state packet flags {flags:#x}")
                        return pos, 0
                    q = pos + MULTIFD_DEVICE_STATE_HEADER
                    if q > end:
                        return pos, q
                    raw = buf[pos:q]
                    idstr = raw[12:268].split(b"\0", 1)[0]
                    instance_id, length = _DEVICE_FIELDS.unpack_from(raw, 268)
                    append(MultifdDeviceStateHeader(raw, idstr, instance_id, length))
                    self._blob_left = length
                    self._state = _BLOB
                    pos = q
                    continue
                if flags & ~MULTIFD_FLAG_SYNC:
                    self._start_passthrough(pos, f"multifd packet flags {flags:#x} "
                                            "(compressed or unknown)")
                    return pos, 0
                q = pos + self._header_len
                if q > end:
                    return pos, q
                header = self._packet_header(buf[pos:q], flags)
                if header is None:
                    self._start_passthrough(pos, "multifd packet page counts out of range")
                    return pos, 0
                append(header)
                pos = q
                if header.normal_pages:
                    self._block = header.block
                    self._offsets = header.offsets
                    self._page_index = 0
                    self._pages_left = header.normal_pages
                    self._state = _PAGES
            elif state == _BLOB:
                take = min(self._blob_left, end - pos)
                if take:
                    append(Opaque(mv[pos:pos + take]))
                    pos += take
                    self._blob_left -= take
                if self._blob_left:
                    return pos, end + 1
                self._state = _PACKET
            else:
                q = pos + MULTIFD_INIT_SIZE
                if q > end:
                    return pos, q
                raw = buf[pos:q]
                init = MultifdInit(raw)
                if init.magic != MULTIFD_MAGIC or init.version != MULTIFD_VERSION:
                    self._start_passthrough(pos, "not a multifd channel (initial packet magic "
                                            f"{init.magic:#x} version {init.version})")
                    return pos, 0
                append(init)
                self.init = init
                pos = q
                self._state = _PACKET

    def _packet_header(self, raw: bytes, flags: int) -> MultifdPacketHeader | None:
        """Checks of multifd_ram_unfill_packet (10.0) / multifd_recv_unfill_packet (7.2)."""
        (_, _, _, pages_alloc, normal, next_size, packet_num,
         zero) = _HEADER_FIELDS.unpack_from(raw)
        if not self._zero_pages_field:
            zero = 0
        if pages_alloc > self._page_count or normal > pages_alloc or zero > pages_alloc - normal:
            return None
        # QEMU reads ramblock as a C string (it forces byte 255 to NUL): stop at the first NUL.
        block = raw[64:319].split(b"\0", 1)[0]
        count = normal + zero
        offsets = struct.unpack_from(f">{count}Q", raw, MULTIFD_PACKET_FIXED)
        return MultifdPacketHeader(raw, flags, pages_alloc, normal, zero, next_size,
                                   packet_num, block, offsets)


__all__ = ["ChannelKind", "MultifdChannelParser", "classify_channel"]
