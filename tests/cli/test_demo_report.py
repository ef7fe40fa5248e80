"""The demo's report: measured delivery from the API's own figures, the simulator's truth over the
same intervals and the event's devices, and the gap line (no service started: the API answer
and the simulator are stand-ins)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from cli.demo import Demo, DemoOptions
from sim.simulator import GroundTruth
from vpp.settings import Settings
from vpp.timefmt import to_rfc3339

T0 = 1_800_000_000_000 - 1_800_000_000_000 % 300_000
STEP = 300_000
N = 6


def request_answer() -> dict[str, Any]:
    delivered = [0.9, 1.0, 1.0, 0.8, 1.1, 0.7]
    return {
        "id": "cr-000000000001",
        "status": "completed",
        "settled": True,
        "start": to_rfc3339(T0),
        "end": to_rfc3339(T0 + N * STEP),
        "intervals": [
            {
                "start": to_rfc3339(T0 + i * STEP),
                "end": to_rfc3339(T0 + (i + 1) * STEP),
                "target_mw": 1.0,
                "delivered_mw": d,
                "performance": min(d, 1.0),
            }
            for i, d in enumerate(delivered)
        ],
        # The API's summary, as the service computes it: the report shows these, not its own.
        "delivery": {
            "delivered_mw": 0.916667,
            "committed_mw": 1.0,
            "performance": 0.9,
            "intervals": N,
            "expected_intervals": N,
        },
        "performance": 0.9,
    }


def truth() -> GroundTruth:
    # The event's devices only, per 5-minute interval; rows outside the window (an early start,
    # the restore stagger after the end) must not count.
    members = {T0 + i * STEP: 0.88 for i in range(N)}
    members[T0 - STEP] = 0.01
    members[T0 + N * STEP] = 0.02
    members[T0 + (N + 1) * STEP] = 0.01
    return GroundTruth(
        settlement_interval_s=300.0,
        delivered_mw={"cr-000000000001": dict(members)},
        delivered_mw_members={"cr-000000000001": members},
        device_ids=[],
        battery_ids=[],
        battery_min_soc_pct=None,  # type: ignore[arg-type]
        battery_reserve_pct=None,  # type: ignore[arg-type]
        under_command=[],
        opted_out={},
        acks_sent={},
    )


class _Sim:
    def ground_truth(self) -> GroundTruth:
        return truth()


async def test_report_prints_measured_truth_and_their_gap() -> None:
    out = io.StringIO()
    demo = Demo(DemoOptions(hold=False), Console(file=out, width=160))
    demo.settings = Settings()
    demo.sim = _Sim()
    answer = request_answer()

    async def api(method: str, path: str, key: str, **kw: Any) -> Any:
        return answer

    demo.api = api  # type: ignore[method-assign]
    demo.result.request_id = answer["id"]
    demo.result.committed_mw = 1.0
    await demo.settle(answer["id"])
    r = demo.result
    assert r.delivered_mw == pytest.approx(0.916667)  # the API's figure, not a mean of its own
    assert r.performance == pytest.approx(0.9)
    assert r.intervals == N
    assert r.truth_mw == pytest.approx(0.88)  # the window's intervals only
    assert r.truth_performance == pytest.approx(0.88)
    assert r.gap_pct == pytest.approx(3.6667, abs=1e-3)
    demo.report()
    text = out.getvalue()
    assert "gap between measured and ground truth: 3.7 % of committed (goal ≤ 3 %, missed" in text
    assert "0.88 MW" in text and "0.92 MW" in text


async def test_report_says_when_the_figures_are_provisional() -> None:
    out = io.StringIO()
    demo = Demo(DemoOptions(hold=False, settle_wait_s=0.0), Console(file=out, width=200))
    demo.settings = Settings()
    demo.sim = _Sim()
    answer = request_answer()
    answer["settled"] = False
    answer["intervals"] = answer["intervals"][:4]
    answer["delivery"] = {**answer["delivery"], "intervals": 4}

    async def api(method: str, path: str, key: str, **kw: Any) -> Any:
        return answer

    demo.api = api  # type: ignore[method-assign]
    await demo.settle(answer["id"])
    assert demo.result.truth_mw == pytest.approx(0.88) and demo.result.intervals == 4
    demo.report()
    text = out.getvalue()
    assert "not settled yet" in text
    assert "average over 4 intervals of 6, provisional" in text


def test_truth_on_intervals_takes_overlaps_of_its_own_grid() -> None:
    t = truth()
    # Service intervals of 15 minutes over the truth's 5-minute rows; one reaching past the end.
    got = t.on_intervals("cr-000000000001", [T0, T0 + 3 * STEP], [T0 + 3 * STEP, T0 + 6 * STEP])
    assert got == pytest.approx([0.88, 0.88])
    tail = t.on_intervals("cr-000000000001", [T0 + 5 * STEP], [T0 + 7 * STEP])
    assert tail == pytest.approx([(0.88 + 0.02) / 2])
    assert t.on_intervals("cr-unknown", [T0], [T0 + STEP]) == [0.0]
