"""The history's binary COPY stream (numpy-built, ``store.history.copy_binary``) and the kept
driver connection it travels on (``Database.bulk_connection``): every value and NULL comes back
as written, rows go in key order whatever order they were taken in, and a kept connection the
server closed is replaced without failing the write."""

from __future__ import annotations

import asyncio
import struct

import asyncpg
import numpy as np

from store.database import BULK_KEPT, Database
from store.history import FIELDS, Partials, copy_binary, write_intervals, write_partials

NOW = 1_784_061_000_000
INTERVAL_MS = 300_000


def parse(stream: bytes) -> list[tuple[object, ...]]:
    """PostgreSQL's binary COPY format, read back: (device_id, start, samples, *FIELDS)."""
    assert stream[:11] == b"PGCOPY\n\xff\r\n\x00"
    flags, ext = struct.unpack_from(">ii", stream, 11)
    assert flags == 0
    pos = 19 + ext
    rows: list[tuple[object, ...]] = []
    while True:
        (nfields,) = struct.unpack_from(">h", stream, pos)
        pos += 2
        if nfields == -1:
            break
        assert nfields == 3 + len(FIELDS)
        raw: list[bytes | None] = []
        for _ in range(nfields):
            (length,) = struct.unpack_from(">i", stream, pos)
            pos += 4
            raw.append(None if length == -1 else stream[pos : pos + length])
            pos += max(length, 0)
        dev, start, samples, *vals = raw
        assert dev is not None and start is not None and samples is not None
        assert len(start) == 8 and len(samples) == 4
        rows.append(
            (
                dev.decode(),
                struct.unpack(">q", start)[0],
                struct.unpack(">i", samples)[0],
                *(None if v is None else struct.unpack(">d", v)[0] for v in vals),
            )
        )
    assert pos == len(stream)
    return rows


def mixed(n: int, seed: int = 7) -> Partials:
    """Ids of every length up to 64 (some not ASCII), in no order, any pattern of NULLs."""
    rng = np.random.default_rng(seed)
    keys: list[tuple[str, int]] = []
    for i in range(n):
        stem = ("é" if i % 5 == 0 else "") + ("x" * int(rng.integers(0, 50))) + f"-{i}"
        keys.append((stem[:64], NOW + int(rng.integers(0, 4)) * INTERVAL_MS))
    counts = rng.integers(0, 3, (n, len(FIELDS)))
    sums = rng.normal(0.0, 1e4, (n, len(FIELDS))) * counts
    return Partials(keys=keys, sums=sums, counts=counts, samples=counts.max(axis=1) + 1)


def as_tuples(p: Partials) -> list[tuple[object, ...]]:
    return [
        (r["device_id"], r["interval_start_ms"], r["samples"], *(r[f] for f in FIELDS))
        for r in p.rows()
    ]


def test_the_stream_holds_every_value_and_null_in_key_order() -> None:
    p = mixed(300)
    present = p.counts > 0
    stream = copy_binary(
        [k[0] for k in p.keys],
        np.array([k[1] for k in p.keys], dtype=np.int64),
        p.samples,
        p.sums / np.maximum(p.counts, 1),
        present,
    )
    got = parse(stream)
    want = sorted(as_tuples(p), key=lambda r: (r[0], r[1]))  # Python's order of the keys
    assert got == want
    empty = copy_binary([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 6)),
                        np.zeros((0, 6), bool))  # fmt: skip
    assert parse(empty) == []


async def test_binary_copy_round_trips_through_postgres(fresh_pg_url: str) -> None:
    db = Database(fresh_pg_url)
    try:
        p = mixed(400)
        assert await write_partials(db, p) == 400  # COPY straight in
        rows = [
            {"device_id": "ü-closed", "interval_start_ms": NOW, "samples": 3}
            | {f: None for f in FIELDS}
            | {"hvac_w": -12.5, "outdoor_c": float("nan")}  # NaN: NULL, as None
        ]
        assert await write_intervals(db, rows) == 1
        async with db.bulk_connection() as pg:
            stored = await pg.fetch(
                "SELECT device_id, interval_start_ms, samples, "
                + ", ".join(FIELDS)
                + " FROM telemetry_intervals ORDER BY device_id, interval_start_ms"
            )
        got = {(r[0], r[1]): tuple(r) for r in stored}
        for row in as_tuples(p):
            assert got.pop((row[0], row[1])) == row
        assert got == {("ü-closed", NOW): ("ü-closed", NOW, 3, None, None, None, None, -12.5, None)}
    finally:
        await db.dispose()


async def backend_pids(admin: asyncpg.Connection, datname: str) -> set[int]:
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        datname,
    )
    return {r[0] for r in rows}


async def test_the_kept_connection_is_reused_replaced_when_closed_and_closed_at_dispose(
    fresh_pg_url: str,
) -> None:
    db = Database(fresh_pg_url)
    datname = fresh_pg_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(fresh_pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        one = [(f"k-{i}", NOW) for i in range(10)]
        p = Partials(
            keys=one,
            sums=np.ones((10, len(FIELDS))),
            counts=np.ones((10, len(FIELDS)), dtype=np.int64),
            samples=np.ones(10, dtype=np.int64),
        )
        await write_partials(db, p)
        async with db.bulk_connection() as pg:
            first = pg.get_server_pid()
        # A write that meets stored rows (a unique violation, then the merge) keeps it too.
        await write_partials(db, p)
        async with db.bulk_connection() as pg:
            assert pg.get_server_pid() == first
            assert await pg.fetchval("SELECT sum(samples) FROM telemetry_intervals") == 20

        # The server drops it while it is kept (a restart, an idle timeout): the next write
        # gets a new one and goes through.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        await asyncio.sleep(0.2)  # the socket's end reaches the kept connection
        later = Partials(
            keys=[(d, s + INTERVAL_MS) for d, s in one],
            sums=p.sums,
            counts=p.counts,
            samples=p.samples,
        )
        assert await write_partials(db, later) == 10
        async with db.bulk_connection() as pg:
            second = pg.get_server_pid()
            assert second != first
            assert await pg.fetchval("SELECT count(*) FROM telemetry_intervals") == 20

        # One whose use was cut short (a cancelled statement) is closed, not kept.
        async def sleeper() -> None:
            async with db.bulk_connection() as pg:
                await pg.execute("SELECT pg_sleep(10)")

        task = asyncio.create_task(sleeper())
        await asyncio.sleep(0.2)
        assert db._bulk_idle == []  # the sleeper holds the only one
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert db._bulk_idle == []

        # Several at once: each its own connection; at most BULK_KEPT stay.
        async def hold() -> None:
            async with db.bulk_connection() as pg:
                await pg.execute("SELECT pg_sleep(0.05)")

        await asyncio.gather(*(hold() for _ in range(BULK_KEPT + 2)))
        assert len(db._bulk_idle) == BULK_KEPT
        await db.dispose()  # closes every kept one
        for _ in range(50):
            if not await backend_pids(admin, datname):
                break
            await asyncio.sleep(0.05)
        assert await backend_pids(admin, datname) == set()
    finally:
        await db.dispose()
        await admin.close()
