"""Per-socket TCP tuning for AMST connections, and reading the kernel's view of a socket.

What is set, and why:

- ``TCP_CONGESTION`` (bbr by default): on a lossy long path BBR keeps its rate where CUBIC
  halves at every loss (TESTBED: 0.1 % loss, 8 cubic streams 139 Mbit/s, 8 bbr 923). A
  namespace or host may not allow it (``net.ipv4.tcp_allowed_congestion_control``); then the
  socket keeps the system default and a WARNING says so and how to allow it.
- ``SO_MAX_PACING_RATE`` (optional): caps each connection at its share of a configured rate,
  to leave room for others on a shared link. Linux paces in TCP itself, no fq qdisc needed.
- ``TCP_NOTSENT_LOWAT``: keeps at most this many not-yet-sent bytes in a socket. The driver
  hands a frame to whichever connection has room, so a connection that slows down (a loss,
  a backoff) does not hoard frames in its kernel buffer while the receiver waits for them.
- ``TCP_NODELAY``: ACK and PING frames are small and must not wait for Nagle.
- ``TCP_USER_TIMEOUT``: a connection whose sent data stays unacknowledged this long is
  declared dead by the kernel, so failover starts; a short cut (a second) is survived.
- ``SO_SNDBUF``/``SO_RCVBUF``: only when ``buffer_bytes`` is given. Setting them turns off the
  kernel's autotuning and Linux caps them at ``net.core.wmem_max``/``rmem_max``; see
  docs/BENCHMARKS.md (bench_transport) for the measurement behind the default (autotuning).
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, overload

log = logging.getLogger(__name__)

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux; not in Python 3.11
_TCP_INFO_LEN = 104  # up to and including tcpi_total_retrans
_warned: set[tuple[str, str]] = set()


class SocketLike(Protocol):
    """A socket, or the ``asyncio.trsock.TransportSocket`` a transport hands out."""

    def setsockopt(self, level: int, optname: int, value: int | bytes, /) -> None: ...

    @overload
    def getsockopt(self, level: int, optname: int, /) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def fileno(self) -> int: ...


@dataclass(frozen=True)
class TcpOptions:
    congestion_control: str | None = "bbr"  # None: keep the system default
    pacing_rate: float | None = None  # bytes/s for the whole session (split per connection)
    buffer_bytes: int | None = None  # SO_SNDBUF/SO_RCVBUF per socket; None: autotuning
    notsent_lowat: int | None = 512 * 1024
    user_timeout: float | None = 10.0  # seconds; None: the kernel default (minutes)
    nodelay: bool = True

    def bdp_buffer(self, rate_bytes_s: float, rtt_s: float, streams: int) -> int:
        """A per-socket buffer for ``streams`` connections filling ``rate`` at ``rtt``: twice
        each one's share of the bandwidth-delay product (a full queue may double the RTT)."""
        return max(256 * 1024, int(2 * rate_bytes_s * rtt_s / max(1, streams)))


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
    except OSError:
        return "?"


def _warn_once(key: tuple[str, str], msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def congestion_control(sock: SocketLike) -> str:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def apply_before_connect(sock: SocketLike, opts: TcpOptions) -> None:
    """Options that must be set before the handshake (window scaling follows SO_RCVBUF)."""
    if opts.buffer_bytes:
        for opt, limit in ((socket.SO_SNDBUF, "net.core.wmem_max"),
                           (socket.SO_RCVBUF, "net.core.rmem_max")):
            sock.setsockopt(socket.SOL_SOCKET, opt, opts.buffer_bytes)
            got = sock.getsockopt(socket.SOL_SOCKET, opt) // 2  # Linux reports it doubled
            if got < opts.buffer_bytes:
                _warn_once(("buf", limit), "socket buffer capped at %d bytes by %s (%s), %d "
                           "asked: raise it, or leave buffer_bytes unset for autotuning",
                           got, limit, _sysctl(limit), opts.buffer_bytes)
    apply_after_connect(sock, opts, streams=1, quiet=True)


def apply_after_connect(sock: SocketLike, opts: TcpOptions, *, streams: int,
                        quiet: bool = False) -> str:
    """Tune a connected (or listening) socket; returns the congestion control in use."""
    if opts.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if opts.notsent_lowat:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, opts.notsent_lowat)
    if opts.user_timeout:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        int(opts.user_timeout * 1000))
    if opts.pacing_rate:
        per = int(opts.pacing_rate / max(1, streams))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, min(per, 0xFFFF_FFFF))
        except OSError as exc:
            _warn_once(("pacing", str(exc.errno)), "cannot pace connections (SO_MAX_PACING_RATE:"
                       " %s): sending unpaced", exc)
    if opts.congestion_control:
        want = opts.congestion_control
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, want.encode())
        except OSError as exc:
            if not quiet:
                _warn_once(("cc", want), "congestion control %s unavailable (%s): using the "
                           "system default %s. Available: %s; allowed: %s. Load it (modprobe "
                           "tcp_%s) and allow it with sysctl "
                           "net.ipv4.tcp_allowed_congestion_control", want, exc.strerror,
                           congestion_control(sock),
                           _sysctl("net.ipv4.tcp_available_congestion_control"),
                           _sysctl("net.ipv4.tcp_allowed_congestion_control"), want)
    return congestion_control(sock)


@dataclass(frozen=True)
class TcpInfo:
    rtt_ms: float
    cwnd: int
    total_retrans: int


def tcp_info(sock: SocketLike) -> TcpInfo | None:
    """The kernel's RTT estimate, congestion window and retransmitted segments of a socket."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    rtt_us, = struct.unpack_from("I", raw, 68)
    cwnd, = struct.unpack_from("I", raw, 80)
    total_retrans, = struct.unpack_from("I", raw, 100)
    return TcpInfo(rtt_us / 1000, cwnd, total_retrans)
