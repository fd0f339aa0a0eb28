"""The agent's QEMU-side connections: reads handed out as views lose and reorder nothing (also
when a read is cancelled, as the idle-flush timeout does), reading pauses when the consumer
lags, writes and write_eof reach the peer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from pathlib import Path

from dwcp_migrate.agent import qemuio
from dwcp_migrate.agent.qemuio import QemuConnection, QemuListener, connect_qemu
from dwcp_migrate.transports.rawsock import RawTransport


def _blocks(n: int) -> list[bytes]:
    return [os.urandom(size) for size in [1, 4095, 70_000, 1 << 20, 3 << 20] * n]


async def _read_all(conn: QemuConnection, *, timeout_every: int = 0) -> bytes:
    out = bytearray()
    reads = 0
    while True:
        reads += 1
        if timeout_every and reads % timeout_every == 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.0005):  # as the idle flush does: may cancel
                    chunk = await conn.read(1 << 20)
                    out += chunk
                    if not chunk:
                        return bytes(out)
            continue
        limit = 100_000 if reads % 2 else 1 << 20  # also cuts received runs in two
        chunk = await conn.read(limit)
        if not chunk:
            return bytes(out)
        assert len(chunk) <= limit
        out += chunk


def test_listener_reads_everything_in_order_with_cancelled_reads(tmp_path: Path) -> None:
    blocks = _blocks(4)
    expected = b"".join(blocks)

    async def main() -> bytes:
        accepted: asyncio.Queue[QemuConnection] = asyncio.Queue()
        listener = QemuListener(tmp_path / "to-b.sock", accepted.put_nowait)
        await listener.start()
        assert (tmp_path / "to-b.sock").stat().st_mode & 0o777 == 0o600

        def qemu_side() -> None:  # a blocking writer, as QEMU is
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(tmp_path / "to-b.sock"))
                for block in blocks:
                    s.sendall(block)

        writer = asyncio.get_running_loop().run_in_executor(None, qemu_side)
        conn = await accepted.get()
        data = await _read_all(conn, timeout_every=3)
        await writer
        conn.close()
        listener.close()
        assert not (tmp_path / "to-b.sock").exists()
        return data

    data = asyncio.run(main())
    assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()


def test_reading_pauses_while_the_consumer_lags(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "q.sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen(1)
        server.setblocking(False)
        loop = asyncio.get_running_loop()
        accept = loop.create_task(loop.sock_accept(server))
        conn = await connect_qemu(path)
        peer, _ = await accept
        payload = os.urandom(qemuio.MAX_BUFFERED * 2)
        sending = loop.create_task(loop.sock_sendall(peer, payload))
        await asyncio.sleep(0.3)  # nobody reads: the agent side must stop reading
        assert conn.transport is not None and not conn.transport.is_reading()
        assert qemuio.MAX_BUFFERED <= conn._buffered < qemuio.MAX_BUFFERED + (1 << 20)
        assert not sending.done()
        got = bytearray()
        while len(got) < len(payload):
            got += await conn.read()
        await sending
        assert bytes(got) == payload

        # the other way: writes, drain, write_eof -> the peer sees everything, then EOF
        blob = os.urandom(5 << 20)
        conn.write(blob)
        conn.write(blob[:10])
        reader = loop.create_task(_recv_all(loop, peer))
        await conn.drain()
        conn.write_eof()
        assert await reader == blob + blob[:10]
        conn.close()
        peer.close()
        server.close()

    asyncio.run(main())


async def _recv_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk
    return bytes(out)


def test_connect_to_nothing_raises_as_connect_does(tmp_path: Path) -> None:
    async def main() -> None:
        try:
            await connect_qemu(tmp_path / "absent.sock")
        except FileNotFoundError:
            return
        raise AssertionError("connected to a socket that does not exist")

    asyncio.run(main())


def test_a_lost_connection_fails_drain_and_ends_reads(tmp_path: Path) -> None:
    async def main() -> None:
        left, right = socket.socketpair()
        conn = QemuConnection()
        RawTransport(asyncio.get_running_loop(), left, conn)
        right.close()
        assert await conn.read() == b""
        conn.write(b"x" * (4 << 20))  # EPIPE on the first send: the connection is lost
        await asyncio.sleep(0.05)
        try:
            await conn.drain()
        except ConnectionResetError:
            return
        raise AssertionError("drain() after the peer vanished did not fail")

    asyncio.run(main())


def test_read_parts_takes_what_is_buffered_up_to_the_limit() -> None:
    async def main() -> None:
        left, right = socket.socketpair()
        conn = QemuConnection()
        RawTransport(asyncio.get_running_loop(), left, conn)
        first = asyncio.ensure_future(conn.read_parts(1000))
        await asyncio.sleep(0.02)
        assert not first.done()  # nothing received yet: waits for the first bytes
        right.sendall(b"a" * 300)
        assert b"".join(await first) == b"a" * 300
        blob = os.urandom(3 << 20)  # several receive buffers' worth
        await asyncio.get_running_loop().run_in_executor(None, right.sendall, blob)
        while conn._buffered < len(blob):
            await asyncio.sleep(0.01)
        got = bytearray()
        while len(got) < len(blob):
            parts = await conn.read_parts(700_000)
            assert sum(map(len, parts)) == min(700_000, len(blob) - len(got))
            for part in parts:
                got += part
        assert bytes(got) == blob
        right.close()
        assert await conn.read_parts() == []
        conn.close()

    asyncio.run(main())
