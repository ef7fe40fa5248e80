"""Delivery reports: for every OpenADR event the service dispatched, one report written by the
service (clientName ``VPP_OPENADR_VTN_NAME``, resource ``AGGREGATED_REPORT``, an interval per
settlement interval with ``BASELINE`` and ``DEMAND`` (delivered) in MW), refreshed by the
leading replica every ``VPP_OPENADR_REPORT_S`` service seconds while its grid events run, and a
last time once they are settled (or aborted and measured). Business-logic clients read them
with ``GET /reports?eventID=…``; webhooks fire as for any object."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select

from devices.edges import Edges
from devices.outage_log import OutageLog
from dispatch import events as es
from dispatch.leadership import Leadership
from dispatch.openadr.access import EVENT, REPORT
from dispatch.openadr.vtn import Vtn
from dispatch.periodic import Periodic
from dispatch.settlement_service import event_settlement
from store import openadr as db
from store.models import OpenAdrObject
from vpp.domain import GridEventStatus
from vpp.openadr import Delivered, delivery_report

log = logging.getLogger(__name__)

FINAL = "final"
ENDED = (GridEventStatus.completed.value, GridEventStatus.aborted.value)
STALE_MS = 2 * 86_400_000


async def delivered(services: Edges, grids: list[es.EventRecord]) -> tuple[list[Delivered], bool]:
    """The settlement intervals (baseline, delivered MW) of an outside event's grid events, and
    whether they are final (settled, or ended and an hour past their end)."""
    now = services.clock.now_ms()
    intervals: list[Delivered] = []
    final = True
    for g in grids:
        st = await event_settlement(services, g.info.id)
        intervals += [
            Delivered(i.start_ms, i.end_ms, i.baseline_mw, i.delivered_mw) for i in st.intervals
        ]
        if not (st.settled or (g.info.status in ENDED and now >= g.info.end_ms + 3_600_000)):
            final = False
    return intervals, final


class DeliveryReporter(Periodic):
    task_name = "openadr-reporter"

    def __init__(self, services: Edges, vtn: Vtn, *, leadership: Leadership | None = None) -> None:
        self.services = services
        self.vtn = vtn
        self.leadership = leadership
        self.period_s = services.settings.openadr_report_s
        self._task = None
        self.outages = OutageLog(log, "openadr delivery reports")

    async def tick(self) -> int:
        """Write the reports that changed; returns how many."""
        async with self.services.db.session() as s:
            events = list(
                (await s.execute(select(OpenAdrObject).where(OpenAdrObject.object_type == EVENT)))
                .scalars()
                .all()
            )
            reports = {
                r.parent_id: r
                for r in (
                    await s.execute(
                        select(OpenAdrObject).where(
                            OpenAdrObject.object_type == REPORT, OpenAdrObject.client_id.is_(None)
                        )
                    )
                ).scalars()
            }
        written = 0
        for ev in events:
            current = reports.get(ev.id)
            if current is not None and current.state == FINAL:
                continue
            if await self.refresh(ev, current):
                written += 1
        return written

    async def refresh(self, ev: OpenAdrObject, current: OpenAdrObject | None) -> bool:
        grids = await es.grid_events_of_source(self.services, es.SOURCE_OPENADR, ev.id)
        if not grids:
            return False
        now = self.services.clock.now_ms()
        if all(now < g.info.start_ms for g in grids):
            return False
        if current is None and all(
            g.info.status in ENDED and now > g.info.end_ms + STALE_MS for g in grids
        ):
            return False  # long over and never reported (e.g. aborted before it ran)
        intervals, final = await delivered(self.services, grids)
        body = delivery_report(
            ev.id, ev.body.get("eventName"), self.services.settings.openadr_vtn_name, intervals
        )
        state = FINAL if final else None
        if current is None:
            row = OpenAdrObject(
                id=db.new_object_id(REPORT),
                tenant_id=ev.tenant_id,
                object_type=REPORT,
                client_id=None,
                parent_id=ev.id,
                state=state,
                body=body,
                created_ms=now,
                modified_ms=now,
            )
            await db.insert_object(self.services.db, row)
            self.vtn.webhooks.emit(row, "CREATE", self.vtn.doc(row))
            return True
        if current.body == body and state is None:
            return False
        row = await db.update_object(self.services.db, current.id, body, now, state=state)
        self.vtn.webhooks.emit(row, "UPDATE", self.vtn.doc(row))
        return True

    async def _run(self) -> None:
        while True:
            try:
                if self.leadership is None or self.leadership.is_leader:
                    await self.tick()
                    self.outages.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.outages.failed(exc):
                    log.exception("openadr delivery reports")
            await self.services.clock.sleep(self.period_s)
