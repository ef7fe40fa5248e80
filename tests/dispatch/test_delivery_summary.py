"""The one figure per question: delivery_summary's interval rule (the committed window's
settlement intervals, a partial last interval by its length, missing intervals not counted)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dispatch.settlement import (
    SettlementGrid,
    SettlementInputs,
    delivery_summary,
    performance,
    settle,
)

MIN = 60_000


def lines(bounds_min: list[tuple[int, int]]) -> dict[str, list[int]]:
    return {
        "starts_ms": [a * MIN for a, _ in bounds_min],
        "ends_ms": [b * MIN for _, b in bounds_min],
    }


def test_full_intervals_give_the_mean_and_the_brief_performance() -> None:
    delivered = [1.2, 0.5, 0.9, -0.1]
    committed = [1.0, 1.0, 1.0, 1.0]
    s = delivery_summary(
        **lines([(0, 5), (5, 10), (10, 15), (15, 20)]),
        committed_mw=committed,
        delivered_mw=delivered,
        window_start_ms=0,
        window_end_ms=20 * MIN,
        interval_s=300,
    )
    # Delivered is the time-average, not floored (the rebound shows); performance floors it.
    assert s.delivered_mw == pytest.approx(np.mean(delivered))
    assert s.committed_mw == pytest.approx(1.0)
    assert s.performance == pytest.approx((1.0 + 0.5 + 0.9 + 0.0) / 4)
    brief = performance(delivered_mw=delivered, committed_mw=committed)
    assert s.performance == pytest.approx(brief)
    assert (s.intervals, s.expected, s.missing, s.complete) == (4, 4, 0, True)
    assert s.interval_performance.tolist() == pytest.approx([1.0, 0.5, 0.9, 0.0])


def test_a_partial_last_interval_counts_for_its_own_length() -> None:
    # A 12-minute window on 5-minute intervals: the last one is 2 minutes long.
    s = delivery_summary(
        **lines([(0, 5), (5, 10), (10, 12)]),
        committed_mw=[1.0, 1.0, 1.0],
        delivered_mw=[1.0, 1.0, 0.0],
        window_start_ms=0,
        window_end_ms=12 * MIN,
        interval_s=300,
    )
    assert (s.intervals, s.expected) == (3, 3)
    assert s.hours == pytest.approx(12 / 60)
    # 10 of 12 minutes delivered, not 2 of 3 intervals.
    assert s.delivered_mw == pytest.approx(10 / 12)
    assert s.performance == pytest.approx(10 / 12)


def test_a_line_reaching_past_the_window_counts_only_inside_it() -> None:
    # A line stored as a full interval past the window's end (and one wholly outside it).
    s = delivery_summary(
        **lines([(0, 5), (5, 10), (10, 15), (15, 20)]),
        committed_mw=[1.0, 1.0, 1.0, 1.0],
        delivered_mw=[1.0, 1.0, 0.0, 5.0],
        window_start_ms=0,
        window_end_ms=12 * MIN,
        interval_s=300,
    )
    assert (s.intervals, s.expected) == (3, 3)
    assert s.delivered_mw == pytest.approx(10 / 12)
    assert s.performance == pytest.approx(10 / 12)
    assert math.isnan(s.interval_performance[3])


def test_missing_intervals_are_not_counted_and_are_reported() -> None:
    # A provisional settlement: two of the window's four intervals are in.
    s = delivery_summary(
        **lines([(0, 5), (5, 10)]),
        committed_mw=[2.0, 2.0],
        delivered_mw=[2.0, float("nan")],  # no reading: nothing proven
        window_start_ms=0,
        window_end_ms=20 * MIN,
        interval_s=300,
    )
    assert (s.intervals, s.expected, s.missing, s.complete) == (2, 4, 2, False)
    assert s.delivered_mw == pytest.approx(1.0)
    assert s.performance == pytest.approx(0.5)


def test_nothing_measured_or_nothing_committed() -> None:
    empty = delivery_summary(
        starts_ms=[],
        ends_ms=[],
        committed_mw=[],
        delivered_mw=[],
        window_start_ms=0,
        window_end_ms=10 * MIN,
        interval_s=300,
    )
    assert (empty.delivered_mw, empty.performance, empty.intervals, empty.expected) == (
        None,
        None,
        0,
        2,
    )
    free = delivery_summary(
        **lines([(0, 5)]),
        committed_mw=[0.0],
        delivered_mw=[0.3],
        window_start_ms=0,
        window_end_ms=5 * MIN,
        interval_s=300,
        uncommitted=1.0,
    )
    assert free.performance is None and free.delivered_mw == pytest.approx(0.3)
    assert free.interval_performance.tolist() == [1.0]


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="delivered_mw"):
        delivery_summary(
            **lines([(0, 5)]),
            committed_mw=[1.0, 1.0],
            delivered_mw=[1.0],
            window_start_ms=0,
            window_end_ms=5 * MIN,
            interval_s=300,
        )
    with pytest.raises(ValueError, match="interval_s"):
        delivery_summary(
            **lines([(0, 5)]),
            committed_mw=[1.0],
            delivered_mw=[1.0],
            window_start_ms=0,
            window_end_ms=5 * MIN,
            interval_s=0,
        )


def test_settle_reports_the_summarys_performance_on_a_partial_grid() -> None:
    # 12 minutes on 5-minute intervals: one battery delivering 1 MW, then nothing in the last 2.
    grid = SettlementGrid(0, 12 * MIN, 300)
    actual = np.array([[1e6, 1e6, 0.0]])  # W of output
    st = settle(
        SettlementInputs(
            grid=grid,
            target_mw=np.array([1.0, 1.0, 1.0]),
            battery_actual_w=actual,
            battery_before_w=np.array([0.0]),
            battery_after_w=np.array([0.0]),
            battery_active=np.ones((1, 3), bool),
        )
    )
    assert [ln.interval_end_ms for ln in st.lines] == [5 * MIN, 10 * MIN, 12 * MIN]
    assert st.performance == pytest.approx(10 / 12)
