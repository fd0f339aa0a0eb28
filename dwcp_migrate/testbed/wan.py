"""Emulated WAN links between test hosts, and the measurements tests and benchmarks share.

The kernel of the test machines has no netem, so a WAN link is a small C forwarder
(``csrc/wanlink.c``) between two TUN devices, one in each host's namespace. Per direction it
applies random loss, a drop-tail queue drained at the link rate, then a fixed one-way delay.
The forwarder configures the devices itself (address, MTU, up) and removes them by exiting:
the TUN devices are not persistent, so a killed forwarder leaves nothing behind.

Link ``i`` between hosts A and B uses device ``wan<i>`` in both namespaces, addresses
``10.201.<i>.1/24`` (A) and ``10.201.<i>.2/24`` (B), recorded in ``host.addresses[name]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dwcp_migrate.errors import LinkError, TestbedError
from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed.netns import Host, TcpSettings
from dwcp_migrate.testbed.procs import Reaper

log = logging.getLogger(__name__)

WANLINK_SOURCE = Path(__file__).resolve().parent / "csrc" / "wanlink.c"
WAN_PREFIX = "10.201"

# The forwarder's signals (see wanlink.c): glibc's SIGRTMIN is the same number in C and Python.
SIG_STATS = signal.SIGUSR1
SIG_CUT = signal.SIGRTMIN
SIG_RESTORE = signal.SIGRTMIN + 1
SIG_CORRUPT = signal.SIGRTMIN + 2

_READY_TIMEOUT_S = 10.0
_REPLY_TIMEOUT_S = 5.0


# ---- building --------------------------------------------------------------------------
def build_wanlink(out_dir: Path, *, force: bool = False) -> Path:
    """Compile the forwarder into ``out_dir/wanlink`` unless it is newer than its source."""
    out = out_dir / "wanlink"
    if (not force and out.exists()
            and out.stat().st_mtime >= WANLINK_SOURCE.stat().st_mtime):
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LinkError("gcc is not installed, cannot build the WAN forwarder: "
                        "run scripts/setup.sh")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name, then rename: a parallel test never runs a half-written file.
    tmp = out_dir / f".wanlink.{os.getpid()}.tmp"
    argv = [gcc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(tmp), str(WANLINK_SOURCE),
            "-lm"]
    res = subprocess.run(argv, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise LinkError(f"building the WAN forwarder failed: {' '.join(argv)}\n"
                        f"{res.stderr.strip()}")
    tmp.replace(out)
    return out


def wanlink_binary() -> Path:
    """The forwarder in the project's build directory, built on first use."""
    return build_wanlink(build_dir())


# ---- link specification ----------------------------------------------------------------
@dataclass(frozen=True)
class WanSpec:
    """What a WAN link emulates. Every figure applies to each direction independently.

    ``one_way_delay_ms`` is the delay of one direction, so the round-trip time is twice it
    (use :meth:`from_rtt` to give the RTT). ``loss`` is a fraction (0.001 = 0.1 %) of the
    packets of each direction. ``queue_bytes`` is the drop-tail queue in front of the
    bottleneck; ``None`` means one bandwidth-delay product (rate x RTT), at least 32 packets.
    """

    one_way_delay_ms: float
    rate_mbit: float
    loss: float = 0.0
    queue_bytes: int | None = None
    mtu: int = 1500

    def __post_init__(self) -> None:
        # Same bounds as the forwarder's own checks, so errors surface before anything starts.
        def bad(what: str) -> LinkError:
            return LinkError(f"invalid WanSpec: {what} ({self})")

        for name in ("one_way_delay_ms", "rate_mbit", "loss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise bad(f"{name} must be a finite number")
        if not 0 <= self.one_way_delay_ms <= 10_000:
            raise bad("one_way_delay_ms must be within 0..10000")
        if not 0.01 <= self.rate_mbit <= 100_000:
            raise bad("rate_mbit must be within 0.01..100000")
        if not 0 <= self.loss <= 1:
            raise bad("loss is a fraction within 0..1 (0.001 = 0.1 %)")
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) \
                or not 576 <= self.mtu <= 65535:
            raise bad("mtu must be an integer within 576..65535")
        if self.queue_bytes is not None and (
                isinstance(self.queue_bytes, bool) or not isinstance(self.queue_bytes, int)
                or not self.mtu <= self.queue_bytes <= 1 << 30):
            raise bad("queue_bytes must be None or an integer from mtu to 1 GiB")

    @classmethod
    def from_rtt(cls, rtt_ms: float, rate_mbit: float, loss: float = 0.0,
                 queue_bytes: int | None = None, mtu: int = 1500) -> WanSpec:
        return cls(rtt_ms / 2, rate_mbit, loss, queue_bytes, mtu)

    @property
    def rtt_ms(self) -> float:
        return 2 * self.one_way_delay_ms

    @property
    def bdp_bytes(self) -> int:
        return int(self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1e3)

    @property
    def queue_limit_bytes(self) -> int:
        """The queue the forwarder will use (the same rule as its default)."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(self.bdp_bytes, 32 * self.mtu)

    def tcp_settings(self, congestion_control: str | None = None) -> TcpSettings:
        """TCP buffers large enough to fill this link with one stream.

        A full drop-tail queue doubles the RTT, so a sender may need the BDP plus the queue in
        flight, and autotuning wants about twice that in the buffer. Never below 6 MiB (Debian's
        receive maximum). Only the per-namespace sysctls: ``net.core.[rw]mem_max`` cannot be set
        inside a network namespace, and autotuning does not need them.
        """
        need = 2 * (self.bdp_bytes + self.queue_limit_bytes)
        size = max(6 * 1024 * 1024, 1 << max(0, need - 1).bit_length())
        return TcpSettings(congestion_control=congestion_control,
                           tcp_rmem=(4096, 131072, size), tcp_wmem=(4096, 16384, size))

    def argv(self) -> list[str]:
        return ["--delay-ms", repr(float(self.one_way_delay_ms)),
                "--rate-mbit", repr(float(self.rate_mbit)),
                "--loss", repr(float(self.loss)),
                "--queue-bytes", str(self.queue_limit_bytes),
                "--mtu", str(self.mtu)]


# ---- counters --------------------------------------------------------------------------
@dataclass(frozen=True)
class DirectionCounters:
    fwd_pkts: int
    fwd_bytes: int
    drop_loss: int
    drop_queue: int
    drop_ring: int  # the ring was full: should stay 0 (it is sized for queue + delay line)
    drop_cut: int
    write_err: int
    max_backlog: int  # largest queue seen, bytes
    corrupted: int  # segments given a flipped payload byte on request (corrupt_next)

    @property
    def arrived(self) -> int:
        """Packets that entered this direction (forwarded, dropped, or still in flight)."""
        return self.fwd_pkts + self.drop_loss + self.drop_queue + self.drop_ring + self.drop_cut


@dataclass(frozen=True)
class WanCounters:
    """Counters since the forwarder started; ``ab`` is A to B (a restart resets them)."""

    ab: DirectionCounters
    ba: DirectionCounters
    cut: bool


def _parse_counters(line: str) -> WanCounters:
    values = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
    names = [f.name for f in fields(DirectionCounters)]
    try:
        ab, ba = (DirectionCounters(**{n: int(values[f"{d}_{n}"]) for n in names})
                  for d in ("ab", "ba"))
        return WanCounters(ab, ba, values["cut"] == "1")
    except (KeyError, ValueError) as exc:
        raise LinkError(f"cannot parse the forwarder's counters: {line!r}") from exc


# ---- the link --------------------------------------------------------------------------
class WanLink:
    """An emulated WAN link between hosts ``a`` and ``b``, started at construction.

    The forwarder runs in the root namespace (it enters each host's namespace only to create
    the devices), spawned through the reaper so teardown ends it by PID.
    """

    def __init__(self, reaper: Reaper, a: Host, b: Host, spec: WanSpec, *, index: int = 0,
                 name: str | None = None, binary: Path | None = None,
                 seed: int | None = None) -> None:
        if not 0 <= index <= 255:
            raise LinkError(f"WAN link index must be within 0..255, got {index}")
        if a.netns == b.netns:
            raise LinkError(f"a WAN link needs two different hosts, got {a.name} twice")
        self.reaper = reaper
        self.a, self.b = a, b
        self.index = index
        self.name = name or ("wan" if index == 0 else f"wan{index}")
        self.device = f"wan{index}"
        self.spec = spec
        self.seed = seed
        self.address_a = f"{WAN_PREFIX}.{index}.1"
        self.address_b = f"{WAN_PREFIX}.{index}.2"
        self.log_path = reaper.state_dir / f"wanlink-{index}.log"
        self._binary = binary or wanlink_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where the current forwarder's output starts in the log
        self._seq = 0  # last event number read from the current forwarder
        self._restore_timer: threading.Timer | None = None
        self._lock = threading.Lock()  # a cut's timer thread and the caller both signal
        self.start()

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start the forwarder; a no-op while it runs (the constructor has started it)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        argv = [str(self._binary), "--ns-a", self.a.netns, "--ns-b", self.b.netns,
                "--dev", self.device, "--addr-a", f"{self.address_a}/24",
                "--addr-b", f"{self.address_b}/24", *self.spec.argv()]
        if self.seed is not None:
            argv += ["--seed", str(self.seed)]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._seq = 0
        with self.log_path.open("ab") as logfile:
            try:
                self._proc = self.reaper.spawn(argv, name=f"wanlink-{self.name}", stderr=logfile)
            except TestbedError as exc:
                raise LinkError(f"cannot start the WAN forwarder: {exc}") from exc
        self._wait_for(lambda line: line.startswith("wanlink: ready"), _READY_TIMEOUT_S,
                       "to come up")
        self.a.addresses[self.name] = self.address_a
        self.b.addresses[self.name] = self.address_b

    def stop(self) -> WanCounters | None:
        """End the forwarder (the devices vanish with it); returns its final counters."""
        self._cancel_timer()
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.returncode != 0:  # it crashed earlier, or ignored SIGTERM: say so
            raise LinkError(f"the WAN forwarder of link {self.name} ended with status "
                            f"{proc.returncode}{self._log_tail()}")
        final = [line for line in self._new_lines() if line.startswith("wanlink: final")]
        return _parse_counters(final[-1]) if final else None

    def set_spec(self, spec: WanSpec) -> None:
        """Change delay, rate, loss or queue by restarting the forwarder.

        Packets in flight are lost and the devices are re-created (TCP connections survive as
        they would a short outage); the counters start again from zero and a cut link is up.
        """
        self.stop()
        self.spec = spec
        self.start()

    # ---- cutting the link --------------------------------------------------------------
    @property
    def is_down(self) -> bool:
        return self.counters().cut

    def down(self) -> None:
        """Cut the link: everything queued, in flight or arriving is dropped until up()."""
        self._cancel_timer()
        self._event(SIG_CUT, "wanlink: link cut")

    def up(self) -> None:
        self._cancel_timer()
        self._event(SIG_RESTORE, "wanlink: link restored")

    def corrupt_next(self) -> None:
        """Flip a payload byte of the next A-to-B TCP segment (64+ bytes of payload) and fix
        its TCP checksum: TCP delivers the damage, only a check above TCP can catch it."""
        self._event(SIG_CORRUPT, "wanlink: corrupt armed")

    def cut(self, seconds: float, *, wait: bool = True) -> None:
        """Cut the link for ``seconds``; with ``wait=False`` return at once (restore later)."""
        if seconds < 0:
            raise LinkError(f"cut duration must be >= 0, got {seconds}")
        self.down()
        if wait:
            time.sleep(seconds)
            self.up()
            return
        timer = threading.Timer(seconds, self._timed_restore)
        timer.daemon = True
        self._restore_timer = timer
        timer.start()

    def _timed_restore(self) -> None:
        with contextlib.suppress(LinkError):  # the link may have been stopped meanwhile
            self._event(SIG_RESTORE, "wanlink: link restored")

    def _cancel_timer(self) -> None:
        timer, self._restore_timer = self._restore_timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    # ---- observing ---------------------------------------------------------------------
    def counters(self) -> WanCounters:
        line = self._event(SIG_STATS, "wanlink: stats")
        return _parse_counters(line)

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds the forwarder has used so far.

        Writing a packet into a TUN device runs the receiving namespace's stack (TCP receive,
        ACKs, the sender's reaction to ACKs) in the writing thread, so most of it is system time.
        """
        proc = self._require_running()
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        ticks = stat[stat.rfind(")") + 2:].split()
        hz = os.sysconf("SC_CLK_TCK")
        return int(ticks[11]) / hz, int(ticks[12]) / hz

    def cpu_seconds(self) -> float:
        """User + system CPU time the forwarder has used so far."""
        return sum(self.cpu_times())

    def address(self, host: Host) -> str:
        if host.netns == self.a.netns:
            return self.address_a
        if host.netns == self.b.netns:
            return self.address_b
        raise LinkError(f"host {host.name} is not an end of WAN link {self.name}")

    def peer_address(self, host: Host) -> str:
        """The address ``host`` reaches the other end of this link at."""
        mine = self.address(host)
        return self.address_b if mine == self.address_a else self.address_a

    # ---- talking to the forwarder ------------------------------------------------------
    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise LinkError(f"the forwarder of WAN link {self.name} is not running"
                            f"{self._log_tail()}")
        return proc

    def _event(self, sig: int, prefix: str) -> str:
        """Send ``sig``; return the forwarder's answer (a line with a newer ``seq``)."""
        with self._lock:
            proc = self._require_running()
            seq = self._seq
            proc.send_signal(sig)

            def answered(line: str) -> bool:
                found = re.search(r"\bseq=(\d+)", line)
                return line.startswith(prefix) and found is not None \
                    and int(found.group(1)) > seq

            line = self._wait_for(answered, _REPLY_TIMEOUT_S, f"to answer {prefix!r}")
            found = re.search(r"\bseq=(\d+)", line)
            assert found is not None
            self._seq = int(found.group(1))
            return line

    def _new_lines(self) -> list[str]:
        try:
            with self.log_path.open("rb") as logfile:
                logfile.seek(self._log_offset)
                data = logfile.read()
        except FileNotFoundError:
            return []
        # Only complete lines: the forwarder may be half way through writing one.
        return data[: data.rfind(b"\n") + 1].decode(errors="replace").splitlines()

    def _wait_for(self, match: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in reversed(self._new_lines()):
                if match(line):
                    return line
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc else None
                raise LinkError(f"the WAN forwarder of link {self.name} exited (status {code}) "
                                f"instead of {what.removeprefix('to ')}{self._log_tail()}")
            if time.monotonic() > deadline:
                raise LinkError(f"the WAN forwarder of link {self.name} did not manage {what} "
                                f"within {timeout} s{self._log_tail()}")
            time.sleep(0.01)

    def _log_tail(self) -> str:
        lines = self._new_lines()[-5:]
        return (":\n" + "\n".join(lines)) if lines else ""


# ---- measurements ----------------------------------------------------------------------
@dataclass(frozen=True)
class PingStats:
    sent: int
    received: int
    min_ms: float | None
    avg_ms: float | None
    max_ms: float | None
    mdev_ms: float | None

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 0.0


def ping(src: Host, dst_addr: str, count: int, *, interval_s: float = 0.2,
         size: int = 56) -> PingStats:
    """Ping ``dst_addr`` from inside ``src``'s namespace; lost replies are counted, not raised."""
    if count < 1:
        raise LinkError(f"ping count must be >= 1, got {count}")
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval_s:g}", "-s", str(size),
            "-W", "2", dst_addr]
    try:
        res = src.run(argv, check=False, timeout=count * interval_s + 30)
    except TestbedError as exc:
        raise LinkError(f"ping from {src.name} failed: {exc}") from exc
    counts = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", res.stdout)
    if counts is None:
        raise LinkError(f"ping from {src.name} to {dst_addr} failed ({res.returncode}): "
                        f"{(res.stderr or res.stdout).strip()}")
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", res.stdout)
    mn, avg, mx, mdev = (float(g) for g in rtt.groups()) if rtt else (None,) * 4
    return PingStats(int(counts.group(1)), int(counts.group(2)), mn, avg, mx, mdev)


def measure_rtt_ms(src_host: Host, dst_addr: str, count: int = 10, *,
                   interval_s: float = 0.1) -> float:
    """Average round-trip time of ``count`` pings; LinkError if none came back."""
    stats = ping(src_host, dst_addr, count, interval_s=interval_s)
    if stats.avg_ms is None:
        raise LinkError(f"no ping reply from {dst_addr} to {src_host.name} "
                        f"({stats.sent} sent)")
    return stats.avg_ms


@dataclass(frozen=True)
class GoodputResult:
    mbit_s: float  # received by the server, excluding the omitted warm-up
    sent_mbit_s: float
    retransmits: int
    streams: int
    seconds: int
    congestion_control: str | None
    sender_cpu_percent: float  # iperf3's own figure for its process, all cores
    receiver_cpu_percent: float


def run_iperf3(reaper: Reaper, src: Host, dst: Host, *, dst_addr: str | None = None,
               link: str = "wan", streams: int = 1, seconds: int = 10,
               omit_s: int = 2, congestion_control: str | None = None,
               port: int = 5201) -> GoodputResult:
    """A TCP transfer from ``src`` to ``dst`` with iperf3 (server in ``dst``, tracked)."""
    # Whole seconds: iperf3 reads -t and -O with atoi, and "-t 0.5" would mean "forever".
    if not all(isinstance(v, int) for v in (streams, seconds, omit_s)) \
            or streams < 1 or seconds < 1 or omit_s < 0:
        raise LinkError(f"iperf3: need integers streams >= 1, seconds >= 1, omit_s >= 0 "
                        f"(got {streams!r}, {seconds!r}, {omit_s!r})")
    if shutil.which("iperf3") is None:
        raise LinkError("iperf3 is not installed: run scripts/setup.sh")
    addr = dst_addr or dst.addresses.get(link)
    if addr is None:
        raise LinkError(f"host {dst.name} has no address on link {link!r}")
    server = _start_iperf3_server(reaper, dst, port)
    try:
        argv = ["iperf3", "-c", addr, "-p", str(port), "-P", str(streams),
                "-t", str(seconds), "-O", str(omit_s), "-J"]
        if congestion_control:
            argv += ["-C", congestion_control]
        try:
            res = src.run(argv, check=False, timeout=seconds + omit_s + 60)
        except TestbedError as exc:
            raise LinkError(f"iperf3 from {src.name} to {addr}: {exc}") from exc
        try:
            report: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise LinkError(f"iperf3 from {src.name} to {addr} gave no report "
                            f"({res.returncode}): {res.stderr.strip()}") from exc
        if "error" in report:
            raise LinkError(f"iperf3 from {src.name} to {addr}: {report['error']}")
        end = report["end"]
        cpu = end.get("cpu_utilization_percent", {})
        return GoodputResult(
            mbit_s=end["sum_received"]["bits_per_second"] / 1e6,
            sent_mbit_s=end["sum_sent"]["bits_per_second"] / 1e6,
            retransmits=int(end["sum_sent"].get("retransmits", 0)),
            streams=streams, seconds=seconds, congestion_control=congestion_control,
            sender_cpu_percent=float(cpu.get("host_total", 0.0)),
            receiver_cpu_percent=float(cpu.get("remote_total", 0.0)),
        )
    finally:
        if server.poll() is None:  # -1 makes it exit after one test; not after a failed one
            server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=5)


def measure_goodput(src: Host, dst: Host, streams: int, seconds: int,
                    congestion_control: str | None = None, *, reaper: Reaper,
                    omit_s: int = 2, link: str = "wan") -> float:
    """Goodput in Mbit/s of ``streams`` TCP streams from ``src`` to ``dst`` over ``link``.

    ``reaper`` tracks the iperf3 server; ``congestion_control`` None keeps the host default.
    """
    return run_iperf3(reaper, src, dst, link=link, streams=streams, seconds=seconds,
                      omit_s=omit_s, congestion_control=congestion_control).mbit_s


def _start_iperf3_server(reaper: Reaper, host: Host, port: int,
                         attempts: int = 3) -> subprocess.Popen[bytes]:
    """A one-test iperf3 server in ``host``, listening when this returns.

    Retried: one bench run saw a fresh server exit (status 255) before listening, right after
    the previous test's server had exited on the same port; it did not reproduce in isolation.
    """
    log_path = reaper.state_dir / f"iperf3-server-{host.name}-{port}.log"
    for attempt in range(1, attempts + 1):
        with log_path.open("wb") as logfile:
            server = reaper.spawn(["iperf3", "-s", "-1", "-p", str(port)],
                                  name="iperf3-server", netns=host.netns, stdout=logfile,
                                  stderr=subprocess.STDOUT)
        try:
            _wait_listening(host, port, server, log_path)
            return server
        except LinkError as exc:
            log.warning("iperf3 server, attempt %d of %d: %s", attempt, attempts, exc)
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=5)
            if attempt == attempts:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _wait_listening(host: Host, port: int, server: subprocess.Popen[bytes], log_path: Path,
                    timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        res = host.run(["ss", "-H", "-t", "-l", "-n", f"sport = :{port}"], check=False)
        if res.stdout.strip():
            return
        if server.poll() is not None:
            output = log_path.read_text(errors="replace").strip()
            raise LinkError(f"iperf3 server in {host.name} exited ({server.returncode}) "
                            f"before listening on port {port}: {output}")
        if time.monotonic() > deadline:
            raise LinkError(f"iperf3 server in {host.name} not listening after {timeout} s")
        time.sleep(0.02)
