"""SQLAlchemy 2 models. Timestamps that devices or the market speak are epoch ms (BigInteger),
so the same code runs on SQLite and PostgreSQL without time-zone surprises."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public key id (prefix)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    # SHA-256 of the whole key: keys are 256-bit random, so a fast hash is safe and lookups O(1).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Service-clock epoch ms after which the key answers 401; None: it never expires.
    expires_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Per-key token bucket (requests a second, and the burst); None: the settings' defaults.
    rate_limit_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    site_id: Mapped[str] = mapped_column(String(64))
    region: Mapped[str] = mapped_column(String(64))
    feeder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    vendor: Mapped[str | None] = mapped_column(String(64), nullable=True)  # OEM, for outage shocks
    lat: Mapped[float | None] = mapped_column(Float, nullable=True)
    lon: Mapped[float | None] = mapped_column(Float, nullable=True)
    enrolled: Mapped[bool] = mapped_column(Boolean, default=True)
    offboarded_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # Battery
    capacity_wh: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_discharge_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_charge_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    backup_reserve_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Solar
    rated_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Thermostat
    hvac_rated_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    comfort_max_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    comfort_min_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_offset_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Enrollment settings: fairness budgets per customer.
    max_events_per_season: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_hours_per_season: Mapped[float | None] = mapped_column(Float, nullable=True)
    # How the device is reached: "mqtt" (its own broker login and topics) or "openadr" (a VEN's
    # resource: commands become OpenADR events, telemetry comes from the VEN's reports).
    transport: Mapped[str] = mapped_column(String(16), default="mqtt", server_default="mqtt")

    __table_args__ = (
        Index("ix_devices_region_kind", "region", "kind"),
        Index("ix_devices_tenant_region", "tenant_id", "region"),
        Index(
            "ix_devices_transport_openadr",
            "transport",
            postgresql_where=text("transport <> 'mqtt'"),
            sqlite_where=text("transport <> 'mqtt'"),
        ),
    )


class TelemetryInterval(Base):
    """Per-device averages over a fixed interval (5 min by default): the history that baselines
    (10-in-10), availability rates and forecast calibration are computed from.

    On PostgreSQL the table is partitioned by ``interval_start_ms``, one partition per UTC day
    (``telemetry_intervals_pYYYYMMDD``) and a DEFAULT partition that catches a day nobody created
    yet, so a write never fails for want of a partition: ``store.history_partitions`` creates
    the days ahead, moves what the DEFAULT partition caught into its day and drops the days past
    retention. A query prunes to the days its ``interval_start_ms`` range names. SQLite keeps
    one plain table."""

    __tablename__ = "telemetry_intervals"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    interval_start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    power_w: Mapped[float | None] = mapped_column(Float, nullable=True)  # battery/solar output
    soc_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    indoor_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    setpoint_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    hvac_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    outdoor_c: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_telemetry_intervals_start", "interval_start_ms"),
        {"postgresql_partition_by": "RANGE (interval_start_ms)"},
    )


# A partitioned table without partitions refuses every row: whoever builds the schema from the
# models (create_all in tests) gets the DEFAULT partition with it, as the migration makes it.
event.listen(
    TelemetryInterval.__table__,
    "after_create",
    DDL(
        "CREATE TABLE IF NOT EXISTS telemetry_intervals_default "
        "PARTITION OF telemetry_intervals DEFAULT"
    ).execute_if(dialect="postgresql"),
)


class CapacityRequest(Base):
    __tablename__ = "capacity_requests"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    region: Mapped[str] = mapped_column(String(64), index=True)
    mw: Mapped[float] = mapped_column(Float)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    end_ms: Mapped[int] = mapped_column(BigInteger)
    firmness: Mapped[float] = mapped_column(Float, default=0.9)
    direction: Mapped[str] = mapped_column(String(20), default="load_reduction")
    max_price_per_mwh: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=50)
    status: Mapped[str] = mapped_column(String(20), index=True)
    quoted_mw: Mapped[float] = mapped_column(Float, default=0.0)
    quote_expires_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    body_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    performance: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_request_idem"),)


class LedgerEntry(Base):
    """MW booked per request, region and interval. The sum per (region, interval) never exceeds
    P90 − margin at commit time; rows go when a request is cancelled."""

    __tablename__ = "ledger_entries"
    request_id: Mapped[str] = mapped_column(ForeignKey("capacity_requests.id"), primary_key=True)
    interval_start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    region: Mapped[str] = mapped_column(String(64))
    mw: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_ledger_region_interval", "region", "interval_start_ms"),)


class RegionLock(Base):
    """One row per region: commits lock it (SELECT … FOR UPDATE) so two racing commits for the
    last megawatts serialise."""

    __tablename__ = "region_locks"
    region: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class GridEvent(Base):
    __tablename__ = "grid_events"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    region: Mapped[str] = mapped_column(String(64), index=True)
    mw: Mapped[float] = mapped_column(Float)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    end_ms: Mapped[int] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(Integer, default=100)
    preempt: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(20), index=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # Who raised it: ``api`` (POST /v1/grid-events) or ``openadr`` (an OpenADR 3.1 event of a
    # business-logic client; ``source_id`` is that event's id: one grid event per run of equal
    # values of its intervals).
    source: Mapped[str] = mapped_column(String(16), default="api", server_default="api")
    source_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)


class Plan(Base):
    """A dispatch plan for one event (a capacity request or a grid event), stored before any
    command is sent. ``version`` rises each time the plan is re-made."""

    __tablename__ = "plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    interval_s: Mapped[int] = mapped_column(Integer)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    # Per interval: target_mw, planned_mw, shortfall_mw, binding constraint; per cluster MW; and
    # device counts by kind. JSON keeps the plan readable in one row.
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class Command(Base):
    """Every command, stored before it is published; the runner resumes from these after a crash."""

    __tablename__ = "commands"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # command_id, c-…
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    type: Mapped[str] = mapped_column(String(32))
    setpoint_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    offset_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    limit_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    valid_from_ms: Mapped[int] = mapped_column(BigInteger)
    valid_until_ms: Mapped[int] = mapped_column(BigInteger)
    randomize_start_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # vpp.domain.CommandStatus: pending → sent → received/started/completed, or opted_out/
    # rejected/expired/missed/stale/preempted/released/restored
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ack_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    # The device's pre-event level (battery output W, thermostat HVAC W) when it was commanded:
    # the closed loop's baseline, kept so a restarted runner estimates exactly as before.
    baseline_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The kW the plan expects from the device while the command holds.
    expected_kw: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_commands_event_device", "event_id", "device_id"),)


class SettlementLine(Base):
    """One settlement interval of one event, with the inputs kept so it can be recomputed."""

    __tablename__ = "settlement_lines"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    interval_start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    interval_end_ms: Mapped[int] = mapped_column(BigInteger)
    target_mw: Mapped[float] = mapped_column(Float)
    baseline_mw: Mapped[float] = mapped_column(Float)
    actual_mw: Mapped[float] = mapped_column(Float)
    delivered_mw: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(40))
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)


class EventTimeline(Base):
    """One row per event and control step (a service minute): what the closed loop saw and did.
    The dashboard's event timeline reads these."""

    __tablename__ = "event_timeline"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    target_mw: Mapped[float] = mapped_column(Float)
    delivered_mw: Mapped[float] = mapped_column(Float)
    commanded: Mapped[int] = mapped_column(Integer)
    acknowledged: Mapped[int] = mapped_column(Integer)
    opted_out: Mapped[int] = mapped_column(Integer)
    replaced: Mapped[int] = mapped_column(Integer)
    stale: Mapped[int] = mapped_column(Integer, default=0)
    action: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AuditEntry(Base):
    """Who (tenant, key id) did what (action, target, a small JSON detail) and when (service ms):
    one row per ledger, dispatch or key action. ``id`` rises with each row: the list's cursor."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    # The caller: its key's tenant and id over HTTP; None for the command line (``actor`` cli).
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor: Mapped[str] = mapped_column(String(16))  # api | cli
    action: Mapped[str] = mapped_column(String(40), index=True)  # vpp.domain.AuditAction
    target_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class BrokerLogin(Base):
    """One device's login at the broker tier (``VPP_BROKER_CREDENTIALS=password_file``): the
    salted hash only, never the password. ``password_hash`` NULL is a revoked login (a tombstone,
    so an agent that reads only what changed since its last generation sees the revocation).
    ``generation`` rises with every write; rows of one write share it, and writes commit in
    generation order (devices/credentials.py holds an advisory lock from the number to the
    commit), so ``generation > applied`` never skips a row that committed late."""

    __tablename__ = "broker_logins"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    generation: Mapped[int] = mapped_column(BigInteger, index=True)


class BrokerTier(Base):
    """A broker tier (one broker and its agent, devices/broker_agent.py): the generation of
    ``broker_logins`` its password file holds, recorded once a login made in it was accepted."""

    __tablename__ = "broker_tier"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    applied_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    applied_at_ms: Mapped[int] = mapped_column(BigInteger, default=0)


class OpenAdrClient(Base):
    """An OpenADR 3.1 client of the VTN (``vpp openadr clients create``): a business-logic
    client (``bl``: a utility, an ISO, an operator) or a VEN (``ven``: a device maker's cloud).
    The secret is stored as its SHA-256 only (256-bit random, as the API keys)."""

    __tablename__ = "openadr_clients"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(8))  # bl | ven
    # ven: the venName its ven object must have (None: the VEN names it on POST /vens).
    ven_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class OpenAdrToken(Base):
    """A bearer token issued by ``POST /openadr3/3.1.0/auth/token``: its SHA-256, the client,
    the scopes granted (space-separated) and when it expires (service-clock ms)."""

    __tablename__ = "openadr_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("openadr_clients.client_id"), index=True)
    scopes: Mapped[str] = mapped_column(String(400))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    expires_ms: Mapped[int] = mapped_column(BigInteger, index=True)


class OpenAdrObject(Base):
    """One object of the VTN (PROGRAM, EVENT, REPORT, SUBSCRIPTION, VEN, RESOURCE) as JSON,
    with the columns its lookups and its tenancy need: the tenant, the client that made it,
    the VEN it belongs to (a VEN's ven, resources, reports, subscriptions), its parent (an
    event's program, a report's event, a resource's ven) and the name that must be unique
    (programName per tenant, venName per tenant, resourceName per ven: 409)."""

    __tablename__ = "openadr_objects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    object_type: Mapped[str] = mapped_column(String(16))
    client_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ven_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    parent_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    unique_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Service bookkeeping that is not part of the object (a delivery report's "final").
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    modified_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_openadr_objects_tenant_type", "tenant_id", "object_type"),
        UniqueConstraint(
            "tenant_id", "object_type", "parent_id", "unique_name", name="uq_openadr_name"
        ),
    )


class RegionRow(Base):
    """One load zone of the registry (``vpp.regions``): seeded by the migration, added to and
    corrected by admins over ``/v1/regions``."""

    __tablename__ = "regions"
    name: Mapped[str] = mapped_column(String(48), primary_key=True)
    iso: Mapped[str] = mapped_column(String(16), index=True)
    zone: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(200))
    time_zone: Mapped[str] = mapped_column(String(64))
    latitude: Mapped[float] = mapped_column(Float)
    longitude: Mapped[float] = mapped_column(Float)
    climate: Mapped[str] = mapped_column(String(16))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    modified_ms: Mapped[int] = mapped_column(BigInteger)
