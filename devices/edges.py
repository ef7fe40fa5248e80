"""The edges one process talks through: settings, clock, database, state store, MQTT, broker
credentials and the fleet cache.

Built once per process (``await Edges.create(settings)``, or the richer
``dispatch.services.Services`` that adds the components built on top) and handed to ingest,
onboarding and everything above, so each part talks to the same edges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from devices.credentials import CredentialManager, make_credential_manager
from devices.mqtt import (
    InProcessBroker,
    MqttClient,
    OutMessage,
    default_broker,
    make_client,
    make_publisher,
    parse_mqtt_url,
)
from store.database import Database
from store.fleet_cache import FleetCache
from store.regions import list_regions
from store.state import StateStore, make_state_store
from vpp.clock import Clock, get_clock
from vpp.regions import RegionBook
from vpp.settings import Settings

log = logging.getLogger(__name__)
# How long a process trusts its copy of the region registry before reading it again (wall s):
# another replica's POST or PATCH /v1/regions shows here within this.
REGIONS_REFRESH_S = 30.0


@dataclass(eq=False)
class Edges:
    settings: Settings
    clock: Clock
    db: Database
    state: StateStore
    credentials: CredentialManager
    broker: InProcessBroker | None  # the in-process broker when VPP_MQTT_URL is memory://
    fleet: FleetCache = field(init=False)
    # The region registry as this process knows it (the seed until the database is read).
    regions: RegionBook = field(init=False)
    _regions_read_at: float = field(default=float("-inf"), init=False)
    # Called when a grid event or request changes outside the event runner (abort, cancel), so
    # a runner in this process acts at once instead of on its next tick.
    on_event_change: list[Callable[[], None]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.fleet = FleetCache(self.db, self.state, self.settings, self.clock)
        self.regions = RegionBook(sold=self.settings.regions)

    async def current_regions(self, *, missing: str | None = None) -> RegionBook:
        """The region registry, read again from the database when this copy is older than
        ``REGIONS_REFRESH_S`` or does not hold ``missing`` (a name just asked for, perhaps added
        through another replica). A database that does not answer leaves the copy as it was."""
        stale = time.monotonic() - self._regions_read_at > REGIONS_REFRESH_S
        if stale or (missing is not None and missing not in self.regions):
            try:
                rows = await list_regions(self.db)
            except Exception as exc:
                log.warning("region registry not read (%s); keeping the copy in memory", exc)
            else:
                first = self._regions_read_at == float("-inf")
                if rows:
                    self.regions.replace_all(rows)
                self._regions_read_at = time.monotonic()
                if first and self.regions.unregistered():
                    log.warning(
                        "VPP_REGIONS names %s, not in the region registry: sold, with the "
                        "weather and time of the centre of the US (POST /v1/regions adds them)",
                        ", ".join(self.regions.unregistered()),
                    )
        return self.regions

    @classmethod
    async def create(cls, settings: Settings, clock: Clock | None = None) -> Self:
        broker = default_broker() if parse_mqtt_url(settings.mqtt_url).is_memory else None
        if clock is None:
            shared = get_clock()
            same = shared.time_scale == settings.time_scale and settings.time_origin in (
                None,
                shared.origin_ms,
            )
            clock = shared if same else Clock(settings.time_scale, settings.time_origin)
        db = Database(settings.database_url)
        return cls(
            settings=settings,
            clock=clock,
            db=db,
            state=make_state_store(
                settings.redis_url,
                prefix=settings.state_prefix,
                timeout_s=settings.redis_timeout_s,
            ),
            credentials=make_credential_manager(settings, db),
            broker=broker,
        )

    def mqtt_client(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        will: OutMessage | None = None,
        clean_start: bool = True,
    ) -> MqttClient:
        return make_client(
            self.settings.mqtt_url,
            client_id,
            username=username,
            password=password,
            will=will,
            broker=self.broker,
            clean_start=clean_start,
            ca_file=self.settings.mqtt_ca_file,
        )

    def mqtt_publisher(self, client_id: str) -> MqttClient:
        """The event runner's fan-out publisher: ``VPP_MQTT_PUBLISH_CONNECTIONS`` connections
        with ``VPP_MQTT_PUBLISH_INFLIGHT`` each (one in-process client for ``memory://``)."""
        return make_publisher(
            self.settings.mqtt_url,
            client_id,
            connections=self.settings.mqtt_publish_connections,
            max_inflight=self.settings.mqtt_publish_inflight,
            broker=self.broker,
            ca_file=self.settings.mqtt_ca_file,
        )

    def topic(self, device_id: str, leaf: str) -> str:
        return f"{self.settings.topic_root}/devices/{device_id}/{leaf}"

    def event_changed(self) -> None:
        for callback in list(self.on_event_change):
            callback()

    async def close(self) -> None:
        await self.fleet.stop()
        await self.credentials.close()
        await self.state.close()
        await self.db.dispose()
