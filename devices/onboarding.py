"""Onboarding, updating and offboarding devices: the service layer behind ``/v1/devices``.

No HTTP here. Callers hand over raw rows (JSON objects or CSV records) or validated specs and a
tenant scope; failures come back as :class:`OnboardingError` subclasses carrying every offending
row and field, which ``api/errors.py`` turns into HTTP answers.

All or nothing: rows are inserted in one transaction (SQLAlchemy core executemany, in chunks),
the broker credentials are provisioned before the commit, and anything that fails rolls the
whole batch back: provisioned logins are revoked and the registry entries removed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import Table, and_, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from devices.credentials import CredentialError, device_topics
from devices.edges import Edges
from store.models import Device, Tenant
from vpp.domain import (
    BATTERY_MIN_RESERVE_PCT,
    KIND_CODE,
    KIND_OFFBOARDED,
    THERMOSTAT_DEFAULT_MAX_OFFSET_C,
    DeviceKind,
)
from vpp.errors import (
    Conflict,
    DomainError,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unavailable,
)
from vpp.regions import RegionBook

MAX_BULK_DEVICES = 100_000
DEVICE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
# Rows per executemany call: large enough for PostgreSQL's insertmanyvalues batching, small
# enough for SQLite's 32 766 bound parameters (25 columns × 1 000 rows).
_INSERT_CHUNK = 1_000
_SELECT_CHUNK = 5_000
DEVICES_TABLE = cast(Table, Device.__table__)

# Columns of the devices table each kind uses (the rest stay NULL).
KIND_FIELDS: dict[DeviceKind, tuple[str, ...]] = {
    DeviceKind.battery: ("capacity_wh", "max_discharge_w", "max_charge_w", "backup_reserve_pct"),
    DeviceKind.solar: ("rated_w",),
    DeviceKind.thermostat: ("hvac_rated_w", "comfort_max_c", "comfort_min_c", "max_offset_c"),
}
ALL_KIND_FIELDS = tuple(f for fields in KIND_FIELDS.values() for f in fields)
COMMON_FIELDS = (
    "id",
    "kind",
    "site_id",
    "region",
    "feeder",
    "vendor",
    "lat",
    "lon",
    "enrolled",
    "max_events_per_season",
    "max_hours_per_season",
)

TRANSPORT_MQTT = "mqtt"
TRANSPORT_OPENADR = "openadr"  # a VEN's resource: commands are OpenADR events, no broker login

TenantScope = str | None  # a tenant id, or None for a key that sees every tenant


# --- Errors -------------------------------------------------------------------------------------
class OnboardingError(DomainError):
    """Every offending row and field of one call (``errors``); ``detail`` joins the first 20."""

    def __init__(self, errors: Sequence[FieldError] | str) -> None:
        found = [FieldError("body", errors)] if isinstance(errors, str) else list(errors)
        parts = [
            (f"row {e.index}: " if e.index is not None else "") + f"{e.field}: {e.message}"
            for e in found[:20]
        ]
        more = len(found) - 20
        super().__init__(
            None, "; ".join(parts) + (f"; … and {more} more" if more > 0 else ""), found
        )


class InvalidDevice(OnboardingError, InvalidInput):
    """A field is missing, out of range, of another kind, or not allowed."""


class DeviceExists(OnboardingError, Conflict):
    """An id is already registered."""


class DeviceNotFound(OnboardingError, NotFound):
    """No such device for this caller: missing, offboarded, or another tenant's."""

    def __init__(self, device_id: str) -> None:
        super().__init__([FieldError("id", f"device {device_id!r} not found")])


class TenantForbidden(OnboardingError, Forbidden):
    """A fleet key tried to act for another tenant."""


class BrokerFailure(OnboardingError, Unavailable):
    """The broker refused or did not answer a credential change; nothing was changed."""

    dependency = "broker"


# --- Specs --------------------------------------------------------------------------------------
def _check_id(value: str | None) -> str | None:
    if value is not None and not _DEVICE_ID_RE.match(value):
        raise ValueError(
            "1 to 64 characters of A-Z a-z 0-9 . _ : - (no '/', '+', '#' or spaces: the id is "
            "the device's MQTT username and topic level)"
        )
    return value


class _DeviceSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str | None = Field(
        None,
        description="Device id, also its MQTT username: 1–64 characters of `[A-Za-z0-9._:-]` "
        "(without `:` when the broker keeps logins in a password file, "
        "VPP_BROKER_CREDENTIALS=password_file). Generated (`d-<hex>`) when absent.",
        examples=["bat-000123"],
    )
    site_id: str = Field(
        min_length=1, max_length=64, description="The customer's site (home); no address."
    )
    region: str = Field(
        min_length=1,
        max_length=64,
        description="Market region (ISO zone) the device sits in; one of the service's regions.",
        examples=["ERCOT-NORTH"],
    )
    feeder: str | None = Field(
        None, max_length=64, description="Distribution feeder id, for locational dispatch."
    )
    vendor: str | None = Field(
        None,
        max_length=64,
        description="OEM whose cloud the device depends on (vendor-outage shocks in the forecast).",
    )
    lat: float | None = Field(
        None, ge=-90, le=90, description="Latitude, degrees.", allow_inf_nan=False
    )
    lon: float | None = Field(
        None, ge=-180, le=180, description="Longitude, degrees.", allow_inf_nan=False
    )
    enrolled: bool = Field(True, description="false: registered but never dispatched.")
    max_events_per_season: int | None = Field(
        None, ge=0, le=10_000, description="Customer's budget of events per season."
    )
    max_hours_per_season: float | None = Field(
        None,
        ge=0,
        le=8_784,
        description="Customer's budget of event hours per season.",
        allow_inf_nan=False,
    )
    tenant_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Admin keys only: the tenant that owns the device (default: the key's own).",
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str | None) -> str | None:
        return _check_id(v)


class BatterySpec(_DeviceSpecBase):
    """A home battery."""

    kind: Literal["battery"] = Field(description="Device kind.")
    capacity_wh: float = Field(
        gt=0, le=10_000_000, description="Usable capacity, Wh.", allow_inf_nan=False
    )
    max_discharge_w: float = Field(
        gt=0, le=1_000_000, description="Continuous discharge rating, W.", allow_inf_nan=False
    )
    max_charge_w: float = Field(
        ge=0, le=1_000_000, description="Continuous charge rating, W.", allow_inf_nan=False
    )
    backup_reserve_pct: float = Field(
        BATTERY_MIN_RESERVE_PCT,
        ge=0,
        le=100,
        description="Customer's backup reserve, % of capacity (0–100). Dispatch never goes below "
        "max(this, 20 %).",
        allow_inf_nan=False,
    )


class SolarSpec(_DeviceSpecBase):
    """Rooftop PV: curtailment only, never dispatched upward."""

    kind: Literal["solar"] = Field(description="Device kind.")
    rated_w: float = Field(gt=0, le=10_000_000, description="DC nameplate, W.", allow_inf_nan=False)


class ThermostatSpec(_DeviceSpecBase):
    """A smart thermostat driving air conditioning or heating."""

    kind: Literal["thermostat"] = Field(description="Device kind.")
    hvac_rated_w: float = Field(
        gt=0, le=100_000, description="Electric rating of the HVAC unit, W.", allow_inf_nan=False
    )
    comfort_max_c: float = Field(
        ge=0,
        le=45,
        description="Warmest indoor temperature the customer accepts, °C.",
        allow_inf_nan=False,
    )
    comfort_min_c: float = Field(
        ge=0,
        le=45,
        description="Coldest indoor temperature the customer accepts, °C; below comfort_max_c.",
        allow_inf_nan=False,
    )
    max_offset_c: float = Field(
        THERMOSTAT_DEFAULT_MAX_OFFSET_C,
        gt=0,
        le=10,
        description="Largest setpoint offset an event may apply, °C.",
        allow_inf_nan=False,
    )

    @field_validator("comfort_min_c")
    @classmethod
    def _below_max(cls, v: float, info: ValidationInfo) -> float:
        top = info.data.get("comfort_max_c")
        if top is not None and v >= top:
            raise ValueError(f"must be below comfort_max_c ({top:g})")
        return v


DeviceSpec = Annotated[BatterySpec | SolarSpec | ThermostatSpec, Field(discriminator="kind")]
_ROWS = TypeAdapter(list[DeviceSpec])
KINDS = ", ".join(k.value for k in DeviceKind)
_KIND_TAGS = frozenset(k.value for k in DeviceKind)


class DevicePatch(BaseModel):
    """Enrollment settings and ratings that may change after onboarding; omitted fields keep
    their value. Fields of another kind are refused by name."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    enrolled: bool | None = Field(None, description="false opts the device out of all events.")
    site_id: str | None = Field(None, min_length=1, max_length=64)
    feeder: str | None = Field(None, max_length=64)
    vendor: str | None = Field(None, max_length=64)
    lat: float | None = Field(None, ge=-90, le=90, allow_inf_nan=False)
    lon: float | None = Field(None, ge=-180, le=180, allow_inf_nan=False)
    max_events_per_season: int | None = Field(None, ge=0, le=10_000)
    max_hours_per_season: float | None = Field(None, ge=0, le=8_784, allow_inf_nan=False)
    capacity_wh: float | None = Field(None, gt=0, le=10_000_000, allow_inf_nan=False)
    max_discharge_w: float | None = Field(None, gt=0, le=1_000_000, allow_inf_nan=False)
    max_charge_w: float | None = Field(None, ge=0, le=1_000_000, allow_inf_nan=False)
    backup_reserve_pct: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    rated_w: float | None = Field(None, gt=0, le=10_000_000, allow_inf_nan=False)
    hvac_rated_w: float | None = Field(None, gt=0, le=100_000, allow_inf_nan=False)
    comfort_max_c: float | None = Field(None, ge=0, le=45, allow_inf_nan=False)
    comfort_min_c: float | None = Field(None, ge=0, le=45, allow_inf_nan=False)
    max_offset_c: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)


# Fields a PATCH may set to null (the rest must keep a value).
_NULLABLE_PATCH = {
    "feeder",
    "vendor",
    "lat",
    "lon",
    "max_events_per_season",
    "max_hours_per_season",
}
_IMMUTABLE = {"id", "kind", "region", "tenant_id"}


# --- Validation ---------------------------------------------------------------------------------
def pydantic_field_errors(
    errors: Iterable[Mapping[str, Any]], *, indexed: bool, strip: tuple[str, ...] = ()
) -> list[FieldError]:
    """Turn pydantic errors of spec validation into (index, field, message), with the union's
    tag taken out of the location and plain messages for the cases users meet most."""
    out: list[FieldError] = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p not in strip]
        index = loc.pop(0) if indexed and loc and isinstance(loc[0], int) else None
        kind = None
        if loc and loc[0] in _KIND_TAGS:
            kind = loc.pop(0)
        etype = e.get("type", "")
        msg = str(e.get("msg", "invalid"))
        if etype in ("union_tag_invalid", "union_tag_not_found"):
            name = "kind"
            tag = e.get("input", {}).get("kind") if isinstance(e.get("input"), dict) else None
            msg = (
                f"must be one of {KINDS}"
                if etype == "union_tag_invalid"
                else f"required: one of {KINDS}"
            )
            if tag is not None:
                msg += f" (got {tag!r})"
        elif etype == "json_invalid":
            name = "body"
            msg = f"not valid JSON ({e.get('ctx', {}).get('error', msg)})"
        else:
            name = ".".join(str(p) for p in loc) or ("row" if indexed else "body")
            if etype == "extra_forbidden":
                msg = f"not a field of a {kind} device" if kind else "unknown field"
            elif etype == "missing":
                msg = f"required for a {kind} device" if kind else "required"
            elif etype in ("model_type", "model_attributes_type", "dict_type"):
                msg = "must be a JSON object"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
        out.append(FieldError(name, msg, index))
    return out


def region_errors(rows: Sequence[Any], regions: RegionBook, indexed: bool) -> list[FieldError]:
    """Rows whose region is not sold here: not in the registry, or outside ``VPP_REGIONS``."""
    sold = set(regions.sold())
    out = []
    for i, row in enumerate(rows):
        region = row.get("region") if isinstance(row, Mapping) else getattr(row, "region", None)
        if isinstance(region, str) and region.strip() and region.strip() not in sold:
            name = region.strip()
            why = (
                "a load zone of the registry, but not sold here (VPP_REGIONS)"
                if name in regions
                else "not a region of this service"
            )
            out.append(
                FieldError(
                    "region",
                    f"{region!r} is {why} ({regions.describe_sold()})",
                    i if indexed else None,
                )
            )
    return out


def validate_rows(
    rows: Sequence[Any], regions: RegionBook
) -> list[BatterySpec | SolarSpec | ThermostatSpec]:
    """Validate raw rows (dicts from JSON or CSV); raises :class:`InvalidDevice` listing every
    bad row by index and field. Ids repeated within the rows are errors too."""
    if not isinstance(rows, list):
        raise InvalidDevice([FieldError("body", "must be a JSON array of devices")])
    if not rows:
        raise InvalidDevice([FieldError("body", "no devices given")])
    if len(rows) > MAX_BULK_DEVICES:
        raise InvalidDevice(
            [FieldError("body", f"{len(rows)} devices: at most {MAX_BULK_DEVICES} per import")]
        )
    errors = region_errors(rows, regions, indexed=True)
    specs: list[BatterySpec | SolarSpec | ThermostatSpec] = []
    try:
        specs = _ROWS.validate_python(rows)
    except ValidationError as exc:
        errors.extend(pydantic_field_errors(exc.errors(include_url=False), indexed=True))
    ids = [r.get("id") if isinstance(r, Mapping) else None for r in rows]
    errors.extend(_duplicate_errors([i.strip() if isinstance(i, str) else None for i in ids]))
    if errors:
        errors.sort(key=lambda e: (e.index if e.index is not None else -1, e.field))
        raise InvalidDevice(errors)
    return specs


def _duplicate_errors(ids: Sequence[str | None]) -> list[FieldError]:
    counts = Counter(i for i in ids if i is not None)
    if not counts or max(counts.values()) == 1:
        return []
    first: dict[str, int] = {}
    out = []
    for index, device_id in enumerate(ids):
        if device_id is None or counts[device_id] == 1:
            continue
        if device_id in first:
            out.append(FieldError("id", f"{device_id!r} repeats row {first[device_id]}", index))
        else:
            first[device_id] = index
    return out


def check_single(
    spec: BatterySpec | SolarSpec | ThermostatSpec, regions: RegionBook
) -> BatterySpec | SolarSpec | ThermostatSpec:
    """Checks the HTTP layer's model validation cannot make (the service's regions)."""
    errors = region_errors([spec], regions, indexed=False)
    if errors:
        raise InvalidDevice(errors)
    return spec


def parse_csv(text: str) -> list[dict[str, Any]]:
    """CSV with a header row of field names → row dicts; empty cells are absent fields.
    Text the csv module cannot read (a stray carriage return in a cell, an over-long field) is an
    :class:`InvalidDevice` naming the body and the line, never a crash."""
    # newline="": the csv module reads \r, \n and \r\n line ends itself (and quoted ones).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
        if not fieldnames:
            raise InvalidDevice([FieldError("body", "CSV needs a header row of field names")])
        header = [h.strip() for h in fieldnames]
        if "" in header or len(set(header)) != len(header):
            raise InvalidDevice(
                [FieldError("header", "field names must be non-empty and distinct")]
            )
        rows: list[dict[str, Any]] = []
        for raw in reader:
            row: dict[str, Any] = {}
            extra = raw.pop(None, None)  # type: ignore[call-overload]
            for name, value in zip(header, raw.values(), strict=True):
                if value is not None and value.strip() != "":
                    row[name] = value.strip()
            if extra:
                row["__extra_cells__"] = extra
            rows.append(row)
            if len(rows) > MAX_BULK_DEVICES:
                break
    except csv.Error as exc:
        raise InvalidDevice(
            [FieldError("body", f"not valid CSV (line {reader.line_num}): {exc}")]
        ) from None
    bad = [
        FieldError("row", "more cells than header fields", i)
        for i, r in enumerate(rows)
        if r.pop("__extra_cells__", None) is not None
    ]
    if bad:
        raise InvalidDevice(bad)
    return rows


# --- Onboarding ---------------------------------------------------------------------------------
@dataclass
class Onboarded:
    """Devices just stored, with their (one-time) MQTT passwords."""

    devices: list[dict[str, Any]]
    passwords: dict[str, str] = field(default_factory=dict)


def new_device_id() -> str:
    return f"d-{secrets.token_hex(8)}"


def mqtt_credentials(topic_root: str, device_id: str, password: str) -> dict[str, Any]:
    return {
        "username": device_id,
        "password": password,
        "topics": device_topics(topic_root, device_id),
    }


def _row_of(
    spec: BatterySpec | SolarSpec | ThermostatSpec, tenant_id: str, now_ms: int
) -> dict[str, Any]:
    values = spec.__dict__
    row = {name: values.get(name) for name in COMMON_FIELDS}
    for name in ALL_KIND_FIELDS:
        row[name] = values.get(name)
    row["tenant_id"] = tenant_id
    row["offboarded_ms"] = None
    row["created_ms"] = now_ms
    row["updated_ms"] = now_ms
    return row


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


async def onboard(
    services: Edges,
    specs: Sequence[BatterySpec | SolarSpec | ThermostatSpec],
    *,
    tenant_id: str,
    sees_all_tenants: bool = False,
    indexed: bool = True,
    transport: str = TRANSPORT_MQTT,
) -> Onboarded:
    """Store ``specs`` for ``tenant_id`` (a spec's own ``tenant_id`` needs ``sees_all_tenants``),
    provision broker credentials and register them for ingest, all or nothing. A device of
    ``transport`` ``openadr`` (a VEN's resource) gets no broker login: it is reached through
    the VTN."""
    now_ms = services.clock.now_ms()
    rows: list[dict[str, Any]] = []
    tenants: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        owner = spec.tenant_id or tenant_id
        if owner != tenant_id and not sees_all_tenants:
            raise TenantForbidden(
                [
                    FieldError(
                        "tenant_id",
                        "a fleet key registers devices of its own tenant only",
                        index if indexed else None,
                    )
                ]
            )
        if spec.id is None:
            spec.id = new_device_id()
        tenants.setdefault(owner, []).append(index)
        rows.append(_row_of(spec, owner, now_ms))
        if transport != TRANSPORT_MQTT:
            rows[-1]["transport"] = transport
    ids = [r["id"] for r in rows]
    registry = {r["id"]: KIND_CODE[DeviceKind(r["kind"])] for r in rows}
    provisioned = False
    registered = False
    async with services.db.session() as session:
        try:
            async with session.begin():
                missing_tenants = (
                    set(tenants)
                    - {tenant_id}
                    - {
                        t
                        for (t,) in (
                            await session.execute(
                                select(Tenant.id).where(Tenant.id.in_(set(tenants) - {tenant_id}))
                            )
                        ).all()
                    }
                )
                if missing_tenants:
                    raise InvalidDevice(
                        [
                            FieldError("tenant_id", f"no tenant {t!r}", i if indexed else None)
                            for t in sorted(missing_tenants)
                            for i in tenants[t]
                        ]
                    )
                taken = await _existing_ids(session, ids, services.db.is_sqlite)
                if taken:
                    raise DeviceExists(
                        [
                            FieldError("id", f"{d!r} is already registered", i if indexed else None)
                            for i, d in enumerate(ids)
                            if d in taken
                        ]
                    )
                await _insert_rows(session, rows, services.db.is_sqlite)
                # Credentials and registry before the commit: a failure leaves no rows behind.
                passwords: dict[str, str] = {}
                provisioned = transport == TRANSPORT_MQTT
                try:
                    if provisioned:
                        passwords = await services.credentials.provision(ids)
                except ValueError as exc:
                    # An id the broker's mechanism cannot take (a password file: no ':'); the
                    # manager checks every id before it writes anything.
                    raise InvalidDevice([FieldError("id", str(exc))]) from exc
                registered = True
                await services.state.registry_put(registry)
        except IntegrityError as exc:
            # Another request registered one of these ids between our check and the insert.
            await _undo(services, ids, provisioned, registered)
            raise DeviceExists(
                [FieldError("id", "already registered (concurrent request)")]
            ) from exc
        except CredentialError as exc:
            await _undo(services, ids, provisioned, registered)
            raise BrokerFailure(
                [FieldError("broker", f"could not provision credentials, nothing stored: {exc}")]
            ) from exc
        except OnboardingError:
            raise
        except BaseException:
            await _undo(services, ids, provisioned, registered)
            raise
    services.fleet.apply_changes(rows)  # visible in the next snapshot, no registry reload
    return Onboarded(devices=rows, passwords=passwords)


async def _existing_ids(session: AsyncSession, ids: list[str], sqlite: bool) -> set[str]:
    """Which of ``ids`` already have a row (offboarded ones included: ids are never reused)."""
    taken: set[str] = set()
    for chunk in _chunks(ids, _SELECT_CHUNK):
        if sqlite:
            found = await session.execute(select(Device.id).where(Device.id.in_(chunk)))
        else:
            # A join against the id array: PostgreSQL plans a long IN list of bind parameters
            # as a sequential scan with a linear search (seconds per chunk on a big table).
            found = await session.execute(
                text(
                    "SELECT d.id FROM unnest(CAST(:ids AS varchar[])) AS u(id) "
                    "JOIN devices d ON d.id = u.id"
                ),
                {"ids": list(chunk)},
            )
        taken.update(d for (d,) in found.all())
    return taken


async def _insert_rows(session: AsyncSession, rows: list[dict[str, Any]], sqlite: bool) -> None:
    """Insert inside the session's transaction: COPY on PostgreSQL (asyncpg), core executemany
    in chunks elsewhere (the ORM's bulk path would emit one INSERT per row here)."""
    conn = await session.connection()
    if not sqlite:
        raw = await conn.get_raw_connection()
        driver = getattr(raw, "driver_connection", None)
        if driver is not None and hasattr(driver, "copy_records_to_table"):
            from asyncpg.exceptions import UniqueViolationError

            columns = list(rows[0])
            try:
                await driver.copy_records_to_table(
                    DEVICES_TABLE.name,
                    records=[tuple(r[c] for c in columns) for r in rows],
                    columns=columns,
                )
            except UniqueViolationError as exc:
                # Another request registered one of these ids since our check.
                raise DeviceExists(
                    [FieldError("id", "already registered (concurrent request)")]
                ) from exc
            return
    for chunk in _chunks(rows, _INSERT_CHUNK):
        await conn.execute(insert(DEVICES_TABLE), list(chunk))


async def _undo(services: Edges, ids: list[str], provisioned: bool, registered: bool) -> None:
    """Best-effort compensation after a failed onboarding (the row insert rolls back by itself)."""
    if registered:
        try:
            await services.state.registry_remove(ids)
        except Exception:  # the original error is what the caller must see
            pass
    if provisioned:
        try:
            await services.credentials.revoke(ids)
        except Exception:
            pass


# --- Reading ------------------------------------------------------------------------------------
def _scoped(device_id: str, scope: TenantScope) -> Any:
    cond = and_(Device.id == device_id, Device.offboarded_ms.is_(None))
    if scope is not None:
        cond = and_(cond, Device.tenant_id == scope)
    return cond


def device_dict(row: Device) -> dict[str, Any]:
    return {c.name: getattr(row, c.key) for c in Device.__table__.columns}


async def get_device(services: Edges, device_id: str, scope: TenantScope) -> dict[str, Any]:
    """The device's row as a dict; :class:`DeviceNotFound` when missing, offboarded or another
    tenant's (the same answer in all three cases)."""
    async with services.db.session() as session:
        row = (
            await session.execute(select(Device).where(_scoped(device_id, scope)))
        ).scalar_one_or_none()
    if row is None:
        raise DeviceNotFound(device_id)
    return device_dict(row)


async def list_devices(
    services: Edges,
    scope: TenantScope,
    *,
    region: str | None = None,
    kind: str | None = None,
    enrolled: bool | None = None,
    ids: Sequence[str] | None = None,
    id_prefix: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Devices ordered by id, after ``after`` (exclusive), at most ``limit``."""
    q = select(Device).where(Device.offboarded_ms.is_(None))
    if scope is not None:
        q = q.where(Device.tenant_id == scope)
    if region is not None:
        q = q.where(Device.region == region)
    if kind is not None:
        q = q.where(Device.kind == kind)
    if enrolled is not None:
        q = q.where(Device.enrolled == enrolled)
    if ids is not None:
        q = q.where(Device.id.in_(list(ids)))
    if id_prefix is not None:
        q = q.where(Device.id.startswith(id_prefix, autoescape=True))
    if after is not None:
        q = q.where(Device.id > after)
    q = q.order_by(Device.id).limit(limit)
    async with services.db.session() as session:
        return [device_dict(r) for r in (await session.execute(q)).scalars().all()]


# --- Updating -----------------------------------------------------------------------------------
def validate_patch(body: Any, kind: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The changes a PATCH body asks for, checked against the device's kind and its other
    settings; raises :class:`InvalidDevice` naming each bad field."""
    if not isinstance(body, Mapping):
        raise InvalidDevice([FieldError("body", "must be a JSON object")])
    errors = [
        FieldError(name, "cannot be changed; offboard the device and register it again")
        for name in body
        if name in _IMMUTABLE
    ]
    rest = {k: v for k, v in body.items() if k not in _IMMUTABLE}
    patch: dict[str, Any] = {}
    try:
        model = DevicePatch.model_validate(rest)
        patch = {k: getattr(model, k) for k in model.model_fields_set}
    except ValidationError as exc:
        errors.extend(pydantic_field_errors(exc.errors(include_url=False), indexed=False))
    own = set(KIND_FIELDS[DeviceKind(kind)])
    for name in list(patch):
        if name in ALL_KIND_FIELDS and name not in own:
            errors.append(FieldError(name, f"not a field of a {kind} device"))
        elif patch[name] is None and name not in _NULLABLE_PATCH:
            errors.append(FieldError(name, "may not be null"))
    if not errors and kind == DeviceKind.thermostat:
        lo = patch.get("comfort_min_c", current.get("comfort_min_c"))
        hi = patch.get("comfort_max_c", current.get("comfort_max_c"))
        if lo is not None and hi is not None and lo >= hi:
            name = "comfort_min_c" if "comfort_min_c" in patch else "comfort_max_c"
            errors.append(
                FieldError(name, f"comfort_min_c ({lo:g}) must be below comfort_max_c ({hi:g})")
            )
    if errors:
        raise InvalidDevice(errors)
    return patch


async def update_device(
    services: Edges, device_id: str, scope: TenantScope, body: Any
) -> dict[str, Any]:
    """Apply a PATCH body; returns the updated row. ``enrolled: false`` takes the device out of
    every new dispatch at once (the fleet snapshot is rebuilt)."""
    async with services.db.session() as session, session.begin():
        row = (
            await session.execute(select(Device).where(_scoped(device_id, scope)).with_for_update())
        ).scalar_one_or_none()
        if row is None:
            raise DeviceNotFound(device_id)
        patch = validate_patch(body, row.kind, device_dict(row))
        if patch:
            patch["updated_ms"] = services.clock.now_ms()
            await session.execute(update(Device).where(Device.id == device_id).values(**patch))
            for name, value in patch.items():
                setattr(row, name, value)
        result = device_dict(row)
    if patch:
        # Same kind code again: the write bumps the registry version, so fleet snapshots in
        # other processes (event runner, forecaster) reload enrollment too.
        await services.state.registry_put({device_id: KIND_CODE[DeviceKind(result["kind"])]})
        services.fleet.apply_changes([result])
    return result


# --- Offboarding --------------------------------------------------------------------------------
async def offboard(services: Edges, device_id: str, scope: TenantScope) -> None:
    """Remove a device: its broker login is revoked (live session dropped) before the commit, its
    registry entry becomes a tombstone (ingest counts its messages as ``offboarded``) and its
    latest state is forgotten. The row stays, marked offboarded, for settlement history."""
    now_ms = services.clock.now_ms()
    kind_code: int | None = None  # set once the tombstone is written, to undo it on failure
    try:
        async with services.db.session() as session, session.begin():
            found = (
                await session.execute(
                    update(Device)
                    .where(_scoped(device_id, scope))
                    .values(offboarded_ms=now_ms, updated_ms=now_ms, enrolled=False)
                    .returning(Device.id, Device.kind, Device.transport)
                )
            ).first()
            if found is None:
                raise DeviceNotFound(device_id)
            # The tombstone before the commit: with the state store down the call fails and
            # nothing changes (a retry would otherwise find the row offboarded, and never
            # write it).
            await services.state.registry_put({device_id: KIND_OFFBOARDED})
            kind_code = KIND_CODE[DeviceKind(found.kind)]
            try:
                if found.transport == TRANSPORT_MQTT:  # a VEN's resource has no broker login
                    await services.credentials.revoke([device_id])
            except CredentialError as exc:
                raise BrokerFailure(
                    [FieldError("broker", f"could not revoke credentials, nothing changed: {exc}")]
                ) from exc
    except BaseException:
        if kind_code is not None:  # not offboarded after all: the device's entry back
            with contextlib.suppress(Exception):  # the first error is what the caller sees
                await services.state.registry_put({device_id: kind_code})
        raise
    with contextlib.suppress(Exception):
        # Its latest state is only a cache: left behind if the store fails now, it is ignored
        # (the fleet snapshot no longer lists the device) and goes with the store's next loss.
        await services.state.delete_devices([device_id])
    services.fleet.apply_changes([], [device_id])
