"""The QEMU migration stream codec: a core without I/O (bytes in, records out, and back).

* :class:`MainChannelParser` parses the main channel (``QEVM`` stream): header,
  configuration, commands, the RAM section (pages, zero pages, XBZRLE, MEM_SIZE, EOS,
  MULTIFD_FLUSH), section headers and footers, EOF, VMDESCRIPTION.
* :class:`MultifdChannelParser` parses one multifd channel (initial packet, packet headers,
  pages), QEMU 7.2 and 10.0 formats.
* :func:`classify_channel` tells a main channel from a multifd one by its first 4 bytes.
* :func:`write_records` turns records back into bytes.

The invariant: ``write_records(all records of a parser fed x) == x`` for *every* byte string
``x``: whatever the parser cannot parse with certainty it passes through as :class:`Opaque`
(and from there on, the rest of the stream). See ``docs/STREAM-CODEC.md``.
"""

from dwcp_migrate.stream.errors import StreamClosedError, StreamError, StreamTruncatedError
from dwcp_migrate.stream.main_channel import MainChannelParser
from dwcp_migrate.stream.multifd import ChannelKind, MultifdChannelParser, classify_channel
from dwcp_migrate.stream.records import (
    Command,
    CompressedPage,
    ConfigSubsection,
    Configuration,
    Eof,
    FileHeader,
    MemSize,
    MultifdDeviceStateHeader,
    MultifdFlush,
    MultifdInit,
    MultifdPacketHeader,
    MultifdPage,
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
)
from dwcp_migrate.stream.writer import encode, write_into, write_records

__all__ = [
    "ChannelKind", "Command", "CompressedPage", "ConfigSubsection", "Configuration", "Eof",
    "FileHeader", "MainChannelParser", "MemSize", "MultifdChannelParser",
    "MultifdDeviceStateHeader", "MultifdFlush", "MultifdInit", "MultifdPacketHeader",
    "MultifdPage", "Opaque", "RamBlockSize", "RamEos", "RamPage", "Record", "SectionFooter",
    "SectionHeader", "StreamClosedError", "StreamError", "StreamTruncatedError", "VmDescription",
    "XbzrlePage", "ZeroPage", "classify_channel", "encode", "write_into", "write_records",
]
