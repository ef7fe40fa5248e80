"""The service container: settings, clock, database, state store, MQTT, credentials, fleet.

Built once per process (``await Services.create(settings)``) and handed to the API, the ingest
worker, the forecaster and the event runner, so each talks to the same edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from store.database import Database
from store.fleet_cache import FleetCache
from store.state import StateStore, make_state_store
from vpp.clock import Clock, get_clock
from vpp.settings import Settings

if TYPE_CHECKING:
    from devices.credentials import CredentialManager
    from devices.mqtt import InProcessBroker, MqttClient, OutMessage


@dataclass
class Services:
    settings: Settings
    clock: Clock
    db: Database
    state: StateStore
    credentials: CredentialManager
    broker: InProcessBroker | None  # the in-process broker when VPP_MQTT_URL is memory://
    fleet: FleetCache = field(init=False)
    # Components attach themselves here (forecast service, event runner, …) by name.
    components: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fleet = FleetCache(self)

    @classmethod
    async def create(cls, settings: Settings, clock: Clock | None = None) -> Services:
        from devices.credentials import make_credential_manager
        from devices.mqtt import default_broker, parse_mqtt_url

        broker = default_broker() if parse_mqtt_url(settings.mqtt_url).is_memory else None
        if clock is None:
            shared = get_clock()
            same = shared.time_scale == settings.time_scale and settings.time_origin in (
                None,
                shared.origin_ms,
            )
            clock = shared if same else Clock(settings.time_scale, settings.time_origin)
        return cls(
            settings=settings,
            clock=clock,
            db=Database(settings.database_url),
            state=make_state_store(settings.redis_url, prefix=settings.state_prefix),
            credentials=make_credential_manager(settings),
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
        from devices.mqtt import make_client

        return make_client(
            self.settings.mqtt_url,
            client_id,
            username=username,
            password=password,
            will=will,
            broker=self.broker,
            clean_start=clean_start,
        )

    def topic(self, device_id: str, leaf: str) -> str:
        return f"{self.settings.topic_root}/devices/{device_id}/{leaf}"

    async def close(self) -> None:
        for comp in list(self.components.values()):
            stop = getattr(comp, "stop", None)
            if stop is not None:
                await stop()
        await self.credentials.close()
        await self.state.close()
        await self.db.dispose()
