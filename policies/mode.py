"""Mode detection: is the path between two agents datacenter, internet or hybrid? No I/O.

A pure function of RTT and bandwidth samples (time is passed in). The mode sets the defaults
of a migration (:func:`defaults_for`): connection count and range, congestion control,
compression, and the data path (passthrough where the link outruns encoding, encode where
encoding pays). Seed thresholds (configurable in :class:`ModeConfig`):

- datacenter: RTT < 10 ms and bandwidth > 1 Gbit/s;
- internet: RTT > 50 ms or bandwidth < 1 Gbit/s;
- hybrid: everything between.

How the samples become a mode (:class:`ThresholdModePolicy`):

- **Each sample is classified on its own**, RTT and bandwidth of the same interval together
  (combining the lowest RTT of one path with the highest bandwidth of another, as separate
  min/max filters would while the path changes, invents a mode neither path has).
- **The window decides optimistically**: over the last ``window`` samples (none older than
  ``window_s``) the most optimistic class wins (datacenter over hybrid over internet), after
  dropping the ``outliers`` most optimistic samples. Queueing only ever adds delay and an
  interval only ever loses bandwidth, so a few good samples show what the path can do; and
  one bogus sample cannot switch the mode.
- **Bandwidth** from an interval in which the sender was not backlogged (``app_limited``) is
  only a lower bound: it can show that a path is fast, never that it is slow (an idle guest
  is not a slow link).
- **RTT only** (bandwidth unknown): at session start, below ``lan_rtt_ms`` (2 ms) the path is
  a LAN, taken as datacenter (passthrough: on this test bed's veth LAN, sub-ms and
  multi-Gbit/s, passthrough wins); above ``internet_rtt_ms`` internet; else hybrid. Later,
  an RTT alone can only make the mode more pessimistic (too long for the current mode),
  never more optimistic: that needs bandwidth.
- **Hysteresis**, two kinds: leaving the current mode needs a sample ``margin`` (20 %)
  beyond the threshold, so noise around a threshold cannot flip it; and the new mode must
  win in ``switch_after`` consecutive new samples. A sustained change is followed within
  ``window + switch_after`` samples: the window forgets the old path, then the streak runs.

:class:`PathEstimate` (lowest RTT, highest bandwidth of the window) is kept in every decision
for logs and the migration record; it does not decide.

Policies are pluggable by name, like aioquic's congestion controls: :data:`MODE_POLICIES`,
:func:`get_mode_policy`, :func:`register_mode_policy`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from dwcp_migrate.errors import ConfigError


class Mode(enum.StrEnum):
    DATACENTER = "datacenter"
    HYBRID = "hybrid"
    INTERNET = "internet"


@dataclass(frozen=True)
class PathSample:
    """One measurement between two agents."""

    at: float  # seconds, on the caller's monotonic clock
    rtt_ms: float | None = None
    bandwidth_mbit: float | None = None  # goodput over an interval
    app_limited: bool = False  # sender not backlogged: bandwidth is only a lower bound

    def __post_init__(self) -> None:
        if self.rtt_ms is not None and not self.rtt_ms >= 0:
            raise ValueError(f"RTT must be >= 0 ms, got {self.rtt_ms}")
        if self.bandwidth_mbit is not None and not self.bandwidth_mbit >= 0:
            raise ValueError(f"bandwidth must be >= 0 Mbit/s, got {self.bandwidth_mbit}")


class SessionStats(Protocol):
    """What :func:`sample_from_stats` reads (``TransportStats`` of TCP and RDMA sessions)."""

    @property
    def bytes_acked(self) -> int: ...
    @property
    def elapsed_s(self) -> float: ...
    @property
    def min_rtt_ms(self) -> float | None: ...
    @property
    def tcp_rtt_ms(self) -> float | None: ...


def sample_from_stats(previous: SessionStats | None, current: SessionStats, at: float, *,
                      backlogged: bool) -> PathSample:
    """A sample from two ``stats()`` snapshots of one session (``previous`` None: RTT only).

    ``backlogged``: the sender had data waiting during the interval (otherwise the goodput is
    what the guest produced, not what the path carries).
    """
    rtts = [r for r in (current.tcp_rtt_ms, current.min_rtt_ms) if r is not None and r > 0]
    bandwidth = None
    if previous is not None and current.elapsed_s > previous.elapsed_s:
        acked = current.bytes_acked - previous.bytes_acked
        bandwidth = max(0, acked) * 8 / (current.elapsed_s - previous.elapsed_s) / 1e6
    return PathSample(at, min(rtts) if rtts else None, bandwidth, app_limited=not backlogged)


@dataclass(frozen=True)
class ModeConfig:
    datacenter_rtt_ms: float = 10.0  # datacenter: RTT below this ...
    datacenter_mbit: float = 1000.0  # ... and bandwidth above this
    internet_rtt_ms: float = 50.0  # internet: RTT above this ...
    internet_mbit: float = 1000.0  # ... or bandwidth below this
    lan_rtt_ms: float = 2.0  # bandwidth not measured: below this RTT, a LAN (datacenter)
    window: int = 10  # samples in the estimate
    window_s: float = 60.0  # and none older than this
    switch_after: int = 3  # consecutive new samples that must agree on a new mode
    margin: float = 0.2  # leaving a mode: the estimate this far (relative) past a threshold
    outliers: int = 1  # most optimistic samples the window ignores (when it has more)

    def __post_init__(self) -> None:
        if not 0 < self.lan_rtt_ms <= self.datacenter_rtt_ms <= self.internet_rtt_ms:
            raise ConfigError("mode thresholds need 0 < lan_rtt_ms <= datacenter_rtt_ms <= "
                              f"internet_rtt_ms, got {self.lan_rtt_ms}, "
                              f"{self.datacenter_rtt_ms}, {self.internet_rtt_ms}")
        if not 0 < self.internet_mbit <= self.datacenter_mbit:
            raise ConfigError("mode thresholds need 0 < internet_mbit <= datacenter_mbit, got "
                              f"{self.internet_mbit}, {self.datacenter_mbit}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"mode margin must be in [0, 1), got {self.margin}")
        if self.window < 1 or self.switch_after < 1 or self.window_s <= 0:
            raise ConfigError("mode window, window_s and switch_after must be positive")
        if self.outliers < 0:
            raise ConfigError(f"mode outliers must be >= 0, got {self.outliers}")


@dataclass(frozen=True)
class PathEstimate:
    rtt_ms: float | None  # minimum over the window (less outliers)
    bandwidth_mbit: float | None  # maximum over the window (less outliers)
    bandwidth_is_lower_bound: bool  # only app-limited samples gave it
    samples: int  # in the window


@dataclass(frozen=True)
class ModeDecision:
    mode: Mode
    reason: str
    estimate: PathEstimate
    candidate: Mode | None = None  # another mode seen, not yet for switch_after samples
    streak: int = 0  # consecutive samples that saw the candidate
    changed: bool = False  # this decision changed the mode (or is the first)
    last_sample_at: float | None = None  # the newest sample counted


class ModePolicy(Protocol):
    name: str

    def decide(self, samples: Sequence[PathSample], previous: ModeDecision | None,
               now: float) -> ModeDecision:
        """The mode after ``samples`` (oldest first), given the previous decision."""


def _best(values: list[float], outliers: int, *, highest: bool) -> float | None:
    """The best value after dropping up to ``outliers`` better ones (always keeps one)."""
    if not values:
        return None
    return sorted(values, reverse=highest)[min(outliers, len(values) - 1)]


def window_of(samples: Sequence[PathSample], now: float,
              config: ModeConfig) -> list[PathSample]:
    """The samples the estimate uses, newest first (``samples`` are oldest first)."""
    recent: list[PathSample] = []
    for sample in reversed(samples):  # from the end: a long history costs nothing
        if sample.at > now:
            continue
        if sample.at <= now - config.window_s or len(recent) == config.window:
            break
        recent.append(sample)
    return recent


def estimate(samples: Sequence[PathSample], now: float, config: ModeConfig) -> PathEstimate:
    """Lowest RTT and highest bandwidth of the window, less outliers (for the record)."""
    return _estimate(window_of(samples, now, config), config.outliers)


def _estimate(recent: Sequence[PathSample], drop: int) -> PathEstimate:
    rtt = _best([s.rtt_ms for s in recent if s.rtt_ms is not None], drop, highest=False)
    bandwidth = _best([s.bandwidth_mbit for s in recent
                       if s.bandwidth_mbit is not None and not s.app_limited], drop, highest=True)
    lower = _best([s.bandwidth_mbit for s in recent
                   if s.bandwidth_mbit is not None and s.app_limited], drop, highest=True)
    lower_bound = False
    if lower is not None and (bandwidth is None or lower > bandwidth):
        bandwidth, lower_bound = lower, bandwidth is None
    return PathEstimate(rtt, bandwidth, lower_bound, len(recent))


class _Thresholds(NamedTuple):
    lan_rtt: float
    dc_rtt: float
    dc_mbit: float
    inet_rtt: float
    inet_mbit: float


def _thresholds(config: ModeConfig, current: Mode | None) -> _Thresholds:
    """The thresholds moved by the margin so that the current mode's region grows."""
    c, up, down = config, 1 + config.margin, 1 - config.margin
    if current is Mode.DATACENTER:
        return _Thresholds(c.lan_rtt_ms * up, c.datacenter_rtt_ms * up,
                           c.datacenter_mbit * down, c.internet_rtt_ms * up,
                           c.internet_mbit * down)
    if current is Mode.INTERNET:
        return _Thresholds(c.lan_rtt_ms * down, c.datacenter_rtt_ms * down,
                           c.datacenter_mbit * up, c.internet_rtt_ms * down,
                           c.internet_mbit * up)
    if current is Mode.HYBRID:
        return _Thresholds(c.lan_rtt_ms * down, c.datacenter_rtt_ms * down,
                           c.datacenter_mbit * up, c.internet_rtt_ms * up,
                           c.internet_mbit * down)
    return _Thresholds(c.lan_rtt_ms, c.datacenter_rtt_ms, c.datacenter_mbit,
                       c.internet_rtt_ms, c.internet_mbit)


def classify(sample: PathSample, t: _Thresholds,
             current: Mode | None) -> tuple[Mode, str] | None:
    """The mode one sample shows (None: it measured nothing), with the reason."""
    rtt, bw = sample.rtt_ms, sample.bandwidth_mbit
    if bw is not None and sample.app_limited and bw <= t.dc_mbit:
        bw = None  # a slow app-limited interval says nothing about the path
    if rtt is None and bw is None:
        return None
    if rtt is not None and rtt > t.inet_rtt:
        return Mode.INTERNET, f"RTT {rtt:.1f} ms > {t.inet_rtt:g} ms"
    if bw is not None and bw < t.inet_mbit:
        return Mode.INTERNET, f"bandwidth {bw:.0f} Mbit/s < {t.inet_mbit:g} Mbit/s"
    if bw is None:
        assert rtt is not None
        if current is None:  # session start: the RTT is all there is
            if rtt < t.lan_rtt:
                return Mode.DATACENTER, (f"RTT {rtt:.2f} ms < {t.lan_rtt:g} ms with bandwidth "
                                         "not measured yet: a LAN")
            return Mode.HYBRID, f"RTT {rtt:.1f} ms with bandwidth not measured yet"
        if current is Mode.DATACENTER and rtt >= t.dc_rtt:
            return Mode.HYBRID, f"RTT {rtt:.1f} ms >= {t.dc_rtt:g} ms: too long for a datacenter"
        return current, f"RTT {rtt:.2f} ms fits {current} (bandwidth not measured)"
    if rtt is None:
        return current or Mode.HYBRID, f"bandwidth {bw:.0f} Mbit/s with RTT not measured"
    if rtt < t.dc_rtt and bw > t.dc_mbit:
        return Mode.DATACENTER, (f"RTT {rtt:.2f} ms < {t.dc_rtt:g} ms and bandwidth "
                                 f"{bw:.0f} Mbit/s > {t.dc_mbit:g} Mbit/s")
    return Mode.HYBRID, (f"RTT {rtt:.1f} ms and bandwidth {bw:.0f} Mbit/s: between datacenter "
                         "and internet")


_OPTIMISM = {Mode.DATACENTER: 2, Mode.HYBRID: 1, Mode.INTERNET: 0}


def classify_window(recent: Sequence[PathSample], t: _Thresholds, current: Mode | None,
                    outliers: int) -> tuple[Mode, str] | None:
    """The most optimistic class of the window (``recent``: newest first) after dropping up
    to ``outliers`` more optimistic ones."""
    found = [c for c in (classify(s, t, current) for s in recent) if c is not None]
    if not found:
        return None
    found.sort(key=lambda c: _OPTIMISM[c[0]], reverse=True)  # stable: newest reason first
    return found[min(outliers, len(found) - 1)]


class ThresholdModePolicy:
    """The seeds' mode detector: thresholds, a window, a margin and a streak (module doc)."""

    name = "threshold"

    def __init__(self, config: ModeConfig | None = None) -> None:
        self.config = config or ModeConfig()

    def decide(self, samples: Sequence[PathSample], previous: ModeDecision | None,
               now: float) -> ModeDecision:
        cfg = self.config
        if previous is not None and previous.last_sample_at is None:
            previous = None  # "nothing measured yet" is no mode to hold on to
        recent = window_of(samples, now, cfg)
        est = _estimate(recent, cfg.outliers)
        current = previous.mode if previous is not None else None
        raw = classify_window(recent, _thresholds(cfg, current), current, cfg.outliers)
        if raw is None:  # nothing measured: keep what we had, else hybrid (encoding is safe)
            if previous is not None:
                return previous
            return ModeDecision(Mode.HYBRID, "nothing measured yet", est, changed=True)
        mode, why = raw
        newest = recent[0].at if recent else None
        if previous is None:
            return ModeDecision(mode, why, est, changed=True, last_sample_at=newest)
        current = previous.mode
        if newest == previous.last_sample_at:  # no new sample: nothing to count
            return ModeDecision(current, previous.reason, est, previous.candidate,
                                previous.streak, False, newest)
        if mode is current:
            return ModeDecision(current, why, est, last_sample_at=newest)
        streak = previous.streak + 1 if previous.candidate is mode else 1
        if streak >= cfg.switch_after:
            return ModeDecision(mode, f"{why} ({streak} samples in a row; was {current})", est,
                                changed=True, last_sample_at=newest)
        return ModeDecision(current, f"still {current}: {why} ({streak} of "
                            f"{cfg.switch_after} samples)", est, mode, streak, False, newest)


class ModeTracker:
    """The samples and the last decision for one peer. No I/O: time comes with the samples."""

    def __init__(self, policy: ModePolicy, max_samples: int = 256) -> None:
        self.policy = policy
        self.samples: deque[PathSample] = deque(maxlen=max_samples)
        self.decision: ModeDecision | None = None

    def add(self, sample: PathSample) -> ModeDecision:
        self.samples.append(sample)
        self.decision = self.policy.decide(self.samples, self.decision, sample.at)
        return self.decision


# ---- what a mode means ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeDefaults:
    mode: Mode
    streams: int  # TCP connections at start
    min_streams: int  # range the goodput adaptation may use
    max_streams: int
    congestion_control: str | None  # TCP_CONGESTION; None: the system default
    compression: str  # pagecodec Compression.parse syntax, when encoding
    data_path: Literal["passthrough", "encode"]
    rdma: bool  # try RDMA where both agents have a device
    # What a migration's session may hold between the two QEMUs, in bytes: the destination's
    # receive window (asked for in OPEN) and the cap of the source's send window, which
    # otherwise follows the delivery rate (transports/flow.py: DeliveryWindow). All of it
    # drains after the source guest has stopped, and QEMU times its switchover by how fast
    # the source agent takes the stream, not by how fast it arrives. On the test bed's LAN the
    # consumer (the destination agent on a busy core) is the slow side and the window fills:
    # 64 MiB added up to 0.5 s to the downtime measured end to end; 8 MiB cost about 15 % of
    # a veth session's goodput (32 against 38 Gbit/s) and drains in about 20 ms at the
    # 400 MB/s the LAN relay moves here. Long paths need room for the bandwidth-delay product
    # and resends (1 Gbit/s at 50 ms is 6.25 MB); there the rate-following send window is
    # what keeps the backlog down.
    relay_window: int


_MIB = 1 << 20
_DEFAULTS = {
    # Sub-10 ms, multi-Gbit/s: the link outruns Python encoding (2-3 ms per MiB), so bytes
    # pass through untouched. CUBIC: nothing to gain from BBR's probing on a short clean path,
    # and it shares fairly with the datacenter's other (CUBIC) flows. lz4 only if encoding is
    # forced by configuration. RDMA fabrics live here. One connection to start: the session's
    # sender is one Python thread, so on a fast path more connections add per-frame work and
    # no bandwidth (veth LAN: 1 connection 0.71-0.75x an iperf3 stream, 2 about 0.6x, 4 0.5x;
    # docs/BENCHMARKS.md); the goodput adaptation steps up where more do pay (for example
    # where one flow is held to one core's receive processing).
    Mode.DATACENTER: ModeDefaults(Mode.DATACENTER, 1, 1, 8, "cubic", "lz4", "passthrough",
                                  True, 8 * _MIB),
    # Fast but long (or fast-ish and short): encode, but cheaply. Zero pages, dedup and deltas
    # are most of the win and cost little; lz4 keeps the compressor off the critical path.
    Mode.HYBRID: ModeDefaults(Mode.HYBRID, 4, 2, 16, "bbr", "lz4", "encode", False, 32 * _MIB),
    # Long or slow: every byte saved pays. zstd level 1: on the captured workload level 3
    # gave the same ratio (1.73x) at half the speed (DESIGN: 420 vs 210 MB/s per core). BBR
    # with 8 streams held 923 Mbit/s at 0.1 % loss on the test bed, where CUBIC collapses.
    Mode.INTERNET: ModeDefaults(Mode.INTERNET, 8, 2, 16, "bbr", "zstd:1", "encode", False,
                                64 * _MIB),
}


def defaults_for(mode: Mode | str) -> ModeDefaults:
    try:
        return _DEFAULTS[Mode(mode)]
    except ValueError:
        raise ConfigError(f"unknown mode {mode!r} (known: "
                          f"{', '.join(m.value for m in Mode)})") from None


def choose_data_path(configured: str, decision: ModeDecision) -> tuple[str, str]:
    """(``"encode"`` | ``"passthrough"``, reason): the configuration wins unless ``auto``."""
    if configured in ("encode", "passthrough"):
        return configured, f"codec.mode is {configured} in the configuration"
    if configured != "auto":
        raise ConfigError(f"unknown codec mode {configured!r} (auto, encode or passthrough)")
    path = defaults_for(decision.mode).data_path
    return path, f"{decision.mode} path ({decision.reason}): {path}"


# ---- the registry -----------------------------------------------------------------------------
ModePolicyFactory = Callable[[ModeConfig], ModePolicy]

MODE_POLICIES: dict[str, ModePolicyFactory] = {"threshold": ThresholdModePolicy}


def register_mode_policy(name: str, factory: ModePolicyFactory) -> None:
    MODE_POLICIES[name] = factory


def get_mode_policy(name: str = "threshold", config: ModeConfig | None = None) -> ModePolicy:
    try:
        factory = MODE_POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown mode policy {name!r} (known: "
                          f"{', '.join(sorted(MODE_POLICIES))})") from None
    return factory(config or ModeConfig())
