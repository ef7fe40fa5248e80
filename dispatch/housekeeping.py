"""Housekeeping, background components of ``vpp serve`` run by the leading replica only.

:class:`MarketHousekeeper`: every ``period_s`` of service time it expires stale quotes and
re-plans committed requests whose fleet changed (two replicas re-planning one request at once
would store two plan versions). :class:`HistoryHousekeeper`: the interval history's partitions
and retention."""

from __future__ import annotations

import asyncio
import logging

from devices.edges import Edges
from devices.outage_log import OutageLog
from dispatch.leadership import Leadership
from dispatch.market import Market
from dispatch.periodic import Periodic
from dispatch.planner import Planner
from store.history_partitions import MaintenanceReport, maintain
from vpp.clock import Clock

log = logging.getLogger(__name__)


class MarketHousekeeper(Periodic):
    task_name = "market-housekeeper"

    def __init__(
        self,
        market: Market,
        planner: Planner,
        clock: Clock,
        period_s: float = 60.0,
        *,
        leadership: Leadership | None = None,
    ) -> None:
        self.market = market
        self.leadership = leadership
        self.planner = planner
        self.clock = clock
        self.period_s = period_s
        self._task = None
        self.outages = OutageLog(log, "market housekeeping")

    async def tick(self) -> tuple[int, list[str]]:
        now = int(self.clock.now_ms())
        expired = await self.market.expire_quotes(now)
        replanned = await self.planner.refresh(now)
        return expired, replanned

    async def _run(self) -> None:
        while True:
            try:
                if self.leadership is None or self.leadership.is_leader:
                    await self.tick()
                    self.outages.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep going: the next tick may find the database back
                if not self.outages.failed(exc):  # an outage is one line, a bug its traceback
                    log.exception("market housekeeping")
            await self.clock.sleep(self.period_s)


class HistoryHousekeeper(Periodic):
    """History maintenance, a background component of ``vpp serve``: at start and then every
    ``settings.history_maintenance_s`` of service time, the leading replica creates the history
    partitions ahead, moves what the DEFAULT partition caught and drops the days past
    ``settings.history_retention_days`` (``store.history_partitions.maintain``). Leader only:
    two replicas creating the same partition at once would both try, one failing."""

    task_name = "history-housekeeper"

    def __init__(self, services: Edges, *, leadership: Leadership | None = None) -> None:
        self.services = services
        self.leadership = leadership
        self.period_s = services.settings.history_maintenance_s
        self._task = None
        self.outages = OutageLog(log, "history maintenance")
        self.last: MaintenanceReport | None = None

    async def tick(self) -> MaintenanceReport:
        s = self.services
        self.last = await maintain(s.db, int(s.clock.now_ms()), s.settings.history_retention_days)
        return self.last

    async def _run(self) -> None:
        while True:
            try:
                if self.leadership is None or self.leadership.is_leader:
                    await self.tick()
                    self.outages.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep going: the next run may find the database back
                if not self.outages.failed(exc):
                    log.exception("history maintenance")
            # Until it has led once, a follower looks again soon: a new leader must not wait a
            # whole period before making today's partition.
            led = self.last is not None
            await self.services.clock.sleep(self.period_s if led else min(self.period_s, 60.0))
