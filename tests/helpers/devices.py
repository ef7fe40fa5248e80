"""Devices as the API's users send them: registration bodies for each kind, packed state
records as ingest stores them, and the reads the device tests check the API's answers with."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select

from store.models import Device
from vpp.fleet.records import empty_state, pack_state

NOW = 1_784_061_000_000  # 2026-07-14T20:30:00Z
REGION = "ERCOT-NORTH"


def uid(prefix: str = "d") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def battery(device_id: str | None = None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "battery",
        "site_id": "site-1",
        "region": REGION,
        "capacity_wh": 13_500,
        "max_discharge_w": 5_000,
        "max_charge_w": 5_000,
    }
    if device_id is not None:
        body["id"] = device_id
    return {**body, **kw}


def thermostat(device_id: str | None = None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "thermostat",
        "site_id": "site-2",
        "region": REGION,
        "hvac_rated_w": 5_600,
        "comfort_max_c": 28,
        "comfort_min_c": 18,
    }
    if device_id is not None:
        body["id"] = device_id
    return {**body, **kw}


def solar(device_id: str | None = None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "solar",
        "site_id": "site-3",
        "region": REGION,
        "rated_w": 7_600,
    }
    if device_id is not None:
        body["id"] = device_id
    return {**body, **kw}


def state(recv_ms: int, **fields: float) -> bytes:
    """A packed state record as ingest writes it (received at ``recv_ms``)."""
    rec = empty_state()
    rec["recv_ms"] = recv_ms
    rec["ts_ms"] = recv_ms - 1_000
    for name, value in fields.items():
        rec[name] = value
    return pack_state(rec)


def fields_of(resp: Any) -> set[str]:
    return {e["field"] for e in resp.json()["errors"]}


async def stored_ids(client: Any) -> set[str]:
    async with client.services.db.session() as s:
        return set((await s.execute(select(Device.id))).scalars().all())
