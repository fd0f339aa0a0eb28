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
    CREDIT  destination -> source, be64: bytes of QEMU stream written into the destination
            QEMU so far (only when OPEN asked for it and ACCEPT agreed; see agent/credit.py)
    LANE_DECLINED  source -> destination, JSON {"why": ...}: ACCEPT offered a TLS lane that
            the source could not connect to (a firewall); the session carries the stream,
            and the destination closes the lane's port
    LANE_TAKEN  source -> destination, empty: the source has its lane connection(s) and
            carries the stream on the lane. Sent only when OPEN and ACCEPT both said
            ``"lane_verdict": true``; the destination then commits its QEMU to the lane on
            this message alone, never on the connections' arrival (which a source that gave
            up on them a moment before would follow with LANE_DECLINED)

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
    CREDIT = 8
    LANE_DECLINED = 9
    LANE_TAKEN = 10


@dataclass(frozen=True)
class Message:
    type: MessageType
    payload: bytes | memoryview  # a view of the received data, which never changes

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(bytes(self.payload))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ChannelProtocolError(f"{self.type.name} payload is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ChannelProtocolError(f"{self.type.name} payload is not a JSON object")
        return value

    def text(self) -> str:
        return bytes(self.payload).decode("utf-8", errors="replace")


def encode(kind: MessageType, payload: bytes | bytearray | memoryview = b"") -> list[bytes]:
    """The message as buffers to send (header and payload apart: the payload is not copied)."""
    if len(payload) > MAX_MESSAGE:
        raise ChannelProtocolError(f"{kind.name} message of {len(payload)} bytes exceeds "
                                   f"{MAX_MESSAGE}")
    header = HEADER.pack(kind, len(payload))
    return [header, bytes(payload)] if payload else [header]


def encode_joined(kind: MessageType, parts: list[memoryview] | list[bytes]) -> bytes:
    """The message as one buffer: header and the parts' bytes, gathered with one copy.

    For passthrough: a message then fits one AMST frame (the header sent apart was a frame of
    its own), and QEMU's reads, often a few hundred KiB each (its socket buffer), travel as
    one message of up to a frame instead of one each.
    """
    length = sum(len(p) for p in parts)
    if length > MAX_MESSAGE:
        raise ChannelProtocolError(f"{kind.name} message of {length} bytes exceeds {MAX_MESSAGE}")
    return b"".join([HEADER.pack(kind, length), *parts])


def encode_json(kind: MessageType, value: dict[str, Any]) -> list[bytes]:
    return encode(kind, json.dumps(value, separators=(",", ":")).encode())


class MessageReader:
    """Splits a byte stream into messages; fed any chunking of it.

    A message that arrives within one fed chunk keeps a view of that chunk as its payload
    (no copy: the chunks must not change afterwards, as AMST's received frames do not); one
    spread over several chunks is gathered with one copy. Batches are sent with header and
    payload apart (a header alone, then the payload whole in the next chunk: taken without a
    copy too); passthrough messages as one buffer of at most a frame (:func:`encode_joined`).
    """

    def __init__(self) -> None:
        self._partial = bytearray()  # an incomplete message: its header and payload so far

    def _header(self, data: bytes | bytearray | memoryview, pos: int) -> tuple[MessageType, int]:
        kind, length = HEADER.unpack_from(data, pos)
        if length > MAX_MESSAGE:
            raise ChannelProtocolError(f"message of {length} bytes announced (limit "
                                       f"{MAX_MESSAGE}): the peer agent is misbehaving")
        try:
            return MessageType(kind), length
        except ValueError:
            raise ChannelProtocolError(f"unknown message type {kind}: the peer agent is "
                                       "misbehaving or of an incompatible version") from None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        view = memoryview(data).cast("B")
        out: list[Message] = []
        pos = 0
        partial = self._partial
        if partial:
            if len(partial) < HEADER.size:
                take = min(HEADER.size - len(partial), len(view))
                partial += view[:take]
                pos = take
                if len(partial) < HEADER.size:
                    return out
            mtype, length = self._header(partial, 0)
            missing = HEADER.size + length - len(partial)
            if len(partial) == HEADER.size and len(view) - pos >= length:
                out.append(Message(mtype, view[pos:pos + length]))  # payload whole: a view
                pos += length
            else:
                take = min(missing, len(view) - pos)
                partial += view[pos:pos + take]
                pos += take
                if take < missing:
                    return out
                out.append(Message(mtype, memoryview(partial)[HEADER.size:]))
            self._partial = bytearray()
        end_of_data = len(view)
        while end_of_data - pos >= HEADER.size:
            mtype, length = self._header(view, pos)
            end = pos + HEADER.size + length
            if end > end_of_data:
                break
            out.append(Message(mtype, view[pos + HEADER.size:end]))
            pos = end
        if pos < end_of_data:
            self._partial = bytearray(view[pos:])
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message (non-zero at end of stream means truncation)."""
        return len(self._partial)
