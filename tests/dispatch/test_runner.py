"""The event runner on the embedded stack (SQLite, in-process broker and state store) with a
simulated fleet: a grid event is dispatched, acknowledged, closed-loop controlled, restored and
settled; an abort restores everyone at once; acks drive retries and replacements."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from sqlalchemy import select

from dispatch.runner.commands import MISSED, SENT, CommandBatch, payloads
from dispatch.runner.loop import EventRunner
from dispatch.runner.table import Running
from store.models import Command, GridEvent, SettlementLine
from tests.helpers.eventkit import running_stack, summer_clock, wait_for
from tests.helpers.fleets import fleet_of
from tests.helpers.settings import make_settings
from vpp.domain import CommandStatus, CommandType, RequestStatus
from vpp.fleet.snapshot import THERMOSTAT
from vpp.flexibility import available_kw
from vpp.timefmt import to_rfc3339

SCALE = 240.0


async def _grid_event(stack, start_ms: int, end_ms: int, mw: float) -> str:  # type: ignore[no-untyped-def]
    headers = await stack.operator()
    r = await stack.client.post(
        "/v1/grid-events",
        json={
            "region": "ERCOT-NORTH",
            "mw": mw,
            "start": to_rfc3339(start_ms),
            "end": to_rfc3339(end_ms),
        },
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_grid_event_runs_restores_and_settles(sqlite_url, services_factory) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(sqlite_url, time_scale=SCALE)
    svc = await services_factory(settings, clock=summer_clock(SCALE))
    async with running_stack(svc, 500, fleet_options={"never_answer_share": 0.0}) as st:
        now = svc.clock.now_ms()
        # Some pre-event history first (the closed loop's baselines, meter-before).
        assert await wait_for(lambda: svc.clock.now_ms() > now + 35 * 60_000, 60)
        snap = await svc.fleet.snapshot(force=True)
        avail_mw = float(available_kw(snap, window_h=1.0).sum()) / 1000.0
        assert avail_mw > 0.3
        start = (svc.clock.now_ms() // 300_000 + 2) * 300_000  # on the 5-minute grid
        end = start + 3_600_000
        mw = round(0.5 * avail_mw, 3)
        ev_id = await _grid_event(st, start, end, mw)

        async def status() -> str:
            async with svc.db.session() as s:
                return str((await s.get(GridEvent, ev_id)).status)  # type: ignore[union-attr]

        assert await wait_for(lambda: svc.clock.now_ms() > start + 20 * 60_000, 60)
        assert await status() == "active"
        mid = st.runner.snapshot_of(ev_id)
        assert mid is not None and mid["commands"] > 0 and mid["control"] > 0
        # Every command is stored, and every stored dispatch command was published once or more.
        async with svc.db.session() as s:
            cmds = (await s.execute(select(Command).where(Command.event_id == ev_id))).scalars()
            cmds = list(cmds)
        assert cmds and all(c.status != CommandStatus.pending for c in cmds)
        assert all(c.valid_until_ms <= end + 16 * 60_000 for c in cmds)

        assert await wait_for(lambda: svc.clock.now_ms() > end + 25 * 60_000, 90)
        assert await status() == RequestStatus.completed

        async def settled() -> bool:
            async with svc.db.session() as s:
                n = len(
                    (
                        await s.execute(
                            select(SettlementLine).where(SettlementLine.event_id == ev_id)
                        )
                    ).all()
                )
            return n == 12

        assert await wait_for(settled, 60)
        truth = st.sim.ground_truth()
        assert not truth.under_command  # everyone restored
        assert truth.batteries_below_reserve == 0
        r = await st.client.get(f"/v1/grid-events/{ev_id}", headers=await st.operator())
        body = r.json()
        assert body["settled"] and len(body["intervals"]) == 12
        delivered = np.array([i["delivered_mw"] for i in body["intervals"]])
        _tstarts, _tmw = truth.series(ev_id)
        members = truth.delivered_mw_members.get(ev_id, {})
        gt = np.array([members.get(int(s), 0.0) for s in range(start, end, 300_000)])
        print("target", mw, "delivered", delivered.round(3), "truth", gt.round(3))
        print(body["intervals"][3])
        assert abs(delivered.sum() - gt.sum()) <= 0.1 * gt.sum()
        csv = await st.client.get(
            f"/v1/grid-events/{ev_id}/settlement.csv", headers=await st.operator()
        )
        assert csv.status_code == 200 and csv.text.count("\n") == 13
        tl = await st.client.get(f"/v1/events/{ev_id}/timeline", headers=await st.operator())
        assert tl.status_code == 200 and len(tl.json()["points"]) > 10


async def test_abort_restores_everyone_at_once(sqlite_url, services_factory) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(sqlite_url, time_scale=SCALE)
    svc = await services_factory(settings, clock=summer_clock(SCALE))
    async with running_stack(svc, 200, seed=11) as st:
        snap_wait = svc.clock.now_ms() + 10 * 60_000
        assert await wait_for(lambda: svc.clock.now_ms() > snap_wait, 60)
        snap = await svc.fleet.snapshot(force=True)
        mw = round(0.4 * float(available_kw(snap, window_h=1.0).sum()) / 1000.0, 3)
        start = svc.clock.now_ms() + 60_000
        ev_id = await _grid_event(st, start, start + 2 * 3_600_000, mw)
        assert await wait_for(
            lambda: len(st.sim.fleet.ids) and st.sim.summary()["under_command"] > 0, 60
        )
        headers = await st.operator()
        r = await st.client.post(f"/v1/grid-events/{ev_id}/abort", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "aborted"
        assert await wait_for(lambda: st.sim.summary()["under_command"] == 0, 30)
        again = await st.client.post(f"/v1/grid-events/{ev_id}/abort", headers=headers)
        assert again.status_code == 409


def _fake_run(n: int, now: int) -> Running:
    from dispatch import events as es
    from dispatch.types import Horizon

    b = CommandBatch(
        ids=[f"c-{i:04d}" for i in range(n)],
        device_ids=[f"d-{i}" for i in range(n)],
        kind=np.zeros(n, np.int8),
        type=[CommandType.battery_discharge.value] * n,
        setpoint_w=np.full(n, 3000.0),
        offset_c=np.full(n, np.nan),
        limit_w=np.full(n, np.nan),
        valid_from_ms=np.full(n, now, np.int64),
        valid_until_ms=np.full(n, now + 3_600_000, np.int64),
        randomize_s=np.zeros(n, np.int64),
        baseline_w=np.zeros(n),
        expected_kw=np.full(n, 3.0),
    )
    info = es.EventInfo("ge-x", es.KIND_GRID, "t", "ERCOT-NORTH", 1.0, now, now + 3_600_000,
                        100, False, "load_reduction", "active")  # fmt: skip
    runner = EventRunner.__new__(EventRunner)
    return Running(
        info, Horizon(now, 300, 12), np.ones(12), runner._table("ge-x", b), [], np.zeros(0)
    )


def test_command_json_follows_the_contract() -> None:
    run = _fake_run(2, 1_784_061_000_000)
    doc = orjson.loads(run.table.payload[0])
    assert doc == {
        "command_id": "c-0000",
        "event_id": "ge-x",
        "type": "battery_discharge",
        "setpoint_w": 3000,
        "valid_from": 1_784_061_000_000,
        "valid_until": 1_784_064_600_000,
    }
    b = CommandBatch(
        ids=["c-r"], device_ids=["d-1"], kind=np.array([THERMOSTAT], np.int8),
        type=[CommandType.thermostat_offset.value],
        setpoint_w=np.array([np.nan]), offset_c=np.array([1.7]), limit_w=np.array([np.nan]),
        valid_from_ms=np.array([1], np.int64), valid_until_ms=np.array([2], np.int64),
        randomize_s=np.array([120], np.int64), baseline_w=np.array([0.0]),
        expected_kw=np.array([1.0]),
    )  # fmt: skip
    t = orjson.loads(payloads("cr-1", b)[0])
    assert t["offset_c"] == 1.7 and t["randomize_start_s"] == 120 and "setpoint_w" not in t


async def test_unacknowledged_commands_are_retried_then_replaced(
    sqlite_url, services_factory, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from vpp.clock import ManualClock

    settings = make_settings(sqlite_url, command_ack_timeout_s=30.0)
    clock = ManualClock(1_784_061_000_000)
    svc = await services_factory(settings, clock=clock)
    runner = EventRunner(svc)
    assert await runner.leadership.renew()  # this runner leads: it may publish
    sent: list[list[bytes]] = []

    class FakeClient:
        async def publish_many(self, msgs):  # type: ignore[no-untyped-def]
            sent.append([m[1] for m in msgs])
            return len(msgs)

    runner.client = FakeClient()
    replaced: list[int] = []

    async def fake_replace(run, rows, why):  # type: ignore[no-untyped-def]
        replaced.extend(rows.tolist())
        return 0

    runner.replace = fake_replace  # type: ignore[method-assign]
    run = _fake_run(3, clock.now_ms())
    records = runner.store.records("ge-x", _batch_of(run), clock.now_ms())
    async with svc.db.engine.begin() as conn:
        await runner.store.insert(conn, records)
    runner._register(run)
    await runner.publish_due(run, clock.now_ms())
    assert (run.table.status == SENT).all() and len(sent) == 1
    # One device acknowledges; the others stay silent.
    await svc.state.push_acks([orjson.dumps({"device_id": "d-0", "command_id": "c-0000",
                                             "status": "started", "ts": 1, "recv_ms": 1})])  # fmt: skip  # noqa: E501
    await runner.drain_acks()
    import dispatch.runner.loop as rmod

    monkeypatch.setattr(rmod, "MIN_ACK_WAIT_WALL_S", 0.0)
    run.table.sent_wall[:] -= 31.0
    await runner.retries(run)
    assert len(sent) == 2 and len(sent[1]) == 2
    assert sent[1] == sent[0][1:]  # the same command (same id, same fields) again
    run.table.sent_wall[:] -= 31.0
    await runner.retries(run)
    assert (run.table.status[1:] == MISSED).all() and sorted(replaced) == [1, 2]
    async with svc.db.session() as s:
        rows = {c.id: c for c in (await s.execute(select(Command))).scalars()}
    assert rows["c-0000"].status == CommandStatus.started
    assert rows["c-0001"].status == CommandStatus.missed
    assert rows["c-0001"].attempts == 2


def _batch_of(run: Running) -> CommandBatch:
    t = run.table
    n = len(t)
    return CommandBatch(
        ids=t.cmd_id.tolist(), device_ids=t.device_id.tolist(), kind=t.kind,
        type=[CommandType.battery_discharge.value] * n, setpoint_w=np.full(n, 3000.0),
        offset_c=np.full(n, np.nan), limit_w=np.full(n, np.nan),
        valid_from_ms=t.valid_from_ms, valid_until_ms=t.valid_until_ms,
        randomize_s=np.zeros(n, np.int64), baseline_w=t.baseline_w, expected_kw=t.expected_kw,
    )  # fmt: skip


async def test_estimate_waits_for_telemetry_from_after_the_start(
    sqlite_url, services_factory
) -> None:  # type: ignore[no-untyped-def]
    """At the window's start every device's latest report is from before it acted (devices
    report every 5 minutes outside events, and the first report after the start averages over
    the switch): the closed loop must count what the plan expects, not a shortfall — it used to
    read ~0 MW there, enlist every free device of the region, and have none left when the
    thermostats' shed faded later in the window. Once a device has had time to report and has
    not, it is stale."""
    from dispatch.runner.commands import STARTED
    from dispatch.runner.loop import ACT_LAG_MS
    from vpp.clock import ManualClock

    start = 1_784_061_000_000
    clock = ManualClock(start + 20_000)
    svc = await services_factory(make_settings(sqlite_url), clock=clock)
    runner = EventRunner(svc)
    run = _fake_run(4, start)
    run.table.status[:] = STARTED
    run.table.sent_wall[:] = 0.0  # sent long ago (the commands went out ahead of the window)
    fleet = fleet_of("bbbb")
    fleet.device_ids = np.array([f"d-{i}" for i in range(4)], dtype=object)
    fleet.index = {f"d-{i}": i for i in range(4)}
    # d-0, d-1: last report 4 minutes before the start (idle); d-2: a report 5 s after the
    # start (half a step of discharge); d-3: a report after the switch-over, discharging 3 kW.
    fleet.state["recv_ms"] = [start - 240_000, start - 240_000, start + 5_000, start + ACT_LAG_MS]
    fleet.state["power_w"] = [0.0, 0.0, 1_000.0, 3_000.0]
    clock._now_ms = start + ACT_LAG_MS + 1_000
    est = runner.estimate(run, fleet, clock.now_ms())
    assert est["settling"][:3].all() and not est["settling"][3]
    assert not est["stale"].any()
    assert est["delivered_mw"] == pytest.approx(0.012)  # 4 × 3 kW: on plan, nothing to enlist
    # Four minutes on, d-0 has still not reported since the start: stale (to be replaced).
    clock._now_ms = start + 240_000
    fleet.state["recv_ms"] = [start - 240_000, start + 200_000, start + 200_000, start + 200_000]
    fleet.state["power_w"] = [0.0, 3_000.0, 3_000.0, 3_000.0]
    est = runner.estimate(run, fleet, clock.now_ms())
    assert est["stale"].tolist() == [True, False, False, False]
    assert est["delivered_mw"] == pytest.approx(0.009)
