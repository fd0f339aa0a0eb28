"""Wire format of the page codec: session header, batch header, payload sections, compression.

Everything here is described for humans in ``docs/PAGE-CODEC.md``; keep the two in step. All
integers are little-endian: both agents run on x86-64 or arm64, and numpy reads little-endian
columns without a byte swap there.
"""

from __future__ import annotations

import struct
from typing import Final

import lz4.block  # type: ignore[import-untyped]  # lz4 ships no type information
import numpy as np
import xxhash
import zstandard

from dwcp_migrate.pagecodec.errors import CorruptBatchError, SessionMismatchError
from dwcp_migrate.pagecodec.types import Compression, PageCodecConfig

FORMAT_VERSION: Final = 2  # 2: the content check leaves zero pages out (see metadata_check)

# ---- session header ---------------------------------------------------------------------
SESSION_MAGIC: Final = b"DWCP-HDE"
# magic, version, reserved, page size, cache slots, session id, xxh3-64 of the bytes before
SESSION_HEADER: Final = struct.Struct("<8sHHIIQQ")
SESSION_HEADER_SIZE: Final = SESSION_HEADER.size

# ---- batch header -------------------------------------------------------------------------
BATCH_MAGIC: Final = b"HB"
# magic, version, codec, sequence number, payload length before and after compression,
# content check (xxh3-64 of the original bytes), frame check (xxh3-64 seeded with the session
# id over the header before this field and the compressed payload)
BATCH_HEADER: Final = struct.Struct("<2sBBQIIQQ")
BATCH_HEADER_SIZE: Final = BATCH_HEADER.size
FRAME_CHECKED: Final = BATCH_HEADER_SIZE - 8  # header bytes covered by the frame check
MAX_PAYLOAD: Final = 0xFFFFFFFF

CODEC_NONE: Final = 0
CODEC_ZSTD: Final = 1
CODEC_LZ4: Final = 2
CODEC_IDS: Final = {"none": CODEC_NONE, "zstd": CODEC_ZSTD, "lz4": CODEC_LZ4}

# ---- payload --------------------------------------------------------------------------------
# items, references, deltas, delta runs, opaque runs, new block names
SECTION_TABLE: Final = struct.Struct("<IIIIIH")

ZERO: Final = 0
REF: Final = 1
DELTA: Final = 2
LITERAL: Final = 3
OPAQUE: Final = 4
KIND_COUNT: Final = 5

U8: Final = np.dtype("u1")
U16: Final = np.dtype("<u2")
U32: Final = np.dtype("<u4")
U64: Final = np.dtype("<u8")
RUN_HEADER: Final = 4  # bytes of one delta run in the run table (offset u16, length u16)
# Changed runs separated by at most this many unchanged bytes are sent as one run: carrying
# the unchanged bytes is cheaper than a second run header.
RUN_MERGE_GAP: Final = 4


def metadata_check(check: xxhash.xxh3_64, kinds: bytes, blocks: bytes, offsets: bytes,
                   tags: bytes, opaque_lens: bytes, names: bytes) -> None:
    """Add a batch's metadata to its content check, after the original bytes.

    The content check (format 2) is the xxh3-64 of: the xxh3-64 (u64) of every page that is
    not a ZERO item, in page order; then every opaque byte, in order; then this metadata.
    Hashing each page on its own lets the encoder use the same digest to find duplicates,
    one pass over the page for both (format 1 hashed the pages into the check and again,
    seeded, for the index, and hashed 4 KiB of zeros for every zero page). Zero pages have no
    digest: the decoder makes them from nothing, and the kinds column says where they are.

    The original bytes alone would not notice a page rebuilt at the wrong offset, in the wrong
    block or with the wrong tag, a zero page and a page swapped, nor opaque runs cut at other
    places; so the check covers the item kinds, the block ids, absolute offsets and tags of
    the pages, the opaque run lengths and the block names declared in the batch, each as its
    payload column.
    """
    for part in (kinds, blocks, offsets, tags, opaque_lens, names):
        check.update(part)


def session_header(config: PageCodecConfig, session_id: int) -> bytes:
    head = SESSION_HEADER.pack(SESSION_MAGIC, FORMAT_VERSION, 0, config.page_size,
                               config.cache_slots, session_id, 0)[:-8]
    return head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")


def parse_session_header(data: bytes) -> tuple[int, int, int]:
    """Check a session header; return (page size, cache slots, session id)."""
    if len(data) != SESSION_HEADER_SIZE:
        raise SessionMismatchError(f"page codec session header has {len(data)} bytes, expected "
                                   f"{SESSION_HEADER_SIZE}: the peer is not a page encoder")
    magic, version, reserved, page_size, slots, session_id, check = SESSION_HEADER.unpack(data)
    if magic != SESSION_MAGIC:
        raise SessionMismatchError(f"page codec session header starts with {magic!r}, not "
                                   f"{SESSION_MAGIC!r}: the peer is not a page encoder")
    if check != xxhash.xxh3_64_intdigest(data[:-8]):
        raise SessionMismatchError("page codec session header fails its check: it was "
                                   "damaged on the way")
    if version != FORMAT_VERSION or reserved:
        raise SessionMismatchError(f"peer speaks page codec format {version}, this agent "
                                   f"speaks {FORMAT_VERSION}: upgrade the older agent")
    return page_size, slots, session_id


class Compressors:
    """Compressor objects of one encoder, made once per level (making one costs ~50 us)."""

    def __init__(self) -> None:
        self._zstd: dict[int, zstandard.ZstdCompressor] = {}

    def compress(self, payload: bytes, how: Compression) -> tuple[int, bytes]:
        """Return (codec id, compressed bytes); payloads that do not shrink go uncompressed."""
        if how.codec == "zstd":
            comp = self._zstd.get(how.level)
            if comp is None:
                comp = self._zstd[how.level] = zstandard.ZstdCompressor(
                    level=how.level, write_checksum=False, write_content_size=True)
            codec, out = CODEC_ZSTD, comp.compress(payload)
        elif how.codec == "lz4":
            if how.level:
                out = lz4.block.compress(payload, mode="high_compression",
                                         compression=how.level, store_size=False)
            else:
                out = lz4.block.compress(payload, store_size=False)
            codec = CODEC_LZ4
        else:
            return CODEC_NONE, payload
        if len(out) >= len(payload):
            return CODEC_NONE, payload
        return codec, bytes(out)


class Decompressor:
    """Decompression with the length known in advance, so garbage cannot make it balloon."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()

    def decompress(self, codec: int, data: memoryview, raw_len: int, where: str) -> bytes:
        try:
            if codec == CODEC_ZSTD:
                params = zstandard.get_frame_parameters(data)
                if params.content_size != raw_len:
                    raise CorruptBatchError(f"{where}: zstd frame holds {params.content_size} "
                                            f"bytes, the header says {raw_len}")
                out = self._zstd.decompress(data, max_output_size=raw_len)
            elif codec == CODEC_LZ4:
                out = lz4.block.decompress(data, uncompressed_size=raw_len)
            else:
                raise CorruptBatchError(f"{where}: unknown compression codec {codec}")
        except (zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError) as exc:
            raise CorruptBatchError(f"{where}: payload does not decompress: {exc}") from exc
        if len(out) != raw_len:
            raise CorruptBatchError(f"{where}: payload decompressed to {len(out)} bytes, the "
                                    f"header says {raw_len}")
        return bytes(out)
