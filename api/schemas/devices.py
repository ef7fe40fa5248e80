"""Device and fleet models of the HTTP API.

The request bodies are the service layer's own specs (``devices.onboarding``), so the API
validates exactly what onboarding accepts; the response models below document every field.
Units: kW for one device, MW for aggregates, RFC 3339 UTC timestamps.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, Field

from devices.onboarding import (
    BatterySpec,
    DevicePatch,
    DeviceSpec,
    SolarSpec,
    ThermostatSpec,
)
from vpp import domain

DeviceCreate = DeviceSpec
Freshness = Literal["fresh", "stale", "offline"]
Kind = Literal["battery", "solar", "thermostat"]
# Spelled out for the OpenAPI schema; the vocabularies are vpp.domain's.
assert set(get_args(Freshness)) == {f.value for f in domain.Freshness}
assert set(get_args(Kind)) == {k.value for k in domain.DeviceKind}

__all__ = [
    "BatterySpec",
    "BulkCreated",
    "BulkDevice",
    "DeviceCreate",
    "DeviceCreated",
    "DeviceDetail",
    "DeviceList",
    "DeviceOut",
    "DevicePatch",
    "DeviceSummary",
    "ErrorOut",
    "FieldErrorOut",
    "FleetOut",
    "FleetRow",
    "FleetTotals",
    "LastTelemetry",
    "MqttCredentials",
    "MqttTopics",
    "SolarSpec",
    "ThermostatSpec",
]


# --- Errors -------------------------------------------------------------------------------------
class FieldErrorOut(BaseModel):
    index: int | None = Field(
        None, description="Position of the bad row in a bulk import (0-based); absent otherwise."
    )
    field: str = Field(description="The offending field, e.g. `region` or `capacity_wh`.")
    message: str = Field(description="What is wrong with it.")


class ErrorOut(BaseModel):
    detail: str = Field(description="Human-readable summary naming each offending field.")
    errors: list[FieldErrorOut] = Field(
        default_factory=list, description="Every problem found, by row index and field."
    )
    bad_rows: int | None = Field(None, description="Bulk import: how many rows are bad.")


# --- Credentials --------------------------------------------------------------------------------
class MqttTopics(BaseModel):
    telemetry: str = Field(description="Publish telemetry here (QoS 0 or 1).")
    status: str = Field(description="Publish `online`/`offline` here, retained; the Last Will.")
    ack: str = Field(description="Publish command acknowledgements here (QoS 1).")
    cmd: str = Field(description="Subscribe here for commands (QoS 1).")


class MqttCredentials(BaseModel):
    username: str = Field(description="MQTT username: the device id.")
    password: str = Field(description="MQTT password; shown only in this answer, never again.")
    topics: MqttTopics = Field(description="The device's own topics (it may touch no others).")


# --- Devices ------------------------------------------------------------------------------------
class DeviceOut(BaseModel):
    id: str = Field(description="Device id, also its MQTT username.")
    tenant_id: str = Field(description="Tenant that owns the device.")
    kind: Kind = Field(description="Device kind.")
    site_id: str = Field(description="The customer's site.")
    region: str = Field(description="Market region (ISO zone).")
    feeder: str | None = Field(None, description="Distribution feeder id.")
    vendor: str | None = Field(None, description="OEM.")
    lat: float | None = Field(None, description="Latitude, degrees.")
    lon: float | None = Field(None, description="Longitude, degrees.")
    enrolled: bool = Field(description="false: opted out of every event.")
    max_events_per_season: int | None = Field(None, description="Events per season budget.")
    max_hours_per_season: float | None = Field(None, description="Event hours per season budget.")
    capacity_wh: float | None = Field(None, description="Battery: usable capacity, Wh.")
    max_discharge_w: float | None = Field(None, description="Battery: discharge rating, W.")
    max_charge_w: float | None = Field(None, description="Battery: charge rating, W.")
    backup_reserve_pct: float | None = Field(None, description="Battery: backup reserve, %.")
    rated_w: float | None = Field(None, description="Solar: DC nameplate, W.")
    hvac_rated_w: float | None = Field(None, description="Thermostat: HVAC electric rating, W.")
    comfort_max_c: float | None = Field(None, description="Thermostat: warmest accepted, °C.")
    comfort_min_c: float | None = Field(None, description="Thermostat: coldest accepted, °C.")
    max_offset_c: float | None = Field(None, description="Thermostat: largest event offset, °C.")
    transport: Literal["mqtt", "openadr"] = Field(
        "mqtt",
        description="How the device is reached: `mqtt` (its own broker login and topics) or "
        "`openadr` (a VEN's resource: commands are OpenADR events, telemetry its reports).",
    )
    created_at: str = Field(description="Registration time, RFC 3339 UTC.")
    updated_at: str = Field(description="Last change of the registration, RFC 3339 UTC.")


class DeviceCreated(DeviceOut):
    mqtt: MqttCredentials = Field(description="The device's broker login; shown this once.")


class LastTelemetry(BaseModel):
    """The latest accepted telemetry, in the HTTP API's units (kW for one device)."""

    ts: str = Field(description="Device clock of the reading, RFC 3339 UTC.")
    ts_ms: int = Field(description="Device clock of the reading, epoch ms.")
    received_at: str = Field(description="Service clock at receipt, RFC 3339 UTC.")
    received_ms: int = Field(description="Service clock at receipt, epoch ms.")
    clock_skewed: bool = Field(description="Device clock more than a minute off the service's.")
    seq: int | None = Field(None, description="Device's sequence number, if it sends one.")
    power_kw: float | None = Field(
        None, description="Battery: + discharging, − charging; solar: generation; kW."
    )
    soc_pct: float | None = Field(None, description="Battery state of charge, %.")
    backup_reserve_pct: float | None = Field(None, description="Battery reserve it reports, %.")
    grid: Literal["up", "down"] | None = Field(None, description="Battery: grid status seen.")
    energy_kwh: float | None = Field(None, description="Solar: cumulative energy counter, kWh.")
    indoor_c: float | None = Field(None, description="Thermostat: indoor temperature, °C.")
    setpoint_c: float | None = Field(None, description="Thermostat: setpoint, °C.")
    hvac_kw: float | None = Field(None, description="Thermostat: HVAC electric draw, kW.")
    mode: Literal["off", "cool", "heat", "auto"] | None = Field(
        None, description="Thermostat mode."
    )
    outdoor_c: float | None = Field(None, description="Thermostat: outdoor temperature, °C.")


class DeviceDetail(DeviceOut):
    online: bool = Field(
        description="Heard from recently (fresh or stale) and its status topic does not say "
        "offline."
    )
    freshness: Freshness = Field(
        description="fresh: heard within 2 telemetry intervals; stale: later (left out of new "
        "dispatch); offline: nothing for 15 minutes, a Last Will, or never heard from."
    )
    last_telemetry: LastTelemetry | None = Field(
        None, description="Latest accepted telemetry; null if the device was never heard from."
    )
    available_kw: float = Field(
        description="Flexibility the device could deliver now, held for `window_h` hours, kW; 0 "
        "unless enrolled, online and fresh. Battery: min(max discharge, energy above reserve × "
        "0.949 / h); thermostat: RC-model shed at its indoor/outdoor state; solar: 0."
    )
    capability_kw: float = Field(
        description="The same figure ignoring enrollment and freshness (what the hardware holds)."
    )
    window_h: float = Field(1.0, description="Hours the available power is held for.")


class DeviceSummary(DeviceOut):
    online: bool = Field(description="As in GET /v1/devices/{id}.")
    freshness: Freshness = Field(description="fresh, stale or offline, as in GET /v1/devices/{id}.")
    available_kw: float = Field(description="As in GET /v1/devices/{id}, kW.")


class DeviceList(BaseModel):
    devices: list[DeviceSummary] = Field(description="This page of devices, ordered by id.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class BulkDevice(BaseModel):
    id: str = Field(description="Device id, also its MQTT username.")
    mqtt: MqttCredentials = Field(description="The device's broker login; shown this once.")


class BulkCreated(BaseModel):
    count: int = Field(description="Devices registered (all of them: imports are all or nothing).")
    devices: list[BulkDevice] = Field(description="Each device's broker login, in input order.")


# --- Fleet --------------------------------------------------------------------------------------
class FleetRow(BaseModel):
    region: str = Field(description="Market region (ISO zone).")
    kind: Kind = Field(description="Device kind.")
    registered: int = Field(description="Devices registered (not offboarded).")
    enrolled: int = Field(description="Of which enrolled in events.")
    online: int = Field(description="Of which online and not offline by freshness.")
    fresh: int = Field(description="Of which fresh (heard within 2 telemetry intervals).")
    available_mw: float = Field(
        description="MW deliverable now, held for the next hour, by enrolled, online, fresh "
        "devices."
    )
    lat: float | None = Field(
        None, description="Mean latitude of the devices that gave one (for maps); else null."
    )
    lon: float | None = Field(
        None, description="Mean longitude of the devices that gave one (for maps); else null."
    )


class FleetTotals(BaseModel):
    registered: int = Field(description="Devices registered, every region and kind.")
    enrolled: int = Field(description="Of which enrolled in events.")
    online: int = Field(description="Of which online and not offline by freshness.")
    fresh: int = Field(description="Of which fresh.")
    available_mw: float = Field(description="MW deliverable now, held for the next hour.")


class FleetOut(BaseModel):
    as_of: str = Field(description="Time of the fleet state summed, RFC 3339 UTC.")
    window_h: float = Field(1.0, description="Hours the available MW is held for.")
    regions: list[FleetRow] = Field(description="One row per region and kind with devices.")
    totals: FleetTotals = Field(description="The rows summed.")
