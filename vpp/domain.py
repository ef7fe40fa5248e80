"""Domain vocabulary shared by every package: kinds, roles, states, the brief's figures."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class DeviceKind(StrEnum):
    battery = "battery"
    solar = "solar"
    thermostat = "thermostat"


# Small integer codes for vectorised arrays and the packed state store.
KIND_CODE: dict[DeviceKind, int] = {
    DeviceKind.battery: 0,
    DeviceKind.solar: 1,
    DeviceKind.thermostat: 2,
}
KIND_BY_CODE: dict[int, DeviceKind] = {v: k for k, v in KIND_CODE.items()}


class Role(StrEnum):
    admin = "admin"
    operator = "operator"
    fleet = "fleet"
    hyperscaler = "hyperscaler"


class Freshness(StrEnum):
    fresh = "fresh"
    stale = "stale"
    offline = "offline"


class FreshnessCode(IntEnum):
    fresh = 0
    stale = 1
    offline = 2
    never = 3  # registered, never heard from


class RequestStatus(StrEnum):
    quoted = "quoted"
    committed = "committed"
    active = "active"
    completed = "completed"
    rejected = "rejected"
    cancelled = "cancelled"
    expired = "expired"


class Direction(StrEnum):
    load_reduction = "load_reduction"
    net_export = "net_export"


class GridEventStatus(StrEnum):
    scheduled = "scheduled"
    active = "active"
    completed = "completed"
    aborted = "aborted"


class CommandType(StrEnum):
    battery_discharge = "battery_discharge"
    battery_charge = "battery_charge"
    thermostat_offset = "thermostat_offset"
    solar_curtail = "solar_curtail"
    restore = "restore"


class AckStatus(StrEnum):
    received = "received"
    started = "started"
    completed = "completed"
    opted_out = "opted_out"
    rejected = "rejected"
    expired = "expired"


class RejectReason(StrEnum):
    """Why an MQTT message was dropped; each is a label of ``vpp_ingest_rejected_total``."""

    invalid_json = "invalid_json"
    not_object = "not_object"
    missing_field = "missing_field"
    wrong_type = "wrong_type"
    out_of_range = "out_of_range"
    unknown_device = "unknown_device"
    offboarded = "offboarded"
    not_enrolled = "not_enrolled"
    out_of_order = "out_of_order"
    oversize = "oversize"
    future = "future"
    bad_topic = "bad_topic"


# --- Figures from the domain brief, used as defaults --------------------------------------------
BATTERY_ONE_WAY_EFFICIENCY = 0.949  # sqrt(0.90 round trip)
BATTERY_MIN_RESERVE_PCT = 20.0  # never below max(customer setting, 20 %)
BATTERY_DEFAULT_CAPACITY_WH = 13_500.0
BATTERY_DEFAULT_MAX_DISCHARGE_W = 5_000.0
BATTERY_WEAR_COST_PER_KWH = 0.05

THERMOSTAT_R_C_PER_KW = 2.0  # °C per kW
THERMOSTAT_C_KWH_PER_C = 2.0  # kWh per °C
THERMOSTAT_COP = 2.5
THERMOSTAT_RATED_W = 5_600.0
# Internal and solar heat gain of a typical home. 0.5 kW reproduces the brief's worked example:
# 35 °C outside, +2 °C offset: off about 0.7 h, 1.1 kW average shed over 2 h, 0.8 kW over 4 h,
# and about 1.6 kWh of recovery energy afterwards.
THERMOSTAT_Q_GAIN_KW = 0.5
THERMOSTAT_DEFAULT_OFFSET_C = 1.7
THERMOSTAT_MAX_EVENT_H = 2.0
THERMOSTAT_HARD_MAX_EVENT_H = 3.0
THERMOSTAT_DEFAULT_MAX_OFFSET_C = 2.0

PENALTY_PER_MWH = 1_150.0
DEFAULT_FIRMNESS = 0.9
