"""AMST frames: the wire format, without any I/O.

Every frame is a 40-byte header and a payload (all integers big-endian)::

    offset  size  field
         0     4  magic        b"AMST"
         4     1  version      1
         5     1  type         FrameType
         6     2  flags        Flag bits (per type); bit 15 XXH3: see payload_sum
         8     8  session_id   random, chosen by the initiator
        16     8  seq          DATA: byte offset of the payload in the stream; FIN: final offset
        24     4  length       payload bytes (DATA: at most the receiver's max_payload;
                               other types: at most CONTROL_LIMIT, 8 KiB)
        28     8  payload_sum  XXH3-64 of the payload if flag XXH3, else its zlib CRC-32
        36     4  header_crc   zlib CRC-32 of header bytes 0..35

``seq`` is a *byte offset*, not a frame counter: it lets the receiver check a frame against
its byte-based receive window before keeping it, and a resent frame (same offset, same bytes,
same header) is recognised as a duplicate on any connection.

Two CRCs rather than one over everything: the header's own CRC is checked *before* its length
is trusted, so a bit flip in the length field is reported as corruption (the connection is
replaced, nothing is lost) instead of as a peer sending an oversized frame, and the reader never
waits for bytes that a corrupted length invented. Together they cover header and payload.
CRC-32 catches every single-bit error and every burst up to 32 bits, which is what the 36
header bytes get. Payloads get XXH3-64 when both agents have it (``xxhash``; capability XXH3):
zlib's CRC-32 runs at about 5 GB/s here, XXH3 at over 50, and at LAN rates the CRC alone was
about half of the per-byte CPU of each side; a corrupted payload slips past a 64-bit hash with
probability 2^-64. Without ``xxhash`` on either side, payloads get CRC-32. Neither is an
authenticator: against an attacker, TLS protects the bytes. The first 40 bytes of a HELLO keep
this layout in every future version, so that a peer speaking another version is told so rather
than seeing a checksum error.

:class:`FrameReader` turns received bytes into :class:`Frame` objects. It is built for
``asyncio.BufferedProtocol``: :meth:`FrameReader.get_buffer` hands out the memory the socket
reads into (a large payload is read straight into its own buffer, no copy), and
:meth:`FrameReader.buffer_updated` returns the frames completed.
"""

from __future__ import annotations

import enum
import struct
import sys
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from dwcp_migrate.transports.errors import (
    BadMagicError,
    ChecksumError,
    FrameTooLargeError,
    HandshakeError,
    VersionMismatchError,
)

xxh3_64: Callable[[Bytes], int] | None
try:
    from xxhash import xxh3_64_intdigest as xxh3_64
except ImportError:  # optional: payloads then get CRC-32 (slower, as safe)
    xxh3_64 = None

MAGIC = b"AMST"
VERSION = 1
HEADER_SIZE = 40
MAX_PAYLOAD_LIMIT = 16 * 1024 * 1024  # the protocol's hard cap; sessions announce less
CONTROL_LIMIT = 8192  # control frames (HELLO, ERROR, ...) may be this long whatever max_payload
_PREFIX = struct.Struct("!4sBBHQQIQ")  # header bytes 0..35, covered by the header CRC
_CRC = struct.Struct("!I")
_HEADER = struct.Struct("!4sBBHQQIQI")
assert _HEADER.size == HEADER_SIZE

Bytes = bytes | bytearray | memoryview


class FrameType(enum.IntEnum):
    HELLO = 1  # initiator -> acceptor, first frame of every connection
    WELCOME = 2  # acceptor -> initiator, the answer to HELLO
    DATA = 3  # stream bytes at offset seq
    ACK = 4  # cumulative acknowledgement and receive limit (AckInfo)
    PING = 5  # liveness and RTT: payload is the sender's timestamp
    PONG = 6  # echo of a PING's payload
    FIN = 7  # the sender's stream ends at offset seq
    RETIRE = 8  # no more frames on this connection (stream-count change or session end)
    ERROR = 9  # the sender refuses or ends the session: code and message, then it hangs up


class Flag(enum.IntFlag):
    NONE = 0
    NEW_SESSION = 1  # HELLO: this connection may create the session
    FIN_ACK = 2  # ACK: the FIN was received and all data before it delivered
    XXH3 = 0x8000  # any frame: payload_sum is XXH3-64 (else CRC-32)


class Role(enum.IntEnum):
    INITIATOR = 1  # connected: opens (and re-opens) the connections
    ACCEPTOR = 2  # listened: accepts connections and matches them to sessions


class Capability(enum.IntFlag):
    NONE = 0
    CRC32 = 1  # checks CRC-32 payload sums (every version-1 peer sets it)
    XXH3 = 2  # checks XXH3-64 payload sums: send it XXH3 frames


LOCAL_CAPABILITIES = Capability.CRC32 | (Capability.XXH3 if xxh3_64 else Capability.NONE)


_XXH3_FLAG: Final = int(Flag.XXH3)  # a plain int: IntFlag's & runs Python code


def payload_sum(payload: Bytes, flags: int) -> int:
    if flags & _XXH3_FLAG:
        assert xxh3_64 is not None
        return xxh3_64(payload)
    return zlib.crc32(payload)


class Frame:
    """A received frame whose CRC matched. ``payload`` is owned by the frame."""

    __slots__ = ("flags", "length", "payload", "seq", "session_id", "type")

    def __init__(self, ftype: int, flags: int, session_id: int, seq: int,
                 payload: Bytes) -> None:
        self.type = ftype
        self.flags = flags
        self.session_id = session_id
        self.seq = seq
        self.payload = payload
        self.length = len(payload)

    def __repr__(self) -> str:
        try:
            name = FrameType(self.type).name
        except ValueError:
            name = str(self.type)
        return f"Frame({name}, seq={self.seq}, len={self.length}, flags={self.flags:#x})"


def encode_header(ftype: int, flags: int, session_id: int, seq: int, payload: Bytes) -> bytes:
    """The 40-byte header for ``payload`` (its sum by ``flags``, then the header CRC)."""
    prefix = _PREFIX.pack(MAGIC, VERSION, ftype, flags, session_id, seq, len(payload),
                          payload_sum(payload, flags))
    return prefix + _CRC.pack(zlib.crc32(prefix))


def encode_frame(ftype: int, flags: int, session_id: int, seq: int, payload: Bytes = b"") -> bytes:
    """A whole frame as one bytes object (for small frames; DATA keeps header and payload apart)."""
    return encode_header(ftype, flags, session_id, seq, payload) + bytes(payload)


# ---- control payloads ---------------------------------------------------------------------
_HELLO = struct.Struct("!BBHIQQIQ32sH")  # role, 0, index, caps, ts, echo, max, window, token, n
TOKEN_SIZE = 32
_ACK = struct.Struct("!QQ")
_STAMP = struct.Struct("!Q")
_ERROR = struct.Struct("!H")
MAX_NAME = 255


@dataclass(frozen=True)
class Hello:
    """The payload of HELLO and WELCOME: who is speaking and what it can take.

    ``timestamp_ns`` is the sender's clock; ``echo_ns`` the timestamp of the HELLO a WELCOME
    answers, so the initiator gets an RTT sample from the handshake. ``token`` is the
    session's secret: connections that join an existing session must present it.
    """

    role: Role
    conn_index: int
    capabilities: int
    timestamp_ns: int
    echo_ns: int
    max_payload: int
    recv_window: int
    token: bytes
    name: str

    def encode(self) -> bytes:
        name = self.name.encode()
        return _HELLO.pack(self.role, 0, self.conn_index, self.capabilities, self.timestamp_ns,
                           self.echo_ns, self.max_payload, self.recv_window, self.token,
                           len(name)) + name

    @classmethod
    def decode(cls, payload: Bytes, peer: str | None) -> Hello:
        if len(payload) < _HELLO.size:
            raise HandshakeError(f"HELLO/WELCOME payload of {len(payload)} bytes is shorter "
                                 f"than the {_HELLO.size} it needs", peer=peer)
        (role, _, index, caps, ts, echo, max_payload, window, token,
         name_len) = _HELLO.unpack_from(payload)
        name_bytes = bytes(payload[_HELLO.size:])
        if len(name_bytes) != name_len or name_len > MAX_NAME:
            raise HandshakeError(f"HELLO/WELCOME announces a {name_len}-byte agent name but "
                                 f"carries {len(name_bytes)} bytes", peer=peer)
        try:
            name = name_bytes.decode()
            role_ = Role(role)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HandshakeError(f"malformed HELLO/WELCOME: {exc}", peer=peer) from exc
        if not 0 < max_payload <= MAX_PAYLOAD_LIMIT or window < max_payload:
            raise HandshakeError(f"HELLO/WELCOME announces max_payload {max_payload} and window "
                                 f"{window}: need 0 < max_payload <= {MAX_PAYLOAD_LIMIT} and "
                                 f"window >= max_payload", peer=peer)
        return cls(role_, index, caps, ts, echo, max_payload, window, token, name)


@dataclass(frozen=True)
class AckInfo:
    """ACK payload: ``ack`` = stream bytes delivered in order; ``limit`` = highest offset the
    receiver accepts (data consumed by its application + its receive window)."""

    ack: int
    limit: int

    def encode(self) -> bytes:
        return _ACK.pack(self.ack, self.limit)

    @classmethod
    def decode(cls, payload: Bytes, peer: str | None) -> AckInfo:
        if len(payload) != _ACK.size:
            raise HandshakeError(f"ACK payload of {len(payload)} bytes, expected {_ACK.size}",
                                 peer=peer)
        ack, limit = _ACK.unpack_from(payload)
        return cls(ack, limit)


def encode_stamp(stamp_ns: int) -> bytes:
    return _STAMP.pack(stamp_ns & 0xFFFF_FFFF_FFFF_FFFF)


def decode_stamp(payload: Bytes, peer: str | None) -> int:
    if len(payload) != _STAMP.size:
        raise HandshakeError(f"PING/PONG payload of {len(payload)} bytes, expected "
                             f"{_STAMP.size}", peer=peer)
    return int(_STAMP.unpack_from(payload)[0])


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1  # the peer broke the protocol
    VERSION = 2  # unsupported protocol version
    UNKNOWN_SESSION = 3  # a join for a session this agent does not have
    BAD_TOKEN = 4  # a join with the wrong secret token
    REFUSED = 5  # refused by policy (name not allowed, shutting down, ...)
    ABORTED = 6  # the application aborted the session
    CLOSED = 7  # a join for a session that completed: everything was delivered


def encode_error(code: ErrorCode, message: str) -> bytes:
    return _ERROR.pack(code) + message.encode()[:4000]


def decode_error(payload: Bytes) -> tuple[int, str]:
    if len(payload) < _ERROR.size:
        return 0, "(malformed ERROR frame)"
    return int(_ERROR.unpack_from(payload)[0]), bytes(payload[_ERROR.size:]).decode(
        errors="replace")


# ---- reading ------------------------------------------------------------------------------
class BufferPool:
    """Payload buffers of ``size`` bytes, reused once the application has let go of them.

    Why: with a new 1 MiB bytearray per frame, glibc serves each from fresh pages (large
    blocks come from mmap, or from a heap top it trims again), so every frame paid about 256
    page faults: at LAN rates that was a third of the receiver's CPU. Payloads are handed to
    the application without a copy (a memoryview of a pooled buffer), so only the
    application knows when one is free; CPython frees an object with its last reference, so a
    buffer whose reference count shows no one but the pool (no memoryview of it alive, no
    other holder) is free to fill again.
    """

    SMALL = 64 * 1024  # smaller payloads come from malloc's heap, which is cheap

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self._lent: deque[bytearray] = deque()

    def take(self, n: int) -> memoryview:
        # Less than half a buffer gets a buffer of its own size: unread frames then hold at
        # most twice their bytes, so the receive window bounds memory even against a peer
        # sending small frames (each in a pooled 1 MiB buffer, 64 KiB frames would pin 16x).
        if n > self.size or n < max(self.SMALL, self.size // 2):
            return memoryview(bytearray(n))
        lent = self._lent
        # The oldest first (applications read in order); all of them if need be: a busy
        # receiver may hold most of its window in unread frames, and a check costs ~50 ns.
        for _ in range(len(lent)):
            buf = lent[0]
            lent.rotate(-1)
            if sys.getrefcount(buf) == 3:  # the deque, ``buf`` and getrefcount's argument
                return memoryview(buf)[:n]
        buf = bytearray(self.size)
        if len(lent) < self.limit:
            lent.append(buf)
        return memoryview(buf)[:n]


class FrameReader:
    """Reassembles frames from a byte stream; see the module docstring for the buffer protocol.

    ``max_payload`` bounds what one frame may allocate; a longer length is refused before any
    of its payload is read. ``peer`` names the peer in errors (set it once the name is known).
    After an error the reader is broken: the connection must be dropped. Magic, version and
    length are checked only after the header CRC matched, so a corrupted header is reported as
    corruption; a wrong magic with a wrong CRC is reported as "not an AMST peer".
    """

    def __init__(self, max_payload: int, peer: str | None = None,
                 staging_size: int = 64 * 1024, pool: BufferPool | None = None) -> None:
        if not 0 < max_payload <= MAX_PAYLOAD_LIMIT:
            raise ValueError(f"max_payload must be within 1..{MAX_PAYLOAD_LIMIT}")
        self.max_payload = max_payload
        self.limit = max(max_payload, CONTROL_LIMIT)  # DATA is held to max_payload by the session
        self.peer = peer
        self.pool = pool
        self._staging = bytearray(max(staging_size, 2 * HEADER_SIZE))
        self._staging_mv = memoryview(self._staging)
        self._fill = 0  # bytes of staging holding data not yet parsed (always from 0)
        # A frame whose payload is being read straight into its own buffer:
        self._payload: memoryview | None = None
        self._payload_mv = memoryview(b"")
        self._payload_fill = 0
        self._header: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self.broken: Exception | None = None
        self.bytes_in = 0

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never past the frame being read)."""
        if self.broken is not None:
            raise self.broken
        if self._payload is not None:
            return self._payload_mv[self._payload_fill:]
        return self._staging_mv[self._fill:]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were written into the last buffer; returns the frames now complete."""
        self.bytes_in += nbytes
        try:
            if self._payload is not None:
                self._payload_fill += nbytes
                if self._payload_fill < len(self._payload):
                    return []
                # Entering payload mode consumed all of staging, so nothing else is pending.
                return [self._finish_payload()]
            self._fill += nbytes
            return self._parse_staging()
        except Exception as exc:
            self.broken = exc
            raise

    def feed(self, data: Bytes) -> list[Frame]:
        """Convenience for tests and simple callers: copy ``data`` in, return complete frames."""
        frames: list[Frame] = []
        view = memoryview(data).cast("B")
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            frames += self.buffer_updated(n)
        return frames

    def _check_header(self, pos: int, magic: bytes, version: int, length: int,
                      header_crc: int) -> None:
        if zlib.crc32(self._staging_mv[pos:pos + 36]) != header_crc:
            if magic != MAGIC:
                raise BadMagicError(f"received {magic!r} where an AMST frame header should "
                                    f"start (expected {MAGIC!r}): the peer is not an AMST agent, "
                                    f"or one side uses TLS and the other does not",
                                    peer=self.peer)
            maybe = " (or the peer speaks another version)" if version != VERSION else ""
            raise ChecksumError(f"frame header failed its CRC-32 check: it was corrupted in "
                                f"transit{maybe}; the connection is replaced and its frames "
                                f"resent", peer=self.peer)
        if version != VERSION:
            raise VersionMismatchError(f"speaks AMST protocol version {version}, this agent "
                                       f"speaks version {VERSION}: upgrade the older agent",
                                       peer=self.peer)
        if length > self.limit:
            raise FrameTooLargeError(f"announced a {length}-byte frame, more than the "
                                     f"{self.limit} bytes this agent accepts",
                                     peer=self.peer)

    def _parse_staging(self) -> list[Frame]:
        frames: list[Frame] = []
        staging = self._staging
        pos, fill = 0, self._fill
        while fill - pos >= HEADER_SIZE:
            (magic, version, ftype, flags, sid, seq, length, pcrc,
             hcrc) = _HEADER.unpack_from(staging, pos)
            self._check_header(pos, magic, version, length, hcrc)
            end = pos + HEADER_SIZE + length
            if end <= fill:  # the whole frame is here (small frames): copy its payload out
                payload = bytes(staging[pos + HEADER_SIZE:end])
                if self._sum(payload, flags, ftype, seq) != pcrc:
                    self._crc_error(ftype, seq, length)
                frames.append(Frame(ftype, flags, sid, seq, payload))
                pos = end
                continue
            # A frame longer than what is here: read the rest of it straight into its buffer.
            self._payload = self.pool.take(length) if self.pool else \
                memoryview(bytearray(length))
            self._payload_mv = self._payload
            have = fill - pos - HEADER_SIZE
            self._payload_mv[:have] = self._staging_mv[pos + HEADER_SIZE:fill]
            self._payload_fill = have
            self._header = (ftype, flags, sid, seq, pcrc)
            pos = fill
            break
        if pos:  # keep the unparsed tail (less than a header) at the start of staging
            rest = fill - pos
            staging[:rest] = staging[pos:fill]
            self._fill = rest
        return frames

    def _sum(self, payload: Bytes, flags: int, ftype: int, seq: int) -> int:
        if flags & _XXH3_FLAG and xxh3_64 is None:
            raise HandshakeError(f"sent a frame (type {ftype}, seq {seq}) with an XXH3 "
                                 f"checksum, which this agent did not announce", peer=self.peer)
        return payload_sum(payload, flags)

    def _crc_error(self, ftype: int, seq: int, length: int) -> None:
        raise ChecksumError(f"frame (type {ftype}, seq {seq}, {length} bytes) failed its "
                            f"payload checksum: it was corrupted in transit and is dropped; "
                            f"the connection is replaced and its frames resent", peer=self.peer)

    def _finish_payload(self) -> Frame:
        payload = self._payload
        assert payload is not None
        ftype, flags, sid, seq, pcrc = self._header
        self._payload = None
        self._payload_mv = memoryview(b"")
        if self._sum(payload, flags, ftype, seq) != pcrc:
            self._crc_error(ftype, seq, len(payload))
        return Frame(ftype, flags, sid, seq, payload)
