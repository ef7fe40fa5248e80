"""The audit trail: who (tenant, key id) did what (action, target, a small JSON detail) and when
(service ms), for every ledger, dispatch and key action.

Actions that write to the database in this layer (API keys) add their row in the same
transaction (:func:`add`); actions of the layers above write it right after they succeed
(:func:`record`), which never raises: a failed audit write is logged and counted, and the
action the caller already made stays made rather than turning into a 500.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from store.database import Database
from store.models import AuditEntry
from vpp.domain import AuditAction
from vpp.metrics import AUDIT_WRITE_FAILURES

log = logging.getLogger(__name__)

# A detail is a few fields naming what changed (MW, region, counts), never a payload: one that
# grows past this is cut to a marker rather than bloating the table.
MAX_DETAIL_CHARS = 2000
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Actor:
    """Who acts: ``api`` with the caller's key, or ``local`` for a process that reaches the
    database directly (``vpp keys``, the demo), which has no key."""

    kind: str
    tenant_id: str | None = None
    key_id: str | None = None


LOCAL = Actor("local")


def _detail(detail: dict[str, Any] | None) -> dict[str, Any]:
    if not detail:
        return {}
    text = json.dumps(detail, default=str, separators=(",", ":"))
    if len(text) > MAX_DETAIL_CHARS:
        return {"truncated": True, "chars": len(text)}
    loaded: dict[str, Any] = json.loads(text)  # only JSON types reach the column
    return loaded


def entry(
    actor: Actor,
    action: AuditAction,
    ts_ms: int,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    return AuditEntry(
        ts_ms=int(ts_ms),
        tenant_id=actor.tenant_id,
        key_id=actor.key_id,
        actor=actor.kind,
        action=AuditAction(action).value,
        target_id=target_id,
        detail=_detail(detail),
    )


def add(
    session: AsyncSession,
    actor: Actor,
    action: AuditAction,
    ts_ms: int,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add the row to the caller's transaction: it commits, or rolls back, with the action."""
    session.add(entry(actor, action, ts_ms, target_id, detail))


async def record(
    db: Database,
    actor: Actor,
    action: AuditAction,
    ts_ms: int,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Write one row after an action succeeded. Never raises: False (logged) if it failed."""
    try:
        async with db.session() as session, session.begin():
            session.add(entry(actor, action, ts_ms, target_id, detail))
    except Exception:
        AUDIT_WRITE_FAILURES.inc()
        log.exception("audit: could not record %s of %s by %s", action, target_id, actor)
        return False
    return True


async def list_entries(
    db: Database,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    tenant_id: str | None = None,
    action: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> tuple[list[AuditEntry], int | None]:
    """Rows newest first (``since`` inclusive, ``until`` exclusive), at most ``limit``, below
    ``before_id`` (the cursor). Returns the rows and the cursor of the next page (None: last)."""
    limit = max(1, min(int(limit), MAX_LIMIT))
    q = select(AuditEntry)
    if since_ms is not None:
        q = q.where(AuditEntry.ts_ms >= since_ms)
    if until_ms is not None:
        q = q.where(AuditEntry.ts_ms < until_ms)
    if tenant_id is not None:
        q = q.where(AuditEntry.tenant_id == tenant_id)
    if action is not None:
        q = q.where(AuditEntry.action == action)
    if before_id is not None:
        q = q.where(AuditEntry.id < before_id)
    q = q.order_by(AuditEntry.id.desc()).limit(limit + 1)
    async with db.session() as session:
        rows = list((await session.execute(q)).scalars().all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)
