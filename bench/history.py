"""Interval history at national scale, against the real PostgreSQL on this machine, in a private
database (``bench_history``, created and dropped here) migrated to head: the history table
partitioned by day.

Prints:

- the write rate of the service's write path (``store.history.write_partials``: the partials
  sorted and encoded into one binary COPY stream by numpy, one autocommit COPY straight into the
  partitioned table on a kept connection, the staging merge only if a row is stored already)
  against a bare COPY of the same rows into the same partitioned table (another day's
  partition): asyncpg's ``copy_records_to_table`` of ready-made tuples, one autocommit
  statement, on one connection of its own. Batch by batch in turns, in the same run; batches of
  ``--batch`` rows of one interval each, what one write-through carries (a million devices
  reporting every 5 minutes: ~830 rows every 250 ms);
- the rate when every row merges into a stored one (a device reporting more than once per
  interval);
- bytes per device-day on disk: ``pg_total_relation_size`` of the day's partition (table, TOAST
  and both indexes) per 288 rows, for ``--day-devices`` devices × ``--intervals`` five-minute
  rows (a whole day; 48 in ``--small``) (half
  batteries, half thermostats, each with its own fields and NULL in the others);
- the time of the settlement's history read (``dispatch.settlement_service._history``) of a
  10-day baseline window for ``--devices`` devices. Only the intervals a baseline of a one-hour
  event reads are loaded (that hour, 12 rows, on each of the 10 days before the event; half an
  hour in ``--small``): loading
  all 288 rows × 10 days × 100 000 devices is beyond this machine; the query still spans the 10
  days' partitions, which hold nothing else.

    .venv/bin/python bench/history.py            # 2 000 device-days; baseline 100 000 devices
    .venv/bin/python bench/history.py --small    # 1 000 devices x 4 h; baseline 5 000 devices
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dispatch.settlement_service import _history  # noqa: E402
from store.database import Database  # noqa: E402
from store.history import FIELDS, Partials, write_partials  # noqa: E402
from store.history_partitions import DAY_MS, ensure_day, partition_name  # noqa: E402
from store.migrate import upgrade  # noqa: E402

PG_ADMIN_DSN = os.environ.get("VPP_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DB_NAME = "bench_history"
INTERVAL_MS = 300_000
PER_DAY = DAY_MS // INTERVAL_MS  # 288
COLUMNS = ["device_id", "interval_start_ms", "samples", *FIELDS]
BATTERY = np.array([True, True, False, False, False, False])  # power_w, soc_pct
THERMOSTAT = ~BATTERY  # indoor_c, setpoint_c, hvac_w, outdoor_c
DAY0 = 1_784_000_000_000 // DAY_MS  # a day in July 2026


def partials_of(ids: list[str], start_ms: int, rng: np.random.Generator) -> Partials:
    """One reading of every device for the interval at ``start_ms``."""
    n = len(ids)
    sums = rng.normal(1000.0, 300.0, (n, len(FIELDS)))
    present = np.where((np.arange(n) % 2 == 0)[:, None], BATTERY, THERMOSTAT)
    sums[~present] = 0.0
    return Partials(
        keys=[(d, start_ms) for d in ids],
        sums=sums,
        counts=present.astype(np.int64),
        samples=np.ones(n, dtype=np.int64),
    )


def records_of(p: Partials) -> list[tuple[Any, ...]]:
    return list(zip(*p.columns().values(), strict=True))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--devices", type=int, default=None, help="devices of the baseline read")
    ap.add_argument("--day-devices", type=int, default=None, help="devices × one full day")
    ap.add_argument("--intervals", type=int, default=None, help="intervals per device")
    ap.add_argument("--batch", type=int, default=1000, help="rows per write")
    args = ap.parse_args()
    n_base = args.devices or (5_000 if args.small else 100_000)
    n_day = args.day_devices or (1_000 if args.small else 2_000)
    # Five-minute intervals written per device: a whole day (a morning in --small).
    n_intervals = args.intervals or (48 if args.small else PER_DAY)
    # Intervals of the event window loaded on each of the 10 days (one hour; half in --small).
    n_win = 6 if args.small else 12

    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + DB_NAME
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    db = Database(url)
    try:
        await asyncio.to_thread(upgrade, url)
        ours_day, bare_day = DAY0, DAY0 + 1
        for day in range(DAY0 - 11, DAY0 + 2):
            await ensure_day(db, day)
        bare = await asyncpg.connect(dsn)
        rng = np.random.default_rng(12)
        ids = [f"dev-{i:07d}" for i in range(n_day)]

        # 0. Untimed: each side's connection made and its first COPY run (another day, other
        # devices), so the timed batches compare writes, not connection set-up.
        warm = partials_of([f"warm-{i}" for i in range(args.batch)], (DAY0 - 10) * DAY_MS, rng)
        await write_partials(db, warm)
        await bare.copy_records_to_table(
            "telemetry_intervals",
            records=records_of(
                Partials(
                    keys=[(d, s + INTERVAL_MS) for d, s in warm.keys],
                    sums=warm.sums,
                    counts=warm.counts,
                    samples=warm.samples,
                )
            ),
            columns=COLUMNS,
        )

        # 1. One full day of n_day devices, written both ways in turns, batch by batch.
        t_ours = t_bare = 0.0
        rows = 0
        turn = 0
        for k in range(n_intervals):
            for lo in range(0, n_day, args.batch):
                chunk = ids[lo : lo + args.batch]
                p = partials_of(chunk, ours_day * DAY_MS + k * INTERVAL_MS, rng)
                shifted = Partials(
                    keys=[(d, s + DAY_MS) for d, s in p.keys],
                    sums=p.sums,
                    counts=p.counts,
                    samples=p.samples,
                )
                recs = records_of(shifted)  # the peer gets its rows ready-made

                async def run_ours(p: Partials = p) -> float:
                    t = time.perf_counter()
                    await write_partials(db, p)
                    return time.perf_counter() - t

                async def run_bare(recs: list[tuple[Any, ...]] = recs) -> float:
                    # One statement, its own transaction: no BEGIN/COMMIT round trips.
                    t = time.perf_counter()
                    await bare.copy_records_to_table(
                        "telemetry_intervals", records=recs, columns=COLUMNS
                    )
                    return time.perf_counter() - t

                if turn % 2 == 0:
                    t_ours += await run_ours()
                    t_bare += await run_bare()
                else:
                    t_bare += await run_bare()
                    t_ours += await run_ours()
                turn += 1
                rows += len(chunk)
        size = {}
        for day in (ours_day, bare_day):
            size[day] = await bare.fetchval(
                f"SELECT pg_total_relation_size('{partition_name(day)}')"
            )
        r_ours, r_bare = rows / t_ours, rows / t_bare
        print(
            f"history write: {r_ours:,.0f} rows/s; bare COPY of the same rows into the same "
            f"partitioned table: {r_bare:,.0f} rows/s; ratio {r_ours / r_bare:.2f} (goal >= 0.8) "
            f"[{rows} rows in batches of {args.batch}]"
        )

        # 2. The same rows again: every one merges into a stored row.
        t = time.perf_counter()
        for k in range(n_intervals):
            for lo in range(0, n_day, args.batch):
                start = ours_day * DAY_MS + k * INTERVAL_MS
                await write_partials(db, partials_of(ids[lo : lo + args.batch], start, rng))
        merge_rate = rows / (time.perf_counter() - t)
        print(f"history write, every row merging into a stored one: {merge_rate:,.0f} rows/s")
        print(
            f"history bytes per device-day on disk: {size[ours_day] / rows * PER_DAY:,.0f} "
            f"(bare COPY's partition: {size[bare_day] / rows * PER_DAY:,.0f}; table + indexes "
            f"of {n_day} devices x {n_intervals} rows, per {PER_DAY} rows)"
        )

        # 3. The baseline read: 10 days before a one-hour event at 17:00 UTC on DAY0 + 1.
        event_start = (DAY0 + 1) * DAY_MS + 17 * 3_600_000
        base_ids = [f"b-{i:07d}" for i in range(n_base)]
        t = time.perf_counter()
        loaded = 0
        for back in range(1, 11):
            for k in range(n_win):
                start = event_start - back * DAY_MS + k * INTERVAL_MS
                for lo in range(0, n_base, 50_000):
                    recs = records_of(partials_of(base_ids[lo : lo + 50_000], start, rng))
                    async with bare.transaction():
                        await bare.copy_records_to_table(
                            "telemetry_intervals", records=recs, columns=COLUMNS
                        )
                    loaded += len(recs)
        await bare.execute("ANALYZE telemetry_intervals")
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        hist = await _history(
            SimpleNamespace(db=db),  # type: ignore[arg-type]
            base_ids,
            event_start - 10 * DAY_MS,
            event_start,
        )
        query_s = time.perf_counter() - t
        got = len(hist.cols)
        assert got == loaded, (got, loaded)
        # The same rows by the bare driver, no ORM rows or dicts: what the database costs.
        t = time.perf_counter()
        for lo in range(0, n_base, 10_000):
            await bare.fetch(
                "SELECT device_id, interval_start_ms, power_w, hvac_w FROM telemetry_intervals "
                "WHERE device_id = ANY($1) AND interval_start_ms >= $2 AND interval_start_ms < $3",
                base_ids[lo : lo + 10_000],
                event_start - 10 * DAY_MS,
                event_start,
            )
        raw_s = time.perf_counter() - t
        print(
            f"history 10-day baseline query for {n_base} devices: {query_s:.2f} s "
            f"({got:,} rows: {n_win} intervals x 10 days each, loaded in {load_s:.0f} s; the "
            f"same rows by the bare driver: {raw_s:.2f} s)"
        )
        await bare.close()
    finally:
        await db.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
