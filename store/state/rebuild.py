"""Rebuilding a lost state store from the database.

What the state store holds and where each part comes back from when it is lost (a Redis
restarted empty: these machines keep nothing on disk):

- the ingest registry (device id → kind code, tombstones for offboarded devices): from the
  ``devices`` table, here, by the first ingest worker that sees the generation missing;
- its version: moved to a value no process has seen, so every fleet cache reloads;
- latest states and online statuses: from the next telemetry and status messages (ingest keeps
  what it accepted but could not write yet, and writes it once the store answers);
- leases (event runner, calibrator): taken again on their holders' next renewal;
- the ack queue: acks lost with it are recovered by the event runner, which re-sends an
  unacknowledged command with the same id (devices answer idempotently);
- shared values: the forecast tuning is written back by any process that still has it installed
  (``ForecastService.load_tuning``), the newest one winning.
"""

from __future__ import annotations

import asyncio
import csv
import io

from sqlalchemy import select

from store.database import Database, copy_csv
from store.models import Device
from store.state.base import StateStore
from vpp.domain import KIND_CODE, KIND_OFFBOARDED, DeviceKind


async def load_ingest_registry(db: Database) -> dict[str, int]:
    """Every device ever registered: its kind code, or the tombstone once offboarded (ingest
    counts an offboarded device's messages as ``offboarded``, not ``unknown_device``)."""
    if not db.is_sqlite:
        copied = await _copy_registry(db)
        if copied is not None:
            return await asyncio.to_thread(_parse_copy, copied)
    query = select(Device.id, Device.kind, Device.offboarded_ms)
    async with db.session() as session:
        rows = (await session.execute(query)).all()
    return {
        device_id: KIND_OFFBOARDED if offboarded is not None else KIND_CODE[DeviceKind(kind)]
        for device_id, kind, offboarded in rows
    }


# The code computed by PostgreSQL, the rows streamed by COPY: no Python object per row on the
# event loop (a million devices load in about a second instead of several).
_CODE_SQL = (
    f"SELECT id, CASE WHEN offboarded_ms IS NOT NULL THEN {KIND_OFFBOARDED} "
    + " ".join(f"WHEN kind = '{k.value}' THEN {c}" for k, c in KIND_CODE.items())
    + " END FROM devices"
)


async def _copy_registry(db: Database) -> bytes | None:
    return await copy_csv(db, _CODE_SQL)


def _parse_copy(data: bytes) -> dict[str, int]:
    return {row[0]: int(row[1]) for row in csv.reader(io.StringIO(data.decode()))}


async def rebuild_if_lost(db: Database, state: StateStore) -> bool:
    """Rebuild ``state`` from ``db`` if it was lost and nobody else is rebuilding it; True if
    this call rebuilt it. Safe to call from every process at once (the store's lock)."""
    return await state.rebuild(lambda: load_ingest_registry(db))
