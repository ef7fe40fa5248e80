"""An event's settlement as the API shows it: the per-interval JSON of GET /v1/grid-events/{id}
and the CSV export of the stored lines with their baseline inputs."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from typing import Any

import orjson

from dispatch.settlement import DeliverySummary
from dispatch.settlement_service import EventSettlement, IntervalResult
from store.models import SettlementLine
from vpp.timefmt import to_rfc3339


def interval_doc(iv: IntervalResult) -> dict[str, Any]:
    return {
        "start": to_rfc3339(iv.start_ms),
        "end": to_rfc3339(iv.end_ms),
        "target_mw": round(iv.target_mw, 6),
        "delivered_mw": round(iv.delivered_mw, 6),
        "baseline_mw": round(iv.baseline_mw, 6),
        "actual_mw": round(iv.actual_mw, 6),
        "performance": round(iv.performance, 4),
        "method": iv.method,
    }


def delivery_doc(summary: DeliverySummary | None) -> dict[str, Any] | None:
    """The event's delivery in one figure per question, as every screen shows it
    (:func:`dispatch.settlement.delivery_summary`); None before anything was measured."""
    if summary is None or summary.intervals == 0:
        return None

    def r(v: float | None, nd: int = 6) -> float | None:
        return None if v is None else round(v, nd)

    return {
        "delivered_mw": r(summary.delivered_mw),
        "committed_mw": r(summary.committed_mw),
        "performance": r(summary.performance),
        "intervals": summary.intervals,
        "expected_intervals": summary.expected,
    }


def settlement_doc(st: EventSettlement) -> dict[str, Any]:
    return {
        "settled": st.settled,
        "intervals": [interval_doc(iv) for iv in st.intervals],
        "performance": None if st.performance is None else round(st.performance, 6),
        "delivery": delivery_doc(st.summary),
        "devices": asdict(st.devices),
    }


CSV_COLUMNS = [
    "event_id",
    "interval_start",
    "interval_end",
    "target_mw",
    "baseline_mw",
    "actual_mw",
    "delivered_mw",
    "performance",
    "method",
    "battery_devices",
    "battery_with_readings",
    "battery_baseline_output_kw",
    "battery_actual_output_kw",
    "battery_control_drift_kw",
    "thermostat_devices",
    "thermostat_with_readings",
    "thermostat_pre_event_sum_kw",
    "thermostat_baseline_load_kw",
    "thermostat_actual_load_kw",
    "control_devices",
    "control_with_readings",
    "control_mean_kw",
    "control_pre_event_mean_kw",
    "control_ratio",
    "control_used",
    "inputs_json",
]


def settlement_csv(
    event_id: str, lines: list[SettlementLine], summary: DeliverySummary | None
) -> str:
    """The settlement lines with their baseline inputs, one row an interval: the lines
    ``summary`` counted, each line's performance the summary's (the JSON's)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    per = [] if summary is None else summary.interval_performance.tolist()
    for ln, perf in zip(lines, per, strict=True):
        if perf != perf:  # NaN: a line outside the window, not counted
            continue
        inp = ln.inputs or {}
        b, t, c = inp.get("battery", {}), inp.get("thermostat", {}), inp.get("control", {})
        w.writerow(
            [
                event_id,
                to_rfc3339(ln.interval_start_ms),
                to_rfc3339(ln.interval_end_ms),
                ln.target_mw,
                ln.baseline_mw,
                ln.actual_mw,
                ln.delivered_mw,
                round(perf, 4),
                inp.get("method", ln.method),
                b.get("devices", 0),
                b.get("with_readings", 0),
                b.get("baseline_output_kw", 0),
                b.get("actual_output_kw", 0),
                b.get("control_drift_kw", 0),
                t.get("devices", 0),
                t.get("with_readings", 0),
                t.get("pre_event_sum_kw", 0),
                t.get("baseline_load_kw", 0),
                t.get("actual_load_kw", 0),
                c.get("devices", 0),
                c.get("with_readings", 0),
                c.get("mean_kw", 0),
                c.get("pre_event_mean_kw", 0),
                c.get("ratio", 1),
                c.get("used", False),
                orjson.dumps(inp).decode(),
            ]
        )
    return buf.getvalue()
