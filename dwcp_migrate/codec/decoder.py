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

from bisect import bisect_right
from itertools import pairwise
from typing import Final

import numpy as np

from dwcp_migrate.codec.errors import EncodedCorruptError
from dwcp_migrate.pagecodec import (
    CodecStats,
    PageBatch,
    PageCodecConfig,
    PageDecoder,
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
_TAGS: Final = np.array([0, _PAGE, _PAGE_CONT, _ZERO, _ZERO_CONT], np.uint64)
_ZERO_RECORD_DTYPE: Final = np.dtype([("word", ">u8"), ("fill", "u1")])  # 9 bytes, packed


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
        pages = self.codec.decode_pages(batch)
        n = pages.pages
        tags, datas = pages.tags, pages.datas
        tag_arr = np.array(tags, np.uint64)
        bad = ~np.isin(tag_arr, _TAGS)
        if bad.any():
            tag = int(tag_arr[np.flatnonzero(bad)[0]])
            raise EncodedCorruptError(
                f"stream decoder, batch {self.batches}: a page carries tag {tag:#x}, which "
                f"no stream encoder writes: the encoder is of another version or broken")
        # Every page's be64 offset|flags, and the whole record of a ZERO|CONTINUE page (the
        # most common record of a first pass), made for all pages at once.
        records = np.zeros(n, _ZERO_RECORD_DTYPE)
        records["word"] = np.array(pages.offsets, np.uint64) | tag_arr
        zero_records = records.tobytes()
        words = records["word"].tobytes()
        # Runs of records of one shape: ZERO|CONTINUE (a slice of zero_records), PAGE|CONTINUE
        # (header, page, header, page...), multifd pages (the pages), the rest record by record.
        shape = np.full(n, 3, np.uint8)
        shape[tag_arr == _ZERO_CONT] = 0
        shape[tag_arr == _PAGE_CONT] = 1
        shape[tag_arr == 0] = 2
        cuts = {0, n, *pages.opaque_at}
        cuts.update((np.flatnonzero(shape[1:] != shape[:-1]) + 1).tolist())
        parts: list[ByteData] = []
        add = parts.append
        op, op_at, opaques = 0, pages.opaque_at, pages.opaques
        ordered = sorted(cuts)
        for a, b in pairwise(ordered):
            while op < len(op_at) and op_at[op] <= a:
                add(opaques[op])
                op += 1
            kind = shape[a]
            if kind == 0:
                add(zero_records[9 * a:9 * b])
            elif kind == 1:
                run: list[ByteData] = [b""] * (2 * (b - a))
                run[0::2] = [words[at:at + 8] for at in range(8 * a, 8 * b, 8)]
                run[1::2] = datas[a:b]
                parts += run
            elif kind == 2:
                parts += datas[a:b]
            else:
                for i in range(a, b):  # PAGE or ZERO: the record names its block
                    tag = tags[i]
                    block = self._block_of(pages, i)
                    name = self._names.get(block)
                    if name is None:
                        name = self._names[block] = bytes((len(block),)) + block
                    add(words[8 * i:8 * i + 8] + name)
                    add(datas[i] if tag == _PAGE else b"\0")
        parts += opaques[op:]
        out = b"".join(parts)
        self.bytes_out += len(out)
        self.batches += 1
        return out

    @staticmethod
    def _block_of(pages: PageBatch, i: int) -> bytes:
        runs = pages.blocks
        return runs[bisect_right(runs, i, key=lambda run: run[0]) - 1][1]


__all__ = ["StreamDecoder"]
