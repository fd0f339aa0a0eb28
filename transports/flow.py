"""The two halves of a session's byte stream, without I/O: what is sent and what is received.

:class:`SendStream` cuts the application's bytes into DATA frames, keeps every frame until the
peer acknowledges it (so a broken connection's frames can be sent again on another one) and
bounds that memory by a send window in bytes. :class:`RecvStream` puts frames that arrive on
different connections back in order, drops duplicates, and bounds what it holds (frames out of
order plus in-order bytes the application has not read) by a receive window: the peer may only
send up to ``limit`` = bytes the application consumed + the window, and a frame past that limit
is a protocol violation, not a reason to buffer more.

Frames are never re-cut: a resent frame has the offset, length and header it had the first time,
so a duplicate is recognised by its offset alone and anything overlapping is an error.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque

from dwcp_migrate.transports.errors import SequenceError
from dwcp_migrate.transports.frames import AckInfo, Bytes, FrameType, encode_header


class OutFrame:
    """A frame kept until acknowledged; ``conn`` is where it was last sent (None: queued)."""

    __slots__ = ("conn", "end", "header", "payload", "sends", "seq", "type")

    def __init__(self, ftype: int, seq: int, payload: Bytes, header: bytes) -> None:
        self.type = ftype
        self.seq = seq
        self.end = seq + len(payload)
        self.payload = payload
        self.header = header
        self.conn: int | None = None
        self.sends = 0

    def __lt__(self, other: OutFrame) -> bool:  # resend order: lowest offset first
        return self.seq < other.seq


class SendStream:
    """Outgoing bytes: framing, the unacknowledged frames, the send window, resends."""

    def __init__(self, session_id: int, window: int, max_payload: int) -> None:
        if window < max_payload:
            raise ValueError(f"send window {window} is smaller than one frame ({max_payload})")
        self.session_id = session_id
        self.window = window
        self.max_payload = max_payload
        self.offset = 0  # bytes accepted from the application
        self.acked = 0  # bytes the peer delivered in order
        self.peer_limit = 0  # highest offset the peer accepts; set by the handshake
        self.data_flags = 0  # Flag.XXH3 once both sides announced it
        self.fin: OutFrame | None = None
        self.fin_acked = False
        self._unacked: deque[OutFrame] = deque()  # by offset; the FIN frame last
        self._fresh: deque[OutFrame] = deque()  # never sent yet (a tail of _unacked)
        self._resend: list[OutFrame] = []  # heap: frames whose connection broke
        self.frames_sent = 0
        self.frames_resent = 0
        self.bytes_resent = 0

    # ---- application side ---------------------------------------------------------------
    @property
    def unacked_bytes(self) -> int:
        return self.offset - self.acked

    def space(self) -> int:
        """Bytes :meth:`write` would take now (0 after FIN)."""
        # max: the window may have been lowered below what is already unacknowledged
        return 0 if self.fin is not None else max(0, self.window - self.unacked_bytes)

    def write(self, data: Bytes) -> int:
        """Take as much of ``data`` as the window allows (whole frames); returns bytes taken.

        Read-only buffers (``bytes``) are kept by reference, not copied: the frames point into
        them until acknowledged. A writable buffer is copied once, since the caller may reuse it.
        """
        view = memoryview(data).cast("B")
        space = self.space()
        # Do not cut a frame short just because the window is almost full: wait for room.
        if space < min(len(view), self.max_payload):
            return 0
        take = min(len(view), space)
        view = view[:take] if view.readonly else memoryview(bytes(view[:take]))
        mp = self.max_payload
        for start in range(0, take, mp):
            chunk = view[start:start + mp]
            seq = self.offset + start
            frame = OutFrame(FrameType.DATA, seq, chunk, encode_header(
                FrameType.DATA, self.data_flags, self.session_id, seq, chunk))
            self._unacked.append(frame)
            self._fresh.append(frame)
        self.offset += take
        return take

    def finish(self) -> None:
        """Queue the FIN frame after all data written so far."""
        if self.fin is not None:
            return
        fin = OutFrame(FrameType.FIN, self.offset, b"",
                       encode_header(FrameType.FIN, 0, self.session_id, self.offset, b""))
        self.fin = fin
        self._unacked.append(fin)
        self._fresh.append(fin)

    # ---- connection side ----------------------------------------------------------------
    def has_sendable(self) -> bool:
        if self._resend:
            return True
        return bool(self._fresh) and self._fresh[0].end <= self.peer_limit

    def next_frame(self, conn: int) -> OutFrame | None:
        """The next frame to put on connection ``conn``: resends first, then new data."""
        while self._resend:
            frame = heapq.heappop(self._resend)
            if frame.end <= self.acked and frame is not self.fin:
                continue  # acknowledged while it waited
            if frame is self.fin and self.fin_acked:
                continue
            self._mark_sent(frame, conn)
            self.frames_resent += 1
            self.bytes_resent += frame.end - frame.seq
            return frame
        if self._fresh and self._fresh[0].end <= self.peer_limit:
            frame = self._fresh.popleft()
            self._mark_sent(frame, conn)
            return frame
        return None

    def _mark_sent(self, frame: OutFrame, conn: int) -> None:
        frame.conn = conn
        frame.sends += 1
        self.frames_sent += 1

    def connection_lost(self, conn: int) -> int:
        """Queue again every unacknowledged frame last sent on ``conn``; returns how many."""
        count = 0
        for frame in self._unacked:
            if frame.conn == conn:
                frame.conn = None
                heapq.heappush(self._resend, frame)
                count += 1
        return count

    def on_ack(self, info: AckInfo, fin_ack: bool, peer: str | None) -> int:
        """Apply an ACK; returns the bytes it released from the send window."""
        if info.ack > self.offset:
            raise SequenceError(f"acknowledged {info.ack} bytes, but only {self.offset} were "
                                f"sent", peer=peer)
        if info.limit < info.ack:
            raise SequenceError(f"announced a receive limit {info.limit} below its own "
                                f"acknowledgement {info.ack}", peer=peer)
        self.peer_limit = max(self.peer_limit, info.limit)
        released = 0
        if info.ack > self.acked:
            released = info.ack - self.acked
            self.acked = info.ack
            unacked = self._unacked
            while unacked and unacked[0].end <= info.ack and unacked[0] is not self.fin:
                unacked.popleft()
        if fin_ack:
            if self.fin is None or info.ack != self.fin.seq:
                sent = "no FIN was sent" if self.fin is None else f"it was at {self.fin.seq}"
                raise SequenceError(f"acknowledged a FIN at offset {info.ack}, but {sent}",
                                    peer=peer)
            self.fin_acked = True
            if self._unacked and self._unacked[0] is self.fin:
                self._unacked.popleft()
        return released

    @property
    def all_acked(self) -> bool:
        return self.fin is not None and self.fin_acked


class RecvStream:
    """Incoming bytes: reordering, duplicates, the receive window, end of stream."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.delivered = 0  # in-order bytes handed to the ready queue
        self.consumed = 0  # bytes the application has read
        self.limit = window  # highest offset announced to the peer (HELLO, then ACKs)
        self.fin_offset: int | None = None
        self._ready: deque[Bytes] = deque()
        self._ready_bytes = 0
        self._ooo: dict[int, Bytes] = {}  # out of order, by offset
        self._ooo_keys: list[int] = []  # sorted offsets of _ooo
        self._ooo_bytes = 0
        self.duplicates = 0
        self.frames_received = 0

    @property
    def held_bytes(self) -> int:
        """Memory this stream holds: out-of-order frames plus unread in-order bytes."""
        return self._ready_bytes + self._ooo_bytes

    @property
    def eof(self) -> bool:
        """The peer's FIN arrived and every byte before it was delivered."""
        return self.fin_offset is not None and self.delivered == self.fin_offset

    def on_data(self, seq: int, payload: Bytes, peer: str | None) -> bool:
        """Take a DATA frame; returns True if it delivered new in-order bytes."""
        length = len(payload)
        end = seq + length
        if length == 0:
            raise SequenceError(f"sent an empty DATA frame at offset {seq}", peer=peer)
        if end > self.limit:
            raise SequenceError(f"sent data up to offset {end}, beyond the receive window "
                                f"(limit {self.limit}, {self.consumed} consumed): it ignores "
                                f"flow control", peer=peer)
        if self.fin_offset is not None and end > self.fin_offset:
            raise SequenceError(f"sent data up to offset {end} after its FIN at "
                                f"{self.fin_offset}", peer=peer)
        self.frames_received += 1
        delivered = self.delivered
        if end <= delivered:
            self.duplicates += 1  # a resend of something already delivered
            return False
        if seq < delivered:
            raise SequenceError(f"sent a frame {seq}..{end} overlapping bytes already "
                                f"delivered up to {delivered}", peer=peer)
        if seq > delivered:
            self._hold(seq, end, payload, peer)
            return False
        self._ready.append(payload)
        self._ready_bytes += length
        delivered = end
        ooo, keys = self._ooo, self._ooo_keys
        while keys and keys[0] == delivered:
            chunk = ooo.pop(keys.pop(0))
            self._ooo_bytes -= len(chunk)
            self._ready.append(chunk)
            self._ready_bytes += len(chunk)
            delivered += len(chunk)
        self.delivered = delivered
        return True

    def _hold(self, seq: int, end: int, payload: Bytes, peer: str | None) -> None:
        ooo, keys = self._ooo, self._ooo_keys
        if seq in ooo:
            if len(ooo[seq]) != end - seq:
                raise SequenceError(f"sent two different frames at offset {seq} "
                                    f"({len(ooo[seq])} and {end - seq} bytes)", peer=peer)
            self.duplicates += 1
            return
        i = bisect.bisect_left(keys, seq)
        if (i > 0 and keys[i - 1] + len(ooo[keys[i - 1]]) > seq) or (i < len(keys) and \
                keys[i] < end):
            raise SequenceError(f"sent a frame {seq}..{end} overlapping another one held "
                                f"for reordering", peer=peer)
        keys.insert(i, seq)
        ooo[seq] = payload
        self._ooo_bytes += end - seq

    def on_fin(self, seq: int, peer: str | None) -> None:
        if self.fin_offset is not None and self.fin_offset != seq:
            raise SequenceError(f"sent a second FIN at offset {seq} after one at "
                                f"{self.fin_offset}", peer=peer)
        if seq < self.delivered or (self._ooo_keys and
                                    self._ooo_keys[-1] + len(self._ooo[self._ooo_keys[-1]]) > seq):
            raise SequenceError(f"sent a FIN at offset {seq} before data it had already sent",
                                peer=peer)
        if seq > self.limit:
            raise SequenceError(f"sent a FIN at offset {seq} beyond the receive limit "
                                f"{self.limit}", peer=peer)
        self.fin_offset = seq

    def read(self, max_bytes: int | None = None) -> Bytes | None:
        """The next in-order chunk (one frame's payload, or ``max_bytes`` of it).

        None: nothing to read yet; ``b""``: end of stream.
        """
        if not self._ready:
            return b"" if self.eof else None
        chunk = self._ready[0]
        if max_bytes is not None and len(chunk) > max_bytes:
            view = memoryview(chunk)
            self._ready[0] = view[max_bytes:]
            chunk = view[:max_bytes]
        else:
            self._ready.popleft()
        self._ready_bytes -= len(chunk)
        self.consumed += len(chunk)
        return chunk

    def readable_bytes(self) -> int:
        return self._ready_bytes

    def ack_info(self) -> AckInfo:
        """The ACK to send now; raises the announced limit to consumed + window."""
        self.limit = max(self.limit, self.consumed + self.window)
        return AckInfo(self.delivered, self.limit)


class DeliveryWindow:
    """A send window sized from what the path delivers: ``gain`` x the highest delivery rate
    of the last ``memory_s`` seconds x the lowest RTT, within ``floor`` .. ``cap``. No I/O.

    Why: whatever a sender has written and the peer's application has not read must drain
    at the end, and for a relay carrying a live migration that end is the guest's downtime.
    A fixed window lets a sender that outruns its path queue a whole window (64 MiB by
    default) that the path drains at its own pace. ``gain`` 2 leaves the sender room to
    double its rate per round trip, and the max filter keeps the window through short pauses
    of the application (a QEMU between two iterations) instead of collapsing it. Measured so
    far: on the test bed's LAN it sits at its floor; on the emulated WAN the agents are slower
    than the link, under 1 MB was unacknowledged at switchover with or without it, and the
    end-to-end downtime there (170 to 950 ms) did not change measurably (docs/BENCHMARKS.md).
    That backlog was in QEMU stream bytes, which encoded windows do not bound: the agents'
    delivery credit (agent/credit.py) does, with this class sizing its window too.
    """

    def __init__(self, floor: int, cap: int, *, gain: float = 2.0, memory_s: float = 1.0,
                 min_interval_s: float = 0.02) -> None:
        if not 0 < floor <= cap:
            raise ValueError(f"window floor {floor} must be within 1..cap ({cap})")
        self.floor, self.cap, self.gain = floor, cap, gain
        self.memory_s, self.min_interval_s = memory_s, min_interval_s
        self._mark: tuple[float, int] | None = None  # (time, bytes acked) of the last sample
        self._rates: deque[tuple[float, float]] = deque()  # (time, bytes/s), oldest first

    def on_ack(self, acked: int, now: float, min_rtt: float | None) -> int | None:
        """Feed the peer's cumulative ACK; returns the new window when it was recomputed."""
        if self._mark is None:
            self._mark = (now, acked)
            return None
        since, acked_then = self._mark
        elapsed = now - since
        if elapsed < max(self.min_interval_s, min_rtt or 0.0):
            return None
        self._mark = (now, acked)
        rates = self._rates
        rates.append((now, (acked - acked_then) / elapsed))
        while rates and rates[0][0] < now - self.memory_s:
            rates.popleft()
        best = max(rate for _, rate in rates)
        return int(min(self.cap, max(self.floor, self.gain * best * (min_rtt or 0.0))))
