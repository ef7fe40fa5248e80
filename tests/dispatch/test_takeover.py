"""Leadership and takeover, in one process: the leader lease (Redis and in-process), a runner
that stops acting the moment it stops leading, acks of commands the leader does not hold in
memory, and a new leader finishing an event its predecessor ended but did not finish."""

from __future__ import annotations

import uuid

import numpy as np
import orjson
import pytest
from sqlalchemy import insert, select

from dispatch.leadership import Leadership, lease_ttl_s
from dispatch.runner.commands import CommandBatch
from dispatch.runner.loop import EventRunner, LeadershipLost
from store.models import Command, GridEvent, Plan
from store.state.memory import MemoryStateStore
from tests.helpers.settings import REDIS_URL, make_settings
from vpp.clock import ManualClock
from vpp.domain import CommandStatus, CommandType
from vpp.fleet.snapshot import BATTERY, THERMOSTAT

NOW = 1_784_061_000_000


class FakeClient:
    """The runner's MQTT client, recording what it publishes."""

    connected = True
    connects = 1

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []

    async def publish_many(self, msgs):  # type: ignore[no-untyped-def]
        self.sent.extend(orjson.loads(m[1]) for m in msgs)
        return len(msgs)


async def test_redis_lease_has_one_holder_and_is_handed_back() -> None:
    from store.state.redis import RedisStateStore

    store = RedisStateStore(REDIS_URL, prefix=f"lease-{uuid.uuid4().hex[:6]}")
    try:
        assert await store.acquire_lease("leader", "a", 5.0)
        assert not await store.acquire_lease("leader", "b", 5.0)
        assert await store.acquire_lease("leader", "a", 5.0)  # renewal
        assert await store.lease_holder("leader") == "a"
        assert not await store.release_lease("leader", "b")  # not b's to give back
        assert await store.release_lease("leader", "a")
        assert await store.lease_holder("leader") is None
        assert await store.acquire_lease("leader", "b", 5.0)
        assert not await store.acquire_lease("leader", "a", 5.0)
    finally:
        await store.flush_prefix()
        await store.close()


async def test_one_leader_among_replicas_and_the_other_takes_over() -> None:
    settings = make_settings("sqlite+aiosqlite://", leader_lease_s=5.0)
    state = MemoryStateStore()
    a, b = Leadership(state, settings), Leadership(state, settings)
    assert a.owner != b.owner  # unique per process and instance, whatever the port
    assert await a.renew() and not await b.renew()
    assert a.is_leader and not b.is_leader
    assert await b.holder() == a.owner
    changes: list[bool] = []
    b.on_change.append(changes.append)
    await a.stop()  # hands the lease back
    assert not a.is_leader
    assert await b.renew() and b.is_leader and changes == [True]
    assert not await a.renew()


def test_lease_ttl_is_a_service_minute_within_bounds() -> None:
    assert lease_ttl_s(make_settings("sqlite+aiosqlite://")) == 10.0
    assert lease_ttl_s(make_settings("sqlite+aiosqlite://", time_scale=20.0)) == 4.0
    assert lease_ttl_s(make_settings("sqlite+aiosqlite://", time_scale=60.0)) == 4.0
    assert lease_ttl_s(make_settings("sqlite+aiosqlite://", leader_lease_s=2.5)) == 2.5


async def _event_with_commands(svc, status: str, end_ms: int, kinds: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """A grid event as a runner leaves it in the database: its plan, and one command a device."""
    from store.keys import ensure_tenant

    start_ms = end_ms - 3_600_000
    n = len(kinds)
    ids = [f"c-{i:04d}" for i in range(n)]
    kind = np.array(kinds, np.int8)
    th = kind == THERMOSTAT
    b = CommandBatch(
        ids=ids,
        device_ids=[f"d-{i}" for i in range(n)],
        kind=kind,
        type=[
            CommandType.thermostat_offset.value if t else CommandType.battery_discharge.value
            for t in th
        ],
        setpoint_w=np.where(th, np.nan, 3000.0),
        offset_c=np.where(th, 2.0, np.nan),
        limit_w=np.full(n, np.nan),
        valid_from_ms=np.full(n, start_ms, np.int64),
        # Thermostats keep their offset into the release stagger; batteries to the end + margin.
        valid_until_ms=np.where(th, end_ms + 600_000, end_ms + 60_000).astype(np.int64),
        randomize_s=np.zeros(n, np.int64),
        baseline_w=np.zeros(n),
        expected_kw=np.full(n, 3.0),
    )
    runner = EventRunner(svc)
    await ensure_tenant(svc.db, "grid", start_ms)
    async with svc.db.session() as s, s.begin():
        s.add(GridEvent(id="ge-x", tenant_id="grid", region="ERCOT-NORTH", mw=0.01,
                        start_ms=start_ms, end_ms=end_ms, priority=100, preempt=False,
                        status=status, created_ms=start_ms, updated_ms=end_ms))  # fmt: skip
    async with svc.db.engine.begin() as conn:
        await conn.execute(insert(Plan).values(
            event_id="ge-x", version=1, created_ms=start_ms, interval_s=300, start_ms=start_ms,
            body={"runner": {"horizon": {"start_ms": start_ms, "interval_s": 300,
                                         "n_intervals": 12},
                             "target_mw": [0.01] * 12}}))  # fmt: skip
        await runner.store.insert(conn, runner.store.records("ge-x", b, start_ms))
    await runner.store.mark(ids, CommandStatus.started.value, sent_ms=start_ms, attempts_inc=True)
    return ids


async def test_new_leader_finishes_an_event_ended_but_not_finished(
    sqlite_url, services_factory
) -> None:  # type: ignore[no-untyped-def]
    """The leader ended the event (status completed) and died before the thermostats'
    staggered restores and the final settlement: the next leader restores each device at the
    time the ending runner chose, and settles."""
    end = NOW
    clock = ManualClock(end + 30_000)
    svc = await services_factory(make_settings(sqlite_url), clock=clock)
    await _event_with_commands(svc, "completed", end, [BATTERY, BATTERY, THERMOSTAT])
    runner = EventRunner(svc)
    runner.client = FakeClient()
    assert await runner.leadership.renew()
    await runner.tick()
    assert runner.is_leader and "ge-x" in runner.settle_queue
    restored = {m["command_id"]: m for m in runner.client.sent if m["type"] == "restore"}
    assert len(restored) == 2  # the batteries at once
    clock.advance(600)  # past the thermostat's release time (its command's expiry − margin)
    await runner.tick()
    restores = [m for m in runner.client.sent if m["type"] == "restore"]
    assert len(restores) == 3
    async with svc.db.session() as s:
        rows = (await s.execute(select(Command).where(Command.type == "restore"))).scalars()
        assert sorted(r.device_id for r in rows) == ["d-0", "d-1", "d-2"]


async def test_acks_of_commands_not_in_memory_are_recorded_forward_only(
    sqlite_url, services_factory
) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock(NOW)
    svc = await services_factory(make_settings(sqlite_url), clock=clock)
    ids = await _event_with_commands(svc, "completed", NOW - 3_600_000 * 2, [BATTERY] * 4)
    await EventRunner(svc).store.mark(ids, CommandStatus.sent.value)
    runner = EventRunner(svc)  # holds nothing in memory
    # Several acks of one status are written as one statement over many rows.
    acks = [
        {"command_id": ids[0], "status": "started", "ts": NOW},
        {"command_id": ids[1], "status": "received", "ts": NOW},
        {"command_id": ids[2], "status": "started", "ts": NOW},
        {"command_id": ids[3], "status": "received", "ts": NOW},
    ]
    await svc.state.push_acks([orjson.dumps(a) for a in acks])
    await runner.drain_acks()
    # A late "received" after "started" does not move the row back.
    await svc.state.push_acks([orjson.dumps({"command_id": ids[0], "status": "received",
                                             "ts": NOW + 1})])  # fmt: skip
    await runner.drain_acks()
    async with svc.db.session() as s:
        rows = {c.id: c for c in (await s.execute(select(Command))).scalars()}
    assert rows[ids[0]].status == "started" and rows[ids[0]].ack_ms == NOW
    assert rows[ids[1]].status == "received"
    assert rows[ids[2]].status == "started" and rows[ids[3]].status == "received"


async def test_a_runner_that_stops_leading_publishes_nothing(sqlite_url, services_factory) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock(NOW)
    svc = await services_factory(make_settings(sqlite_url, leader_lease_s=5.0), clock=clock)
    await _event_with_commands(svc, "active", NOW + 1_800_000, [BATTERY, BATTERY])
    runner = EventRunner(svc)
    runner.client = FakeClient()
    assert await runner.leadership.renew()
    await runner.tick()
    assert "ge-x" in runner.running
    # Another replica took the lease (this one stalled past its lease): nothing more goes out.
    await runner.leadership.stop()
    assert await svc.state.acquire_lease("leader", "other", 5.0)
    run = runner.running["ge-x"]
    with pytest.raises(LeadershipLost):
        await runner._send_rows(run, np.array([0]))
    await runner.tick()
    assert not runner.running and not runner.is_leader
    assert runner.client.sent == []
    # A follower leaves the shared ack queue alone.
    await svc.state.push_acks([b'{"command_id": "c-0000", "status": "started", "ts": 1}'])
    await runner.tick()
    assert len(await svc.state.pop_acks()) == 1


async def test_acks_popped_while_the_database_is_down_are_kept_for_the_next_tick(
    sqlite_url, services_factory
) -> None:  # type: ignore[no-untyped-def]
    """The runner pops acks from the shared queue; if writing them fails (the database went
    away), they go back on the queue instead of being lost with the failed tick."""
    clock = ManualClock(NOW)
    svc = await services_factory(make_settings(sqlite_url), clock=clock)
    ids = await _event_with_commands(svc, "completed", NOW - 3_600_000 * 2, [BATTERY] * 2)
    runner = EventRunner(svc)
    await runner.store.mark(ids, CommandStatus.sent.value)
    await svc.state.push_acks(
        [orjson.dumps({"command_id": i, "status": "started", "ts": NOW}) for i in ids]
    )
    record = runner.store.record_acks

    async def database_down(acks: dict[str, tuple[str, int]]) -> int:
        raise ConnectionRefusedError(111, "Connection refused")

    runner.store.record_acks = database_down  # type: ignore[method-assign]
    with pytest.raises(ConnectionRefusedError):
        await runner.drain_acks()
    runner.store.record_acks = record  # type: ignore[method-assign]
    assert await runner.drain_acks() == 2
    async with svc.db.session() as s:
        rows = {c.id: c for c in (await s.execute(select(Command))).scalars()}
    assert all(rows[i].status == "started" for i in ids)


def _running(event_id: str, statuses: list[int], valid_until: list[int], ending: str | None = None):  # type: ignore[no-untyped-def]
    from dispatch import events as es
    from dispatch.runner.table import DeviceTable, Running
    from dispatch.types import Horizon

    n = len(statuses)
    table = DeviceTable(
        cmd_id=np.array([f"c-{event_id}-{i}" for i in range(n)], object),
        device_id=np.array([f"d-{i}" for i in range(n)], object),
        kind=np.full(n, BATTERY, np.int8),
        status=np.array(statuses, np.int8),
        valid_until_ms=np.array(valid_until, np.int64),
        restore_id=np.array([None] * n, object),
        release_at_ms=np.zeros(n, np.int64),
    )
    info = es.EventInfo(id=event_id, kind="request", tenant_id="t", region="ERCOT-NORTH", mw=1.0,
                        start_ms=NOW - 600_000, end_ms=NOW + 3_000_000, priority=50,
                        preempt=False, direction="load_reduction", status="active")  # fmt: skip
    return Running(info=info, horizon=Horizon(NOW - 600_000, 300, 12), target_mw=np.ones(12),
                   table=table, control_ids=[], control_baseline_w=np.zeros(0),
                   ending=ending)  # fmt: skip


async def test_a_device_the_runner_gave_up_on_stays_busy_until_its_command_expires(
    sqlite_url, services_factory
) -> None:  # type: ignore[no-untyped-def]
    """No ack (missed) or no telemetry (stale) does not mean the device is not acting: another
    event may not command it while that command is valid, nor, after an event ended, while a
    thermostat waits for its staggered release."""
    from dispatch.runner.commands import COMPLETED, MISSED, STALE, STARTED

    svc = await services_factory(make_settings(sqlite_url), clock=ManualClock(NOW))
    runner = EventRunner(svc)
    later, past = NOW + 600_000, NOW - 1
    run = _running(
        "cr-a", [STARTED, MISSED, STALE, MISSED, COMPLETED], [later, later, later, past, later]
    )
    runner.running[run.id] = run
    assert runner.busy_devices(exclude_event="ge-b") == {"d-0", "d-1", "d-2"}
    run.table.restore_id[1] = "c-restore"  # a restore went out: the device is free
    assert runner.busy_devices(exclude_event="ge-b") == {"d-0", "d-2"}
    # Ended: live rows still valid and rows waiting for their release stay busy.
    run.ending = "completed"
    run.table.release_at_ms[4] = NOW + 60_000
    assert runner.busy_devices(exclude_event="ge-b") == {"d-0", "d-2", "d-4"}
