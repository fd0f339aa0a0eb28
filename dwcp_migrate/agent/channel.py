"""The agent-to-agent channel protocol, without I/O.

One QEMU migration connection (the main channel, or one multifd channel) is carried by one
transport session. The session already gives an ordered, checked, loss-free byte stream in
both directions; this protocol only adds message boundaries and meaning:

    message = u8 type | be32 length | payload

    OPEN    source -> destination, JSON: which migration, channel index, the socket to
            deliver to, data mode (encode | passthrough) and the page codec session header
    ACCEPT  destination -> source, JSON: delivered to QEMU
    REFUSE  destination -> source, UTF-8 reason: nothing was delivered
    RAW     either way: QEMU bytes verbatim (passthrough, and QEMU's return path)
    BATCH   source -> destination: one encoded batch of the page codec
    EOF     either way: QEMU closed its side of the connection
    ABORT   either way, UTF-8 reason: the migration failed; close everything

A message longer than ``MAX_MESSAGE`` or of an unknown type is a protocol error: the peer is
misbehaving, and the channel is torn down with an error that says so.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from dwcp_migrate.errors import MigrationError

HEADER = struct.Struct(">BI")
MAX_MESSAGE = 64 * 1024 * 1024
PROTOCOL_VERSION = 1


class ChannelProtocolError(MigrationError):
    """The peer agent sent something this protocol does not allow."""


class MessageType(enum.IntEnum):
    OPEN = 1
    ACCEPT = 2
    REFUSE = 3
    RAW = 4
    BATCH = 5
    EOF = 6
    ABORT = 7


@dataclass(frozen=True)
class Message:
    type: MessageType
    payload: bytes

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ChannelProtocolError(f"{self.type.name} payload is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ChannelProtocolError(f"{self.type.name} payload is not a JSON object")
        return value

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def encode(kind: MessageType, payload: bytes | bytearray | memoryview = b"") -> list[bytes]:
    """The message as buffers to send (header and payload apart: the payload is not copied)."""
    if len(payload) > MAX_MESSAGE:
        raise ChannelProtocolError(f"{kind.name} message of {len(payload)} bytes exceeds "
                                   f"{MAX_MESSAGE}")
    header = HEADER.pack(kind, len(payload))
    return [header, bytes(payload)] if payload else [header]


def encode_json(kind: MessageType, value: dict[str, Any]) -> list[bytes]:
    return encode(kind, json.dumps(value, separators=(",", ":")).encode())


class MessageReader:
    """Splits a byte stream into messages; fed any chunking of it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self._buffer += data
        out: list[Message] = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= HEADER.size:
            kind, length = HEADER.unpack_from(buf, pos)
            if length > MAX_MESSAGE:
                raise ChannelProtocolError(f"message of {length} bytes announced (limit "
                                           f"{MAX_MESSAGE}): the peer agent is misbehaving")
            try:
                mtype = MessageType(kind)
            except ValueError:
                raise ChannelProtocolError(f"unknown message type {kind}: the peer agent is "
                                           "misbehaving or of an incompatible version") from None
            end = pos + HEADER.size + length
            if end > len(buf):
                break
            out.append(Message(mtype, bytes(buf[pos + HEADER.size:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message (non-zero at end of stream means truncation)."""
        return len(self._buffer)
