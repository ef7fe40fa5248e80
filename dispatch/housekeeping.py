"""Quote housekeeping, a background component of ``vpp serve``: every ``period_s`` of service
time it expires stale quotes and re-plans committed requests whose fleet changed. With a
``leadership`` (``vpp serve``), only the leading replica does: two replicas re-planning one request
at once would store two plan versions."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from devices.outage_log import OutageLog
from dispatch.leadership import Leadership
from dispatch.market import Market
from dispatch.planner import Planner
from vpp.clock import Clock

log = logging.getLogger(__name__)


class MarketHousekeeper:
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
        self._task: asyncio.Task[None] | None = None
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

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="market-housekeeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
