"""OpenADR 3.1 events and programs in the core's terms, pure (no I/O).

- :func:`parse_duration`: an ISO 8601 duration (``PT1H``, ``P1DT30M``, ``P2W``; ``P9999Y`` is
  infinity) in seconds;
- :func:`parse_interval_period`: an ``intervalPeriod`` object (start, duration, randomizeStart);
- :func:`resolve_intervals`: an event's intervals with absolute windows (the event's
  ``intervalPeriod`` gives defaults; an interval's own period overrides them; an interval
  without a start follows the one before);
- :func:`event_demand`: the MW of load reduction an event asks, as runs of equal values: each
  run becomes one grid event of the core;
- :func:`program_region`: the region a program is in (a ``targets`` string naming a region
  and/or an attribute ``{"type": "REGION", "values": [...]}``; exactly one).

Bad input raises :class:`vpp.errors.InvalidInput` naming the field as the body spells it
(``intervals[1].intervalPeriod.duration``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vpp.errors import InvalidInput
from vpp.timefmt import parse_rfc3339, to_rfc3339

# The payload type the service turns into MW of reduction, and the ones it refuses: they do not
# say honestly what a reduction of a fleet's load is (a limit on a site's import or export, an
# absolute setpoint, a unitless level), so mapping them would invent a target.
SETPOINT_RELATIVE = "DISPATCH_SETPOINT_RELATIVE"
REFUSED_PAYLOADS = frozenset(
    {"IMPORT_CAPACITY_LIMIT", "EXPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT", "SIMPLE"}
)
UNITS_TO_MW = {"KW": 1e-3, "MW": 1.0}
DEFAULT_UNITS = "KW"

# "0001-01-01" (any time of that day) means now (OpenADR 3 User Guide).
_NOW_PREFIX = "0001-01-01"
_DURATION = re.compile(
    r"^(-?)P(?=\d|T\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)([DW]))?"
    r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
INFINITE_YEARS = 9999


def parse_duration(text: Any, field: str = "duration") -> float:
    """Seconds in an ISO 8601 duration (the spec's pattern: years are 365 days, months 30);
    ``P9999Y`` is infinity. A negative duration (``-PT5M``) is negative seconds."""
    if not isinstance(text, str):
        raise InvalidInput(field, f"must be an ISO 8601 duration string, not {text!r}")
    m = _DURATION.match(text)
    if m is None:
        raise InvalidInput(field, f"{text!r} is not an ISO 8601 duration (e.g. PT1H)")
    sign, years, months, days, unit, hours, minutes, seconds = m.groups()
    if years is not None and int(years) >= INFINITE_YEARS:
        return -math.inf if sign else math.inf
    total = (
        int(years or 0) * 365 * 86_400
        + int(months or 0) * 30 * 86_400
        + int(days or 0) * (7 if unit == "W" else 1) * 86_400
        + int(hours or 0) * 3_600
        + int(minutes or 0) * 60
        + float(seconds or 0)
    )
    return -total if sign else total


def parse_start(text: Any, now_ms: int, field: str = "start") -> int:
    """Epoch ms of an RFC 3339 time; ``0001-01-01…`` is now."""
    if not isinstance(text, str):
        raise InvalidInput(field, f"must be an RFC 3339 date-time string, not {text!r}")
    if text.startswith(_NOW_PREFIX):
        return now_ms
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise InvalidInput(field, f"{text!r} is not an RFC 3339 time with an offset") from exc


@dataclass(frozen=True)
class Period:
    """An ``intervalPeriod``: each part None when the object leaves it out (or sends null)."""

    start_ms: int | None = None
    duration_s: float | None = None
    randomize_s: float | None = None


def parse_interval_period(obj: Any, now_ms: int, field: str = "intervalPeriod") -> Period:
    """An ``intervalPeriod`` object; null or absent is an empty period (liberal: some clients
    send ``null`` where the schema has no null)."""
    if obj is None:
        return Period()
    if not isinstance(obj, Mapping):
        raise InvalidInput(field, "must be an object with start and duration")
    start = obj.get("start")
    duration = obj.get("duration")
    randomize = obj.get("randomizeStart")
    start_ms = parse_start(start, now_ms, f"{field}.start") if start is not None else None
    duration_s = parse_duration(duration, f"{field}.duration") if duration is not None else None
    if duration_s is not None and duration_s < 0:
        raise InvalidInput(f"{field}.duration", "must not be negative")
    randomize_s = (
        parse_duration(randomize, f"{field}.randomizeStart") if randomize is not None else None
    )
    return Period(start_ms, duration_s, randomize_s)


@dataclass(frozen=True)
class Interval:
    """One interval of an event with its window resolved."""

    index: int  # position in the event's ``intervals``
    id: int
    start_ms: int
    end_ms: int  # may be far in the future for an infinite duration
    payloads: tuple[Mapping[str, Any], ...]


def resolve_intervals(event: Mapping[str, Any], now_ms: int) -> list[Interval]:
    """The event's intervals with absolute windows. An interval's own ``intervalPeriod``
    overrides the event's; without a start, an interval starts where the one before ends (the
    first at the event's start); a duration must come from one of them."""
    default = parse_interval_period(event.get("intervalPeriod"), now_ms)
    raw = event.get("intervals")
    if raw is None:
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise InvalidInput("intervals", "must be a list of intervals")
    out: list[Interval] = []
    cursor = default.start_ms
    for i, iv in enumerate(raw):
        where = f"intervals[{i}]"
        if not isinstance(iv, Mapping):
            raise InvalidInput(where, "must be an object")
        iv_id = iv.get("id")
        if not isinstance(iv_id, int) or isinstance(iv_id, bool):
            raise InvalidInput(f"{where}.id", "must be an integer")
        own = parse_interval_period(iv.get("intervalPeriod"), now_ms, f"{where}.intervalPeriod")
        start = own.start_ms if own.start_ms is not None else cursor
        duration = own.duration_s if own.duration_s is not None else default.duration_s
        if start is None:
            raise InvalidInput(
                f"{where}.intervalPeriod.start",
                "no start: give the event's intervalPeriod.start or the interval's own",
            )
        if duration is None:
            raise InvalidInput(
                f"{where}.intervalPeriod.duration",
                "no duration: give the event's intervalPeriod.duration or the interval's own",
            )
        end = _end_ms(start, duration)
        payloads = iv.get("payloads")
        if not isinstance(payloads, Sequence) or isinstance(payloads, str | bytes):
            raise InvalidInput(f"{where}.payloads", "must be a list of valuesMap objects")
        for j, p in enumerate(payloads):
            if not isinstance(p, Mapping) or not isinstance(p.get("type"), str):
                raise InvalidInput(f"{where}.payloads[{j}].type", "must be a string")
            if not isinstance(p.get("values"), Sequence) or isinstance(p.get("values"), str):
                raise InvalidInput(f"{where}.payloads[{j}].values", "must be a list")
        out.append(Interval(i, iv_id, start, end, tuple(payloads)))
        cursor = end
    return out


# An "infinite" interval ends this far ahead (the core refuses grid events over 24 h anyway).
_FAR_MS = 100 * 365 * 86_400_000


def _end_ms(start_ms: int, duration_s: float) -> int:
    if math.isinf(duration_s):
        return start_ms + _FAR_MS
    return start_ms + round(duration_s * 1000)


@dataclass(frozen=True)
class Run:
    """Consecutive intervals asking the same MW of reduction: one grid event of the core."""

    start_ms: int
    end_ms: int
    mw: float


def payload_units(event: Mapping[str, Any], payload_type: str = SETPOINT_RELATIVE) -> str:
    """The units of the event's payload descriptor for ``payload_type`` (KW when it has none)."""
    descriptors = event.get("payloadDescriptors") or []
    if not isinstance(descriptors, Sequence) or isinstance(descriptors, str):
        raise InvalidInput("payloadDescriptors", "must be a list")
    for k, d in enumerate(descriptors):
        if not isinstance(d, Mapping):
            raise InvalidInput(f"payloadDescriptors[{k}]", "must be an object")
        if d.get("payloadType") == payload_type:
            units = d.get("units")
            if units is None:
                return DEFAULT_UNITS
            if not isinstance(units, str) or units.upper() not in UNITS_TO_MW:
                raise InvalidInput(
                    f"payloadDescriptors[{k}].units",
                    f"{payload_type} must be in KW or MW, not {units!r}",
                )
            return units.upper()
    return DEFAULT_UNITS


def event_demand(event: Mapping[str, Any], now_ms: int) -> list[Run]:
    """The MW of load reduction an event asks: its ``DISPATCH_SETPOINT_RELATIVE`` payloads (a
    positive reduction in the descriptor's KW or MW), interval by interval, merged into runs of
    equal values over touching intervals. A value of 0 asks nothing (a gap between runs).
    ``IMPORT_CAPACITY_LIMIT``, ``EXPORT_CAPACITY_LIMIT``, ``DISPATCH_SETPOINT`` and ``SIMPLE``
    are refused naming the payload; other payload types (``PRICE``, …) ask nothing of the
    fleet. Overlapping intervals are refused."""
    intervals = resolve_intervals(event, now_ms)
    to_mw = UNITS_TO_MW[payload_units(event)]
    asked: list[tuple[Interval, float]] = []
    for iv in intervals:
        value: float | None = None
        for j, p in enumerate(iv.payloads):
            kind = str(p["type"])
            where = f"intervals[{iv.index}].payloads[{j}]"
            if kind in REFUSED_PAYLOADS:
                raise InvalidInput(
                    f"{where}.type",
                    f"payload type {kind} is not taken: it does not say what reduction of "
                    f"the fleet's load is asked; send {SETPOINT_RELATIVE} (a positive "
                    "reduction in KW or MW)",
                )
            if kind != SETPOINT_RELATIVE:
                continue
            values = p["values"]
            if len(values) != 1:
                raise InvalidInput(f"{where}.values", "must hold exactly one number")
            v = values[0]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidInput(f"{where}.values", f"must be a finite number, not {v!r}")
            if v < 0:
                raise InvalidInput(
                    f"{where}.values", "must be ≥ 0: a reduction (an increase is not taken)"
                )
            if value is not None:
                raise InvalidInput(f"{where}.type", f"{SETPOINT_RELATIVE} given twice")
            value = float(v) * to_mw
        if value is not None:
            asked.append((iv, value))
    ordered = sorted(intervals, key=lambda iv: (iv.start_ms, iv.index))
    for a, b in itertools.pairwise(ordered):
        if b.start_ms < a.end_ms:
            raise InvalidInput(
                f"intervals[{b.index}].intervalPeriod",
                f"overlaps intervals[{a.index}]",
            )
    return runs_of((iv.start_ms, iv.end_ms, mw) for iv, mw in asked)


def runs_of(windows: Iterable[tuple[int, int, float]]) -> list[Run]:
    """Touching windows of equal MW merged into one run; zero-MW windows dropped."""
    runs: list[Run] = []
    for start, end, mw in sorted(windows):
        if mw <= 0 or end <= start:
            continue
        last = runs[-1] if runs else None
        if last is not None and last.end_ms == start and math.isclose(last.mw, mw):
            runs[-1] = Run(last.start_ms, end, last.mw)
        else:
            runs.append(Run(start, end, mw))
    return runs


REGION_ATTRIBUTE = "REGION"


def program_region(program: Mapping[str, Any], regions: Sequence[str]) -> str:
    """The one region a program is in: named among its ``targets`` (3.1 targets are strings;
    a 3.0-style ``{"type": "REGION", "values": [...]}`` target is taken too) and/or by an
    attribute ``{"type": "REGION", "values": [...]}``. Both may name it; they must agree, and
    the region must be one the service sells in. Other targets (groups, VEN names) are left
    alone."""
    known = set(regions)
    found: dict[str, str] = {}  # region → the field that named it
    targets = program.get("targets") or []
    if not isinstance(targets, Sequence) or isinstance(targets, str):
        raise InvalidInput("targets", "must be a list")
    for i, t in enumerate(targets):
        if isinstance(t, str):
            if t in known:
                found.setdefault(t, f"targets[{i}]")
        elif isinstance(t, Mapping) and t.get("type") == REGION_ATTRIBUTE:
            for v in _values(t, f"targets[{i}]"):
                found.setdefault(_known_region(v, known, f"targets[{i}].values"), f"targets[{i}]")
    attributes = program.get("attributes") or []
    if not isinstance(attributes, Sequence) or isinstance(attributes, str):
        raise InvalidInput("attributes", "must be a list")
    for i, a in enumerate(attributes):
        if isinstance(a, Mapping) and a.get("type") == REGION_ATTRIBUTE:
            for v in _values(a, f"attributes[{i}]"):
                found.setdefault(
                    _known_region(v, known, f"attributes[{i}].values"), f"attributes[{i}]"
                )
    if not found:
        raise InvalidInput(
            "targets",
            "the program names no region: put one of "
            f"{', '.join(regions)} among its targets or in an attribute "
            '{"type": "REGION", "values": [...]}',
        )
    if len(found) > 1:
        raise InvalidInput(
            next(iter(found.values())),
            f"the program names {len(found)} regions ({', '.join(sorted(found))}); "
            "a program is in exactly one",
        )
    return next(iter(found))


def _values(obj: Mapping[str, Any], field: str) -> list[Any]:
    values = obj.get("values")
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise InvalidInput(f"{field}.values", "must be a list")
    return list(values)


def _known_region(value: Any, known: set[str], field: str) -> str:
    if not isinstance(value, str) or value not in known:
        raise InvalidInput(field, f"unknown region {value!r} (one of {', '.join(sorted(known))})")
    return value


# --- delivery reports ---------------------------------------------------------------------------
AGGREGATED = "AGGREGATED_REPORT"


@dataclass(frozen=True)
class Delivered:
    """One settlement interval of a grid event: baseline and delivered MW."""

    start_ms: int
    end_ms: int
    baseline_mw: float
    delivered_mw: float


def delivery_report(
    event_id: str, event_name: str | None, client_name: str, intervals: Sequence[Delivered]
) -> dict[str, Any]:
    """The body of the report the service writes for an event it dispatched: one resource,
    ``AGGREGATED_REPORT``, an interval per settlement interval (5 minutes by default) with
    payloads ``BASELINE`` (what the dispatched devices would have drawn) and ``DEMAND`` (the
    reduction delivered: baseline − actual), both in MW."""
    ordered = sorted(intervals, key=lambda d: d.start_ms)
    resource: dict[str, Any] = {"resourceName": AGGREGATED, "intervals": []}
    for i, d in enumerate(ordered):
        resource["intervals"].append(
            {
                "id": i,
                "intervalPeriod": {
                    "start": to_rfc3339(d.start_ms),
                    "duration": iso_duration((d.end_ms - d.start_ms) / 1000),
                },
                "payloads": [
                    {"type": "BASELINE", "values": [round(d.baseline_mw, 6)]},
                    {"type": "DEMAND", "values": [round(d.delivered_mw, 6)]},
                ],
            }
        )
    return {
        "eventID": event_id,
        "clientName": client_name,
        "reportName": f"delivery of {event_name or event_id}",
        "payloadDescriptors": [
            {
                "objectType": "REPORT_PAYLOAD_DESCRIPTOR",
                "payloadType": kind,
                "readingType": "DIRECT_READ",
                "units": "MW",
            }
            for kind in ("BASELINE", "DEMAND")
        ],
        "resources": [resource],
    }


def iso_duration(seconds: float) -> str:
    """Seconds as an ISO 8601 duration (``PT5M``, ``PT1H30M``, ``PT0S``)."""
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    out = "PT" + (f"{h}H" if h else "") + (f"{m}M" if m else "") + (f"{s}S" if s else "")
    return out if out != "PT" else "PT0S"


# --- a VEN's resources as fleet devices ---------------------------------------------------------
KIND_ATTRIBUTE = "KIND"
MAX_EXPORT = "MAX_POWER_EXPORT"  # kW
MAX_CONSUMPTION = "MAX_POWER_CONSUMPTION"  # kW
STORAGE_CAPACITY = "STORAGE_USABLE_CAPACITY"  # kWh
RESOURCE_KINDS = ("battery", "solar", "thermostat")
# The attributes each kind needs, and the device field (W or Wh) each becomes.
KIND_ATTRIBUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "battery": (
        (STORAGE_CAPACITY, "capacity_wh"),
        (MAX_EXPORT, "max_discharge_w"),
        (MAX_CONSUMPTION, "max_charge_w"),
    ),
    "solar": ((MAX_EXPORT, "rated_w"),),
    "thermostat": ((MAX_CONSUMPTION, "hvac_rated_w"),),
}
# A thermostat resource has no attribute for its comfort band: the VEN's cloud keeps the
# customer's comfort; the fleet plans within this band (the service's convention).
THERMOSTAT_COMFORT_C = (20.0, 26.0)


def _attributes(resource: Mapping[str, Any]) -> dict[str, tuple[int, list[Any]]]:
    """The resource's attributes by type: (position, values); a type given twice is refused."""
    raw = resource.get("attributes") or []
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise InvalidInput("attributes", "must be a list of valuesMap objects")
    out: dict[str, tuple[int, list[Any]]] = {}
    for i, a in enumerate(raw):
        if not isinstance(a, Mapping) or not isinstance(a.get("type"), str):
            raise InvalidInput(f"attributes[{i}].type", "must be a string")
        kind = str(a["type"])
        if kind in out:
            raise InvalidInput(f"attributes[{i}].type", f"{kind} given twice")
        out[kind] = (i, _values(a, f"attributes[{i}]"))
    return out


def _one_number(attrs: dict[str, tuple[int, list[Any]]], name: str, kind: str) -> float:
    if name not in attrs:
        raise InvalidInput("attributes", f"{name} is required for a {kind} resource")
    i, values = attrs[name]
    v = values[0] if len(values) == 1 else None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise InvalidInput(
            f"attributes[{i}].values", f"{name} must hold exactly one finite number ≥ 0"
        )
    return float(v)


def resource_device(resource: Mapping[str, Any], regions: Sequence[str]) -> dict[str, Any] | None:
    """The fleet device a VEN's resource describes, as ``POST /v1/devices`` fields (W, Wh), or
    None when the resource names no ``KIND`` (it is stored, and is no fleet device).

    Attributes: ``KIND`` (battery, solar, thermostat), ``REGION`` (one of the service's),
    ``MAX_POWER_EXPORT`` and ``MAX_POWER_CONSUMPTION`` in kW, ``STORAGE_USABLE_CAPACITY`` in
    kWh. A battery needs all three figures, solar ``MAX_POWER_EXPORT``, a thermostat
    ``MAX_POWER_CONSUMPTION``. An aggregated group (many homes behind one resource) is one device
    of the summed figures the VEN gives. Bad attributes raise InvalidInput naming the
    attribute."""
    attrs = _attributes(resource)
    if KIND_ATTRIBUTE not in attrs:
        return None
    i, values = attrs[KIND_ATTRIBUTE]
    kind = values[0].lower() if len(values) == 1 and isinstance(values[0], str) else None
    if kind not in RESOURCE_KINDS:
        raise InvalidInput(
            f"attributes[{i}].values",
            f"KIND must be one of {', '.join(RESOURCE_KINDS)}, not {values!r}",
        )
    if REGION_ATTRIBUTE not in attrs:
        raise InvalidInput("attributes", f"REGION is required for a {kind} resource")
    j, regs = attrs[REGION_ATTRIBUTE]
    if len(regs) != 1:
        raise InvalidInput(f"attributes[{j}].values", "REGION must hold exactly one region")
    region = _known_region(regs[0], set(regions), f"attributes[{j}].values")
    out: dict[str, Any] = {"kind": kind, "region": region}
    for name, field in KIND_ATTRIBUTES[kind]:
        watts = _one_number(attrs, name, kind) * 1000.0
        if watts <= 0 and field != "max_charge_w":
            raise InvalidInput(f"attributes[{attrs[name][0]}].values", f"{name} must be > 0")
        out[field] = watts
    if kind == "thermostat":
        out["comfort_min_c"], out["comfort_max_c"] = THERMOSTAT_COMFORT_C
    return out


# --- a VEN's reports as telemetry ---------------------------------------------------------------
USAGE = "USAGE"  # kW, + consumed from the grid, − exported
CHARGE_LEVEL = "STORAGE_CHARGE_LEVEL"  # %
BASELINE = "BASELINE"
INDOOR = "TEMPERATURE"  # °C, a thermostat's indoor temperature
THERMOSTAT_SETPOINT = "SETPOINT"  # °C
OPERATING_STATE = "OPERATING_STATE"  # a thermostat's mode: cool, heat, off, auto


@dataclass(frozen=True)
class Reading:
    """One interval of a resource's report as the contract's telemetry (W, %, °C)."""

    resource: int  # position in the report's ``resources``
    ts_ms: int
    telemetry: dict[str, Any]


def _payload_number(p: Mapping[str, Any], where: str) -> float:
    values = p["values"]
    v = values[0] if len(values) == 1 else None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidInput(f"{where}.values", f"{p['type']} must hold exactly one finite number")
    return float(v)


def report_readings(
    resource: Mapping[str, Any], position: int, kind: str, now_ms: int
) -> list[Reading]:
    """A report's resource (one fleet device of ``kind``) as telemetry readings, one per
    interval that carries ``USAGE``. ``USAGE`` is kW consumed (+ drawing from the grid,
    − exporting): a battery's or solar's ``power_w`` is −USAGE×1000 (the contract's + is
    output), a thermostat's ``hvac_w`` +USAGE×1000. A battery needs ``STORAGE_CHARGE_LEVEL``
    (%), a thermostat ``TEMPERATURE`` and ``SETPOINT`` (°C) and ``OPERATING_STATE`` (its mode).
    ``BASELINE`` stays in the report (the service settles on its own baseline from the
    history these readings build). A reading is stamped at its interval's end (now at the
    latest); an interval without a period is a reading of now."""
    base = f"resources[{position}]"
    if resource.get("intervalPeriod") is None:  # readings of now, unless an interval says
        resource = {**resource, "intervalPeriod": {"start": to_rfc3339(now_ms), "duration": "PT0S"}}
    try:
        intervals = resolve_intervals(resource, now_ms)
    except InvalidInput as exc:
        raise InvalidInput(f"{base}.{exc.field}", exc.message) from None
    out: list[Reading] = []
    for iv in intervals:
        got: dict[str, Any] = {}
        for j, p in enumerate(iv.payloads):
            where = f"{base}.intervals[{iv.index}].payloads[{j}]"
            t = str(p["type"])
            if t == OPERATING_STATE:
                vals = p["values"]
                if len(vals) != 1 or vals[0] not in ("cool", "heat", "off", "auto"):
                    raise InvalidInput(f"{where}.values", "OPERATING_STATE: cool, heat, off, auto")
                got[t] = vals[0]
            elif t in (USAGE, CHARGE_LEVEL, INDOOR, THERMOSTAT_SETPOINT, BASELINE):
                got[t] = _payload_number(p, where)
        if USAGE not in got:
            continue
        where = f"{base}.intervals[{iv.index}].payloads"
        usage_w = got[USAGE] * 1000.0
        tel: dict[str, Any] = {}
        if kind == "battery":
            if CHARGE_LEVEL not in got:
                raise InvalidInput(where, f"a battery's USAGE needs {CHARGE_LEVEL} (%) with it")
            if not 0 <= got[CHARGE_LEVEL] <= 100:
                raise InvalidInput(where, f"{CHARGE_LEVEL} must be 0 to 100 %")
            tel = {"power_w": -usage_w, "soc_pct": got[CHARGE_LEVEL]}
        elif kind == "solar":
            if usage_w > 0:
                raise InvalidInput(where, "a solar resource's USAGE must be ≤ 0 (generation)")
            tel = {"power_w": -usage_w}
        else:
            missing = [n for n in (INDOOR, THERMOSTAT_SETPOINT, OPERATING_STATE) if n not in got]
            if missing:
                raise InvalidInput(where, f"a thermostat's USAGE needs {', '.join(missing)}")
            if usage_w < 0:
                raise InvalidInput(where, "a thermostat's USAGE must be ≥ 0")
            tel = {
                "hvac_w": usage_w,
                "indoor_c": got[INDOOR],
                "setpoint_c": got[THERMOSTAT_SETPOINT],
                "mode": got[OPERATING_STATE],
            }
        ts = min(iv.end_ms, now_ms)
        out.append(Reading(position, ts, {"ts": ts, **tel}))
    out.sort(key=lambda r: r.ts_ms)
    return out


def dispatch_event(
    *,
    program_id: str,
    event_name: str,
    targets: Sequence[str],
    command: Mapping[str, Any],
) -> dict[str, Any]:
    """The OpenADR event that carries one device's command (the contract's command JSON) to its
    VEN: one interval from ``valid_from`` to ``valid_until``. A battery's setpoint is
    ``DISPATCH_SETPOINT`` in kW, + discharging (export, the telemetry's sign), − charging; a
    solar curtailment ``EXPORT_CAPACITY_LIMIT`` in kW; a thermostat's offset
    ``CONTROL_SETPOINT`` in °C added to the cooling setpoint (units ``DELTA_C``, the service's
    convention)."""
    t = command["type"]
    if t in ("battery_discharge", "battery_charge"):
        sign = 1.0 if t == "battery_discharge" else -1.0
        ptype, units, value = "DISPATCH_SETPOINT", "KW", sign * float(command["setpoint_w"]) / 1000
    elif t == "solar_curtail":
        ptype, units, value = "EXPORT_CAPACITY_LIMIT", "KW", float(command["limit_w"]) / 1000
    else:
        ptype, units, value = "CONTROL_SETPOINT", "DELTA_C", float(command.get("offset_c") or 0)
    start, until = int(command["valid_from"]), int(command["valid_until"])
    return {
        "programID": program_id,
        "eventName": event_name,
        "targets": list(targets),
        "payloadDescriptors": [
            {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": ptype, "units": units}
        ],
        "intervalPeriod": {
            "start": to_rfc3339(start),
            "duration": iso_duration(max(0, until - start) / 1000),
        },
        "intervals": [{"id": 0, "payloads": [{"type": ptype, "values": [round(value, 4)]}]}],
    }


def cut_event(event: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """The event ended now (a restore): its period shortened to end at ``now_ms`` (at its start
    at the earliest)."""
    out = dict(event)
    period = dict(out.get("intervalPeriod") or {})
    start = parse_start(period.get("start"), now_ms, "intervalPeriod.start")
    period["duration"] = iso_duration(max(0, now_ms - start) / 1000)
    out["intervalPeriod"] = period
    return out
