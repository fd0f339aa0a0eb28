"""Errors of the stream pipeline and of the encoded-stream container.

::

    DwcpError
     └── EncodedStreamError            an encoded stream cannot be made or decoded
          ├── NotAStreamError          the input is not what it should be (a QEMU migration
          │                            stream to encode, an encoded stream to decode)
          ├── EncodedTruncatedError    an encoded stream ended before its end marker
          ├── EncodedCorruptError      an encoded stream is damaged: a check failed, a frame is
          │                            out of place, the totals do not match
          └── PageSizeMismatchError    the QEMU stream's target page size is not the codec's

The page codec's own errors (:class:`~dwcp_migrate.pagecodec.CorruptBatchError` and its
siblings) reach callers of :class:`~dwcp_migrate.codec.StreamDecoder` unchanged; the
container reader wraps them in :class:`EncodedCorruptError` with the position in the file.
"""

from __future__ import annotations

from dwcp_migrate.errors import DwcpError


class EncodedStreamError(DwcpError):
    """An encoded stream cannot be made or decoded; the message says what and where."""


class NotAStreamError(EncodedStreamError):
    """The input is not a QEMU migration stream, or not an encoded stream."""


class EncodedTruncatedError(EncodedStreamError):
    """The encoded stream stopped before its end marker (or inside a frame)."""


class EncodedCorruptError(EncodedStreamError):
    """The encoded stream is damaged; nothing past the damage was released."""


class PageSizeMismatchError(EncodedStreamError):
    """The QEMU stream announces another target page size than the codec was configured for."""
