"""The stream pipeline: QEMU's migration stream in, page-codec batches out, and back (no I/O).

* :class:`StreamEncoder` is fed the raw bytes of one migration channel (main or multifd, as
  they come from QEMU, in any chunking) and returns encoded batches: every page goes through
  the page codec (zero flag, dedup reference, delta, literal; compressed), every other byte
  travels verbatim. It keeps per-iteration statistics (:mod:`dwcp_migrate.codec.stats`).
* :class:`StreamDecoder` is fed those batches, in order, and returns the exact bytes.
* :mod:`dwcp_migrate.codec.container` is the encoded file format (``dwcp stream encode``):
  :class:`EncodedStreamWriter`, :class:`EncodedStreamReader`.

Format and definitions: ``docs/ENCODED-STREAM.md``. Errors::

    DwcpError
     ├── EncodedStreamError          (dwcp_migrate.codec.errors)
     │    ├── NotAStreamError        not a QEMU stream / not an encoded stream
     │    ├── EncodedTruncatedError  an encoded stream without its end marker
     │    ├── EncodedCorruptError    a damaged encoded stream (a check failed)
     │    └── PageSizeMismatchError  the stream's target page size is not the codec's
     ├── PageCodecError              (dwcp_migrate.pagecodec; raised by StreamDecoder.decode)
     └── StreamError                 (dwcp_migrate.stream; StreamClosedError from feed())
"""

from dwcp_migrate.codec.container import (
    DecodedBatch,
    DecodedStreamStats,
    EncodedStreamReader,
    EncodedStreamWriter,
    EndMarker,
    is_encoded,
)
from dwcp_migrate.codec.decoder import StreamDecoder
from dwcp_migrate.codec.encoder import StreamEncoder
from dwcp_migrate.codec.errors import (
    EncodedCorruptError,
    EncodedStreamError,
    EncodedTruncatedError,
    NotAStreamError,
    PageSizeMismatchError,
)
from dwcp_migrate.codec.scan import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_PAGES,
    ChannelScanner,
    ScannedBatch,
)
from dwcp_migrate.codec.stats import ChannelStats, IterationStats

__all__ = [
    "DEFAULT_BATCH_BYTES", "DEFAULT_BATCH_PAGES", "ChannelScanner", "ChannelStats",
    "DecodedBatch", "DecodedStreamStats", "EncodedCorruptError", "EncodedStreamError",
    "EncodedStreamReader", "EncodedStreamWriter", "EncodedTruncatedError", "EndMarker",
    "IterationStats", "NotAStreamError", "PageSizeMismatchError", "ScannedBatch",
    "StreamDecoder", "StreamEncoder", "is_encoded",
]
