"""The region registry's rows (``vpp.regions``): list, add, correct. No rules live here (which
fields are valid: ``vpp.regions.region_problems``); this is rows in and rows out."""

from __future__ import annotations

from dataclasses import fields

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from store.database import Database
from store.models import RegionRow
from vpp.errors import Conflict, NotFound
from vpp.regions import Region


def _region(row: RegionRow) -> Region:
    return Region(**{f.name: getattr(row, f.name) for f in fields(Region)})


async def list_regions(db: Database) -> list[Region]:
    async with db.session() as s:
        rows = (
            await s.execute(select(RegionRow).order_by(RegionRow.iso, RegionRow.name))
        ).scalars()
        return [_region(r) for r in rows]


async def get_region(db: Database, name: str) -> Region | None:
    async with db.session() as s:
        row = await s.get(RegionRow, name)
        return _region(row) if row is not None else None


async def add_region(db: Database, region: Region, now_ms: int) -> Region:
    async with db.session() as s:
        s.add(RegionRow(**region.as_dict(), created_ms=now_ms, modified_ms=now_ms))
        try:
            await s.commit()
        except IntegrityError as exc:
            raise Conflict("name", f"region {region.name} exists already (PATCH it)") from exc
    return region


async def update_region(db: Database, region: Region, now_ms: int) -> Region:
    async with db.session() as s:
        row = await s.get(RegionRow, region.name)
        if row is None:
            raise NotFound("name", f"no region {region.name}")
        for key, value in region.as_dict().items():
            setattr(row, key, value)
        row.modified_ms = now_ms
        await s.commit()
    return region
