"""Interval history of telemetry: per device, the average of each reading over fixed intervals
(5 minutes by default, ``settings.history_interval_s``), for baselines and settlement.

:class:`IntervalHistory` is the pure part: ingest hands it each batch of accepted records
(``STATE_DTYPE``) and it accumulates sums and sample counts in numpy arrays, one row per
(device, interval). When an interval has closed, :meth:`IntervalHistory.take_closed` hands back
its rows and forgets them. :func:`write_intervals` stores rows in ``telemetry_intervals`` with an
upsert that merges sample counts and averages, so two ingest workers that both saw samples of
the same device and interval (the shared subscription splits messages, not devices) and samples
that arrive after their interval was flushed add up instead of failing or overwriting.

A sample's interval is chosen by the device's ``ts``, or by the receive time when the device's
clock is flagged as skewed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import case
from sqlalchemy.ext.asyncio import AsyncSession

from store.database import Database
from store.models import TelemetryInterval
from vpp.fleet.records import STATE_DTYPE

FIELDS = ("power_w", "soc_pct", "indoor_c", "setpoint_c", "hvac_w", "outdoor_c")
_N = len(FIELDS)

Row = dict[str, Any]  # a telemetry_intervals row: device_id, interval_start_ms, samples, FIELDS


class IntervalHistory:
    """Accumulates per-(device, interval) sums; pure (no I/O, no clock)."""

    def __init__(self, interval_s: int = 300, grace_s: float | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("history_interval_s must be > 0")
        self.interval_ms = int(interval_s * 1000)
        # Keep an interval open a little past its end for late messages (10 % of it, ≤ 60 s);
        # anything later still lands, as a second row merged by the upsert.
        self.grace_ms = int((grace_s if grace_s is not None else min(60.0, interval_s / 10)) * 1000)
        self._index: dict[tuple[str, int], int] = {}
        self._keys: list[tuple[str, int]] = []
        cap = 1024
        self._sums = np.zeros((cap, _N))
        self._counts = np.zeros((cap, _N), dtype=np.int64)
        self._samples = np.zeros(cap, dtype=np.int64)
        self._starts = np.zeros(cap, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def _grow(self, need: int) -> None:
        cap = len(self._samples)
        if need <= cap:
            return
        new = max(need, cap * 2)
        self._sums = np.resize(self._sums, (new, _N))
        self._counts = np.resize(self._counts, (new, _N))
        self._samples = np.resize(self._samples, new)
        self._starts = np.resize(self._starts, new)
        self._sums[cap:] = 0.0
        self._counts[cap:] = 0
        self._samples[cap:] = 0

    def add(self, device_ids: Sequence[str], records: np.ndarray) -> None:
        """Add accepted readings: ``device_ids[i]`` sent ``records[i]`` (STATE_DTYPE)."""
        n = len(device_ids)
        if n == 0:
            return
        assert records.dtype == STATE_DTYPE and len(records) == n
        t = np.where(records["clock_skewed"] != 0, records["recv_ms"], records["ts_ms"])
        starts = (t // self.interval_ms) * self.interval_ms
        index = self._index
        keys = self._keys
        rows = np.empty(n, dtype=np.int64)
        for i, key in enumerate(zip(device_ids, starts.tolist(), strict=True)):
            row = index.get(key)
            if row is None:
                row = index[key] = len(keys)
                keys.append(key)
            rows[i] = row
        self._grow(len(keys))
        self._starts[rows] = starts
        vals = np.stack([records[f].astype(np.float64) for f in FIELDS], axis=1)
        present = ~np.isnan(vals)
        np.add.at(self._sums, rows, np.where(present, vals, 0.0))
        np.add.at(self._counts, rows, present.astype(np.int64))
        np.add.at(self._samples, rows, 1)

    def next_close_ms(self) -> int | None:
        """Service time at which the oldest open interval closes (None when empty)."""
        if not self._keys:
            return None
        return int(self._starts[: len(self._keys)].min()) + self.interval_ms + self.grace_ms

    def take_closed(self, now_ms: int, everything: bool = False) -> list[Row]:
        """Rows of the intervals closed at ``now_ms`` (all rows with ``everything``), removed
        from the accumulator."""
        n = len(self._keys)
        if n == 0:
            return []
        starts = self._starts[:n]
        if everything:
            done = np.ones(n, dtype=bool)
        else:
            done = starts + self.interval_ms + self.grace_ms <= now_ms
        if not done.any():
            return []
        idx = np.flatnonzero(done)
        counts = self._counts[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, self._sums[idx] / np.maximum(counts, 1), np.nan)
        samples = self._samples[idx].tolist()
        rows: list[Row] = []
        mean_rows = means.tolist()
        for j, i in enumerate(idx.tolist()):
            device_id, start = self._keys[i]
            row: Row = {"device_id": device_id, "interval_start_ms": start, "samples": samples[j]}
            for f, v in zip(FIELDS, mean_rows[j], strict=True):
                row[f] = None if v != v else v  # NaN → NULL
            rows.append(row)
        keep = np.flatnonzero(~done)
        self._keys = [self._keys[i] for i in keep.tolist()]
        self._index = {k: i for i, k in enumerate(self._keys)}
        m = len(keep)
        self._sums[:m] = self._sums[keep]
        self._counts[:m] = self._counts[keep]
        self._samples[:m] = self._samples[keep]
        self._starts[:m] = self._starts[keep]
        self._sums[m:n] = 0.0
        self._counts[m:n] = 0
        self._samples[m:n] = 0
        return rows


def _upsert(dialect: str, rows: list[Row]) -> Any:
    """INSERT … ON CONFLICT (device_id, interval_start_ms) DO UPDATE merging the two averages
    weighted by their sample counts (PostgreSQL and SQLite share the syntax)."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table: Any = TelemetryInterval.__table__
    stmt = insert(table).values(rows)
    new = stmt.excluded
    merged: dict[str, Any] = {"samples": table.c.samples + new.samples}
    for f in FIELDS:
        old_v, new_v = table.c[f], new[f]
        merged[f] = case(
            (old_v.is_(None), new_v),
            (new_v.is_(None), old_v),
            else_=(old_v * table.c.samples + new_v * new.samples) / (table.c.samples + new.samples),
        )
    return stmt.on_conflict_do_update(
        index_elements=[table.c.device_id, table.c.interval_start_ms], set_=merged
    )


async def write_intervals(db: Database, rows: list[Row], chunk: int = 2000) -> int:
    """Upsert rows into ``telemetry_intervals`` in one transaction; returns the row count."""
    if not rows:
        return 0
    async with db.session() as session:
        await _write(session, rows, chunk)
        await session.commit()
    return len(rows)


async def _write(session: AsyncSession, rows: list[Row], chunk: int) -> None:
    dialect = session.get_bind().dialect.name
    # SQLite allows 32 766 bound parameters a statement; 9 columns a row.
    chunk = min(chunk, 3000) if dialect == "sqlite" else chunk
    for lo in range(0, len(rows), chunk):
        await session.execute(_upsert(dialect, rows[lo : lo + chunk]))
