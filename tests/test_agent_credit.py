"""Delivery credit (agent/credit.py) and the pumps that use it, without sockets: the source
stops reading from QEMU a window ahead of what the destination reported, flushes what the
encoder holds back, and reads on when credit comes (or, never stalling a migration, when
none comes for a while); the destination reports what it wrote into QEMU; a misbehaving
peer's CREDIT is refused. Also: what was read ahead during the handshake is let go once
carried."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

import pytest

from dwcp_migrate.agent.channel import (
    ChannelProtocolError,
    MessageReader,
    MessageType,
    encode,
)
from dwcp_migrate.agent.credit import (
    CREDIT_STEP,
    DeliveryCredit,
    decode_credit,
    encode_credit,
)
from dwcp_migrate.agent.datapath import (
    MessageStream,
    SerializedSender,
    qemu_to_session,
    session_to_qemu,
)
from dwcp_migrate.agent.qemuio import ReadAhead
from dwcp_migrate.agent.records import ChannelCounters

MiB = 1 << 20


# ---- the core ------------------------------------------------------------------------------
def test_credit_payload_round_trip_and_bad_length() -> None:
    assert decode_credit(encode_credit(123 << 30)) == 123 << 30
    with pytest.raises(ChannelProtocolError, match="CREDIT payload of 3 bytes"):
        decode_credit(b"abc")


def test_room_is_the_window_less_what_is_outstanding() -> None:
    credit = DeliveryCredit("b", floor=8 * MiB, cap=64 * MiB)
    assert credit.room(0) == 8 * MiB
    assert credit.room(6 * MiB) == 2 * MiB
    credit.on_credit(5 * MiB, sent=6 * MiB, now=0.0)
    assert credit.room(6 * MiB) == 7 * MiB


def test_window_follows_rate_times_rtt_within_floor_and_cap() -> None:
    rtt = 0.05
    credit = DeliveryCredit("b", floor=8 * MiB, cap=64 * MiB, gain=1.5, min_rtt=lambda: rtt)
    credit.on_credit(0, sent=0, now=0.0)
    # 400 MB/s delivered for 0.1 s: 1.5 x 400 MB/s x 50 ms = 30 MB.
    credit.on_credit(40_000_000, sent=50_000_000, now=0.1)
    assert credit.window == pytest.approx(1.5 * 400e6 * rtt, rel=1e-6)
    # A much faster path is capped...
    credit.on_credit(40_000_000 + 1_000_000_000, sent=2_000_000_000, now=0.2)
    assert credit.window == 64 * MiB
    # ...and one that (after the max filter's second) is slow sits at the floor.
    credit.on_credit(1_040_000_100, sent=2_000_000_000, now=1.5)
    credit.on_credit(1_040_000_200, sent=2_000_000_000, now=1.6)
    assert credit.window == 8 * MiB


@pytest.mark.parametrize("delivered,sent,match", [
    (10, 5, "more than the 5 sent"),
    (1, 100, "delivered after 4"),
])
def test_misbehaving_credit_is_refused(delivered: int, sent: int, match: str) -> None:
    credit = DeliveryCredit("b")
    credit.on_credit(4, sent=100, now=0.0)
    with pytest.raises(ChannelProtocolError, match=match):
        credit.on_credit(delivered, sent=sent, now=0.1)
    assert credit.delivered == 4


def test_wait_returns_on_credit_and_after_a_stall() -> None:
    async def main() -> None:
        credit = DeliveryCredit("b", floor=MiB, cap=MiB, stall_s=0.05)
        waiter = asyncio.create_task(credit.wait_for_room(MiB))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        credit.on_credit(MiB // 2, sent=MiB, now=1.0)
        await asyncio.wait_for(waiter, 1)
        assert (credit.waits, credit.stalls) == (1, 0)
        # No credit at all: it gives up waiting after stall_s and says so in its stats.
        await asyncio.wait_for(credit.wait_for_room(2 * MiB), 1)
        assert credit.stats()["credit_stalls"] == 1

    asyncio.run(main())


# ---- the pumps -----------------------------------------------------------------------------
class FakeQemu:
    """A source QEMU with ``total`` bytes to send, read in 1 MiB pieces."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.given = 0

    async def read(self, max_bytes: int = MiB) -> bytes:
        await asyncio.sleep(0)
        n = min(self.left, max_bytes, MiB)
        self.left -= n
        self.given += n
        return bytes(n)

    async def read_parts(self, max_bytes: int = MiB) -> list[memoryview]:
        data = await self.read(max_bytes)
        return [memoryview(data)] if data else []


class HoldingEncoder:
    """Holds what it is fed until flushed: what a page encoder filling a batch does."""

    def __init__(self) -> None:
        self.held = 0
        self.flushes = 0

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        self.held += len(data)
        return []

    def flush(self) -> list[bytes]:
        self.flushes += 1
        out, self.held = [self.held.to_bytes(8, "big")] if self.held else [], 0
        return out

    def finish(self) -> list[bytes]:
        return self.flush()


class Collector:
    def __init__(self) -> None:
        self.data = bytearray()

    async def send(self, data: bytes) -> None:
        self.data += data


async def _settle() -> None:
    """Let every task run until it waits for something only the test gives."""
    for _ in range(500):
        await asyncio.sleep(0)


def _batch_sizes(data: bytes | bytearray) -> list[int]:
    msgs = MessageReader().feed(bytes(data))
    return [int.from_bytes(m.payload, "big") for m in msgs if m.type is MessageType.BATCH]


def test_source_stops_a_window_ahead_flushes_and_reads_on_with_credit() -> None:
    async def main() -> None:
        qemu, encoder, out = FakeQemu(32 * MiB), HoldingEncoder(), Collector()
        counters = ChannelCounters(0)
        # stall_s long: a pass must come from credit, not from giving up
        credit = DeliveryCredit("b", floor=4 * MiB, cap=4 * MiB, stall_s=60)
        pump = asyncio.create_task(qemu_to_session(qemu, out, counters, encoder,
                                                   credit=credit))
        await _settle()
        # Stopped at the window; what the encoder held went out for the destination.
        assert qemu.given == 4 * MiB
        assert sum(_batch_sizes(out.data)) == 4 * MiB
        delivered = 0
        while not pump.done():
            delivered = counters.bytes_from_qemu - MiB  # the destination lags by a MiB
            credit.on_credit(delivered, sent=counters.bytes_from_qemu, now=0.0)
            await _settle()
            assert counters.bytes_from_qemu - credit.delivered <= 4 * MiB + MiB
        await pump
        assert sum(_batch_sizes(out.data)) == 32 * MiB and credit.stalls == 0
        assert credit.waits > 1

    asyncio.run(main())


class FakeSession:
    """The receiving side of a session, fed the given messages."""

    def __init__(self, messages: list[list[bytes]]) -> None:
        self.data = [b"".join(m) for m in messages]

    async def recv_view(self, max_bytes: int | None = None) -> bytes:
        await asyncio.sleep(0)
        return self.data.pop(0) if self.data else b""


class FakeQemuWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


def _deliver(messages: list[list[bytes]], *, on_credit: Callable[[int], None] | None = None,
             reports: list[int] | None = None) -> FakeQemuWriter:
    async def report(n: int) -> None:
        assert reports is not None
        reports.append(n)

    async def main() -> FakeQemuWriter:
        writer = FakeQemuWriter()
        stream = MessageStream(FakeSession(messages), "a")  # type: ignore[arg-type]
        await session_to_qemu(stream, writer, ChannelCounters(0), None, count_as_return=False,
                              on_credit=on_credit,
                              report_delivered=report if reports is not None else None)
        return writer

    return asyncio.run(main())


def test_destination_reports_what_it_wrote_into_qemu() -> None:
    pieces = [bytes([i]) * (300 << 10) for i in range(10)]  # 3 MB in 300 KiB messages
    reports: list[int] = []
    writer = _deliver([encode(MessageType.RAW, p) for p in pieces]
                      + [encode(MessageType.EOF)], reports=reports)
    assert writer.data == b"".join(pieces) and writer.eof
    assert reports == sorted(set(reports)) and reports[-1] == len(writer.data)
    # At least every CREDIT_STEP (checked after each 300 KiB write).
    gaps = [b - a for a, b in zip([0, *reports], reports, strict=False)]
    assert max(gaps) < CREDIT_STEP + (300 << 10), gaps


def test_source_takes_credit_off_the_return_path() -> None:
    got: list[int] = []
    writer = _deliver([encode(MessageType.CREDIT, encode_credit(5)),
                       encode(MessageType.RAW, b"pong"),
                       encode(MessageType.CREDIT, encode_credit(9)),
                       encode(MessageType.EOF)], on_credit=got.append)
    assert got == [5, 9] and writer.data == b"pong"


def test_credit_nobody_asked_for_is_a_protocol_error() -> None:
    with pytest.raises(ChannelProtocolError, match="sent CREDIT"):
        _deliver([encode(MessageType.CREDIT, encode_credit(5)), encode(MessageType.EOF)])


def test_serialized_sender_keeps_messages_whole() -> None:
    class SlowSession:
        def __init__(self) -> None:
            self.data = bytearray()

        async def send(self, data: bytes) -> None:
            for i in range(len(data)):  # one byte per turn of the loop: any interleaving shows
                self.data += data[i:i + 1]
                await asyncio.sleep(0)

    async def main() -> bytes:
        session = SlowSession()
        sender = SerializedSender(session)
        a = b"".join(encode(MessageType.RAW, b"x" * 50))
        b = b"".join(encode(MessageType.CREDIT, encode_credit(7)))
        await asyncio.gather(*(sender.send(m) for m in (a, b, a, b)))
        return bytes(session.data)

    msgs = MessageReader().feed(asyncio.run(main()))
    assert [m.type for m in msgs] == [MessageType.RAW, MessageType.CREDIT] * 2


@pytest.mark.parametrize("encoded", [True, False])
def test_what_was_read_ahead_is_let_go_once_carried(encoded: bool) -> None:
    """The chunks read during the handshake (ReadAhead) are views of QEMU's pooled receive
    buffers; the pump must not keep them for the rest of the migration, or no buffer is ever
    free again and every later read takes a fresh one."""
    async def main() -> None:
        ahead = ReadAhead(FakeViews(3 * MiB), limit=3 * MiB)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        head, eof = await ahead.stop()
        assert len(head) == 3 and not eof and ahead.chunks == []
        alive = [weakref.ref(chunk) for chunk in head]
        out = Collector()
        counters = ChannelCounters(0)
        await qemu_to_session(FakeQemu(2 * MiB), out, counters,
                              HoldingEncoder() if encoded else None, head=head)
        assert head == []  # consumed: the caller's list no longer holds the views
        gc.collect()
        assert not any(ref() for ref in alive)
        assert counters.bytes_from_qemu == 5 * MiB

    asyncio.run(main())


class FakeViews(FakeQemu):
    """Reads are memoryviews (of a buffer each), as QemuConnection's are."""

    async def read(self, max_bytes: int = MiB) -> memoryview:  # type: ignore[override]
        return memoryview(bytearray(await super().read(max_bytes)))
