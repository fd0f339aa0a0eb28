"""Mode detection (policies/mode.py): seed thresholds, hysteresis, defaults, the registry.

Hypothesis drives the hysteresis properties: noise around any threshold (within the margin)
never changes an established mode; one outlier of any value never does either; a sustained
change of path is followed within ``window + switch_after`` samples and then held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_migrate.errors import ConfigError
from dwcp_migrate.pagecodec import Compression
from dwcp_migrate.policies.mode import (
    MODE_POLICIES,
    Mode,
    ModeConfig,
    ModeDecision,
    ModeTracker,
    PathSample,
    ThresholdModePolicy,
    choose_data_path,
    defaults_for,
    get_mode_policy,
    register_mode_policy,
    sample_from_stats,
)
from dwcp_migrate.transports.tcp import TransportStats

DC, HY, NET = Mode.DATACENTER, Mode.HYBRID, Mode.INTERNET


def _first(rtt: float | None, bw: float | None = None, *, app_limited: bool = False,
           config: ModeConfig | None = None) -> Mode:
    policy = ThresholdModePolicy(config)
    return policy.decide([PathSample(0.0, rtt, bw, app_limited)], None, 0.0).mode


def _modes(config: ModeConfig, samples: Sequence[tuple[float | None, float | None]]
           ) -> list[Mode]:
    """The mode after each sample, one second apart."""
    tracker = ModeTracker(ThresholdModePolicy(config))
    return [tracker.add(PathSample(float(i), rtt, bw)).mode
            for i, (rtt, bw) in enumerate(samples)]


# ---- seed thresholds ----------------------------------------------------------------------------
@pytest.mark.parametrize(("rtt", "bw", "mode"), [
    (0.05, 20_000, DC),  # the test bed's veth LAN: sub-ms, multi-Gbit/s
    (9.9, 1001, DC),
    (10.0, 5000, HY),  # not < 10 ms
    (20, 5000, HY),
    (50, 5000, HY),  # not > 50 ms
    (50.3, 940, NET),  # the test bed's WAN: 50 ms, 1 Gbit/s link (about 940 of goodput)
    (51, 5000, NET),
    (1, 999, NET),  # < 1 Gbit/s: internet whatever the RTT
    (1, 1000, HY),  # neither > 1 Gbit/s nor < 1 Gbit/s
])
def test_seed_thresholds(rtt: float, bw: float, mode: Mode) -> None:
    assert _first(rtt, bw) is mode


@pytest.mark.parametrize(("rtt", "mode"), [
    (0.05, DC), (1.9, DC),  # a LAN: passthrough before anything is measured
    (2.0, HY), (9, HY), (49, HY),
    (50.5, NET),
])
def test_rtt_only_at_session_start(rtt: float, mode: Mode) -> None:
    assert _first(rtt) is mode


def test_first_decision_picks_the_data_path_of_the_test_bed() -> None:
    policy = get_mode_policy()
    lan = policy.decide([PathSample(0.0, rtt_ms=0.08)], None, 0.0)
    wan = policy.decide([PathSample(0.0, rtt_ms=50.4)], None, 0.0)
    assert choose_data_path("auto", lan)[0] == "passthrough"
    assert choose_data_path("auto", wan)[0] == "encode"
    assert choose_data_path("encode", lan) == ("encode",
                                                "codec.mode is encode in the configuration")
    assert "RTT 0.08 ms < 2 ms" in lan.reason
    with pytest.raises(ConfigError, match="unknown codec mode"):
        choose_data_path("fast", lan)


def test_app_limited_goodput_is_only_a_lower_bound() -> None:
    assert _first(0.5, 50, app_limited=True) is DC  # an idle guest is not a slow link
    assert _first(5, 5000, app_limited=True) is DC  # but a fast interval proves a fast path
    assert _first(5, 50, app_limited=False) is NET
    tracker = ModeTracker(ThresholdModePolicy(ModeConfig(outliers=0)))
    tracker.add(PathSample(0, 5, 800))  # measured while backlogged: slow
    assert tracker.add(PathSample(1, 5, 400, app_limited=True)).estimate.bandwidth_mbit == 800


def test_nothing_measured_is_hybrid_then_kept() -> None:
    policy = ThresholdModePolicy()
    first = policy.decide([], None, 0.0)
    assert first.mode is HY and "nothing measured" in first.reason
    known = policy.decide([PathSample(1.0, 0.1)], first, 1.0)
    assert known.mode is DC and known.changed  # the first measurement decides at once
    assert policy.decide([PathSample(1.0, 0.1)], known, 500.0) == known  # all aged out


def test_no_new_sample_does_not_count_towards_a_switch() -> None:
    policy = ThresholdModePolicy(ModeConfig(switch_after=2, outliers=0, window=1))
    samples = [PathSample(0.0, 1.0, 5000)]
    decision = policy.decide(samples, None, 0.0)
    samples.append(PathSample(1.0, 100.0, 5000))
    for now in (1.0, 1.5, 2.0, 3.0):  # the same newest sample, decided again and again
        decision = policy.decide(samples, decision, now)
        assert decision.mode is DC and decision.streak == 1
    samples.append(PathSample(4.0, 100.0, 5000))
    decision = policy.decide(samples, decision, 4.0)
    assert decision.mode is NET and decision.changed and "was datacenter" in decision.reason


def test_sample_from_session_stats() -> None:
    def stats(acked: int, elapsed: float, rtt: float | None) -> TransportStats:
        return TransportStats(acked, acked, 0, elapsed, 0, 0, 3.0, rtt, 2.5, 0, 0, 8, 8, 0, 0,
                              "bbr")

    first = sample_from_stats(None, stats(0, 0.5, 2.0), 10.0, backlogged=False)
    assert (first.rtt_ms, first.bandwidth_mbit) == (2.0, None)
    later = sample_from_stats(stats(0, 0.5, 2.0), stats(250_000_000, 2.5, None), 12.0,
                              backlogged=True)
    assert later.rtt_ms == 2.5 and later.bandwidth_mbit == pytest.approx(1000)
    assert not later.app_limited


# ---- defaults and the registry ------------------------------------------------------------------
def test_defaults_for_each_mode() -> None:
    for mode in Mode:
        d = defaults_for(mode)
        assert d.mode is mode and d == defaults_for(mode.value)
        assert 1 <= d.min_streams <= d.streams <= d.max_streams
        Compression.parse(d.compression)  # a valid codec setting
    assert defaults_for(DC).data_path == "passthrough" and defaults_for(DC).rdma
    assert defaults_for(NET).data_path == "encode" and defaults_for(NET).congestion_control \
        == "bbr"
    assert defaults_for(HY).data_path == "encode"
    assert defaults_for(NET).streams > defaults_for(DC).streams
    with pytest.raises(ConfigError, match="unknown mode 'lan'"):
        defaults_for("lan")


def test_policy_registry() -> None:
    assert isinstance(get_mode_policy("threshold"), ThresholdModePolicy)
    with pytest.raises(ConfigError, match=r"unknown mode policy 'ml' \(known: threshold\)"):
        get_mode_policy("ml")

    class AlwaysInternet:
        name = "always-internet"

        def __init__(self, config: ModeConfig) -> None:
            self.config = config

        def decide(self, samples: Sequence[PathSample], previous: ModeDecision | None,
                   now: float) -> ModeDecision:
            base = ThresholdModePolicy(self.config).decide(samples, previous, now)
            return dataclasses.replace(base, mode=NET, reason="configured")

    register_mode_policy("always-internet", AlwaysInternet)
    try:
        assert get_mode_policy("always-internet").decide(
            [PathSample(0, 0.1)], None, 0).mode is NET
    finally:
        del MODE_POLICIES["always-internet"]


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="lan_rtt_ms <= datacenter_rtt_ms"):
        ModeConfig(datacenter_rtt_ms=60)
    with pytest.raises(ConfigError, match="internet_mbit <= datacenter_mbit"):
        ModeConfig(internet_mbit=2000)
    with pytest.raises(ConfigError, match="margin"):
        ModeConfig(margin=1.5)
    with pytest.raises(ConfigError, match="positive"):
        ModeConfig(switch_after=0)
    with pytest.raises(ValueError, match="RTT"):
        PathSample(0, rtt_ms=-1)


# ---- hysteresis (hypothesis) --------------------------------------------------------------------
# One threshold at a time: (which, value, the other dimension held clearly on one side).
THRESHOLDS = {
    "datacenter RTT": (10.0, "rtt", 10_000.0),
    "internet RTT": (50.0, "rtt", 10_000.0),
    "bandwidth": (1000.0, "bw", 1.0),  # the other dimension is an RTT of 1 ms here
    "LAN RTT (bandwidth unknown)": (2.0, "rtt", None),
}


def _sample(kind: str, value: float, other: float | None) -> tuple[float | None, float | None]:
    return (value, other) if kind == "rtt" else (other, value)


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(sorted(THRESHOLDS)), below=st.booleans(),
       margin=st.floats(0.05, 0.5), window=st.integers(1, 20),
       switch_after=st.integers(1, 5), outliers=st.integers(0, 2),
       noise=st.lists(st.floats(-0.95, 0.95), min_size=1, max_size=120))
def test_noise_around_a_threshold_never_flips_the_mode(
        which: str, below: bool, margin: float, window: int, switch_after: int,
        outliers: int, noise: list[float]) -> None:
    threshold, kind, other = THRESHOLDS[which]
    config = ModeConfig(margin=margin, window=window, switch_after=switch_after,
                        outliers=outliers)
    clean = threshold * ((1 - margin) * 0.7 if below else (1 + margin) * 1.3)
    settle = [_sample(kind, clean, other)] * (window + switch_after + outliers)
    jitter = [_sample(kind, threshold * (1 + n * margin), other) for n in noise]
    modes = _modes(config, settle + jitter)
    established = modes[len(settle) - 1]
    assert modes[len(settle):] == [established] * len(jitter)


# Representative paths, each well inside its region (beyond every margin of 20 %), with
# jitter that only adds delay and only loses bandwidth, as real measurements do.
PATHS = {
    DC: st.tuples(st.floats(0.05, 6), st.floats(2000, 40_000)),
    HY: st.tuples(st.floats(15, 30), st.floats(2000, 40_000)),
    NET: st.one_of(st.tuples(st.floats(70, 300), st.floats(10, 40_000)),
                   st.tuples(st.floats(0.05, 30), st.floats(10, 700))),
}


@st.composite
def _path(draw: st.DrawFn, mode: Mode) -> tuple[Mode, float, float]:
    rtt, bw = draw(PATHS[mode])
    return mode, rtt, bw


@settings(max_examples=300, deadline=None)
@given(data=st.data(), window=st.integers(1, 20), switch_after=st.integers(1, 5),
       outliers=st.integers(0, 2), before=st.sampled_from(list(Mode)),
       after=st.sampled_from(list(Mode)))
def test_a_sustained_change_is_followed_within_the_window(
        data: st.DataObject, window: int, switch_after: int, outliers: int, before: Mode,
        after: Mode) -> None:
    config = ModeConfig(window=window, switch_after=switch_after, outliers=outliers)
    old = data.draw(_path(before))
    new = data.draw(_path(after))

    def samples(path: tuple[Mode, float, float], n: int) -> list[tuple[float, float]]:
        jitter = data.draw(st.lists(st.tuples(st.floats(1, 1.15), st.floats(0.85, 1)),
                                    min_size=n, max_size=n))
        return [(path[1] * j_rtt, path[2] * j_bw) for j_rtt, j_bw in jitter]

    settle = window + switch_after + outliers
    follow = window + switch_after
    modes = _modes(config, samples(old, settle) + samples(new, follow + 2 * window))
    assert modes[settle - 1] is before
    after_change = modes[settle:]
    reached = after_change.index(after) if after in after_change else None
    assert reached is not None and reached < follow, (after_change, follow)
    assert set(after_change[reached:]) == {after}  # and held


@settings(max_examples=200, deadline=None)
@given(start=st.sampled_from(list(Mode)), data=st.data(),
       outlier=st.tuples(st.floats(0.01, 1000), st.floats(1, 100_000)),
       position=st.integers(0, 30), switch_after=st.integers(1, 4))
def test_one_outlier_never_switches(start: Mode, data: st.DataObject,
                                    outlier: tuple[float, float], position: int,
                                    switch_after: int) -> None:
    config = ModeConfig(switch_after=switch_after, outliers=1)
    _, rtt, bw = data.draw(_path(start))
    steady = [(rtt, bw)] * 40
    modes = _modes(config, [*steady[:position + 15], outlier, *steady[position + 15:]])
    assert set(modes) == {start}
