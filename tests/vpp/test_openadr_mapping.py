"""vpp.openadr: ISO 8601 durations, interval periods, an event's MW as runs of equal values
(one grid event per run), a program's region; a VEN's resource as a device, its report as
telemetry, a command as an event."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpp.errors import InvalidInput
from vpp.openadr import (
    Run,
    cut_event,
    dispatch_event,
    event_demand,
    parse_duration,
    parse_interval_period,
    program_region,
    report_readings,
    resolve_intervals,
    resource_device,
    runs_of,
)
from vpp.timefmt import to_rfc3339

NOW = 1_784_061_000_000
REGIONS = ["ERCOT-NORTH", "CAISO-SP15"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("PT1H", 3600), ("PT5M", 300), ("PT0.5S", 0.5), ("P1D", 86400), ("P2W", 14 * 86400),
     ("P1DT1H30M", 86400 + 5400), ("-PT5M", -300), ("P1M", 30 * 86400), ("PT0S", 0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_infinite_and_bad_durations() -> None:
    assert parse_duration("P9999Y") == math.inf
    for bad in ("1H", "PT", "P", "PT1X", "", None, 5):
        with pytest.raises(InvalidInput) as e:
            parse_duration(bad, "intervalPeriod.duration")
        assert e.value.field == "intervalPeriod.duration"


@given(st.integers(0, 48), st.integers(0, 59), st.integers(0, 59))
def test_duration_round_trip(h: int, m: int, s: int) -> None:
    text = f"PT{h}H{m}M{s}S"
    assert parse_duration(text) == h * 3600 + m * 60 + s


def test_interval_period_null_and_now() -> None:
    assert parse_interval_period(None, NOW).start_ms is None
    p = parse_interval_period(
        {"start": "0001-01-01", "duration": "PT1H", "randomizeStart": None}, NOW
    )
    assert (p.start_ms, p.duration_s, p.randomize_s) == (NOW, 3600, None)
    with pytest.raises(InvalidInput) as e:
        parse_interval_period({"start": "yesterday"}, NOW, "intervals[0].intervalPeriod")
    assert e.value.field == "intervals[0].intervalPeriod.start"


def _event(values: list[float], units: str = "KW", start_ms: int = NOW + 3_600_000) -> dict:
    return {
        "programID": "p1",
        "intervalPeriod": {"start": to_rfc3339(start_ms), "duration": "PT15M"},
        "payloadDescriptors": [
            {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "DISPATCH_SETPOINT_RELATIVE",
             "units": units}
        ],
        "intervals": [
            {"id": i, "payloads": [{"type": "DISPATCH_SETPOINT_RELATIVE", "values": [v]}]}
            for i, v in enumerate(values)
        ],
    }  # fmt: skip


def test_intervals_follow_each_other_and_override() -> None:
    ev = _event([1, 2])
    ev["intervals"][1]["intervalPeriod"] = {"duration": "PT30M"}
    ivs = resolve_intervals(ev, NOW)
    s = NOW + 3_600_000
    assert [(i.start_ms, i.end_ms) for i in ivs] == [(s, s + 900_000), (s + 900_000, s + 2_700_000)]


def test_runs_of_equal_values_become_one_grid_event_each() -> None:
    s = NOW + 3_600_000
    q = 900_000
    runs = event_demand(_event([2000, 2000, 5000, 0, 5000]), NOW)
    assert runs == [Run(s, s + 2 * q, 2.0), Run(s + 2 * q, s + 3 * q, 5.0),
                    Run(s + 4 * q, s + 5 * q, 5.0)]  # fmt: skip
    assert event_demand(_event([3], units="MW"), NOW) == [Run(s, s + q, 3.0)]


@given(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=1, max_size=12))
def test_runs_cover_exactly_the_nonzero_intervals(values: list[float]) -> None:
    q = 900_000
    runs = runs_of((i * q, (i + 1) * q, v) for i, v in enumerate(values))
    asked = sum(v * q for v in values)
    assert math.isclose(sum(r.mw * (r.end_ms - r.start_ms) for r in runs), asked)
    for a, b in itertools.pairwise(runs):  # touching runs differ in value
        assert a.end_ms < b.start_ms or a.mw != b.mw


@pytest.mark.parametrize("kind", ["IMPORT_CAPACITY_LIMIT", "EXPORT_CAPACITY_LIMIT",
                                  "DISPATCH_SETPOINT", "SIMPLE"])  # fmt: skip
def test_refused_payloads_name_the_payload(kind: str) -> None:
    ev = _event([1])
    ev["intervals"][0]["payloads"] = [{"type": kind, "values": [1]}]
    with pytest.raises(InvalidInput) as e:
        event_demand(ev, NOW)
    assert e.value.field == "intervals[0].payloads[0].type" and kind in e.value.message


def test_malformed_intervals_name_the_field() -> None:
    ev = _event([1])
    ev["intervalPeriod"] = None
    with pytest.raises(InvalidInput) as e:
        event_demand(ev, NOW)
    assert e.value.field == "intervals[0].intervalPeriod.start"
    ev = _event([-1])
    with pytest.raises(InvalidInput) as e:
        event_demand(ev, NOW)
    assert e.value.field == "intervals[0].payloads[0].values"
    ev = _event([1, 1])
    ev["intervals"][1]["intervalPeriod"] = {"start": to_rfc3339(NOW + 3_600_000)}
    with pytest.raises(InvalidInput) as e:
        event_demand(ev, NOW)
    assert e.value.field == "intervals[1].intervalPeriod"
    ev = _event([1], units="KWH")
    with pytest.raises(InvalidInput) as e:
        event_demand(ev, NOW)
    assert e.value.field == "payloadDescriptors[0].units"


def test_program_region_from_targets_or_attribute() -> None:
    assert program_region({"targets": ["group-1", "ERCOT-NORTH"]}, REGIONS) == "ERCOT-NORTH"
    attr = {"attributes": [{"type": "REGION", "values": ["CAISO-SP15"]}]}
    assert program_region(attr, REGIONS) == "CAISO-SP15"
    both = {"targets": ["CAISO-SP15"], **attr}
    assert program_region(both, REGIONS) == "CAISO-SP15"
    old = {"targets": [{"type": "REGION", "values": ["ERCOT-NORTH"]}]}
    assert program_region(old, REGIONS) == "ERCOT-NORTH"
    for bad, field in [
        ({}, "targets"),
        ({"targets": ["ERCOT-NORTH", "CAISO-SP15"]}, "targets[0]"),
        ({"attributes": [{"type": "REGION", "values": ["MARS"]}]}, "attributes[0].values"),
    ]:
        with pytest.raises(InvalidInput) as e:
            program_region(bad, REGIONS)
        assert e.value.field == field


def attrs(**given: list[object]) -> dict[str, object]:
    return {"attributes": [{"type": k, "values": v} for k, v in given.items()]}


def test_resources_describe_devices_in_w_and_wh() -> None:
    bat = attrs(KIND=["battery"], REGION=["ERCOT-NORTH"], MAX_POWER_EXPORT=[5],
                MAX_POWER_CONSUMPTION=[3.3], STORAGE_USABLE_CAPACITY=[13.5])  # fmt: skip
    assert resource_device(bat, REGIONS) == {
        "kind": "battery", "region": "ERCOT-NORTH", "capacity_wh": 13_500.0,
        "max_discharge_w": 5_000.0, "max_charge_w": 3_300.0,
    }  # fmt: skip
    solar = resource_device(attrs(KIND=["SOLAR"], REGION=["CAISO-SP15"], MAX_POWER_EXPORT=[7]),
                            REGIONS)  # fmt: skip
    assert solar == {"kind": "solar", "region": "CAISO-SP15", "rated_w": 7_000.0}
    th = resource_device(
        attrs(KIND=["thermostat"], REGION=["ERCOT-NORTH"], MAX_POWER_CONSUMPTION=[3.5]), REGIONS
    )
    assert th is not None and th["hvac_rated_w"] == 3_500.0
    assert th["comfort_min_c"] < th["comfort_max_c"]
    assert resource_device(attrs(REGION=["ERCOT-NORTH"]), REGIONS) is None  # no KIND: no device


@pytest.mark.parametrize(
    ("given", "field", "words"),
    [
        ({"KIND": ["heat pump"], "REGION": ["ERCOT-NORTH"]}, "attributes[0].values", "KIND"),
        ({"KIND": ["solar"]}, "attributes", "REGION"),
        ({"KIND": ["solar"], "REGION": ["MARS"]}, "attributes[1].values", "MARS"),
        ({"KIND": ["solar"], "REGION": ["ERCOT-NORTH"]}, "attributes", "MAX_POWER_EXPORT"),
        ({"KIND": ["solar"], "REGION": ["ERCOT-NORTH"], "MAX_POWER_EXPORT": ["lots"]},
         "attributes[2].values", "MAX_POWER_EXPORT"),
        ({"KIND": ["solar"], "REGION": ["ERCOT-NORTH"], "MAX_POWER_EXPORT": [0]},
         "attributes[2].values", "> 0"),
    ],
)  # fmt: skip
def test_bad_resource_attributes_are_named(given: dict[str, list[object]], field: str,
                                           words: str) -> None:  # fmt: skip
    with pytest.raises(InvalidInput) as exc:
        resource_device(attrs(**given), REGIONS)
    assert exc.value.field == field and words in exc.value.message


def test_report_usage_is_consumption_and_telemetry_is_output() -> None:
    start = NOW - 600_000
    res = {
        "resourceName": "home-1",
        "intervalPeriod": {"start": to_rfc3339(start), "duration": "PT5M"},
        "intervals": [
            {"id": 0, "payloads": [{"type": "USAGE", "values": [-2.0]},
                                   {"type": "STORAGE_CHARGE_LEVEL", "values": [80]}]},
            {"id": 1, "payloads": [{"type": "USAGE", "values": [1.5]},
                                   {"type": "STORAGE_CHARGE_LEVEL", "values": [79]}]},
            {"id": 2, "payloads": [{"type": "BASELINE", "values": [1.0]}]},  # no USAGE: none
        ],
    }  # fmt: skip
    readings = report_readings(res, 0, "battery", NOW)
    assert [(r.ts_ms, r.telemetry["power_w"], r.telemetry["soc_pct"]) for r in readings] == [
        (start + 300_000, 2000.0, 80.0),
        (start + 600_000, -1500.0, 79.0),
    ]
    with pytest.raises(InvalidInput, match="STORAGE_CHARGE_LEVEL"):
        report_readings({"intervals": [{"id": 0, "payloads": [
            {"type": "USAGE", "values": [1]}]}]}, 3, "battery", NOW)  # fmt: skip
    (now_reading,) = report_readings(
        {"intervals": [{"id": 0, "payloads": [{"type": "USAGE", "values": [-4]}]}]}, 0, "solar", NOW
    )
    assert now_reading.ts_ms == NOW and now_reading.telemetry["power_w"] == 4000.0
    with pytest.raises(InvalidInput) as exc:
        report_readings({"intervalPeriod": {"start": "yesterday", "duration": "PT5M"},
                         "intervals": []}, 2, "solar", NOW)  # fmt: skip
    assert exc.value.field == "resources[2].intervalPeriod.start"


def test_a_command_is_one_interval_and_a_restore_cuts_it() -> None:
    cmd = {"command_id": "c-1", "event_id": "e-1", "type": "battery_charge", "setpoint_w": 2500,
           "valid_from": NOW, "valid_until": NOW + 3_600_000}  # fmt: skip
    ev = dispatch_event(program_id="pro-1", event_name="x", targets=["oem", "home-1"], command=cmd)
    assert ev["targets"] == ["oem", "home-1"]
    assert ev["intervalPeriod"] == {"start": to_rfc3339(NOW), "duration": "PT1H"}
    (iv,) = ev["intervals"]
    assert iv["payloads"] == [{"type": "DISPATCH_SETPOINT", "values": [-2.5]}]  # charging
    assert ev["payloadDescriptors"][0]["units"] == "KW"
    assert cut_event(ev, NOW + 600_000)["intervalPeriod"]["duration"] == "PT10M"
    assert cut_event(ev, NOW - 5)["intervalPeriod"]["duration"] == "PT0S"
