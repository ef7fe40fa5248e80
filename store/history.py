"""Interval history of telemetry: per device, the average of each reading over fixed intervals
(5 minutes by default, ``settings.history_interval_s``), for baselines and settlement.

:class:`IntervalHistory` is the pure part: ingest hands it each batch of accepted records
(``STATE_DTYPE``) and it accumulates sums and per-field sample counts in numpy arrays, one row
per (device, interval). Ingest writes through: every ``settings.history_writethrough_ms`` it
takes every open partial row (:meth:`IntervalHistory.take_all`, which empties the accumulator)
and upserts it; when that write fails it gives the partials back (:meth:`IntervalHistory.restore`,
exact: sums and counts add) and, past its bound, drops the oldest intervals first
(:meth:`IntervalHistory.drop_oldest`), counting the readings dropped.

:func:`write_intervals` and :func:`write_partials` store rows in ``telemetry_intervals`` (on
PostgreSQL partitioned by day, see :mod:`store.history_partitions`) with a merge of sample counts
and averages; on PostgreSQL the rows are encoded once into a binary COPY stream
(:func:`copy_binary`, numpy) and go straight into the table by one autocommit COPY when none of
them is stored yet, else by COPY into a staging table and one ordered ``INSERT … SELECT … ON
CONFLICT`` that merges them, so the write-through partials of one interval, two ingest
workers that both saw samples of the same device and interval (the shared subscription splits
messages, not devices), and samples that arrive late all add up instead of failing or overwriting.
The merge weighs each average by the row's ``samples``: exact for every field a device of its kind
always sends (``power_w``, ``soc_pct``; ``indoor_c``, ``setpoint_c``, ``hvac_w``), an approximation
for an optional field sent in some readings only (``outdoor_c``), whose own count the table does
not keep.

A sample's interval is chosen by the device's ``ts``, or by the receive time when the device's
clock is flagged as skewed.
"""

from __future__ import annotations

import asyncio
import functools
import io
import random
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import asyncpg
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import select, text

from store.database import Database, copy_csv
from store.models import TelemetryInterval
from vpp import metrics
from vpp.fleet.records import STATE_DTYPE

FIELDS = ("power_w", "soc_pct", "indoor_c", "setpoint_c", "hvac_w", "outdoor_c")
_N = len(FIELDS)

Row = dict[str, Any]  # a telemetry_intervals row: device_id, interval_start_ms, samples, FIELDS
Columns = dict[str, list[Any]]  # the same, one list per column


@dataclass(frozen=True)
class Partials:
    """Open rows taken out of an :class:`IntervalHistory`: keys ``(device_id, start_ms)`` and,
    aligned with them, per-field sums and sample counts and the readings per row."""

    keys: list[tuple[str, int]]
    sums: np.ndarray  # (n, len(FIELDS)) float64
    counts: np.ndarray  # (n, len(FIELDS)) int64
    samples: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def readings(self) -> int:
        return int(self.samples.sum())

    def _means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)

    def rows(self) -> list[Row]:
        """``telemetry_intervals`` rows: the means of the fields present, NULL for the others."""
        rows: list[Row] = []
        for (device_id, start), n, mean_row in zip(
            self.keys, self.samples.tolist(), self._means().tolist(), strict=True
        ):
            row: Row = {"device_id": device_id, "interval_start_ms": start, "samples": n}
            for f, v in zip(FIELDS, mean_row, strict=True):
                row[f] = None if v != v else v  # NaN → NULL
            rows.append(row)
        return rows

    def columns(self) -> Columns:
        """The same rows column by column (what the PostgreSQL upsert sends), without building a
        dict per row: the write-through's hot path."""
        cols: Columns = {
            "device_id": [k[0] for k in self.keys],
            "interval_start_ms": [k[1] for k in self.keys],
            "samples": self.samples.tolist(),
        }
        means = self._means()
        for j, f in enumerate(FIELDS):
            col = means[:, j]
            if np.isnan(col).all():
                cols[f] = [None] * len(col)
            elif np.isnan(col).any():
                cols[f] = [None if v != v else v for v in col.tolist()]  # NaN → NULL
            else:
                cols[f] = col.tolist()
        return cols


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

    @property
    def readings(self) -> int:
        """Readings held (not yet handed out)."""
        return int(self._samples[: len(self._keys)].sum())

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
        rows = self._rows_for(list(zip(device_ids, starts.tolist(), strict=True)), starts)
        vals = np.stack([records[f].astype(np.float64) for f in FIELDS], axis=1)
        present = ~np.isnan(vals)
        np.add.at(self._sums, rows, np.where(present, vals, 0.0))
        np.add.at(self._counts, rows, present.astype(np.int64))
        np.add.at(self._samples, rows, 1)

    def _rows_for(self, keys_in: Sequence[tuple[str, int]], starts: np.ndarray) -> np.ndarray:
        """Accumulator row of each key, new rows made (and the arrays grown) as needed."""
        index = self._index
        keys = self._keys
        rows = np.empty(len(keys_in), dtype=np.int64)
        for i, key in enumerate(keys_in):
            row = index.get(key)
            if row is None:
                row = index[key] = len(keys)
                keys.append(key)
            rows[i] = row
        self._grow(len(keys))
        self._starts[rows] = starts
        return rows

    def take_all(self) -> Partials:
        """Every open row, partial sums and counts as they are; the accumulator is left empty."""
        n = len(self._keys)
        taken = Partials(
            keys=self._keys,
            sums=self._sums[:n].copy(),
            counts=self._counts[:n].copy(),
            samples=self._samples[:n].copy(),
        )
        self._keys = []
        self._index = {}
        self._sums[:n] = 0.0
        self._counts[:n] = 0
        self._samples[:n] = 0
        return taken

    def restore(self, partials: Partials) -> None:
        """Give back rows taken by :meth:`take_all` (a write that failed): sums, counts and
        readings add to whatever arrived since, so the rows stay exact."""
        if not len(partials):
            return
        starts = np.fromiter((k[1] for k in partials.keys), dtype=np.int64, count=len(partials))
        rows = self._rows_for(partials.keys, starts)
        np.add.at(self._sums, rows, partials.sums)
        np.add.at(self._counts, rows, partials.counts)
        np.add.at(self._samples, rows, partials.samples)

    def drop_oldest(self, max_rows: int) -> tuple[int, int]:
        """Keep at most ``max_rows`` rows, dropping those of the oldest intervals first;
        returns ``(rows, readings)`` dropped."""
        n = len(self._keys)
        if n <= max_rows:
            return 0, 0
        order = np.argsort(self._starts[:n], kind="stable")  # oldest first, then arrival
        drop = np.zeros(n, dtype=bool)
        drop[order[: n - max(max_rows, 0)]] = True
        readings = int(self._samples[:n][drop].sum())
        self._compact(drop)
        return int(drop.sum()), readings

    def _compact(self, done: np.ndarray) -> None:
        """Forget the rows where ``done`` is set, keeping the others in order."""
        n = len(self._keys)
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
        taken = Partials(
            keys=[self._keys[i] for i in idx.tolist()],
            sums=self._sums[idx],
            counts=self._counts[idx],
            samples=self._samples[idx],
        )
        self._compact(done)
        return taken.rows()


# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back
# whole and can simply run again. With one canonical row order a deadlock should not happen
# between two writers; the retry covers what that order cannot (another writer of the table with
# its own order). Prompt: a write-through's ordinary backoff is seconds, minutes of service time.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
CONFLICT_RETRIES = 5


def is_transient_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: nothing wrong with the rows, try again."""
    for e in (exc, getattr(exc, "orig", None), exc.__cause__):
        if e is not None and (getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)) in (
            _RETRY_SQLSTATES
        ):
            return True
    return False


async def _with_conflict_retry(run: Callable[[], Awaitable[None]]) -> None:
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            await run()
            return
        except Exception as exc:  # SQLAlchemy's DBAPIError, or asyncpg's own from the COPY path
            if attempt == CONFLICT_RETRIES or not is_transient_conflict(exc):
                raise
            metrics.HISTORY_WRITE_CONFLICTS.inc()
            # A few ms, jittered so the two writers do not meet again in step.
            await asyncio.sleep(random.uniform(0.002, 0.02) * (attempt + 1))


async def write_intervals(db: Database, rows: list[Row], chunk: int = 2000) -> int:
    """Upsert rows into ``telemetry_intervals`` in one transaction, run again at once after a
    deadlock; returns the row count. The keys ``(device_id, interval_start_ms)`` of one call must
    be distinct."""
    if not rows:
        return 0
    if not db.is_sqlite:
        means = np.array(
            [[np.nan if r[f] is None else r[f] for f in FIELDS] for r in rows], dtype=np.float64
        ).reshape(len(rows), _N)
        data = copy_binary(
            [r["device_id"] for r in rows],
            np.fromiter((r["interval_start_ms"] for r in rows), np.int64, len(rows)),
            np.fromiter((r["samples"] for r in rows), np.int64, len(rows)),
            means,
            ~np.isnan(means),
        )
        await _with_conflict_retry(lambda: _pg_copy_merge(db, data))
        return len(rows)

    async def run() -> None:
        async with db.session() as session:
            for lo in range(0, len(rows), chunk):
                await session.execute(_SQLITE_UPSERT, rows[lo : lo + chunk])
            await session.commit()

    await _with_conflict_retry(run)
    return len(rows)


async def write_partials(db: Database, partials: Partials) -> int:
    """Upsert :meth:`IntervalHistory.take_all`'s rows in one transaction (run again at once
    after a deadlock); returns the count."""
    if not len(partials):
        return 0
    if db.is_sqlite:  # executemany takes rows
        return await write_intervals(db, partials.rows())
    keys = partials.keys
    present = partials.counts > 0
    data = copy_binary(
        list(map(itemgetter(0), keys)),
        np.fromiter(map(itemgetter(1), keys), np.int64, len(keys)),
        partials.samples,
        partials.sums / np.maximum(partials.counts, 1),  # where present: the mean
        present,
    )
    await _with_conflict_retry(lambda: _pg_copy_merge(db, data))
    return len(partials)


# PostgreSQL's binary COPY format: a signature, flags and header extension (both 0), then per
# row a field count and each field as its length (-1: NULL) and its bytes, all big-endian; a
# field count of -1 ends it.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"


def copy_binary(
    device_ids: Sequence[str],
    starts: np.ndarray,
    samples: np.ndarray,
    means: np.ndarray,
    present: np.ndarray,
) -> bytes:
    """The rows ``(device_id, interval_start_ms, samples, *FIELDS)`` as one binary COPY stream
    for ``telemetry_intervals`` (or its staging table), sorted by key; ``means`` (n, FIELDS)
    holds the values, NULL where ``present`` is False.

    Built by numpy, without a Python object per value: every row is laid out in one fixed-width
    record (the id padded to the longest, every field 8 bytes), and one boolean mask keeps the
    bytes that are really there (the id's own length, nothing after a NULL's length). Sorted by
    ``(device_id, interval_start_ms)``, UTF-8 bytes compared as Python compares the strings:
    two writers of overlapping rows take their locks in the same order."""
    n = len(device_ids)
    flat = "".join(device_ids).encode()
    id_len = np.fromiter(map(len, device_ids), np.int64, n)
    if len(flat) != int(id_len.sum()):  # not all ASCII: each id's own UTF-8 length
        id_len = np.fromiter((len(d.encode()) for d in device_ids), np.int64, n)
    width = max(int(id_len.max(initial=0)), 1)
    padded = np.zeros((n, width), dtype=np.uint8)
    padded[np.arange(width) < id_len[:, None]] = np.frombuffer(flat, dtype=np.uint8)
    raw_ids = padded.view(f"S{width}").ravel()
    order = np.lexsort((starts, raw_ids))
    layout = _copy_layout(width)
    rec = np.empty(n, dtype=layout)
    rec["n"] = len(_COLUMNS)
    rec["id_len"] = id_len = id_len[order]
    rec["id"] = raw_ids[order]
    rec["start_len"], rec["start"] = 8, starts[order]
    rec["samples_len"], rec["samples"] = 4, samples[order]
    present = present[order]
    rec["fields"]["len"] = np.where(present, 8, -1)
    rec["fields"]["value"] = means[order]  # a NULL's bytes are cut out below
    keep = np.ones((n, layout.itemsize), dtype=bool)
    offsets = layout.fields
    assert offsets is not None
    at = offsets["id"][1]
    np.less(np.arange(width), id_len[:, None], out=keep[:, at : at + width])
    at = offsets["fields"][1]
    keep[:, at : at + 12 * _N].reshape(n, _N, 12)[:, :, 4:] = present[:, :, None]
    body = rec.view(np.uint8).reshape(n, layout.itemsize)[keep]
    return b"".join((_COPY_HEADER, body.tobytes(), _COPY_TRAILER))


@functools.lru_cache(maxsize=64)
def _copy_layout(id_width: int) -> np.dtype:
    """One row of :func:`copy_binary` before the cut: field count, then (length, value) each."""
    return np.dtype(
        [
            ("n", ">i2"),
            ("id_len", ">i4"),
            ("id", f"S{id_width}"),
            ("start_len", ">i4"),
            ("start", ">i8"),
            ("samples_len", ">i4"),
            ("samples", ">i4"),
            ("fields", [("len", ">i4"), ("value", ">f8")], (_N,)),
        ]
    )


class _CopyFirst:
    """When to try the rows straight into the table by COPY first: always, until a try meets a
    stored row; then the next 1, 2, 4 … 64 writes go straight to the staging merge, so a fleet
    whose devices report several times an interval pays for a failed COPY at most once in 65
    writes, and one that reports once an interval (the common case) nearly never."""

    MAX_SKIP = 64

    def __init__(self) -> None:
        self.skip = 0
        self.next_skip = 1

    def should_try(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def met_stored_row(self) -> None:
        self.skip = self.next_skip
        self.next_skip = min(self.next_skip * 2, self.MAX_SKIP)

    def all_new(self) -> None:
        self.next_skip = 1


_COPY_FIRST: weakref.WeakKeyDictionary[Database, _CopyFirst] = weakref.WeakKeyDictionary()


async def _pg_copy_merge(db: Database, data: bytes) -> None:
    """PostgreSQL: the rows (:func:`copy_binary`, sorted by key) land in one committed
    transaction (every reading of them accepted) or in none.

    The rows go by binary COPY straight into the partitioned table when none of them is stored
    yet: one statement in autocommit, its own transaction, committed when the COPY returns, and
    the first stored row met (a unique violation) rolls it back whole. Then, or when
    :class:`_CopyFirst` says the rows are likely stored, they go by COPY into this connection's
    staging table and one ordered ``INSERT … SELECT … ON CONFLICT`` merges them, in one
    transaction. The merge costs ~2× the COPY per row (speculative insertion, row by row),
    hence the first try. The connection is :meth:`Database.bulk_connection`'s (no ping at
    checkout): the whole write is two round trips when the COPY goes in."""
    policy = _COPY_FIRST.setdefault(db, _CopyFirst())
    source = memoryview(data)  # a buffer: asyncpg would read bytes as a file's path
    async with db.bulk_connection() as pg:
        if policy.should_try():
            try:
                await pg.copy_to_table(_TABLE, source=source, columns=_COLUMNS, format="binary")
                policy.all_new()
                return
            except asyncpg.UniqueViolationError:  # rolled back whole: nothing of it stays
                policy.met_stored_row()
        created = pg not in _STAGED
        async with pg.transaction():
            if created:
                await pg.execute(_PG_STAGE_DDL)
            await pg.copy_to_table(_STAGE, source=source, columns=_COLUMNS, format="binary")
            await pg.execute(_PG_MERGE)
        if created:  # only once committed: a rolled-back CREATE leaves no table behind
            _STAGED.add(pg)


# One merge, in SQL text for both databases. PostgreSQL: the batch goes by binary COPY (no
# statement to bind per row) into a temporary staging table of the connection, then one INSERT …
# SELECT merges it into the partitioned table: a COPY cannot merge, and the staging table is
# cheap (temporary: no WAL, no index; emptied at each commit). SQLite: one prepared statement
# run for every row (executemany).
_TABLE = TelemetryInterval.__tablename__
_COLUMNS = ["device_id", "interval_start_ms", "samples", *FIELDS]
_STAGE = "telemetry_intervals_stage"
_PG_STAGE_DDL = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} "
    f"(LIKE {_TABLE} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
# asyncpg connections that have made their staging table (it lives as long as the connection).
_STAGED: weakref.WeakSet[Any] = weakref.WeakSet()


def _merge(f: str) -> str:
    """The stored average and the new one, weighted by their sample counts (NULL: absent)."""
    old, new = f"t.{f}", f"excluded.{f}"
    return (
        f"{f} = CASE WHEN {old} IS NULL THEN {new} WHEN {new} IS NULL THEN {old} "
        f"ELSE ({old} * t.samples + {new} * excluded.samples) / (t.samples + excluded.samples) END"
    )


_ON_CONFLICT = (
    " ON CONFLICT (device_id, interval_start_ms) DO UPDATE SET samples = t.samples + "
    "excluded.samples, " + ", ".join(_merge(f) for f in FIELDS)
)
_INSERT = f"INSERT INTO {TelemetryInterval.__tablename__} AS t ({', '.join(_COLUMNS)}) "
_PG_MERGE = (
    _INSERT
    + f"SELECT {', '.join(_COLUMNS)} FROM {_STAGE}"
    # One canonical order: two writers merging overlapping rows then lock them in the same
    # order, and wait for each other instead of deadlocking.
    + " ORDER BY device_id, interval_start_ms"
    + _ON_CONFLICT
)
_SQLITE_UPSERT = text(
    _INSERT + "VALUES (" + ", ".join(f":{c}" for c in _COLUMNS) + ")" + _ON_CONFLICT
)


@dataclass(frozen=True)
class HistoryColumns:
    """Interval rows of a list of devices, one array per column: ``row`` indexes the device list
    the rows were read for, ``start_ms`` is the interval's start, ``power_w`` and ``hvac_w`` are
    NaN where the interval has no such reading."""

    row: np.ndarray
    start_ms: np.ndarray
    power_w: np.ndarray
    hvac_w: np.ndarray

    @staticmethod
    def empty() -> HistoryColumns:
        z = np.zeros(0, dtype=np.int64)
        return HistoryColumns(z, z.copy(), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return int(self.row.size)


# The device list joins as an array with its positions, so the rows come back keyed by position
# (numbers only: no Python string per row) and the range on the partition key prunes the days.
HISTORY_SQL = (
    "SELECT u.pos - 1, t.interval_start_ms, t.power_w, t.hvac_w "
    "FROM unnest($1::varchar[]) WITH ORDINALITY AS u(id, pos) "
    "JOIN telemetry_intervals t ON t.device_id = u.id "
    "WHERE t.interval_start_ms >= $2 AND t.interval_start_ms < $3"
)
# The same, keeping only the first ``$5`` ms of each day counted from ``$4`` (the windows of a
# day-on-day baseline), so a 20-day look-back reads its windows, not whole days.
HISTORY_DAILY_SQL = HISTORY_SQL + " AND (t.interval_start_ms - $4) % 86400000 < $5"


async def read_history(
    db: Database,
    device_ids: Sequence[str],
    lo_ms: int,
    hi_ms: int,
    *,
    daily_from_ms: int | None = None,
    daily_width_ms: int | None = None,
) -> HistoryColumns:
    """The interval rows of ``device_ids`` with start in [lo, hi), as columns (see
    :class:`HistoryColumns`). With ``daily_from_ms``/``daily_width_ms`` only the rows within
    ``width`` of ``daily_from_ms`` + k days. PostgreSQL: one COPY of the join; SQLite: a query."""
    if not device_ids or hi_ms <= lo_ms:
        return HistoryColumns.empty()
    ids = list(device_ids)
    daily = daily_from_ms is not None and daily_width_ms is not None
    if not db.is_sqlite:
        args: list[Any] = [ids, int(lo_ms), int(hi_ms)]
        if daily:
            args += [int(daily_from_ms or 0), int(daily_width_ms or 0)]
        data = await copy_csv(db, HISTORY_DAILY_SQL if daily else HISTORY_SQL, *args)
        if data is not None:
            return _columns_from_csv(data)
    async with db.session() as s:
        rows: list[Any] = []
        for k in range(0, len(ids), 10_000):
            chunk = ids[k : k + 10_000]
            rows += (
                await s.execute(
                    select(
                        TelemetryInterval.device_id,
                        TelemetryInterval.interval_start_ms,
                        TelemetryInterval.power_w,
                        TelemetryInterval.hvac_w,
                    ).where(
                        TelemetryInterval.device_id.in_(chunk),
                        TelemetryInterval.interval_start_ms >= int(lo_ms),
                        TelemetryInterval.interval_start_ms < int(hi_ms),
                    )
                )
            ).all()
    if not rows:
        return HistoryColumns.empty()
    position = {d: i for i, d in enumerate(ids)}
    start = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    keep = np.ones(len(rows), dtype=bool)
    if daily:
        keep = (start - int(daily_from_ms or 0)) % 86_400_000 < int(daily_width_ms or 0)
    return HistoryColumns(
        row=np.fromiter((position[r[0]] for r in rows), dtype=np.int64, count=len(rows))[keep],
        start_ms=start[keep],
        power_w=np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=float)[keep],
        hvac_w=np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=float)[keep],
    )


def _columns_from_csv(data: bytes) -> HistoryColumns:
    if not data:
        return HistoryColumns.empty()
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=["row", "start", "power", "hvac"]),
        convert_options=pacsv.ConvertOptions(
            column_types={
                "row": pa.int64(),
                "start": pa.int64(),
                "power": pa.float64(),
                "hvac": pa.float64(),
            }
        ),
    )

    def floats(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=float)

    return HistoryColumns(
        row=np.asarray(table.column("row").to_numpy(), dtype=np.int64),
        start_ms=np.asarray(table.column("start").to_numpy(), dtype=np.int64),
        power_w=floats("power"),
        hvac_w=floats("hvac"),
    )
