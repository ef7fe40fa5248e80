"""The telemetry contract, message by message: what is accepted, what it becomes in the state
store, and every reason a message is dropped (with the field it names)."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.telemetry import (
    Rejected,
    record_ts_seq,
    validate_ack,
    validate_status,
    validate_telemetry,
)
from vpp.domain import KIND_OFFBOARDED, RejectReason
from vpp.fleet.records import STATE_DTYPE
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT
from vpp.physics import MODE_COOL

NOW = 1_784_061_042_000
MIN = 60_000


def js(**kw: object) -> bytes:
    return orjson.dumps(kw)


def battery(**kw: object) -> bytes:
    body: dict[str, object] = {"ts": NOW - 1000, "soc_pct": 64.5, "power_w": -1200}
    body.update(kw)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def thermostat(**kw: object) -> bytes:
    body: dict[str, object] = {
        "ts": NOW - 1000,
        "indoor_c": 24.5,
        "setpoint_c": 24.0,
        "hvac_w": 3100,
        "mode": "cool",
    }
    body.update(kw)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def rec(result: object) -> np.void:
    assert not isinstance(result, Rejected), result
    assert isinstance(result, tuple)
    return np.frombuffer(result[0], dtype=STATE_DTYPE)[0]


def rejected(result: object, reason: RejectReason, field: str) -> None:
    assert isinstance(result, Rejected), f"accepted, expected {reason}"
    assert (result.reason, result.field) == (reason, field), result


# --- accepted ------------------------------------------------------------------------------------
def test_battery_reading_becomes_a_state_record() -> None:
    r = validate_telemetry(
        battery(seq=7, backup_reserve_pct=25, grid="up", mode="backup"), BATTERY, None, NOW
    )
    row = rec(r)
    assert r[1:] == (NOW - 1000, 7)  # type: ignore[index]
    assert row["ts_ms"] == NOW - 1000 and row["recv_ms"] == NOW and row["seq"] == 7
    assert row["soc_pct"] == pytest.approx(64.5) and row["power_w"] == -1200
    assert row["backup_reserve_pct"] == 25 and row["grid_up"] == 1
    assert row["kind"] == BATTERY and row["clock_skewed"] == 0
    assert math.isnan(row["indoor_c"]) and math.isnan(row["energy_wh"])


def test_solar_and_thermostat_readings() -> None:
    s = rec(validate_telemetry(js(ts=NOW, power_w=3500.5, energy_wh=1.2e7), SOLAR, None, NOW))
    assert s["power_w"] == 3500.5 and s["energy_wh"] == 1.2e7 and s["seq"] == -1
    t = rec(validate_telemetry(thermostat(outdoor_c=35.0), THERMOSTAT, None, NOW))
    assert t["indoor_c"] == 24.5 and t["hvac_w"] == 3100 and t["outdoor_c"] == 35.0
    assert t["mode"] == MODE_COOL and t["kind"] == THERMOSTAT
    assert math.isnan(t["power_w"])


def test_unknown_extra_fields_are_ignored_and_kind_comes_from_registry() -> None:
    # A thermostat payload claiming to be a battery is still read as a thermostat.
    t = rec(validate_telemetry(thermostat(kind="battery", firmware="1.2"), THERMOSTAT, None, NOW))
    assert t["kind"] == THERMOSTAT


def test_clock_more_than_a_minute_off_is_accepted_but_flagged() -> None:
    behind = rec(validate_telemetry(battery(ts=NOW - 10 * MIN), BATTERY, None, NOW))
    ahead = rec(validate_telemetry(battery(ts=NOW + 2 * MIN), BATTERY, None, NOW))
    near = rec(validate_telemetry(battery(ts=NOW + 30_000), BATTERY, None, NOW))
    assert behind["clock_skewed"] == 1 and ahead["clock_skewed"] == 1
    assert near["clock_skewed"] == 0
    assert behind["recv_ms"] == NOW  # freshness is judged on the receive time


def test_newer_messages_pass_the_ordering_check() -> None:
    assert not isinstance(
        validate_telemetry(battery(seq=8), BATTERY, (NOW - 5000, 7), NOW), Rejected
    )
    # Same ts, higher seq: two readings in one millisecond.
    assert not isinstance(
        validate_telemetry(battery(ts=NOW - 5000, seq=8), BATTERY, (NOW - 5000, 7), NOW), Rejected
    )
    # No seq: ts decides.
    assert not isinstance(validate_telemetry(battery(), BATTERY, (NOW - 5000, -1), NOW), Rejected)


# --- every rejection reason -----------------------------------------------------------------------
def test_invalid_json() -> None:
    for payload in (b"{not json", b"", b"\xff\xfe", b'{"ts": 1', b"NaN"):
        rejected(
            validate_telemetry(payload, BATTERY, None, NOW), RejectReason.invalid_json, "payload"
        )


def test_not_an_object() -> None:
    for payload in (b"[1,2]", b"42", b'"online"', b"null"):
        rejected(
            validate_telemetry(payload, BATTERY, None, NOW), RejectReason.not_object, "payload"
        )


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        (BATTERY, battery(ts=...), "ts"),
        (BATTERY, battery(soc_pct=...), "soc_pct"),
        (BATTERY, battery(power_w=...), "power_w"),
        (SOLAR, js(ts=NOW), "power_w"),
        (THERMOSTAT, thermostat(indoor_c=...), "indoor_c"),
        (THERMOSTAT, thermostat(setpoint_c=...), "setpoint_c"),
        (THERMOSTAT, thermostat(hvac_w=...), "hvac_w"),
        (THERMOSTAT, thermostat(mode=...), "mode"),
    ],
)
def test_missing_required_field(kind: int, payload: bytes, field: str) -> None:
    rejected(validate_telemetry(payload, kind, None, NOW), RejectReason.missing_field, field)


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        (BATTERY, battery(ts="2026-07-14T10:00:00Z"), "ts"),
        (BATTERY, battery(ts=float(NOW)), "ts"),
        (BATTERY, battery(ts=None), "ts"),
        (BATTERY, battery(seq="7"), "seq"),
        (BATTERY, battery(soc_pct="50"), "soc_pct"),
        (BATTERY, battery(soc_pct=True), "soc_pct"),
        (BATTERY, battery(power_w=None), "power_w"),
        (BATTERY, battery(mode=3), "mode"),
        (BATTERY, battery(grid=1), "grid"),
        (SOLAR, js(ts=NOW, power_w=[1]), "power_w"),
        (THERMOSTAT, thermostat(mode=1), "mode"),
        (THERMOSTAT, thermostat(outdoor_c={"v": 1}), "outdoor_c"),
    ],
)
def test_wrong_type(kind: int, payload: bytes, field: str) -> None:
    rejected(validate_telemetry(payload, kind, None, NOW), RejectReason.wrong_type, field)


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        (BATTERY, battery(soc_pct=100.5), "soc_pct"),
        (BATTERY, battery(soc_pct=-1), "soc_pct"),
        (BATTERY, battery(backup_reserve_pct=120), "backup_reserve_pct"),
        (BATTERY, battery(power_w=1e12), "power_w"),
        (BATTERY, battery(grid="sideways"), "grid"),
        (BATTERY, battery(ts=-5), "ts"),
        (BATTERY, battery(seq=-2), "seq"),
        (SOLAR, js(ts=NOW, power_w=-10), "power_w"),
        (SOLAR, js(ts=NOW, power_w=10, energy_wh=-1), "energy_wh"),
        (THERMOSTAT, thermostat(hvac_w=-1), "hvac_w"),
        (THERMOSTAT, thermostat(mode="dry"), "mode"),
        (THERMOSTAT, thermostat(indoor_c=500), "indoor_c"),
    ],
)
def test_value_out_of_range(kind: int, payload: bytes, field: str) -> None:
    rejected(validate_telemetry(payload, kind, None, NOW), RejectReason.out_of_range, field)


def test_unknown_and_offboarded_device() -> None:
    rejected(validate_telemetry(battery(), 9, None, NOW), RejectReason.unknown_device, "device_id")
    rejected(
        validate_telemetry(battery(), KIND_OFFBOARDED, None, NOW),
        RejectReason.offboarded,
        "device_id",
    )


def test_older_than_last_accepted() -> None:
    last = (NOW - 5000, 7)
    # by ts
    rejected(
        validate_telemetry(battery(ts=NOW - 6000), BATTERY, (NOW - 5000, -1), NOW),
        RejectReason.out_of_order,
        "ts",
    )
    # the same reading again (a QoS-1 redelivery)
    rejected(
        validate_telemetry(battery(ts=NOW - 5000), BATTERY, (NOW - 5000, -1), NOW),
        RejectReason.out_of_order,
        "ts",
    )
    # by seq when both have one, even with a later ts
    rejected(
        validate_telemetry(battery(seq=7), BATTERY, last, NOW), RejectReason.out_of_order, "seq"
    )
    rejected(
        validate_telemetry(battery(seq=3), BATTERY, last, NOW), RejectReason.out_of_order, "seq"
    )
    # a higher seq cannot make an older ts acceptable
    rejected(
        validate_telemetry(battery(ts=NOW - 9000, seq=8), BATTERY, last, NOW),
        RejectReason.out_of_order,
        "ts",
    )


def test_oversize() -> None:
    big = battery(note="x" * 5000)
    assert len(big) > 4096
    rejected(validate_telemetry(big, BATTERY, None, NOW), RejectReason.oversize, "payload")
    at_limit = battery(note="x" * (4096 - len(battery(note=""))))
    assert len(at_limit) == 4096
    assert not isinstance(validate_telemetry(at_limit, BATTERY, None, NOW), Rejected)


def test_future() -> None:
    rejected(
        validate_telemetry(battery(ts=NOW + 5 * MIN + 1), BATTERY, None, NOW),
        RejectReason.future,
        "ts",
    )
    assert not isinstance(
        validate_telemetry(battery(ts=NOW + 5 * MIN), BATTERY, None, NOW), Rejected
    )


def test_status_payloads() -> None:
    assert validate_status(b"online") is True
    assert validate_status(b"offline") is False
    rejected(validate_status(b"maybe"), RejectReason.out_of_range, "payload")
    rejected(validate_status(b"x" * 100), RejectReason.oversize, "payload")


def test_ack_payloads() -> None:
    good = js(command_id="c-1", status="opted_out", ts=NOW - 10, reason="customer override")
    out = validate_ack(good, "d-1", NOW)
    assert isinstance(out, bytes)
    assert orjson.loads(out) == {
        "device_id": "d-1",
        "command_id": "c-1",
        "status": "opted_out",
        "ts": NOW - 10,
        "reason": "customer override",
        "recv_ms": NOW,
    }
    rejected(validate_ack(b"{", "d", NOW), RejectReason.invalid_json, "payload")
    rejected(
        validate_ack(js(status="started", ts=NOW), "d", NOW),
        RejectReason.missing_field,
        "command_id",
    )
    rejected(
        validate_ack(js(command_id="c", status="done", ts=NOW), "d", NOW),
        RejectReason.out_of_range,
        "status",
    )
    rejected(
        validate_ack(js(command_id="c", status="started"), "d", NOW),
        RejectReason.missing_field,
        "ts",
    )
    rejected(
        validate_ack(js(command_id=5, status="started", ts=NOW), "d", NOW),
        RejectReason.wrong_type,
        "command_id",
    )


def test_record_ts_seq_reads_back_what_was_packed() -> None:
    r = validate_telemetry(battery(seq=42), BATTERY, None, NOW)
    assert isinstance(r, tuple)
    assert record_ts_seq(r[0]) == (NOW - 1000, 42)


# --- nothing crashes the validator ----------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(
                [
                    "ts",
                    "seq",
                    "soc_pct",
                    "power_w",
                    "indoor_c",
                    "setpoint_c",
                    "hvac_w",
                    "mode",
                    "grid",
                    "x",
                ]
            ),
            json_values,
        ).map(lambda d: orjson.dumps(d)),
    ),
    kind=st.sampled_from([BATTERY, SOLAR, THERMOSTAT, KIND_OFFBOARDED, 7]),
)
def test_any_payload_is_either_a_record_or_a_named_rejection(payload: bytes, kind: int) -> None:
    r = validate_telemetry(payload, kind, (NOW - 10_000, 3), NOW)
    if isinstance(r, Rejected):
        assert r.reason in RejectReason and r.field
    else:
        assert len(r[0]) == STATE_DTYPE.itemsize
