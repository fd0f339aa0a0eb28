"""RawTransport's writes: what the kernel does not take at once is kept uncopied and sent
later in order, with the protocol paused meanwhile."""

from __future__ import annotations

import asyncio
import os
import socket

from dwcp_migrate.transports.rawsock import RawTransport


class _Recorder(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(1 << 16)
        self.received = bytearray()
        self.pauses = 0
        self.resumes = 0
        self.lost: list[Exception | None] = []

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buf[:nbytes]

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def _transfer(chunks: list[list[bytes]]) -> tuple[bytes, _Recorder]:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # forces partial sends
    sender = _Recorder()
    transport = RawTransport(loop, left, sender)
    received = bytearray()
    right.setblocking(False)
    for group in chunks:
        transport.writelines(group)
    transport.write(b"tail")
    transport.close()
    while True:
        data = await loop.sock_recv(right, 1 << 16)
        if not data:
            break
        received += data
    right.close()
    await asyncio.sleep(0)
    return bytes(received), sender


def test_writelines_partial_sends_arrive_whole_and_in_order() -> None:
    groups = [[os.urandom(40), os.urandom(300_000), b"", os.urandom(7)] for _ in range(20)]
    received, sender = asyncio.run(_transfer(groups))
    expected = b"".join(b"".join(g) for g in groups) + b"tail"
    assert received == expected
    assert sender.pauses >= 1 and sender.resumes >= 1  # the kernel did refuse some of it
    assert sender.lost == [None]


def test_writelines_takes_more_buffers_than_one_sendmsg_carries() -> None:
    group = [bytes([i]) * 1000 for i in range(200)]  # more than the 64 iovecs of one call
    received, _ = asyncio.run(_transfer([group]))
    assert received == b"".join(group) + b"tail"
