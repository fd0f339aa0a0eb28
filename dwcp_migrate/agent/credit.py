"""Delivery credit: how far the source agent may read ahead of the destination QEMU.

Why: everything read from the source QEMU and not yet in the destination QEMU must still
reach it after the guest has stopped, so it is downtime. The transport session bounds what it
holds in *encoded* bytes, and with the page codec an encoded batch of references and deltas
can stand for a hundred times its size of QEMU stream (a 71-byte batch for 4 MB of re-sent
pages was common in the final passes measured). On the emulated WAN 34 to 67 MB of QEMU
stream sat between the two QEMUs when the guest stopped, and the destination QEMU loads at
200 to 320 MB/s on this test bed: 0.3 to 0.6 s of the switchover (ad hoc timelines,
docs/BENCHMARKS.md).

So with the page codec the destination reports in CREDIT messages how many bytes of QEMU
stream it has written into its QEMU so far, and the source reads from its QEMU only while it
is less than a window ahead of that. The window follows what the path delivers
(:class:`~dwcp_migrate.transports.flow.DeliveryWindow`: ``gain`` x the best delivery rate of
the last second x the lowest RTT, within a floor and a cap). A welcome side effect: QEMU's
own downtime estimate (what is left / the rate it manages to write) then uses the rate its
stream really reaches the destination at, not the rate the source agent swallows it.

Nothing here does I/O; the source's read stage awaits :meth:`DeliveryCredit.wait_for_room`.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from dwcp_migrate.agent.channel import ChannelProtocolError
from dwcp_migrate.transports.flow import DeliveryWindow

CREDIT = struct.Struct(">Q")  # the CREDIT payload: bytes of QEMU stream delivered so far
# Chosen from ad hoc runs on the emulated WAN (docs/BENCHMARKS.md): floor 8 MiB and gain 1.5
# cut the switchover but made migrations 20 to 50 % longer (the source's own encoder queues
# sit inside the window too); 16, 24 and 32 MiB with gain 2 all gave about 210 ms of
# switchover, 32 MiB the shortest total time (6 interleaved runs each: 4.03 s against 4.33 s
# for 16 MiB, switchover medians 213 and 209 ms).
CREDIT_FLOOR = 32 << 20
CREDIT_CAP = 64 << 20
CREDIT_GAIN = 2.0
CREDIT_STEP = 1 << 20  # the destination reports at least every this many bytes...
# ...and whenever it has nothing more to write. If no credit arrives for this long while the
# source waits, it reads on: the window is an optimisation, never a reason to stall a
# migration (a destination that stopped reporting is then bounded by the session's windows).
CREDIT_STALL_S = 1.0


def encode_credit(delivered: int) -> bytes:
    return CREDIT.pack(delivered)


def decode_credit(payload: bytes | memoryview) -> int:
    if len(payload) != CREDIT.size:
        raise ChannelProtocolError(f"CREDIT payload of {len(payload)} bytes (expected "
                                   f"{CREDIT.size})")
    (delivered,) = CREDIT.unpack(payload)
    return int(delivered)


class DeliveryCredit:
    """The source's view of one channel: bytes read from QEMU against bytes delivered."""

    def __init__(self, peer: str, *, floor: int = CREDIT_FLOOR, cap: int = CREDIT_CAP,
                 gain: float = CREDIT_GAIN, stall_s: float = CREDIT_STALL_S,
                 min_rtt: Callable[[], float | None] = lambda: None) -> None:
        self.peer = peer
        self._sizer = DeliveryWindow(floor, cap, gain=gain)
        self._min_rtt = min_rtt
        self._stall_s = stall_s
        self._changed = asyncio.Event()
        self.window = floor
        self.delivered = 0
        self.waits = 0  # times the source stopped reading for credit
        self.stalls = 0  # times it read on after CREDIT_STALL_S without credit

    def on_credit(self, delivered: int, *, sent: int, now: float) -> None:
        """The destination has written ``delivered`` bytes into its QEMU; ``sent`` is what
        this side has read from its QEMU so far."""
        if delivered < self.delivered:
            raise ChannelProtocolError(f"agent {self.peer} reported {delivered} bytes "
                                       f"delivered after {self.delivered}")
        if delivered > sent:
            raise ChannelProtocolError(f"agent {self.peer} reported {delivered} bytes "
                                       f"delivered, more than the {sent} sent")
        self.delivered = delivered
        window = self._sizer.on_ack(delivered, now, self._min_rtt())
        if window is not None:
            self.window = window
        self._changed.set()

    def room(self, read: int) -> int:
        """Bytes the source may still read when it has read ``read`` bytes."""
        return self.window - (read - self.delivered)

    async def wait_for_room(self, read: int) -> None:
        """Until the window has room again, or no credit came for ``stall_s``."""
        if self.room(read) > 0:
            return
        self.waits += 1
        while self.room(read) <= 0:
            self._changed.clear()
            try:
                async with asyncio.timeout(self._stall_s):
                    await self._changed.wait()
            except TimeoutError:
                self.stalls += 1
                return

    def stats(self) -> dict[str, int]:
        return {"credit_window": self.window, "credit_waits": self.waits,
                "credit_stalls": self.stalls}
