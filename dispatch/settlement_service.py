"""Settlement at the edge: read an event's commands, control group and interval history, run the
pure :func:`dispatch.settlement.settle`, store one ``SettlementLine`` per interval (with the inputs
kept), and read back what the API shows (``api/presenters/settlement.py`` shapes it).

``event_settlement(services, event_id)`` is what GET /v1/grid-events/{id} adds to its answer:
target, delivered and performance per interval, and device counts; ``export_lines`` feeds the CSV
export and ``timeline_rows`` the events timeline. Every delivered MW and performance an event
shows comes from :func:`summarise` (:func:`dispatch.settlement.delivery_summary` over its window).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import delete, insert, select, update

from devices.edges import Edges
from dispatch import events as es
from dispatch.settlement import (
    MIN_CONTROL_DEVICES,
    DeliverySummary,
    Line,
    Settlement,
    SettlementGrid,
    SettlementInputs,
    TenInTen,
    active_mask,
    resample,
    settle,
    summarise_lines,
)
from store.history import HistoryColumns, read_history
from store.models import (
    CapacityRequest,
    Command,
    EventTimeline,
    Plan,
    SettlementLine,
)
from vpp.domain import CommandStatus, CommandType

PRE_WINDOW_MS = 30 * 60_000  # meter-before: the 30 minutes before the event
POST_WINDOW_MS = 30 * 60_000  # meter-after: the 30 minutes after it
DAY_MS = 86_400_000
TEN_IN_TEN_LOOKBACK_DAYS = 20
ADJUST_FROM_H, ADJUST_TO_H = 4.0, 1.0  # same-day adjustment: hours −4..−1 before the start
# Stored but never published.
NOT_DISPATCHED = (CommandStatus.pending.value, CommandStatus.restored.value)


async def _runner_body(services: Edges, event_id: str) -> dict[str, Any]:
    async with services.db.session() as s:
        plan = (
            await s.execute(
                select(Plan).where(Plan.event_id == event_id).order_by(Plan.version.desc()).limit(1)
            )
        ).scalar_one_or_none()
    if plan is None:
        return {}
    body = plan.body or {}
    out: dict[str, Any] = dict(body.get("runner", {}))
    out["_plan"] = body.get("plan")
    return out


async def _history(services: Edges, device_ids: list[str], lo_ms: int, hi_ms: int) -> _History:
    """The interval rows of ``device_ids`` in [lo, hi), as columns keyed by position."""
    ids = list(dict.fromkeys(device_ids))  # one row per device: the index must be unique
    return _History(ids, await read_history(services.db, ids, lo_ms, hi_ms))


class _History:
    """Interval rows read for a list of devices, looked up by any sub-list of them."""

    def __init__(self, ids: list[str], cols: HistoryColumns) -> None:
        self.ids = ids
        self.cols = cols
        self._index = pd.Index(ids)

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """For each history row, its position in ``ids`` (-1: a device not in ``ids``)."""
        where = np.full(len(self.ids), -1, dtype=np.int64)
        if ids:
            at = self._index.get_indexer(pd.Index(ids))
            found = at >= 0
            where[at[found]] = np.flatnonzero(found)
        return where[self.cols.row] if len(self.cols) else np.zeros(0, dtype=np.int64)


def _matrix(
    hist: _History,
    ids: list[str],
    column: int,
    slot_ms: int,
    lo_ms: int,
    hi_ms: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(devices, slots) values of one column on the slot grid [lo, hi); NaN where missing."""
    n_slots = max(0, int(-(-(hi_ms - lo_ms) // slot_ms)))
    starts = lo_ms + np.arange(n_slots, dtype=np.int64) * slot_ms
    m = np.full((len(ids), n_slots), np.nan)
    if not len(hist.cols) or not ids:
        return m, starts
    rows = hist.rows_of(ids)
    values = hist.cols.power_w if column == 0 else hist.cols.hvac_w
    k = (hist.cols.start_ms - lo_ms) // slot_ms
    ok = (rows >= 0) & (k >= 0) & (k < n_slots) & ~np.isnan(values)
    m[rows[ok], k[ok]] = values[ok]
    return m, starts


async def compute_settlement(
    services: Edges, event_id: str
) -> tuple[es.EventInfo, Settlement] | None:
    ev = await es.load_event(services, event_id)
    if ev is None:
        return None
    s = services.settings
    grid = SettlementGrid(ev.start_ms, ev.end_ms, int(s.settlement_interval_min * 60))
    body = await _runner_body(services, event_id)
    target = np.full(grid.n, ev.mw)
    if body.get("target_mw") and body.get("horizon", {}).get("interval_s") == grid.interval_s:
        t = np.asarray(body["target_mw"], dtype=float)
        if t.shape == (grid.n,):
            target = t
    all_control: list[str] = list(body.get("control_ids", []))
    control_kinds = list(body.get("control_kinds", [2] * len(all_control)))
    control_ids = [d for d, k in zip(all_control, control_kinds, strict=False) if k == 2]
    battery_control_ids = [d for d, k in zip(all_control, control_kinds, strict=False) if k == 0]

    async with services.db.session() as session:
        cmds = (
            await session.execute(
                select(
                    Command.device_id,
                    Command.type,
                    Command.status,
                    Command.valid_from_ms,
                    Command.valid_until_ms,
                ).where(Command.event_id == event_id)
            )
        ).all()
        devs = sorted({c[0] for c in cmds})
        # Any later command to the same device (a restore, another event) ends this one.
        later: dict[str, list[int]] = defaultdict(list)
        for k in range(0, len(devs), 10_000):
            for dev, vf in (
                await session.execute(
                    select(Command.device_id, Command.valid_from_ms).where(
                        Command.device_id.in_(devs[k : k + 10_000]),
                        Command.valid_from_ms < ev.end_ms,
                        Command.valid_until_ms > ev.start_ms,
                        Command.status.notin_(NOT_DISPATCHED),
                    )
                )
            ).all():
                later[dev].append(int(vf))
    dispatch = [c for c in cmds if c[1] != CommandType.restore.value and c[2] not in NOT_DISPATCHED]
    kinds: dict[str, str] = {}
    windows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for dev, typ, _status, vf, vu in dispatch:
        kinds[dev] = typ
        ends = [x for x in later[dev] if x > vf]
        until = min([int(vu), *ends])
        windows[dev].append((int(vf), until))
    bat_ids = sorted(d for d, t in kinds.items() if t == CommandType.battery_discharge)
    th_ids = sorted(d for d, t in kinds.items() if t == CommandType.thermostat_offset)

    slot_ms = int(s.history_interval_s * 1000)
    lo, hi = ev.start_ms - PRE_WINDOW_MS, ev.end_ms + POST_WINDOW_MS
    hist = await _history(services, bat_ids + th_ids + all_control, lo, hi)

    def block(ids: list[str], col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, starts = _matrix(hist, ids, col, slot_ms, lo, hi)
        with np.errstate(all="ignore"):
            pre = starts < ev.start_ms
            post = starts >= ev.end_ms
            before = _nanmean_last(m[:, pre])
            after = _nanmean_last(m[:, post])
        return resample(m, starts, grid), before, after

    def active(ids: list[str]) -> np.ndarray:
        rows, vf, vu = [], [], []
        for r, d in enumerate(ids):
            for a, b in windows[d]:
                rows.append(r)
                vf.append(a)
                vu.append(b)
        if not rows:
            return np.zeros((len(ids), grid.n), bool)
        return active_mask(np.array(vf), np.array(vu), grid, rows=np.array(rows), n_rows=len(ids))

    b_act, b_before, b_after = block(bat_ids, 0)
    t_act, t_before, _ = block(th_ids, 1)
    c_act, c_before, _ = block(control_ids, 1)
    bc_act, bc_before, _ = block(battery_control_ids, 0)
    tt = None
    if th_ids and len(control_ids) < MIN_CONTROL_DEVICES:
        tt = await _ten_in_ten(services, th_ids, grid, slot_ms)
    inputs = SettlementInputs(
        grid=grid,
        target_mw=target,
        battery_actual_w=b_act,
        battery_before_w=b_before,
        battery_after_w=b_after,
        battery_active=active(bat_ids),
        battery_control_actual_w=bc_act,
        battery_control_before_w=bc_before,
        thermostat_actual_w=t_act,
        thermostat_before_w=t_before,
        thermostat_active=active(th_ids),
        control_actual_w=c_act,
        control_before_w=c_before,
        ten_in_ten=tt,
    )
    return ev, settle(inputs)


async def _ten_in_ten(
    services: Edges, ids: list[str], grid: SettlementGrid, slot_ms: int
) -> TenInTen | None:
    """CAISO 10-in-10 inputs: the same intervals on the most recent prior days with history on
    which the device had no event, and the same-day adjustment window on each.

    Reads only each day's window (the adjustment hours through the event's end), and works on a
    (devices, days, slots of the window) cube: no loop over devices."""
    adj_lo = int(ADJUST_FROM_H * 3_600_000)
    adj_hi = int(ADJUST_TO_H * 3_600_000)
    n_days = TEN_IN_TEN_LOOKBACK_DAYS
    # Day b's window starts at grid.start - b days - adj_lo (b = 0: the event day).
    first = grid.start_ms - n_days * DAY_MS - adj_lo
    width = adj_lo + (grid.end_ms - grid.start_ms)
    cols = await read_history(
        services.db, ids, first, grid.end_ms, daily_from_ms=first, daily_width_ms=width
    )
    event_back = np.zeros((len(ids), n_days + 1), dtype=bool)
    async with services.db.session() as s:
        position = {d: i for i, d in enumerate(ids)}
        for k in range(0, len(ids), 10_000):
            for dev, vf in (
                await s.execute(
                    select(Command.device_id, Command.valid_from_ms).where(
                        Command.device_id.in_(ids[k : k + 10_000]),
                        Command.type != CommandType.restore.value,
                        Command.valid_from_ms >= first,
                        Command.valid_from_ms < grid.start_ms - DAY_MS // 2,
                    )
                )
            ).all():
                back = round((grid.start_ms - vf) / DAY_MS)
                if 0 <= back <= n_days:
                    event_back[position[dev], back] = True
    n_slots = max(1, int(-(-width // slot_ms)))
    cube = np.full((len(ids), n_days + 1, n_slots), np.nan)
    if len(cols):
        offset = cols.start_ms - first
        day_back = n_days - offset // DAY_MS
        j = (offset % DAY_MS) // slot_ms
        ok = (day_back >= 0) & (day_back <= n_days) & (j < n_slots) & ~np.isnan(cols.hvac_w)
        cube[cols.row[ok], day_back[ok], j[ok]] = cols.hvac_w[ok]
    slot_offsets = np.arange(n_slots, dtype=np.int64) * slot_ms  # from the window's start
    adjust = (slot_offsets >= 0) & (slot_offsets < adj_lo - adj_hi)
    with np.errstate(all="ignore"):
        adjust_mean = _nanmean_last(cube[:, :, adjust])  # (devices, days + 1)
    today = adjust_mean[:, 0]
    per_back = np.full((len(ids), n_days + 1, grid.n), np.nan)
    for b in range(1, n_days + 1):
        window_start = grid.start_ms - b * DAY_MS - adj_lo
        day_g = SettlementGrid(
            grid.start_ms - b * DAY_MS, grid.end_ms - b * DAY_MS, grid.interval_s
        )
        per_back[:, b] = resample(cube[:, b], window_start + slot_offsets, day_g)
    eligible = ~event_back & ~np.all(np.isnan(per_back), axis=2)
    eligible[:, 0] = False
    column = np.cumsum(eligible, axis=1) - 1  # the most recent eligible day is column 0
    take = eligible & (column < 10)
    rows, backs = np.nonzero(take)
    days = np.full((len(ids), n_days, grid.n), np.nan)
    adj_days = np.full((len(ids), n_days), np.nan)
    days[rows, column[rows, backs]] = per_back[rows, backs]
    adj_days[rows, column[rows, backs]] = adjust_mean[rows, backs]
    return TenInTen(days_w=days, adjust_days_w=adj_days, adjust_today_w=today)


def _nanmean_last(m: np.ndarray) -> np.ndarray:
    """Mean over the last axis, ignoring NaN; NaN where nothing is there."""
    have = ~np.isnan(m)
    cnt = have.sum(axis=-1)
    tot = np.where(have, m, 0.0).sum(axis=-1)
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


async def settle_event(
    services: Edges, event_id: str, until_ms: int | None = None
) -> Settlement | None:
    """Compute and store the settlement lines of an event (replacing earlier ones). With
    ``until_ms`` only the intervals that ended by then are stored (a provisional settlement while
    the event runs); the request's performance is stored once every interval is in."""
    res = await compute_settlement(services, event_id)
    if res is None:
        return None
    ev, st = res
    final = until_ms is None or until_ms >= ev.end_ms
    if until_ms is not None and not final:
        st.lines = [ln for ln in st.lines if ln.interval_end_ms <= until_ms]
    rows = [
        {
            "event_id": event_id,
            "interval_start_ms": ln.interval_start_ms,
            "interval_end_ms": ln.interval_end_ms,
            "target_mw": ln.target_mw,
            "baseline_mw": ln.baseline_mw,
            "actual_mw": ln.actual_mw,
            "delivered_mw": ln.delivered_mw,
            "method": ln.method[:40],
            "inputs": {**ln.inputs, "method": ln.method, "performance": ln.performance},
        }
        for ln in st.lines
    ]
    # The request's stored performance: the one summary over the figures just stored, so the
    # list, the request's own answer and the CSV read the same number.
    stored = summarise(services, ev, st.lines)
    async with services.db.session() as s, s.begin():
        await s.execute(delete(SettlementLine).where(SettlementLine.event_id == event_id))
        if rows:
            await s.execute(insert(SettlementLine), rows)
        if final and not ev.is_grid:
            await s.execute(
                update(CapacityRequest)
                .where(CapacityRequest.id == event_id)
                .values(performance=round(stored.performance or 0.0, 6))
            )
    return st


# Command statuses counted as acknowledged, and as replaced (the device failed its command).
_ACKNOWLEDGED = (CommandStatus.received, CommandStatus.started, CommandStatus.completed)
_REPLACED = (
    CommandStatus.opted_out,
    CommandStatus.rejected,
    CommandStatus.expired,
    CommandStatus.missed,
    CommandStatus.stale,
)


async def settlement_lines(services: Edges, event_id: str) -> list[SettlementLine]:
    """An event's stored settlement lines, in interval order."""
    async with services.db.session() as s:
        result = await s.execute(
            select(SettlementLine)
            .where(SettlementLine.event_id == event_id)
            .order_by(SettlementLine.interval_start_ms)
        )
        return list(result.scalars().all())


@dataclass(frozen=True)
class DeviceCounts:
    """Devices of an event by what became of their command (restores not counted)."""

    commanded: int
    acknowledged: int
    opted_out: int
    replaced: int


@dataclass(frozen=True)
class IntervalResult:
    """One settlement interval's figures, stored or provisional; ``performance`` is
    min(delivered, target) ÷ target (0 with no target)."""

    start_ms: int
    end_ms: int
    target_mw: float
    delivered_mw: float
    baseline_mw: float
    actual_mw: float
    performance: float
    method: str


def _intervals(
    lines: Sequence[SettlementLine | Line], summary: DeliverySummary
) -> list[IntervalResult]:
    """The lines the summary counted, each with its performance (the summary's rule alone)."""
    per = summary.interval_performance.tolist()
    return [
        IntervalResult(
            ln.interval_start_ms,
            ln.interval_end_ms,
            ln.target_mw,
            ln.delivered_mw,
            ln.baseline_mw,
            ln.actual_mw,
            float(p),
            ln.method,
        )
        for ln, p in zip(lines, per, strict=True)
        if p == p  # NaN: a line outside the window, not counted
    ]


def summarise(
    services: Edges,
    ev: es.EventInfo,
    lines: Sequence[SettlementLine | Line],
    uncommitted: float = 0.0,
) -> DeliverySummary:
    """:func:`dispatch.settlement.delivery_summary` of an event's lines over its window, on the
    service's settlement interval: what every screen shows for the event."""
    return summarise_lines(
        lines,
        window_start_ms=ev.start_ms,
        window_end_ms=ev.end_ms,
        interval_s=int(services.settings.settlement_interval_min * 60),
        uncommitted=uncommitted,
    )


@dataclass(frozen=True)
class EventSettlement:
    """``settled``: the stored lines; otherwise the intervals measured so far while the event
    runs (none before its window). ``summary``: delivered MW, committed MW and performance over
    ``intervals`` (:func:`dispatch.settlement.delivery_summary`), None when there are none to
    measure; ``performance`` is the summary's."""

    settled: bool
    intervals: list[IntervalResult]
    summary: DeliverySummary | None
    devices: DeviceCounts

    @property
    def performance(self) -> float | None:
        return None if self.summary is None else self.summary.performance


async def event_settlement(services: Edges, event_id: str) -> EventSettlement:
    """Per-interval target, delivered and performance (stored lines once settled; a provisional
    measurement while the event runs), plus device counts."""
    lines = await settlement_lines(services, event_id)
    async with services.db.session() as s:
        counts: dict[str, int] = dict(
            (
                await s.execute(
                    select(Command.status, _count())
                    .where(Command.event_id == event_id, Command.type != CommandType.restore.value)
                    .group_by(Command.status)
                )
            ).all()
        )
    devices = DeviceCounts(
        commanded=int(sum(counts.values())),
        acknowledged=int(sum(counts.get(k, 0) for k in _ACKNOWLEDGED)),
        opted_out=int(counts.get(CommandStatus.opted_out, 0)),
        replaced=int(sum(counts.get(k, 0) for k in _REPLACED)),
    )
    now = services.clock.now_ms()
    ev = await es.load_event(services, event_id)
    if ev is None:
        return EventSettlement(False, [], None, devices)
    if lines:
        summary = summarise(services, ev, lines)
        return EventSettlement(True, _intervals(lines, summary), summary, devices)
    if devices.commanded == 0 or now < ev.start_ms:
        return EventSettlement(False, [], None, devices)
    res = await compute_settlement(services, event_id)
    if res is None:
        return EventSettlement(False, [], None, devices)
    _, st = res
    done = [ln for ln in st.lines if ln.interval_end_ms <= now]
    if not done:
        return EventSettlement(False, [], None, devices)
    summary = summarise(services, ev, done)
    return EventSettlement(False, _intervals(done, summary), summary, devices)


def _count() -> Any:
    from sqlalchemy import func

    return func.count()


async def export_lines(
    services: Edges, event_id: str, uncommitted: float = 0.0
) -> tuple[list[SettlementLine], DeliverySummary | None]:
    """The stored settlement lines for the CSV export and their summary over the event's window
    (``uncommitted``: a line's performance where nothing was committed, as the event's JSON
    shows it). Settles first if the event ran but has no stored lines yet."""
    lines = await settlement_lines(services, event_id)
    ev = await es.load_event(services, event_id)
    if not lines and ev is not None and services.clock.now_ms() >= ev.end_ms:
        await settle_event(services, event_id)
        lines = await settlement_lines(services, event_id)
    if ev is None:
        return lines, None
    return lines, summarise(services, ev, lines, uncommitted=uncommitted)


async def timeline_rows(services: Edges, event_id: str) -> list[EventTimeline]:
    """An event's control steps as the runner recorded them, oldest first."""
    async with services.db.session() as s:
        rows = (
            (
                await s.execute(
                    select(EventTimeline)
                    .where(EventTimeline.event_id == event_id)
                    .order_by(EventTimeline.ts_ms)
                )
            )
            .scalars()
            .all()
        )
    return list(rows)
