"""The page codec ("HDE"): pages and opaque bytes in, small checked batches out (no I/O).

* :class:`PageEncoder` turns batches of :class:`PageItem` / :class:`OpaqueItem` into encoded
  batches: zero pages become a flag, pages already sent become references to the cache slot
  holding them, re-sent pages become deltas against their cached previous version, the rest
  go literally; the batch is compressed (zstd, lz4 or not at all, per batch).
* :class:`PageDecoder` checks and decodes the batches in order and returns the same items.

Encoder and decoder keep identical page caches by applying the same rule to the same items;
the session header makes sure they are configured alike. The format is described in
``docs/PAGE-CODEC.md``. Errors (see :mod:`dwcp_migrate.pagecodec.errors`)::

    DwcpError
     └── PageCodecError
          ├── SessionMismatchError   bad session header, or the two sides configured differently
          ├── CorruptBatchError      a batch was damaged, reordered or failed its checksum
          └── InvalidItemError       the encoder was given an item it cannot encode
"""

from dwcp_migrate.pagecodec.decoder import PageDecoder
from dwcp_migrate.pagecodec.encoder import PageEncoder, PreparedBatch
from dwcp_migrate.pagecodec.errors import (
    CorruptBatchError,
    InvalidItemError,
    PageCodecError,
    SessionMismatchError,
)
from dwcp_migrate.pagecodec.format import FORMAT_VERSION, parse_session_header
from dwcp_migrate.pagecodec.types import (
    DATACENTER,
    WAN,
    CodecStats,
    Compression,
    Item,
    KindStats,
    OpaqueItem,
    PageBatch,
    PageCodecConfig,
    PageItem,
)

__all__ = [
    "DATACENTER", "FORMAT_VERSION", "WAN", "CodecStats", "Compression", "CorruptBatchError",
    "InvalidItemError", "Item", "KindStats", "OpaqueItem", "PageBatch", "PageCodecConfig",
    "PageCodecError",
    "PageDecoder", "PageEncoder", "PageItem", "PreparedBatch", "SessionMismatchError",
    "parse_session_header",
]
