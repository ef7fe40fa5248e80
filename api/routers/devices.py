"""Devices: onboarding (one or bulk JSON/CSV), listing, detail with live state, enrollment
settings, offboarding. Role ``fleet`` (own tenant) or ``admin`` (every tenant).

The work is done by ``devices.onboarding``; this module maps HTTP to it. Errors, whether from
request validation or from onboarding, come out as ``{"detail": …, "errors": [{"index"?, "field",
"message"}]}``.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from api import auditing
from api.deps import Principal, get_services, require_roles
from api.routers.fleet import FleetView, current_view, freshness_name
from api.schemas.devices import (
    BulkCreated,
    DeviceCreate,
    DeviceCreated,
    DeviceDetail,
    DeviceList,
    DeviceOut,
    DevicePatch,
    ErrorOut,
)
from devices import onboarding
from devices.onboarding import (
    FieldError,
    InvalidDevice,
    TenantScope,
    pydantic_field_errors,
)
from devices.outages import dependency_down
from dispatch.services import Services
from vpp import physics
from vpp.domain import AuditAction, DeviceKind, Freshness, FreshnessCode, Role
from vpp.fleet.records import unpack_states
from vpp.fleet.registry import REGISTRY_COLUMNS, assemble, build_registry
from vpp.flexibility import available_kw, outdoor_temperatures
from vpp.regions import RegionBook
from vpp.timefmt import to_rfc3339


class DeviceRoute(APIRoute):
    """Turns request-validation errors into :class:`InvalidDevice`, so they are answered in the
    onboarding errors' shape (``api.errors``), naming each field (the discriminated union's tag is
    taken out of the location: ``rated_w``, not ``battery.rated_w``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = pydantic_field_errors(
                    exc.errors(), indexed=False, strip=("body", "query", "path", "header")
                )
                if request.method == "POST":
                    # The model could not check the region against this service's list: add it,
                    # so one answer names every bad field.
                    errors += await _body_region_errors(request)
                raise InvalidDevice(errors) from None

        return route


async def _body_region_errors(request: Request) -> list[FieldError]:
    try:
        body = orjson.loads(await request.body())  # cached by the handler's own read
    except (orjson.JSONDecodeError, RuntimeError):
        return []
    if not isinstance(body, dict):
        return []
    regions = await _regions(request.app.state.services, [body])
    return onboarding.region_errors([body], regions, False)


async def _regions(services: Services, rows: Any) -> RegionBook:
    """The region registry, read again if it is stale or lacks a region these rows name."""
    # Rows are not validated yet: a region may be anything JSON allows.
    names = [r.get("region") for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    missing = next((n for n in names if isinstance(n, str) and n not in services.regions), None)
    return await services.current_regions(missing=missing)


router = APIRouter(tags=["devices"], route_class=DeviceRoute)
fleet_or_admin = require_roles(Role.fleet)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no valid API key"},
    403: {"model": ErrorOut, "description": "the key's role may not manage devices"},
    422: {"model": ErrorOut, "description": "a field is missing or invalid; each one is named"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "model": ErrorOut,
        "description": "no such device for this key (missing, offboarded, or another tenant's: "
        "the same answer)",
    }
}
_BROKER: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorOut,
        "description": "the broker did not take the credential change; nothing was changed",
    }
}
DeviceId = Path(description="Device id.", max_length=200)


def _scope(principal: Principal) -> TenantScope:
    return None if principal.sees_all_tenants else principal.tenant_id


def device_out(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("offboarded_ms", "created_ms", "updated_ms")}
    out["created_at"] = to_rfc3339(row["created_ms"])
    out["updated_at"] = to_rfc3339(row["updated_ms"])
    return out


# --- Onboarding ---------------------------------------------------------------------------------
@router.post(
    "/v1/devices",
    status_code=201,
    response_model=DeviceCreated,
    summary="Register one device",
    description="Registers a battery, solar system or thermostat and answers with its MQTT "
    "credentials, shown this once. Fields of another kind are refused by name; `region` must "
    "be one of the service's regions.",
    responses={
        **_ERRORS,
        409: {"model": ErrorOut, "description": "a device with this id exists"},
        **_BROKER,
    },
)
async def create_device(
    spec: DeviceCreate,
    principal: Principal = Depends(fleet_or_admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    onboarding.check_single(spec, await _regions(services, [{"region": spec.region}]))
    done = await onboarding.onboard(
        services,
        [spec],
        tenant_id=principal.tenant_id,
        sees_all_tenants=principal.sees_all_tenants,
        indexed=False,
    )
    row = done.devices[0]
    await auditing.record(
        services,
        principal,
        AuditAction.device_created,
        row["id"],
        {"kind": row.get("kind"), "region": row.get("region"), "tenant": row.get("tenant_id")},
    )
    out = device_out(row)
    out["mqtt"] = onboarding.mqtt_credentials(
        services.settings.topic_root, row["id"], done.passwords[row["id"]]
    )
    return out


_DEVICE_ITEMS = {
    "oneOf": [
        {"$ref": "#/components/schemas/BatterySpec"},
        {"$ref": "#/components/schemas/SolarSpec"},
        {"$ref": "#/components/schemas/ThermostatSpec"},
    ],
    "discriminator": {
        "propertyName": "kind",
        "mapping": {
            "battery": "#/components/schemas/BatterySpec",
            "solar": "#/components/schemas/SolarSpec",
            "thermostat": "#/components/schemas/ThermostatSpec",
        },
    },
}


@router.post(
    "/v1/devices/bulk",
    status_code=201,
    response_model=BulkCreated,
    summary="Register up to 100 000 devices, all or nothing",
    description="A JSON array of devices (as for `POST /v1/devices`), or CSV "
    "(`Content-Type: text/csv`, a header row of field names; empty cells are absent fields). "
    "One bad row and nothing is stored: the 422 answer lists every bad row by `index` (0-based, "
    "data rows) and `field`. An id already registered: 409 listing those rows. Success returns "
    "each device's MQTT credentials, in input order.",
    responses={
        **_ERRORS,
        409: {"model": ErrorOut, "description": "ids already registered, listed by row"},
        413: {"model": ErrorOut, "description": "more than 100 000 devices"},
        415: {"model": ErrorOut, "description": "neither JSON nor CSV"},
        **_BROKER,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        "maxItems": onboarding.MAX_BULK_DEVICES,
                        "items": _DEVICE_ITEMS,
                    }
                },
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": "id,kind,site_id,region,capacity_wh,max_discharge_w,max_charge_w,"
                    "rated_w\nbat-1,battery,site-1,ERCOT-NORTH,13500,5000,5000,\n"
                    "pv-1,solar,site-1,ERCOT-NORTH,,,,7600\n",
                },
            },
        }
    },
)
async def create_devices_bulk(
    request: Request,
    principal: Principal = Depends(fleet_or_admin),
    services: Services = Depends(get_services),
) -> Response:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    body = await request.body()
    rows: Any
    if content_type in ("text/csv", "application/csv"):
        try:
            rows = onboarding.parse_csv(body.decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise InvalidDevice([FieldError("body", "CSV must be UTF-8")]) from None
    elif content_type in ("application/json", "") or content_type.endswith("+json"):
        try:
            rows = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidDevice([FieldError("body", f"not valid JSON: {exc}")]) from None
    else:
        return JSONResponse(
            status_code=415,
            content={
                "detail": "Content-Type: send application/json (an array) or text/csv",
                "errors": [{"field": "Content-Type", "message": f"{content_type!r} unsupported"}],
            },
        )
    if isinstance(rows, list) and len(rows) > onboarding.MAX_BULK_DEVICES:
        return JSONResponse(
            status_code=413,
            content={
                "detail": f"body: at most {onboarding.MAX_BULK_DEVICES} devices per import",
                "errors": [{"field": "body", "message": "too many devices"}],
            },
        )
    specs = onboarding.validate_rows(rows, await _regions(services, rows))
    done = await onboarding.onboard(
        services,
        specs,
        tenant_id=principal.tenant_id,
        sees_all_tenants=principal.sees_all_tenants,
    )
    await auditing.record(
        services,
        principal,
        AuditAction.devices_imported,
        None,
        {
            "count": len(done.devices),
            "regions": sorted({str(r.get("region")) for r in done.devices})[:20],
            "format": "csv" if content_type in ("text/csv", "application/csv") else "json",
        },
    )
    root = services.settings.topic_root
    devices = [
        {"id": r["id"], "mqtt": onboarding.mqtt_credentials(root, r["id"], done.passwords[r["id"]])}
        for r in done.devices
    ]
    # orjson straight to bytes: 100 000 credentials serialise in well under a second this way.
    return Response(
        orjson.dumps({"count": len(devices), "devices": devices}),
        status_code=201,
        media_type="application/json",
    )


# --- Reading ------------------------------------------------------------------------------------
def _encode_cursor(device_id: str) -> str:
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = ""
    if not after:
        raise InvalidDevice([FieldError("cursor", "not a cursor from a previous page")])
    return after


def _live(view: FleetView, device_id: str) -> tuple[bool, str, float]:
    i = view.snapshot.index.get(device_id)
    if i is None:  # registered since the snapshot was built
        return False, Freshness.offline.value, 0.0
    snap = view.snapshot
    return (
        bool(snap.online[i] and snap.freshness[i] <= FreshnessCode.stale),
        freshness_name(snap.freshness[i]),
        round(float(view.available_kw[i]), 4),
    )


@router.get(
    "/v1/devices",
    response_model=DeviceList,
    summary="List devices",
    description="The key's own tenant's devices (every tenant's for admin), ordered by id, with "
    "their freshness and available kW. Page with `cursor` = the previous `next_cursor`.",
    responses=_ERRORS,
)
async def list_devices(
    region: str | None = Query(None, description="Only this region."),
    kind: DeviceKind | None = Query(None, description="Only this kind."),
    status: Literal["fresh", "stale", "offline", "online"] | None = Query(
        None,
        description="Only devices that are fresh, stale or offline (by freshness), or online "
        "(status online and not offline by freshness).",
    ),
    enrolled: bool | None = Query(None, description="Only enrolled (true) or opted-out (false)."),
    id_prefix: str | None = Query(
        None, min_length=1, max_length=200, description="Only devices whose id starts with this."
    ),
    limit: int = Query(100, ge=1, le=1000, description="Page size."),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
    principal: Principal = Depends(fleet_or_admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    scope = _scope(principal)
    after = _decode_cursor(cursor) if cursor else None
    kind_value = kind.value if kind is not None else None
    view = await current_view(services)
    if status is None:
        rows = await onboarding.list_devices(
            services,
            scope,
            region=region,
            kind=kind_value,
            enrolled=enrolled,
            id_prefix=id_prefix,
            after=after,
            limit=limit + 1,
        )
    else:
        snap = view.snapshot
        sel = snap.mask(region, kind_value)
        if scope is not None:
            sel &= snap.tenant_ids == scope
        if enrolled is not None:
            sel &= snap.enrolled == enrolled
        if status == "online":
            sel &= snap.online & (snap.freshness <= FreshnessCode.stale)
        elif status == Freshness.offline:
            sel &= snap.freshness >= FreshnessCode.offline
        else:
            sel &= snap.freshness == FreshnessCode[status]
        ids = np.sort(snap.device_ids[sel])
        if id_prefix is not None:
            ids = ids[np.char.startswith(ids.astype(str), id_prefix)]
        if after is not None:
            ids = ids[ids > after]
        page = [str(d) for d in ids[: limit + 1]]
        found = {
            r["id"]: r
            for r in await onboarding.list_devices(services, scope, ids=page, limit=limit + 1)
        }
        rows = [found[d] for d in page if d in found]
    more = len(rows) > limit
    rows = rows[:limit]
    devices = []
    for row in rows:
        out = device_out(row)
        out["online"], out["freshness"], out["available_kw"] = _live(view, row["id"])
        devices.append(out)
    return {
        "devices": devices,
        "next_cursor": _encode_cursor(rows[-1]["id"]) if more and rows else None,
    }


def _num(value: Any, scale: float = 1.0, digits: int = 4) -> float | None:
    v = float(value)
    return None if math.isnan(v) else round(v * scale, digits)


_MODE_NAMES = {code: name for name, code in physics.MODE_CODE.items()}


def last_telemetry(rec: np.void, kind: str) -> dict[str, Any] | None:
    """The packed state record in the API's units; None if the device was never heard from."""
    if int(rec["recv_ms"]) <= 0:
        return None
    out: dict[str, Any] = {
        "ts": to_rfc3339(int(rec["ts_ms"])),
        "ts_ms": int(rec["ts_ms"]),
        "received_at": to_rfc3339(int(rec["recv_ms"])),
        "received_ms": int(rec["recv_ms"]),
        "clock_skewed": bool(rec["clock_skewed"]),
        "seq": int(rec["seq"]) if int(rec["seq"]) >= 0 else None,
    }
    if kind == DeviceKind.battery:
        grid = int(rec["grid_up"])
        out.update(
            power_kw=_num(rec["power_w"], 1e-3),
            soc_pct=_num(rec["soc_pct"]),
            backup_reserve_pct=_num(rec["backup_reserve_pct"]),
            grid={1: "up", 0: "down"}.get(grid),
        )
    elif kind == DeviceKind.solar:
        out.update(power_kw=_num(rec["power_w"], 1e-3), energy_kwh=_num(rec["energy_wh"], 1e-3))
    else:
        out.update(
            indoor_c=_num(rec["indoor_c"]),
            setpoint_c=_num(rec["setpoint_c"]),
            hvac_kw=_num(rec["hvac_w"], 1e-3),
            mode=_MODE_NAMES.get(int(rec["mode"])),
            outdoor_c=_num(rec["outdoor_c"]),
        )
    return out


@router.get(
    "/v1/devices/{device_id}",
    response_model=DeviceDetail,
    summary="One device with its last telemetry, freshness and available flexibility",
    responses={**_ERRORS, **_NOT_FOUND},
)
async def get_device(
    device_id: str = DeviceId,
    principal: Principal = Depends(fleet_or_admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    row = await onboarding.get_device(services, device_id, _scope(principal))
    view = await current_view(services)
    i = view.snapshot.index.get(device_id)
    try:
        (blob,) = await services.state.get_states([device_id])
    except Exception as exc:
        # The state store is down: the last fleet snapshot's record of the device (its age
        # shows in `received_at` and the freshness) rather than no answer at all.
        if dependency_down(exc) != "state_store":
            raise
        blob = view.snapshot.state[i].tobytes() if i is not None else None
    online = bool(view.snapshot.online[i]) if i is not None else True
    settings = services.settings
    one = assemble(
        build_registry([tuple(row[c] for c in REGISTRY_COLUMNS)]),
        {device_id: blob} if blob is not None else {},
        {device_id: (online, 0)},
        services.clock.now_ms(),
        settings.telemetry_interval_s,
        settings.offline_after_s,
    )
    rec = unpack_states([blob])[0]
    # A thermostat without its own reading borrows its region's median from the whole fleet.
    is_th = row["kind"] == DeviceKind.thermostat
    outdoor = outdoor_temperatures(one, reference=view.snapshot) if is_th else None
    capability = available_kw(one, 1.0, outdoor_c=outdoor, only_dispatchable=False)
    out = device_out(row)
    out.update(
        online=bool(one.online[0] and one.freshness[0] <= FreshnessCode.stale),
        freshness=freshness_name(one.freshness[0]),
        last_telemetry=last_telemetry(rec, row["kind"]),
        available_kw=round(float(capability[0]) if one.dispatchable()[0] else 0.0, 4),
        capability_kw=round(float(capability[0]), 4),
        window_h=1.0,
    )
    return out


# --- Changing -----------------------------------------------------------------------------------
@router.patch(
    "/v1/devices/{device_id}",
    response_model=DeviceOut,
    summary="Change enrollment settings",
    description="Omitted fields keep their value. `enrolled: false` opts the device out of every "
    "event from now on. `id`, `kind`, `region` and `tenant_id` cannot change; fields of another "
    "kind are refused by name.",
    responses={**_ERRORS, **_NOT_FOUND},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": DevicePatch.model_json_schema()}},
        }
    },
)
async def patch_device(
    request: Request,
    device_id: str = DeviceId,
    principal: Principal = Depends(fleet_or_admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidDevice([FieldError("body", f"not valid JSON: {exc}")]) from None
    row = await onboarding.update_device(services, device_id, _scope(principal), body)
    changed = sorted(body)[:20] if isinstance(body, dict) else []
    await auditing.record(
        services, principal, AuditAction.device_updated, device_id, {"fields": changed}
    )
    return device_out(row)


@router.delete(
    "/v1/devices/{device_id}",
    status_code=204,
    summary="Offboard a device",
    description="Its MQTT credentials stop working at once (a live session is dropped), ingest "
    "ignores it from now on, and it leaves every list and aggregate.",
    responses={**_ERRORS, **_NOT_FOUND, **_BROKER},
)
async def delete_device(
    device_id: str = DeviceId,
    principal: Principal = Depends(fleet_or_admin),
    services: Services = Depends(get_services),
) -> Response:
    await onboarding.offboard(services, device_id, _scope(principal))
    await auditing.record(services, principal, AuditAction.device_offboarded, device_id)
    return Response(status_code=204)
