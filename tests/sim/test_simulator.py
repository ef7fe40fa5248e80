"""The fleet simulator: physics, command handling, ground truth, and the MQTT/HTTP edge."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import numpy as np
import orjson
import pytest

from dispatch.settlement import performance
from sim.simulator import (
    BATTERY,
    CMD_NONE,
    SOLAR,
    THERMOSTAT,
    FleetConfig,
    FleetSimulator,
    SimFleet,
)
from vpp.clock import ManualClock
from vpp.settings import Settings

# 2026-07-14 20:30 UTC: a summer afternoon at every weather site.
T0 = 1_784_061_000_000
H_MS = 3_600_000


def fleet(n: int = 600, **kw: Any) -> SimFleet:
    kw.setdefault("never_answer_share", 0.0)
    return SimFleet(FleetConfig(n_devices=n, seed=kw.pop("seed", 7), **kw), T0)


def run(f: SimFleet, until_ms: int, dt_s: float = 60.0) -> None:
    t = f.t_ms
    while t < until_ms:
        t = min(until_ms, t + int(dt_s * 1000))
        f.step(t, (t - f.t_ms) / 1000.0)


def command(i: int, typ: str, until: int, **kw: Any) -> dict[str, Any]:
    return {
        "command_id": kw.pop("command_id", f"c-{i}-{typ}"),
        "event_id": kw.pop("event_id", "e-1"),
        "type": typ,
        "valid_until": until,
        **kw,
    }


def of_kind(f: SimFleet, kind: int) -> list[int]:
    return np.flatnonzero(f.kind == kind).tolist()


# --- physics ------------------------------------------------------------------------------------
def test_soc_stays_between_reserve_and_full_under_commands() -> None:
    f = fleet(800)
    bats = of_kind(f, BATTERY)
    half = len(bats) // 2
    until = T0 + 6 * H_MS
    for i in bats[:half]:  # long full-power discharges: they must stop at the reserve
        f.apply_command(i, command(i, "battery_discharge", until, setpoint_w=5000), T0)
    for i in bats[half:]:
        f.apply_command(i, command(i, "battery_charge", until, setpoint_w=5000), T0)
    run(f, until - 60_000)
    soc = f.soc[bats]
    reserve = f.reserve_pct[bats]
    assert np.all(f.min_soc[bats] >= reserve - 1e-6)
    assert np.all(soc <= 100.0 + 1e-9)
    # Six hours at 5 kW empties the discharged ones to their reserve and fills the others.
    assert np.allclose(soc[:half], reserve[:half], atol=0.5)
    assert np.all(soc[half:] > 99.0)
    truth = f.ground_truth()
    assert truth.batteries_below_reserve == 0


def test_batteries_charge_from_solar_and_serve_the_home() -> None:
    f = fleet(600)
    bats = np.array(of_kind(f, BATTERY))
    with_pv = bats[f.pv_rated_w[bats] > 0]
    run(f, T0 + 24 * H_MS)
    # Over a day a self-consuming battery both charged (sun) and discharged (evening).
    soc_seen = []
    for _ in range(24):
        run(f, f.t_ms + H_MS)
        soc_seen.append(f.soc[with_pv].mean())
    assert max(soc_seen) - min(soc_seen) > 10.0
    # Self-consumption never exports: the battery covers at most the home's deficit.
    deficit = np.maximum(f.load_w - f.pv_w, 0.0)
    assert np.all(f.battery_w[bats] <= deficit[bats] + 1e-6)


def test_thermostat_warms_during_an_offset_and_restarts_at_the_new_setpoint() -> None:
    f = fleet(400, thermostat_share=1.0, battery_share=0.0, opt_out_at_2h=0.0)
    cooling = np.flatnonzero(f.hvac_rated_w > 0)
    run(f, T0 + 30 * 60_000)
    cooling = cooling[(f.hvac_w[cooling] > 300) & ~f.heating[cooling]]
    assert len(cooling) > 50
    before_in = f.indoor[cooling].copy()
    before_kw = f.hvac_w[cooling].copy()
    sp = f.sp_cool[cooling]
    until = f.t_ms + 3 * H_MS
    for i in cooling.tolist():
        f.apply_command(i, command(i, "thermostat_offset", until, offset_c=1.5), f.t_ms)
    run(f, f.t_ms + 10 * 60_000)
    assert np.all(f.hvac_w[cooling] < before_kw)  # the unit backs off at once
    assert np.mean(f.indoor[cooling] > before_in) > 0.95  # and the home warms
    run(f, until - 60_000)
    running = f.hvac_w[cooling] > 0
    assert running.mean() > 0.8  # most units restarted …
    new_sp = np.minimum(sp + 1.5, f.comfort_max[cooling])
    assert np.allclose(f.indoor[cooling][running], new_sp[running], atol=0.05)  # … at the new sp
    assert np.all(f.indoor[cooling] <= f.comfort_max[cooling] + 0.05)  # never past comfort


# --- commands -----------------------------------------------------------------------------------
def test_same_command_id_twice_acts_once() -> None:
    f = fleet(200)
    i = of_kind(f, BATTERY)[0]
    cmd = command(i, "battery_discharge", T0 + H_MS, setpoint_w=3000, randomize_start_s=600)
    first = f.apply_command(i, cmd, T0)
    start = int(f.cmd_start_ms[i])
    assert [a["status"] for a in first] == ["received"]
    again = f.apply_command(i, dict(cmd), T0 + 30_000)
    assert [a["status"] for a in again] == ["received"]  # re-acknowledged, not redone
    assert int(f.cmd_start_ms[i]) == start
    run(f, T0 + 15 * 60_000)
    assert [a["status"] for _, a in f.drain_acks()] == ["started"]
    third = f.apply_command(i, dict(cmd), f.t_ms)
    assert [a["status"] for a in third] == ["started"]
    assert f.acks_sent["received"] == 2


def test_past_valid_until_is_ignored_and_commands_revert_by_themselves() -> None:
    f = fleet(200)
    i = of_kind(f, BATTERY)[0]
    late = f.apply_command(i, command(i, "battery_discharge", T0 - 1, setpoint_w=3000), T0)
    assert [a["status"] for a in late] == ["expired"]
    assert f.cmd_type[i] == CMD_NONE
    until = T0 + 20 * 60_000
    acks = f.apply_command(i, command(i, "battery_discharge", until, command_id="c-2",
                                      setpoint_w=3000), T0)  # fmt: skip
    assert [a["status"] for a in acks] == ["received", "started"]
    run(f, T0 + 10 * 60_000)
    assert f.battery_w[i] == pytest.approx(3000.0)
    run(f, until + 60_000)  # no restore sent: the device reverts at valid_until
    assert f.cmd_type[i] == CMD_NONE
    assert [(a["command_id"], a["status"]) for _, a in f.drain_acks()] == [("c-2", "completed")]
    assert f.ground_truth().under_command == []


def test_invalid_commands_are_rejected_naming_the_field() -> None:
    f = fleet(300)
    b = of_kind(f, BATTERY)[0]
    t = of_kind(f, THERMOSTAT)[0]
    until = T0 + H_MS
    rating = f.max_discharge_w[b]
    cases = [
        (b, command(b, "battery_discharge", until, setpoint_w=rating + 100), "setpoint_w"),
        (b, command(b, "thermostat_offset", until, command_id="x", offset_c=1), "type"),
        (t, command(t, "thermostat_offset", until, offset_c=9.0), "offset_c"),
        (b, command(b, "battery_discharge", until, command_id="y"), "setpoint_w"),
        (b, {"command_id": "z", "type": "battery_discharge", "setpoint_w": 10}, "valid_until"),
        (b, command(b, "warp_drive", until), "type"),
    ]
    for i, cmd, fieldname in cases:
        (ack,) = f.apply_command(i, cmd, T0)
        assert ack["status"] == "rejected"
        assert ack["reason"].startswith(fieldname + ":")
    assert np.all(f.cmd_type == CMD_NONE)
    assert f.apply_command(b, "not a dict", T0) == []
    assert f.apply_command_payload(b, b"{garbage", T0) == []


def test_restore_ends_a_command_at_once() -> None:
    f = fleet(300)
    t = of_kind(f, THERMOSTAT)[0]
    f.apply_command(t, command(t, "thermostat_offset", T0 + H_MS, offset_c=1.0), T0)
    acks = f.apply_command(t, {"command_id": "r-1", "type": "restore"}, T0 + 60_000)
    assert [(a["command_id"], a["status"]) for a in acks] == [
        ("r-1", "received"),
        (f"c-{t}-thermostat_offset", "completed"),
        ("r-1", "completed"),
    ]
    assert f.cmd_type[t] == CMD_NONE


def test_some_devices_never_answer() -> None:
    f = fleet(2000, never_answer_share=0.1)
    mute = np.flatnonzero(f.mute)
    assert 120 < len(mute) < 280
    i = int(mute[0])
    assert f.apply_command(i, command(i, "restore", T0 + H_MS), T0) == []


def opt_out_share(hours: float) -> float:
    f = fleet(4000, thermostat_share=1.0, battery_share=0.0, seed=11)
    until = T0 + int(hours * H_MS)
    for i in range(f.n):
        f.apply_command(i, command(i, "thermostat_offset", until, offset_c=1.5), T0)
    run(f, until, dt_s=60)
    acks = [a for _, a in f.drain_acks() if a["status"] == "opted_out"]
    return len(acks) / f.n


def test_opt_outs_grow_with_the_events_length() -> None:
    one, two, four = opt_out_share(1), opt_out_share(2), opt_out_share(4)
    assert one < two < four
    assert 0.07 < two < 0.13  # about 10 % by 2 h (domain brief)
    assert four > 2 * one


def test_an_opted_out_customer_stays_out_of_that_event() -> None:
    f = fleet(300, thermostat_share=1.0, battery_share=0.0, opt_out_at_2h=0.999)
    i = 0
    f.apply_command(i, command(i, "thermostat_offset", T0 + 3 * H_MS, offset_c=1.0), T0)
    run(f, T0 + 2 * H_MS)
    assert [a["status"] for _, a in f.drain_acks() if _ == i][-1] == "opted_out"
    again = f.apply_command(i, command(i, "thermostat_offset", T0 + 3 * H_MS, command_id="c-b",
                                       offset_c=1.0), f.t_ms)  # fmt: skip
    assert [a["status"] for a in again] == ["received", "opted_out"]
    assert f.cmd_type[i] == CMD_NONE


# --- ground truth -------------------------------------------------------------------------------
def test_ground_truth_equals_the_commanded_battery_power() -> None:
    # Backup-mode batteries sit at 0 W outside events: delivered = Σ setpoints exactly.
    f = fleet(1000, self_consumption_share=0.0, battery_share=0.5)
    bats = of_kind(f, BATTERY)
    f.soc[bats] = f.soc_cf[bats] = 100.0  # full: an hour at 2 kW never reaches a reserve
    start = T0 + 5 * 60_000
    until = start + H_MS
    for i in bats:
        f.apply_command(i, command(i, "battery_discharge", until, setpoint_w=2000,
                                   valid_from=start), T0)  # fmt: skip
    run(f, until + 10 * 60_000, dt_s=30)
    starts, mw = f.ground_truth().series("e-1")
    assert starts[0] == start and len(starts) == 12
    assert np.allclose(mw, len(bats) * 2000 / 1e6, rtol=1e-6)
    assert performance(delivered_mw=mw, committed_mw=[len(bats) * 2e-3] * 12) == pytest.approx(1.0)


def test_ground_truth_nets_out_self_consumption() -> None:
    # 20:30 local (CST): no sun, so batteries in self-consumption serve the home's evening load
    # (in the afternoon they charge from solar, and a discharge delivers more than its setpoint).
    t0 = T0 + 6 * H_MS
    f = SimFleet(FleetConfig(n_devices=1000, seed=7, never_answer_share=0.0), t0)
    bats = of_kind(f, BATTERY)
    until = t0 + H_MS
    for i in bats:
        f.apply_command(i, command(i, "battery_discharge", until, setpoint_w=4000), t0)
    expected = []
    for _ in range(60):
        f.step(f.t_ms + 60_000, 60)
        expected.append(np.sum(f.battery_w[bats] - f.battery_w_cf[bats]) / 1e6)
    _, mw = f.ground_truth().series()
    assert np.mean(mw) == pytest.approx(np.mean(expected), rel=1e-6)
    assert np.mean(mw) < len(bats) * 4000 / 1e6  # the home's own use is not counted


def test_dropped_devices_fall_silent_and_revert() -> None:
    f = fleet(500)
    bats = of_kind(f, BATTERY)
    for i in bats:
        f.apply_command(i, command(i, "battery_discharge", T0 + H_MS, setpoint_w=3000), T0)
    gone = f.drop(f.pick(0.1))
    assert len(gone) == 50
    assert not f.due(T0 + 10 * H_MS)[gone].any()
    assert np.all(f.cmd_type[gone] == CMD_NONE)
    assert f.apply_command(int(gone[0]), command(0, "restore", T0 + H_MS), T0) == []


def test_a_device_cut_off_keeps_its_command_ten_minutes_then_reverts() -> None:
    f = fleet(500)
    bats = of_kind(f, BATTERY)[:20]
    for i in bats:
        f.apply_command(i, command(i, "battery_discharge", T0 + 2 * H_MS, setpoint_w=2000), T0)
    f.drop(bats, revert=False)  # a vendor's cloud goes down: the link breaks, not the device
    run(f, T0 + 9 * 60_000)
    assert np.all(f.cmd_type[bats] != CMD_NONE)
    assert np.allclose(f.battery_w[bats], 2000.0)
    run(f, T0 + 11 * 60_000)
    assert np.all(f.cmd_type[bats] == CMD_NONE)
    assert f.drain_acks() == []  # nothing reaches the service from a device it cannot hear


def test_what_the_fleet_sends_passes_or_fails_ingest_validation_as_intended() -> None:
    from devices.telemetry import Rejected, validate_ack, validate_telemetry
    from vpp.domain import RejectReason

    f = fleet(600)
    run(f, T0 + 10 * 60_000)
    now = f.t_ms
    idx, payloads = f.telemetry_payloads(now, np.ones(f.n, dtype=bool))
    last = {}
    for i, p in zip(idx.tolist(), payloads, strict=True):
        got = validate_telemetry(p, int(f.kind[i]), None, now)
        assert not isinstance(got, Rejected), (p, got)
        last[i] = (got[1], got[2])
    some = np.arange(10)
    reasons = {
        validate_telemetry(p, int(f.kind[i]), None, now).reason  # type: ignore[union-attr]
        for i, p in zip(some.tolist(), f.malformed_payloads(some, now), strict=True)
    }
    assert reasons <= {
        RejectReason.invalid_json, RejectReason.not_object, RejectReason.missing_field,
        RejectReason.wrong_type, RejectReason.out_of_range,
    }  # fmt: skip
    assert len(reasons) >= 4
    for i, p in zip(some.tolist(), f.oversized_payloads(some, now), strict=True):
        got = validate_telemetry(p, int(f.kind[i]), None, now)
        assert isinstance(got, Rejected) and got.reason == RejectReason.oversize
    for i, p in zip(some.tolist(), f.out_of_order_payloads(some, now), strict=True):
        got = validate_telemetry(p, int(f.kind[i]), last[i], now)
        assert isinstance(got, Rejected) and got.reason == RejectReason.out_of_order
    f.skew_clocks([0], 900)
    _, (ahead,) = f.telemetry_payloads(now, f._mask([0]), advance=False)
    got = validate_telemetry(ahead, int(f.kind[0]), None, now)
    assert isinstance(got, Rejected) and got.reason == RejectReason.future
    b = of_kind(f, BATTERY)[1]
    for ack in f.apply_command(b, command(b, "battery_discharge", now + H_MS, setpoint_w=1), now):
        assert not isinstance(validate_ack(orjson.dumps(ack), f.ids[b], now), Rejected)


# --- telemetry ----------------------------------------------------------------------------------
def test_telemetry_follows_the_contract() -> None:
    f = fleet(900)
    run(f, T0 + 10 * 60_000)
    idx, payloads = f.telemetry_payloads(f.t_ms, np.ones(f.n, dtype=bool))
    required = {
        BATTERY: {"soc_pct", "power_w"},
        SOLAR: {"power_w"},
        THERMOSTAT: {"indoor_c", "setpoint_c", "hvac_w", "mode"},
    }
    for i, p in zip(idx.tolist(), payloads, strict=True):
        assert len(p) <= 4096
        d = orjson.loads(p)
        assert isinstance(d["ts"], int) and d["seq"] == 1
        assert required[int(f.kind[i])] <= d.keys()
        if "soc_pct" in d:
            assert 0 <= d["soc_pct"] <= 100
        if f.kind[i] == SOLAR:
            assert d["power_w"] >= 0
        if "mode" in d and f.kind[i] == THERMOSTAT:
            assert d["mode"] in ("cool", "heat", "off", "auto") and d["hvac_w"] >= 0
    # Reports are spread over the interval, and come faster under a command.
    f2 = fleet(900)
    due_now = f2.due(T0 + 60_000).sum()
    assert 0 < due_now < f2.n / 2
    b = of_kind(f2, BATTERY)[0]
    f2.apply_command(b, command(b, "battery_discharge", T0 + H_MS, setpoint_w=1000), T0)
    f2.telemetry_payloads(T0 + 1000)
    assert f2.next_due_ms[b] <= T0 + 1000 + 60_000


def test_fault_payloads() -> None:
    f = fleet(300)
    run(f, T0 + 60_000)
    some = np.arange(10)
    for p in f.oversized_payloads(some, f.t_ms):
        assert 4096 < len(p) < 8192
        assert "ts" in orjson.loads(p)
    broken = f.malformed_payloads(some, f.t_ms)
    ok = 0
    for p in broken:
        try:
            d = orjson.loads(p)
            ok += isinstance(d, dict) and isinstance(d.get("ts"), int)
        except orjson.JSONDecodeError:
            pass
    assert ok <= 2  # only the out-of-range variant is well-formed
    f.telemetry_payloads(f.t_ms, np.ones(f.n, dtype=bool))
    f.telemetry_payloads(f.t_ms + 300_000, np.ones(f.n, dtype=bool))
    for i, p in zip(some.tolist(), f.out_of_order_payloads(some, f.t_ms + 300_000), strict=True):
        d = orjson.loads(p)
        assert d["seq"] < f.seq[i] and d["ts"] < f.t_ms
    f.skew_clocks([0], -600)
    _, (p,) = f.telemetry_payloads(f.t_ms, f._mask([0]), advance=False)
    assert orjson.loads(p)["ts"] == f.t_ms - 600_000


def test_100k_devices_step_and_payload_time() -> None:
    t = time.perf_counter()
    f = SimFleet(FleetConfig(n_devices=100_000, seed=1), T0)
    build = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(1, 11):
        f.step(T0 + k * 15_000, 15.0)
    step = (time.perf_counter() - t) / 10
    t = time.perf_counter()
    _, payloads = f.telemetry_payloads(T0 + 150_000, np.ones(f.n, dtype=bool))
    pay = time.perf_counter() - t
    print(
        f"\n100k devices: build {build:.2f} s, step {1000 * step:.1f} ms, "
        f"all payloads {1000 * pay:.0f} ms ({len(payloads) / pay:,.0f}/s)"
    )
    assert len(payloads) == 100_000


# --- the edge: in-process broker, HTTP onboarding, real Mosquitto --------------------------------
class Listener:
    """A service-side subscriber collecting (topic, payload)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def leaf(self, leaf: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.endswith("/" + leaf)]


def sim_settings(**kw: Any) -> Settings:
    root = f"simt-{uuid.uuid4().hex[:8]}/v1"
    return Settings(topic_root=root, broker_credentials="none", **kw)  # type: ignore[arg-type]


async def test_in_process_broker_round_trip() -> None:
    from devices.mqtt import InProcessBroker, make_client

    broker = InProcessBroker()
    settings = sim_settings(mqtt_url="memory://")
    clock = ManualClock(T0)

    def factory(client_id: str, **kw: Any) -> Any:
        return make_client("memory://", client_id, broker=broker, **kw)

    sim = FleetSimulator(settings, 300, ["ERCOT-NORTH"], 300, clock=clock, tick_s=15,
                         mqtt_client_factory=factory,
                         fleet_options={"never_answer_share": 0.0})  # fmt: skip
    service = factory("svc")
    got = Listener()
    service.on_message = got
    root = settings.topic_root
    await service.subscribe([f"{root}/devices/+/telemetry", f"{root}/devices/+/status",
                             f"{root}/devices/+/ack"])  # fmt: skip
    await service.connect()
    await sim.connect()
    assert len(got.leaf("status")) == 300
    for _ in range(21):  # 5 minutes: every device reports once
        clock.advance(15)
        await sim.tick()
    senders = {t.split("/")[-2] for t, _ in got.leaf("telemetry")}
    assert senders == set(sim.fleet.ids)
    b = sim.fleet.ids[of_kind(sim.fleet, BATTERY)[0]]
    cmd = {"command_id": "c-1", "event_id": "e-1", "type": "battery_discharge",
           "setpoint_w": 2500, "valid_until": clock.now_ms() + H_MS}  # fmt: skip
    service.publish_nowait(f"{root}/devices/{b}/cmd", orjson.dumps(cmd), 1)
    clock.advance(15)
    await sim.tick()
    acks = [orjson.loads(p) for t, p in got.leaf("ack") if f"/{b}/" in t]
    assert [a["status"] for a in acks] == ["received", "started"]
    dropped = await sim.drop_devices(0.1)
    assert len(dropped) == 30
    statuses = {t.split("/")[-2]: p for t, p in got.leaf("status")}
    assert all(statuses[d] == b"offline" for d in dropped)
    await sim.inject("malformed", 5)
    await sim.inject("oversized", 2)
    assert sim.stats.malformed == 5 and sim.stats.oversized == 2
    await sim.disconnect()


async def test_per_device_connections_leave_a_last_will() -> None:
    from devices.mqtt import InProcessBroker, make_client

    broker = InProcessBroker()
    settings = sim_settings(mqtt_url="memory://")

    def factory(client_id: str, **kw: Any) -> Any:
        return make_client("memory://", client_id, broker=broker, **kw)

    sim = FleetSimulator(settings, 20, ["ERCOT-NORTH"], 300, clock=ManualClock(T0),
                         mqtt_client_factory=factory, per_device_connections=True)  # fmt: skip
    service = factory("svc")
    got = Listener()
    service.on_message = got
    await service.subscribe([f"{settings.topic_root}/devices/+/status"])
    await service.connect()
    await sim.connect()
    assert len(got.leaf("status")) == 20
    (gone,) = await sim.drop_devices([sim.fleet.ids[3]])
    assert got.leaf("status")[-1] == (f"{settings.topic_root}/devices/{gone}/status", b"offline")
    await sim.disconnect()


async def test_onboards_through_the_api(settings_sqlite: Settings, api_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, make_key = await api_factory(settings_sqlite)
    headers = await make_key("fleet-co", "fleet")
    creds = tmp_path / "creds.json"
    sim = FleetSimulator(settings_sqlite, 250, ["ERCOT-NORTH"], 300, http_client=client,
                         api_key=headers["Authorization"].split()[1], credentials_file=creds,
                         clock=ManualClock(T0), id_prefix="onb")  # fmt: skip
    assert await sim.onboard() == 250
    assert creds.exists()
    r = await client.get("/v1/devices", params={"kind": "battery"}, headers=headers)
    assert r.status_code == 200
    # A second run reads the file instead of onboarding again (which would be a 409).
    again = FleetSimulator(settings_sqlite, 250, ["ERCOT-NORTH"], 300, credentials_file=creds,
                           clock=ManualClock(T0), id_prefix="onb")  # fmt: skip
    assert await again.onboard() == 250
    assert again.credentials == sim.credentials


async def test_real_mosquitto_gateway_publishing(mqtt_url: str) -> None:
    from devices.mqtt import make_client

    settings = sim_settings(mqtt_url=mqtt_url)
    root = settings.topic_root
    clock = ManualClock(T0)
    n = 5000
    sim = FleetSimulator(settings, n, ["ERCOT-NORTH"], 300, clock=clock, gateways=4,
                         fleet_options={"never_answer_share": 0.0})  # fmt: skip
    service = make_client(mqtt_url, f"svc-{uuid.uuid4().hex[:6]}")
    got = Listener()
    service.on_message = got
    await service.subscribe([f"{root}/devices/+/telemetry", f"{root}/devices/+/ack"])
    await service.connect()
    try:
        await sim.connect()
        # Every device due at once: one big batch, as at the top of a 5-minute interval.
        sim.fleet.next_due_ms[:] = T0
        t = time.perf_counter()
        await sim.tick()
        while len(got.leaf("telemetry")) < n and time.perf_counter() - t < 20:
            await asyncio.sleep(0.02)
        took = time.perf_counter() - t
        print(f"\nMosquitto: {n} telemetry messages through 4 gateways in {took:.2f} s "
              f"({n / took:,.0f}/s end to end)")  # fmt: skip
        assert len(got.leaf("telemetry")) == n
        t_id = sim.fleet.ids[of_kind(sim.fleet, THERMOSTAT)[0]]
        cmd = {"command_id": "c-real", "event_id": "e-real", "type": "thermostat_offset",
               "offset_c": 1.0, "valid_until": clock.now_ms() + H_MS}  # fmt: skip
        service.publish_nowait(f"{root}/devices/{t_id}/cmd", orjson.dumps(cmd), 1)
        deadline = time.perf_counter() + 10
        # Both acks (received, then started) arrive one after the other: wait for the second.
        while len(got.leaf("ack")) < 2 and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            clock.advance(1)
            await sim.tick()
        acks = [orjson.loads(p) for _, p in got.leaf("ack")]
        assert [a["status"] for a in acks] == ["received", "started"]
        assert sim.stats.commands == 1  # the shared subscription hands it to one gateway
    finally:
        await sim.clear_statuses()  # leave no retained messages on the shared broker
        await sim.disconnect()
        await service.disconnect()


async def test_run_loop_on_a_fast_clock() -> None:
    from devices.mqtt import InProcessBroker, make_client
    from vpp.clock import Clock

    broker = InProcessBroker()
    settings = sim_settings(mqtt_url="memory://")
    clock = Clock(600.0)  # ten service minutes a wall second

    def factory(client_id: str, **kw: Any) -> Any:
        return make_client("memory://", client_id, broker=broker, **kw)

    sim = FleetSimulator(settings, 200, None, 300, clock=clock, mqtt_client_factory=factory)
    service = factory("svc")
    got = Listener()
    service.on_message = got
    await service.subscribe([f"{settings.topic_root}/devices/+/telemetry"])
    await service.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop))
    await asyncio.sleep(1.2)
    stop.set()
    await asyncio.wait_for(task, 5)
    senders = {t.split("/")[-2] for t, _ in got.leaf("telemetry")}
    assert senders == set(sim.fleet.ids)  # everyone reported within the first 5 minutes
    assert sim.stats.ticks >= 10


async def test_per_device_connections_on_mosquitto_leave_a_last_will(mqtt_url: str) -> None:
    from devices.mqtt import make_client

    settings = sim_settings(mqtt_url=mqtt_url)
    sim = FleetSimulator(
        settings, 6, None, 300, clock=ManualClock(T0), per_device_connections=True,
        id_prefix=f"pd{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    service = make_client(mqtt_url, f"svc-{uuid.uuid4().hex[:6]}")
    got = Listener()
    service.on_message = got
    await service.subscribe([f"{settings.topic_root}/devices/+/status"])
    await service.connect()
    try:
        await sim.connect()
        (gone,) = await sim.drop_devices([sim.fleet.ids[2]])
        deadline = time.perf_counter() + 10
        topic = f"{settings.topic_root}/devices/{gone}/status"
        while time.perf_counter() < deadline and (topic, b"offline") not in got.leaf("status"):
            await asyncio.sleep(0.05)
        assert (topic, b"offline") in got.leaf("status")  # the broker's Last Will
    finally:
        await sim.clear_statuses()
        await service.publish_many([(f"{settings.topic_root}/devices/{d}/status", b"", 1, True)
                                    for d in sim.fleet.ids])  # fmt: skip
        await sim.disconnect()
        await service.disconnect()
