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
# The kind code the ingest registry keeps for an offboarded device (a tombstone, not a kind).
KIND_OFFBOARDED = -1


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


# Small integer codes for command types in arrays: the optimiser's assignments (stored in plans
# as ``command_type``, so these numbers must not change), the runner and the simulator.
COMMAND_CODE: dict[CommandType, int] = {
    CommandType.battery_discharge: 0,
    CommandType.thermostat_offset: 1,
    CommandType.solar_curtail: 2,
    CommandType.battery_charge: 3,
    CommandType.restore: 4,
}
COMMAND_BY_CODE: dict[int, CommandType] = {v: k for k, v in COMMAND_CODE.items()}
# The kind of device each command acts on (a restore ends whatever a device is doing).
COMMAND_KIND: dict[CommandType, DeviceKind] = {
    CommandType.battery_discharge: DeviceKind.battery,
    CommandType.battery_charge: DeviceKind.battery,
    CommandType.thermostat_offset: DeviceKind.thermostat,
    CommandType.solar_curtail: DeviceKind.solar,
}
# The payload field that carries each command's value.
COMMAND_FIELD: dict[CommandType, str] = {
    CommandType.battery_discharge: "setpoint_w",
    CommandType.battery_charge: "setpoint_w",
    CommandType.thermostat_offset: "offset_c",
    CommandType.solar_curtail: "limit_w",
}


class CommandStatus(StrEnum):
    """A stored command's status (``commands.status``): pending → sent → an ack's status
    (received, started, completed, opted_out, rejected, expired), or what the runner decided
    (missed: no ack; stale: no telemetry; preempted; released: over target; restored: void,
    never sent, at the event's end)."""

    pending = "pending"
    sent = "sent"
    received = "received"
    started = "started"
    completed = "completed"
    opted_out = "opted_out"
    rejected = "rejected"
    expired = "expired"
    missed = "missed"
    stale = "stale"
    preempted = "preempted"
    released = "released"
    restored = "restored"


# Codes of command statuses in the runner's arrays. Progress is ordered: an ack only moves a
# command forward (received < started < completed).
COMMAND_STATUS_CODE: dict[CommandStatus, int] = {s: i for i, s in enumerate(CommandStatus)}
COMMAND_STATUS_BY_CODE: dict[int, CommandStatus] = {v: k for k, v in COMMAND_STATUS_CODE.items()}


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


class AuditAction(StrEnum):
    """What an audit row records (``GET /v1/audit``'s ``action``)."""

    request_quoted = "request.quoted"
    request_committed = "request.committed"
    request_cancelled = "request.cancelled"
    grid_event_created = "grid_event.created"
    grid_event_aborted = "grid_event.aborted"
    device_created = "device.created"
    devices_imported = "devices.imported"
    device_updated = "device.updated"
    device_offboarded = "device.offboarded"
    key_created = "key.created"
    key_revoked = "key.revoked"
    region_created = "region.created"
    region_updated = "region.updated"


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
