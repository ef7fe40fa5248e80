"""Every part of one process, typed: the edges (``devices.edges.Edges``) and the components
built on them. The forecaster, the market and the planner exist in every process (the API
quotes and plans); the background components (ingest, event runner, quote housekeeping,
forecast calibrator) run only where ``start_background`` is called (``vpp serve``).

Replicas: every ``vpp serve`` on the same database, state store and broker serves the API and runs
ingest; the singletons (the event runner, quote housekeeping, the calibrator) act only in the
replica that holds the leader lease (``leadership``, see ``dispatch.leadership``).

A component that fails to import or start fails the process: nothing disappears silently. A
dependency down at start is no such failure: the lease, ingest and the runner start without it
and keep trying (the runner and ingest connect to the broker in the background; the loops log the
outage once, ``devices.outage_log``), so ``vpp serve`` comes up and ``/readyz`` names what is
missing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

from devices.edges import Edges
from devices.ingest import IngestWorker
from dispatch.forecast_calibrator import ForecastCalibrator
from dispatch.forecast_service import ForecastService
from dispatch.housekeeping import HistoryHousekeeper, MarketHousekeeper
from dispatch.leadership import Leadership
from dispatch.market import Market
from dispatch.openadr.reports import DeliveryReporter
from dispatch.openadr.upstream import UpstreamVens
from dispatch.openadr.ven_devices import VenCommands
from dispatch.openadr.vtn import Vtn
from dispatch.planner import Planner
from dispatch.runner.loop import EventRunner

log = logging.getLogger(__name__)


class Background(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(eq=False)
class Services(Edges):
    forecast: ForecastService = field(init=False)
    market: Market = field(init=False)
    planner: Planner = field(init=False)
    openadr: Vtn = field(init=False)
    # Background components, set by start_background.
    leadership: Leadership | None = field(default=None, init=False)
    ingest: IngestWorker | None = field(default=None, init=False)
    runner: EventRunner | None = field(default=None, init=False)
    housekeeper: MarketHousekeeper | None = field(default=None, init=False)
    history_keeper: HistoryHousekeeper | None = field(default=None, init=False)
    calibrator: ForecastCalibrator | None = field(default=None, init=False)
    openadr_reporter: DeliveryReporter | None = field(default=None, init=False)
    openadr_upstream: UpstreamVens | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.forecast = ForecastService(self)
        self.market = Market(self, self.forecast)
        self.planner = Planner(self)
        self.openadr = Vtn(self)

    async def start_background(self, *, replica_id: str | None = None) -> None:
        """The leader lease, ingest, the event runner, quote housekeeping, history maintenance,
        the forecast calibrator, the OpenADR delivery reports and (if configured) the upstream
        VTNs' poller, in that order; each is set
        here once it has started. If one fails to start, the ones already running are stopped
        and the failure goes on up.
        ``replica_id``: this process's owner id for the lease (default ``host:pid:random``)."""
        try:
            leadership = Leadership(self.state, self.settings, owner=replica_id)
            await leadership.start()
            self.leadership = leadership
            ingest = IngestWorker(self)
            await ingest.start()
            self.ingest = ingest
            self.openadr.devices.ingest = ingest  # VENs' reports are telemetry
            runner = EventRunner(
                self, leadership=leadership, openadr=VenCommands(self, self.openadr.webhooks)
            )
            await runner.start()
            self.runner = runner
            housekeeper = MarketHousekeeper(
                self.market, self.planner, self.clock, leadership=leadership
            )
            await housekeeper.start()
            self.housekeeper = housekeeper
            history_keeper = HistoryHousekeeper(self, leadership=leadership)
            await history_keeper.start()
            self.history_keeper = history_keeper
            calibrator = ForecastCalibrator(self, self.forecast, leadership=leadership)
            await calibrator.start()
            self.calibrator = calibrator
            reporter = DeliveryReporter(self, self.openadr, leadership=leadership)
            await reporter.start()
            self.openadr_reporter = reporter
            if self.settings.openadr_upstream:  # the service as a VEN of utility VTNs
                upstream = UpstreamVens(self, leadership=leadership)
                await upstream.start()
                self.openadr_upstream = upstream
        except BaseException:
            await self.stop_background()
            raise

    async def stop_background(self) -> None:
        """Stop the background components in the reverse order of their start (the lease
        last: handed back once the runner has stopped, so a follower takes over at once)."""
        components: tuple[Background | None, ...] = (
            self.openadr_upstream,
            self.openadr_reporter,
            self.calibrator,
            self.history_keeper,
            self.housekeeper,
            self.runner,
            self.ingest,
            self.leadership,
        )
        for component in components:
            if component is None:
                continue
            try:
                await asyncio.wait_for(component.stop(), 30)
            except Exception:
                log.exception("stopping %s", type(component).__name__)
        self.ingest = self.runner = self.housekeeper = self.calibrator = None
        self.openadr.devices.ingest = None
        self.history_keeper = self.openadr_reporter = self.openadr_upstream = None
        self.leadership = None

    async def close(self) -> None:
        await self.stop_background()
        await self.openadr.webhooks.close()
        await super().close()
