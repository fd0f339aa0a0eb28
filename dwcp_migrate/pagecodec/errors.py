"""Errors of the page codec.

::

    DwcpError
     └── PageCodecError             the page codec refused something
          ├── SessionMismatchError  the session header is bad, or the two sides disagree on the
          │                         configuration (page size, cache size, format version)
          ├── CorruptBatchError     an encoded batch is damaged, truncated, out of order, or does
          │                         not rebuild to the bytes it was made from; nothing is released
          └── InvalidItemError      the encoder was given an item it cannot encode (wrong page
                                    size, out-of-range offset or tag, too many block names)

A decoder that raised :class:`CorruptBatchError` has not changed its state: the batch can be
received again. An encoder that raised (on a bad item or anything else) is left unusable,
because it may already have updated its cache for part of the batch; the migration session has
to start over.
"""

from __future__ import annotations

from dwcp_migrate.errors import DwcpError


class PageCodecError(DwcpError):
    """The page codec refused something; the message says what and where."""


class SessionMismatchError(PageCodecError):
    """The session header is damaged, or encoder and decoder are configured differently."""


class CorruptBatchError(PageCodecError):
    """An encoded batch was rejected: damaged, truncated, reordered, or failed its checksum."""


class InvalidItemError(PageCodecError):
    """The encoder was given an item it cannot encode."""
