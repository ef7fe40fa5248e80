"""The command store: bulk writes of command rows (PostgreSQL COPY and unnest updates,
executemany on SQLite). Commands are stored before they are published."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import bindparam, insert, or_, update

from devices.edges import Edges
from dispatch.runner.commands import CommandBatch, _nan_none
from store.models import Command
from vpp.domain import (
    CommandStatus,
)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class CommandStore:
    """Bulk writes of command rows: PostgreSQL COPY and unnest updates; executemany on SQLite."""

    COLUMNS = (
        "id",
        "event_id",
        "device_id",
        "type",
        "setpoint_w",
        "offset_c",
        "limit_w",
        "valid_from_ms",
        "valid_until_ms",
        "randomize_start_s",
        "status",
        "attempts",
        "sent_ms",
        "ack_ms",
        "reason",
        "created_ms",
        "baseline_w",
        "expected_kw",
    )

    def __init__(self, services: Edges) -> None:
        self.services = services
        self.pg = not services.db.is_sqlite

    def records(self, event_id: str, b: CommandBatch, now_ms: int) -> list[tuple[Any, ...]]:
        sp, oc, lw = b.setpoint_w.tolist(), b.offset_c.tolist(), b.limit_w.tolist()
        vf, vu, rs = b.valid_from_ms.tolist(), b.valid_until_ms.tolist(), b.randomize_s.tolist()
        bw, ek = b.baseline_w.tolist(), b.expected_kw.tolist()
        return [
            (
                b.ids[i],
                event_id,
                b.device_ids[i],
                b.type[i],
                _nan_none(sp[i]),
                _nan_none(oc[i]),
                _nan_none(lw[i]),
                vf[i],
                vu[i],
                rs[i] or None,
                CommandStatus.pending.value,
                0,
                None,
                None,
                None,
                now_ms,
                _nan_none(bw[i]),
                _nan_none(ek[i]),
            )
            for i in range(len(b))
        ]

    async def insert(self, conn: Any, records: list[tuple[Any, ...]]) -> None:
        """Insert inside the caller's transaction (``conn``: an AsyncConnection)."""
        if not records:
            return
        if self.pg:
            raw = await conn.get_raw_connection()
            await raw.driver_connection.copy_records_to_table(
                "commands", records=records, columns=list(self.COLUMNS)
            )
        else:
            await conn.execute(
                insert(Command),
                [dict(zip(self.COLUMNS, r, strict=True)) for r in records],
            )

    async def mark(
        self,
        ids: list[str],
        status: str | list[str],
        *,
        sent_ms: int | None = None,
        ack_ms: list[int] | None = None,
        attempts_inc: bool = False,
        reason: str | None = None,
    ) -> None:
        """Set status (one for all, or one each) and optionally sent_ms/attempts or ack_ms."""
        if not ids:
            return
        statuses = [status] * len(ids) if isinstance(status, str) else status
        async with self.services.db.engine.begin() as conn:
            if self.pg:
                raw: Any = (await conn.get_raw_connection()).driver_connection
                # One status for all (a fan-out's "sent"): a parameter, not an array a row.
                one = isinstance(status, str) and ack_ms is None
                sets = ["status = $2" if one else "status = v.s"]
                args: list[Any] = [ids, status if one else statuses]
                cols = "unnest($1::text[]" if one else "unnest($1::text[], $2::text[]"
                if ack_ms is not None:
                    cols += ", $3::bigint[]"
                    args.append(ack_ms)
                    sets.append("ack_ms = v.a")
                cols += ")"
                names = (
                    "v(id" + ("" if one else ", s") + (", a" if ack_ms is not None else "") + ")"
                )
                if sent_ms is not None:
                    args.append(sent_ms)
                    sets.append(f"sent_ms = ${len(args)}")
                if attempts_inc:
                    sets.append("attempts = commands.attempts + 1")
                if reason is not None:
                    args.append(reason)
                    sets.append(f"reason = ${len(args)}")
                sql = (
                    f"UPDATE commands SET {', '.join(sets)} FROM {cols} AS {names} "
                    "WHERE commands.id = v.id"
                )
                for lo in range(0, len(ids), 50_000):
                    chunk = [a[lo : lo + 50_000] if isinstance(a, list) else a for a in args]
                    await raw.execute(sql, *chunk)
            else:
                t: Any = Command.__table__
                values: dict[str, Any] = {}
                if sent_ms is not None:
                    values["sent_ms"] = sent_ms
                if attempts_inc:
                    values["attempts"] = t.c.attempts + 1
                if reason is not None:
                    values["reason"] = reason
                stmt = (
                    update(t)
                    .where(t.c.id == bindparam("b_id"))
                    .values(
                        status=bindparam("b_status"),
                        **({"ack_ms": bindparam("b_ack")} if ack_ms is not None else {}),
                        **values,
                    )
                )
                rows = [
                    {"b_id": i, "b_status": s, **({"b_ack": ack_ms[k]} if ack_ms else {})}
                    for k, (i, s) in enumerate(zip(ids, statuses, strict=True))
                ]
                await conn.execute(stmt, rows)

    async def record_acks(self, acks: dict[str, tuple[str, int]]) -> int:
        """Acks of commands the runner does not hold in memory, by command id: each moves its
        row forward only (received → started → completed; a failure only from a live status),
        so a late or repeated ack never undoes a later state. Returns the rows changed."""
        changed = 0
        by_status: dict[str, list[dict[str, Any]]] = {}
        for cid, (status, ts) in acks.items():
            if status in _ACK_FROM:
                by_status.setdefault(status, []).append({"b_id": cid, "b_ack": int(ts)})
        t: Any = Command.__table__
        async with self.services.db.engine.begin() as conn:
            for status, rows in by_status.items():
                stmt = (
                    update(t)
                    # An OR of equalities, not IN: an expanding IN cannot run as executemany.
                    .where(
                        t.c.id == bindparam("b_id"),
                        or_(*(t.c.status == s for s in _ACK_FROM[status])),
                    )
                    .values(status=status, ack_ms=bindparam("b_ack"))
                )
                res = await conn.execute(stmt, rows)
                changed += max(int(res.rowcount or 0), 0)
        return changed


_LIVE_NAMES = [CommandStatus.pending.value, CommandStatus.sent.value]
# For each ack status, the row statuses it may follow.
_ACK_FROM: dict[str, list[str]] = {
    CommandStatus.received.value: _LIVE_NAMES,
    CommandStatus.started.value: [*_LIVE_NAMES, CommandStatus.received.value],
    CommandStatus.completed.value: [
        *_LIVE_NAMES,
        CommandStatus.received.value,
        CommandStatus.started.value,
    ],
    **{
        s.value: [*_LIVE_NAMES, CommandStatus.received.value, CommandStatus.started.value]
        for s in (CommandStatus.opted_out, CommandStatus.rejected, CommandStatus.expired)
    },
}
