"""The region registry: ``GET /v1/regions`` for any role (every load zone the service knows,
whether it is sold here, and where its weather comes from); ``POST`` and ``PATCH`` for ``admin``
(a zone the seed lacks, or a correction: load centre, time zone, climate).

The rules are the core's (``vpp.regions``), the rows ``store.regions``'; this maps HTTP to them
and refreshes this process's copy of the registry at once (other replicas within
``devices.edges.REGIONS_REFRESH_S``, or as soon as a device names the new zone)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api import auditing
from api.deps import Principal, any_role, get_services, require_roles
from dispatch.services import Services
from store import regions as store_regions
from vpp.domain import AuditAction, Role
from vpp.errors import InvalidInput, NotFound
from vpp.regions import Climate, Region, region_from, region_problems
from vpp.weather import load_site, nearest_site

router = APIRouter(tags=["regions"])
admin = require_roles(Role.admin)


class WeatherSource(BaseModel):
    typical_year: str = Field(
        description="The bundled typical year its clouds and temperature come from"
    )
    distance_km: float = Field(
        description="How far that year's site is from the zone's load centre"
    )


class RegionOut(BaseModel):
    name: str = Field(description="<ISO>-<the ISO's own zone code>", examples=["MISO-Z4"])
    iso: str
    zone: str
    label: str
    time_zone: str = Field(description="IANA time zone; local hours are its standard time")
    utc_offset_h: float = Field(description="The time zone's standard offset from UTC")
    latitude: float = Field(description="The zone's load centre")
    longitude: float
    climate: Climate
    sold: bool = Field(
        description="Devices may be onboarded and capacity quoted here (VPP_REGIONS)"
    )
    weather: WeatherSource


class RegionList(BaseModel):
    regions: list[RegionOut]
    sold: int = Field(description="How many of them are sold here")


class RegionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(examples=["MISO-Z4"], description="<ISO>-<zone code>, upper case")
    iso: str = Field(examples=["MISO"])
    zone: str | None = Field(None, description="Default: the name after the ISO")
    label: str | None = Field(None, description="Where it is, for people (default: the name)")
    time_zone: str = Field(examples=["America/Chicago"])
    latitude: float
    longitude: float
    climate: Climate = "temperate"


class RegionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    iso: str | None = None
    zone: str | None = None
    label: str | None = None
    time_zone: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    climate: Climate | None = None


def region_doc(services: Services, r: Region) -> dict[str, Any]:
    # Which typical year and how far: the site lookup alone, not the zone's whole weather year
    # (a list of every zone would build 77 of them).
    site, km = nearest_site(r.latitude, r.longitude, r.climate)
    return {
        **r.as_dict(),
        "utc_offset_h": r.utc_offset_h,
        "sold": services.regions.is_sold(r.name),
        "weather": {"typical_year": load_site(site).name, "distance_km": round(km, 1)},
    }


def _checked(body: dict[str, Any], *, partial: bool) -> None:
    problems = region_problems(body, partial=partial)
    if problems:
        raise InvalidInput(problems[0].field, problems[0].message, problems)


_NAME = Path(description="The region's name", examples=["MISO-Z4"], max_length=48)
_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"description": "a field is missing or invalid; each one is named"},
}


@router.get(
    "/v1/regions",
    response_model=RegionList,
    summary="Every load zone of the registry, and which are sold here",
    description="Any role.",
)
async def list_regions(
    iso: str | None = Query(None, description="Only this ISO/RTO (ERCOT, CAISO, PJM, MISO, …)"),
    sold: bool | None = Query(None, description="Only the regions sold here (true) or not (false)"),
    principal: Principal = Depends(any_role),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    book = await services.current_regions()
    rows = [
        r
        for r in book.all()
        if (iso is None or r.iso == iso) and (sold is None or book.is_sold(r.name) == sold)
    ]
    return {"regions": [region_doc(services, r) for r in rows], "sold": len(book.sold())}


@router.get(
    "/v1/regions/{name}",
    response_model=RegionOut,
    summary="One load zone",
    description="Any role.",
    responses={404: {"description": "no such region"}},
)
async def get_region(
    name: str = _NAME,
    principal: Principal = Depends(any_role),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    book = await services.current_regions(missing=name)
    r = book.get(name)
    if r is None:
        raise NotFound("name", f"no region {name} (GET /v1/regions lists them)")
    return region_doc(services, r)


@router.post(
    "/v1/regions",
    response_model=RegionOut,
    status_code=201,
    summary="Add a load zone to the registry (admin)",
    responses={**_ERRORS, 409: {"description": "a region of that name exists (PATCH it)"}},
)
async def create_region(
    body: RegionIn = Body(...),
    principal: Principal = Depends(admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    fields = body.model_dump(exclude_none=True)
    _checked(fields, partial=False)
    region = await store_regions.add_region(
        services.db, region_from(fields), int(services.clock.now_ms())
    )
    services.regions.put(region)
    await auditing.record(services, principal, AuditAction.region_created, region.name, fields)
    return region_doc(services, region)


@router.patch(
    "/v1/regions/{name}",
    response_model=RegionOut,
    summary="Correct a load zone (admin): label, load centre, time zone, climate",
    responses={**_ERRORS, 404: {"description": "no such region"}},
)
async def update_region(
    body: RegionPatch = Body(...),
    name: str = _NAME,
    principal: Principal = Depends(admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    fields = body.model_dump(exclude_unset=True)
    nulls = [k for k, v in fields.items() if v is None]
    if nulls:
        raise InvalidInput(nulls[0], "cannot be null (leave it out to keep it)")
    _checked(fields, partial=True)
    base = await store_regions.get_region(services.db, name)
    if base is None:
        raise NotFound("name", f"no region {name} (POST /v1/regions adds one)")
    region = await store_regions.update_region(
        services.db, region_from(fields, base), int(services.clock.now_ms())
    )
    services.regions.put(region)
    await auditing.record(services, principal, AuditAction.region_updated, region.name, fields)
    return region_doc(services, region)
