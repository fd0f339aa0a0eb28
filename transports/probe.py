"""A transfer tool for tests and benchmarks: ``python -m dwcp_migrate.transports.probe``.

``serve`` accepts AMST sessions and reads each to its end (sha256 and byte count);
``send`` opens a session and sends a deterministic stream (a byte count, or for a duration with
a warm-up that is not measured), optionally resetting random connections while it runs
(``--kill-every``: SO_LINGER 0 then close, so the peer sees a RST). Both print one JSON line per
result. ``plain-serve``/``plain-send`` do the same over one plain TCP socket, as a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import socket
import struct
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dwcp_migrate.transports.session import SessionConfig
from dwcp_migrate.transports.sockopts import TcpOptions
from dwcp_migrate.transports.tcp import (
    TcpSession,
    TransportConfig,
    connect_session,
)
from dwcp_migrate.transports.tcp_server import SessionServer
from dwcp_migrate.transports.tls import TlsConfig, TransportSecurity

BLOCK = 1_000_003  # not a multiple of the frame size: sends are cut across frames


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Pattern:
    """Blocks of pseudo-random bytes, each different (its index in its first 8 bytes)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.pool = [rng.randbytes(BLOCK) for _ in range(4)]
        self.index = 0

    def next(self, unique: bool = True) -> bytes:
        """The next block; ``unique=False`` skips numbering it and returns the same block every
        time, for benchmarks: iperf3 and a plain socket loop send one buffer over and over too,
        so all of them read their source from the CPU cache (four blocks in turn, 4 MiB, do
        not stay in a 2 MiB L2: the session then ran about 7 % slower on the LAN)."""
        i = self.index
        self.index += 1
        if not unique:
            return self.pool[0]
        return struct.pack("!Q", i) + self.pool[i % 4][8:]


def _config(args: argparse.Namespace) -> TransportConfig:
    if args.tls:
        d = Path(args.tls)
        security = TransportSecurity(tls=TlsConfig(d / f"{args.name}.pem", d / f"{args.name}.key",
                                                   d / "ca.pem"))
    else:
        security = TransportSecurity(plaintext=True)
    tcp = TcpOptions(congestion_control=args.cc or None, buffer_bytes=args.buffer or None,
                     user_timeout=args.user_timeout or None, notsent_lowat=args.lowat or None,
                     pacing_rate=args.pacing * 1e6 / 8 if args.pacing else None)
    session = SessionConfig(max_payload=args.frame, send_window=args.window << 20,
                            recv_window=args.window << 20)
    return TransportConfig(security=security, session=session, tcp=tcp,
                           reconnect_timeout=args.reconnect_timeout)


def _stats(session: TcpSession) -> dict[str, Any]:
    return asdict(session.stats())


async def serve(args: argparse.Namespace) -> None:
    server = SessionServer(name=args.name, config=_config(args))
    host, port = args.listen.rsplit(":", 1)
    await server.start(host, int(port))
    _emit({"event": "ready", "port": server.port})
    for _ in range(args.sessions):
        session = await server.accept()
        digest, count, t0 = hashlib.sha256(), 0, time.monotonic()
        try:
            while chunk := await session.recv_view():
                if args.hash:
                    digest.update(chunk)
                count += len(chunk)
            await session.close()
            _emit({"event": "received", "bytes": count, "sha256": digest.hexdigest(),
                   "elapsed_s": time.monotonic() - t0, "stats": _stats(session)})
        except Exception as exc:
            _emit({"event": "error", "error": f"{type(exc).__name__}: {exc}", "bytes": count})
    await server.close()


async def _chaos(session: TcpSession, every: float, rng: random.Random,
                 kills: list[int]) -> None:
    """Reset a random connection every ``every`` seconds on average, counting in ``kills``."""
    while True:
        await asyncio.sleep(rng.expovariate(1 / every))
        conns = [c for c in session._conns.values() if c.sock is not None and not c.closed]
        if not conns:
            continue
        conn = rng.choice(conns)
        assert conn.sock is not None
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close(abort=True)  # with linger 0: a RST, and both sides lose what was in flight
        kills[0] += 1


async def send(args: argparse.Namespace) -> None:
    host, port = args.connect.rsplit(":", 1)
    session = await connect_session((host, int(port)), args.streams, name=args.name,
                                    peer_name=args.peer, config=_config(args))
    pattern = Pattern(args.seed)
    digest, sent = hashlib.sha256(), 0
    chaos, kills = None, [0]
    if args.kill_every:
        chaos = asyncio.create_task(_chaos(session, args.kill_every, random.Random(args.seed),
                                           kills))
    t0 = time.monotonic()
    window: tuple[float, int] | None = None
    measured: dict[str, float] = {}
    while True:
        now = time.monotonic() - t0
        if args.seconds:
            if window is None and now >= args.omit:
                window = (time.monotonic(), session.stats().bytes_acked)
            if now >= args.omit + args.seconds:
                assert window is not None
                acked = session.stats().bytes_acked
                measured = {"goodput_mbit_s": (acked - window[1]) * 8 / 1e6 /
                            (time.monotonic() - window[0])}
                break
        elif sent >= args.bytes:
            break  # resets go on during close: it must survive them too
        block = pattern.next(unique=args.hash)
        if not args.seconds:
            block = block[:args.bytes - sent]
        if args.hash:
            digest.update(block)
        await session.send(block)
        sent += len(block)
    await session.close()
    elapsed = time.monotonic() - t0
    if chaos is not None:
        chaos.cancel()
    _emit({"event": "sent", "bytes": sent, "sha256": digest.hexdigest(), "elapsed_s": elapsed,
           "kills": kills[0], **measured, "stats": _stats(session)})


def plain_serve(args: argparse.Namespace) -> None:
    """One plain TCP stream, received; goodput measured here, after ``--omit`` seconds."""
    host, port = args.listen.rsplit(":", 1)
    lsock = socket.create_server((host, int(port)))
    _emit({"event": "ready", "port": lsock.getsockname()[1]})
    conn, _ = lsock.accept()
    buf = memoryview(bytearray(1 << 20))
    count, t0, mark = 0, 0.0, None
    while n := conn.recv_into(buf):
        if not count:
            t0 = time.monotonic()
        count += n
        if mark is None and time.monotonic() - t0 >= args.omit:
            mark = (time.monotonic(), count)
    end = time.monotonic()
    rate = (count - mark[1]) * 8 / 1e6 / (end - mark[0]) if mark else 0.0
    _emit({"event": "received", "bytes": count, "goodput_mbit_s": rate})


def plain_send(args: argparse.Namespace) -> None:
    host, port = args.connect.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    if args.cc:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    block = random.Random(args.seed).randbytes(1 << 20)
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < args.omit + args.seconds:
        sock.sendall(block)
        sent += len(block)
    sock.close()
    _emit({"event": "sent", "bytes": sent})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dwcp_migrate.transports.probe")
    parser.add_argument("mode", choices=["serve", "send", "plain-serve", "plain-send"])
    parser.add_argument("--listen", default="0.0.0.0:0")
    parser.add_argument("--connect", default="")
    parser.add_argument("--name", default=None, help="this agent (default: b serving, a sending)")
    parser.add_argument("--peer", default=None, help="the agent name expected (TLS)")
    parser.add_argument("--tls", default=None, help="directory made by `dwcp certs`")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--bytes", type=int, default=64 << 20)
    parser.add_argument("--seconds", type=float, default=0, help="send for this long instead")
    parser.add_argument("--omit", type=float, default=2, help="warm-up not measured, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hash", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cc", default="bbr")
    parser.add_argument("--buffer", type=int, default=0, help="SO_SNDBUF/SO_RCVBUF bytes")
    parser.add_argument("--lowat", type=int, default=512 * 1024)
    parser.add_argument("--pacing", type=float, default=0, help="Mbit/s for the session")
    parser.add_argument("--user-timeout", type=float, default=10.0)
    parser.add_argument("--reconnect-timeout", type=float, default=60.0)
    parser.add_argument("--frame", type=int, default=1 << 20)
    parser.add_argument("--window", type=int, default=64, help="MiB")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--kill-every", type=float, default=0, help="mean seconds between RSTs")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.name = args.name or ("b" if args.mode.endswith("serve") else "a")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mode == "plain-serve":
        plain_serve(args)
    elif args.mode == "plain-send":
        plain_send(args)
    else:
        asyncio.run(serve(args) if args.mode == "serve" else send(args))


if __name__ == "__main__":
    main()
