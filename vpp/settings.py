"""Service settings: every knob has an embedded default so the service runs with nothing installed.

Real services are selected by URL: ``VPP_DATABASE_URL`` (PostgreSQL), ``VPP_MQTT_URL`` (Mosquitto
or any MQTT 5 broker), ``VPP_REDIS_URL`` (Redis). The embedded defaults are a SQLite file, an
in-process MQTT broker (``memory://``) and an in-process state store (``memory://``).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vpp.regions import SEED_BY_NAME

# The least history retention accepted: the 10-in-10 baseline's 20-day look-back, the day a
# settlement may wait after its event, and a day's margin.
HISTORY_MIN_RETENTION_DAYS = 22


class OpenAdrUpstream(BaseModel):
    """One upstream utility VTN the service is a VEN of (``VPP_OPENADR_UPSTREAM``)."""

    url: str = Field(..., min_length=1, description="the VTN's base URL, …/openadr3/3.1.0")
    client_id: str = Field(..., min_length=1)
    client_secret: SecretStr
    ven_name: str = Field(..., min_length=1, max_length=64, description="our ven's venName")
    programs: list[str] = Field(default_factory=list, description="programNames; empty: all")
    regions: dict[str, str] = Field(
        default_factory=dict, description="programName → region (else the program's REGION)"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VPP_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite+aiosqlite:///./vpp.db",
        description="SQLAlchemy async URL; postgresql+asyncpg://… in production",
    )
    mqtt_url: str = Field(
        "memory://",
        description="mqtt://user:pass@host:1883 (mqtts:// for TLS), or memory:// for the "
        "in-process broker",
    )
    mqtt_ca_file: str | None = Field(
        None,
        description="PEM file of the CA that signs the broker's certificate, for mqtts:// "
        "(default: the system's CAs)",
    )
    redis_url: str = Field(
        "memory://", description="redis://host:6379/0, or memory:// for the in-process store"
    )
    redis_timeout_s: float = Field(
        20.0,
        gt=0,
        description="seconds a Redis reply may take before the store counts as unreachable "
        "(redis-py's own default, 5 s, is outlasted by a busy process reading a million-device "
        "reply, which then took a healthy Redis for an outage)",
    )
    time_scale: float = Field(1.0, gt=0, description="service clock speed against the wall clock")
    time_origin: int | None = Field(
        None, description="epoch ms where scaled time starts; default: the process start"
    )

    state_prefix: str = Field("vpp", description="key prefix in Redis (one service per prefix)")
    topic_root: str = "vpp/v1"
    # MQTT 5 shared-subscription group: every ingest worker in the group gets a share of the load.
    share_group: str = "vpp-ingest"
    # Credentials of the service's own MQTT clients (ingest, event runner, credential admin).
    mqtt_client_id_prefix: str = "vpp-svc"
    # The event runner's fan-out: commands spread over this many broker connections by device,
    # each with up to this many QoS-1 messages awaiting PUBACK (Mosquitto's
    # max_inflight_messages in deploy/mosquitto; the broker's CONNACK Receive Maximum caps it).
    mqtt_publish_connections: int = Field(
        4, ge=1, le=64, description="broker connections the event runner publishes commands on"
    )
    mqtt_publish_inflight: int = Field(
        100, ge=1, le=65535, description="QoS-1 messages in flight per publishing connection"
    )
    # Broker-side credential management (devices/credentials.py, deploy/README.md "Broker
    # credentials").
    broker_credentials: str = Field(
        "auto",
        description="password_file (logins in PostgreSQL, made live by `vpp broker-agent` beside "
        "each Mosquitto; for large fleets), dynsec (Mosquitto's dynamic-security plugin over "
        "MQTT; a few thousand devices), none, or auto (password_file if an agent has recorded "
        "the tier in the database, else dynsec if the broker answers it, else none)",
    )
    broker_tier: str = Field(
        "default",
        min_length=1,
        max_length=64,
        description="password_file: the broker tier (one broker and its agent) whose applied "
        "generation onboarding waits for",
    )
    broker_apply_timeout_s: float = Field(
        60.0,
        gt=0,
        description="password_file: how long onboarding and offboarding wait for the broker "
        "agent to apply a change before failing with a broker error",
    )

    # Telemetry and freshness (domain brief): fresh within 2 expected intervals, stale after 3,
    # offline after 15 minutes or a Last Will.
    telemetry_interval_s: float = 300.0
    offline_after_s: float = 900.0
    max_clock_skew_s: float = 60.0
    future_tolerance_s: float = 300.0
    max_payload_bytes: int = 4096
    history_interval_s: int = 300
    ingest_flush_ms: int = 100
    # Durable acceptance: how often (wall time) ingest upserts every open interval partial, and
    # how many interval rows it keeps while PostgreSQL is down (then the oldest are dropped).
    # A short period costs little: rows written per second are the devices that reported in
    # that second whatever the period (shorter than their reporting interval); what it sets
    # is the time to durable (about half of it plus one write) and the size of each write.
    # Two ingest workers share one device's messages (the shared subscription splits messages,
    # not devices), so one may store a newer reading a moment before the other stores an older
    # one. A reading older than the stored state by at most this much (wall ms, times
    # time_scale against the devices' ts) still goes into the interval history; older ones,
    # and an exact duplicate of the stored reading, are rejected as out_of_order.
    ingest_reorder_window_ms: int = Field(
        2000,
        ge=0,
        description="wall ms: a reading older than the stored latest one of its device by at "
        "most this (times time_scale, in device ts) is counted into the history (another "
        "worker stored the newer one first); 0: no reordering accepted",
    )
    history_writethrough_ms: int = Field(
        250,
        gt=0,
        description="wall ms between two write-throughs of the open interval partials; a "
        "reading counts as accepted once the write holding it has committed",
    )
    history_buffer_max_rows: int = Field(
        2_000_000,
        gt=0,
        description="interval rows (device x interval) ingest holds while the database is "
        "unreachable; past it the oldest intervals are dropped and counted",
    )

    # Interval history on PostgreSQL: daily partitions, the whole days older than this dropped
    # by the leader's history maintenance (SQLite: rows deleted). At least the settlement's
    # 10-in-10 look-back (20 days before an event, dispatch.settlement_service) plus the day or
    # so a settlement may wait, plus a day's margin.
    history_retention_days: int = Field(
        35,
        ge=HISTORY_MIN_RETENTION_DAYS,
        description="days of interval history kept; whole days older are dropped (minimum "
        f"{HISTORY_MIN_RETENTION_DAYS}: the settlement's 10-in-10 baseline looks back 20 days)",
    )
    history_maintenance_s: float = Field(
        3600.0,
        gt=0,
        description="service seconds between two runs of the history maintenance (partitions "
        "ahead, retention), on the leader only",
    )

    # Market rules.
    safety_margin_pct: float = 5.0
    region_safety_margin_pct: dict[str, float] = Field(default_factory=dict)
    quote_ttl_s: float = 900.0
    forecast_horizon_h: float = 48.0
    min_notice_s: float = 0.0
    max_request_mw: float = 100_000.0

    # Dispatch.
    replacement_reserve_pct: float = 15.0
    settlement_interval_min: int = 5
    command_ack_timeout_s: float = 30.0
    control_period_s: float = 60.0
    battery_wear_cost_per_kwh: float = 0.05

    # Regions the service sells in, narrowing the registry (``vpp.regions``, GET /v1/regions):
    # devices may only be registered, and capacity quoted, in these. Empty: every load zone of
    # the registry.
    regions: list[str] = Field(default_factory=list)

    # Per API key token bucket: requests a second and the burst; a key's own columns override
    # them. 0 requests a second turns the limit off.
    rate_limit_per_s: float = Field(50.0, ge=0)
    rate_limit_burst: int = Field(200, ge=1)
    # Replicas: the leader lease's TTL in wall seconds (None: a minute of service time, kept
    # within 4–10 s). A dead leader is replaced within about 4/3 of it.
    leader_lease_s: float | None = Field(None, gt=0)

    # OpenADR 3.1 VTN (/openadr3/3.1.0): bearer token lifetime (seconds of the service
    # clock), the clientName of the delivery reports it writes, how often the leader refreshes
    # them (service seconds), and whether subscriptions may call back private addresses.
    openadr_token_ttl_s: float = Field(3600.0, gt=0)
    openadr_vtn_name: str = Field("vpp-vtn", min_length=1, max_length=128)
    openadr_report_s: float = Field(60.0, gt=0)
    openadr_webhook_private: bool = False
    openadr_webhook_timeout_s: float = Field(5.0, gt=0)
    # The service as a VEN of upstream utility VTNs (dispatch/openadr/upstream.py): a JSON list
    # of {url, client_id, client_secret, ven_name, programs, regions}, polled every
    # openadr_upstream_poll_s wall seconds by the leader.
    openadr_upstream: list[OpenAdrUpstream] = Field(default_factory=list)
    openadr_upstream_poll_s: float = Field(30.0, gt=0)

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    log_level: str = "info"

    @model_validator(mode="after")
    def _upstream_regions_known(self) -> Settings:
        # Without VPP_REGIONS every zone of the registry is sold: the seeded zones are checked
        # here (the poller checks the live registry again when it reads the program).
        sold = self.regions or list(SEED_BY_NAME)
        for i, up in enumerate(self.openadr_upstream):
            for program, region in up.regions.items():
                if region not in sold:
                    known = ", ".join(self.regions) if self.regions else "GET /v1/regions"
                    raise ValueError(
                        f"openadr_upstream[{i}].regions[{program!r}]: unknown region "
                        f"{region!r} (one of {known})"
                    )
        return self

    def margin_pct(self, region: str) -> float:
        return self.region_safety_margin_pct.get(region, self.safety_margin_pct)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
