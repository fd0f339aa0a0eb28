"""StreamDecoder: encoded page-codec batches in, the exact QEMU stream bytes out (no I/O).

Each item is written back on its own, with no state (see :mod:`dwcp_migrate.codec.scan` for
how records became items): the tag says which record a page was.

===========================  ==============================================================
tag                          bytes written
===========================  ==============================================================
0                            the page (a multifd page: its header travelled as opaque bytes)
PAGE (0x08)                  ``be64 offset|0x08``, ``u8 len``, block name, the page
PAGE|CONTINUE (0x28)         ``be64 offset|0x28``, the page
ZERO (0x02)                  ``be64 offset|0x02``, ``u8 len``, block name, ``u8 0``
ZERO|CONTINUE (0x22)         ``be64 offset|0x22``, ``u8 0``
anything else                refused (:class:`~dwcp_migrate.codec.errors.EncodedCorruptError`)
===========================  ==============================================================

The page codec checks every batch (frame check, then a content check over the rebuilt items,
tags and offsets included) before it releases anything, so the bytes written here are the
bytes that were encoded or nothing.
"""

from __future__ import annotations

import struct
from typing import Final

from dwcp_migrate.codec.errors import EncodedCorruptError
from dwcp_migrate.pagecodec import (
    CodecStats,
    PageCodecConfig,
    PageDecoder,
    PageItem,
    parse_session_header,
)
from dwcp_migrate.pagecodec.decoder import DEFAULT_MAX_BATCH
from dwcp_migrate.stream.records import (
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    ByteData,
)

_PAGE: Final = RAM_SAVE_FLAG_PAGE
_PAGE_CONT: Final = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_ZERO: Final = RAM_SAVE_FLAG_ZERO
_ZERO_CONT: Final = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_BE64 = struct.Struct(">Q").pack
_ZERO_RECORD = struct.Struct(">QB").pack


class StreamDecoder:
    """Decodes the batches of one :class:`~dwcp_migrate.codec.StreamEncoder`, in order."""

    def __init__(self, config: PageCodecConfig | None = None, *,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH) -> None:
        self.codec = PageDecoder(config, max_batch_bytes=max_batch_bytes)
        self.bytes_out = 0
        self.batches = 0
        self._names: dict[bytes, bytes] = {}  # block -> u8 length + name

    @classmethod
    def for_session(cls, session_header: bytes, *,
                    max_batch_bytes: int = DEFAULT_MAX_BATCH) -> StreamDecoder:
        """A decoder configured from the encoder's session header (page and cache size), for
        readers that have no configuration of their own (the encoded file container)."""
        page_size, slots, _ = parse_session_header(bytes(session_header))
        decoder = cls(PageCodecConfig(page_size=page_size, cache_bytes=slots * page_size),
                      max_batch_bytes=max_batch_bytes)
        decoder.accept_session_header(session_header)
        return decoder

    def accept_session_header(self, data: bytes) -> None:
        self.codec.accept_session_header(data)

    @property
    def stats(self) -> CodecStats:
        return self.codec.stats

    @property
    def last_stats(self) -> CodecStats:
        return self.codec.last_stats

    def decode(self, batch: bytes | memoryview) -> bytes:
        """The stream bytes of the next batch (checked by the page codec before release)."""
        items = self.codec.decode_batch(batch)
        parts: list[ByteData] = []
        add = parts.append
        names = self._names
        for item in items:
            if type(item) is not PageItem:
                add(item.data)
                continue
            tag = item.tag
            if tag == _PAGE_CONT:
                add(_BE64(item.offset | tag))
                add(item.data)
            elif tag == 0:
                add(item.data)
            elif tag == _ZERO_CONT:
                add(_ZERO_RECORD(item.offset | tag, 0))
            elif tag in (_PAGE, _ZERO):
                name = names.get(item.block)
                if name is None:
                    name = names[item.block] = bytes((len(item.block),)) + item.block
                add(_BE64(item.offset | tag) + name)
                add(item.data if tag == _PAGE else b"\0")
            else:
                raise EncodedCorruptError(
                    f"stream decoder, batch {self.batches}: a page carries tag {tag:#x}, which "
                    f"no stream encoder writes: the encoder is of another version or broken")
        out = b"".join(parts)
        self.bytes_out += len(out)
        self.batches += 1
        return out


__all__ = ["StreamDecoder"]
