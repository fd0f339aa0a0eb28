"""The migration comparison's reduction of repeated runs (pure; no test bed)."""

from __future__ import annotations

from dwcp_migrate.testbed.compare import Row, median_rows, summarize


def _row(label: str, total: float | None, status: str = "completed", link: str = "wan") -> Row:
    return Row(link, label, status, total, 50, 100, 3, None, True, True)


def test_median_run_is_picked_and_every_run_listed() -> None:
    rows = [_row("dwcp", 3.0), _row("direct", 9.0), _row("dwcp", 2.0), _row("direct", 8.0),
            _row("dwcp", 2.5), _row("direct", None, "timeout")]
    out = median_rows(rows)
    assert [(r.label, r.total_s) for r in out] == [("dwcp", 2.5), ("direct", 8.0)]
    assert out[0].note == "median of 3 runs: 3.00 s, 2.00 s, 2.50 s"
    assert out[1].note == "median of 3 runs: 9.00 s, 8.00 s, timeout"  # lower middle of 2


def test_never_completed_keeps_its_first_row_and_single_runs_stay() -> None:
    rows = [_row("direct", None, "timeout"), _row("direct", None, "failed"),
            _row("dwcp", 4.0, link="wanloss")]
    out = median_rows(rows)
    assert out[0].status == "timeout" and "timeout, failed" in out[0].note
    assert out[1].note == "" and out[1].total_s == 4.0


def test_summary_uses_the_best_completed_plain_run() -> None:
    rows = [_row("plain QEMU direct", 8.0), _row("plain QEMU multifd", 2.0), _row("dwcp", 1.0)]
    lines = summarize(rows, 120)
    assert lines[0].startswith("- wan: dwcp total time 1.00 s = 0.50x")
    assert "plain QEMU multifd" in lines[0]
