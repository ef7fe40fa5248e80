"""Grid events and capacity requests competing for one region's fleet, on PostgreSQL + Redis with
the in-process broker and a small simulated fleet at a high time scale: a preempting grid event
takes devices from a lower-priority request (which then tries to make up the loss), a grid event
without ``preempt`` only gets what commitments leave free, and a request cancelled while its
commands are out restores every device."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select, update

from store.keys import ensure_tenant
from store.models import CapacityRequest, Command, EventTimeline, GridEvent, Plan
from tests.helpers.eventkit import Stack, running_stack, summer_clock, wait_for
from tests.helpers.settings import make_settings
from vpp.domain import CommandStatus, CommandType
from vpp.flexibility import available_kw
from vpp.timefmt import to_rfc3339

SCALE = 240.0
BUYER = "cloudco"
MIN = 60_000


async def _services(services_factory, fresh_pg_url: str, redis_url: str) -> Any:  # type: ignore[no-untyped-def]
    settings = make_settings(fresh_pg_url, redis_url=redis_url, time_scale=SCALE)
    return await services_factory(settings, clock=summer_clock(SCALE))


async def _available_mw(svc: Any) -> float:
    snap = await svc.fleet.snapshot(force=True)
    return float(available_kw(snap, window_h=1.0).sum()) / 1000.0


async def _committed_request(svc: Any, start_ms: int, end_ms: int, mw: float) -> str:
    """A committed capacity request (what quote + commit leave behind), written directly: the
    market's quote depends on the forecast, which is not what these tests are about."""
    now = svc.clock.now_ms()
    await ensure_tenant(svc.db, BUYER, now)
    rid = f"cr-{secrets.token_hex(6)}"
    async with svc.db.session() as s, s.begin():
        s.add(
            CapacityRequest(
                id=rid, tenant_id=BUYER, region="ERCOT-NORTH", mw=mw, quoted_mw=mw,
                start_ms=start_ms, end_ms=end_ms, firmness=0.9, direction="load_reduction",
                priority=50, status="committed", created_ms=now, updated_ms=now,
            )
        )  # fmt: skip
    return rid


async def _grid_event(st: Stack, start_ms: int, end_ms: int, mw: float, preempt: bool) -> str:
    r = await st.client.post(
        "/v1/grid-events",
        json={"region": "ERCOT-NORTH", "mw": mw,
              "start": to_rfc3339(start_ms), "end": to_rfc3339(end_ms),
              "priority": 100, "preempt": preempt},
        headers=await st.operator(),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _commands(svc: Any, event_id: str) -> list[Command]:
    async with svc.db.session() as s:
        rows = await s.execute(select(Command).where(Command.event_id == event_id))
        return list(rows.scalars())


async def _status(svc: Any, model: Any, event_id: str) -> str:
    async with svc.db.session() as s:
        row = await s.get(model, event_id)
        return str(row.status) if row is not None else ""


def _live_devices(cmds: list[Command]) -> set[str]:
    return {
        c.device_id
        for c in cmds
        if c.type != CommandType.restore
        and c.status
        in (
            CommandStatus.pending,
            CommandStatus.sent,
            CommandStatus.received,
            CommandStatus.started,
        )
    }


async def _running_request(st: Stack, mw_share: float) -> tuple[str, float, int]:
    """Some telemetry history, then a committed request (``mw_share`` of the region's
    available MW, one hour) that the runner has started and whose devices acknowledged."""
    svc = st.services
    t0 = svc.clock.now_ms()
    assert await wait_for(lambda: svc.clock.now_ms() > t0 + 10 * MIN, 30)
    avail = await _available_mw(svc)
    assert avail > 0.2
    start = svc.clock.now_ms() + 2 * MIN
    end = start + 60 * MIN
    rid = await _committed_request(svc, start, end, round(mw_share * avail, 3))
    st.runner.wake()

    async def acked() -> bool:
        snap = st.runner.snapshot_of(rid)
        return bool(snap and snap["by_status"].get(CommandStatus.started.value, 0) > 0)

    assert await wait_for(acked, 20)
    assert await _status(svc, CapacityRequest, rid) == "active"
    return rid, avail, end


async def test_preempting_grid_event_takes_devices_from_a_request(  # type: ignore[no-untyped-def]
    fresh_pg_url, redis_url, services_factory
) -> None:
    svc = await _services(services_factory, fresh_pg_url, redis_url)
    async with running_stack(svc, 160, seed=31, fleet_options={"never_answer_share": 0.0}) as st:
        rid, avail, end = await _running_request(st, 0.6)
        held = _live_devices(await _commands(svc, rid))
        assert held
        # The fleet cannot cover both: 0.6 + 0.9 of what is available. The grid event starts on
        # free devices first; what they cannot give, even front-loaded, it takes from the request.
        ge_start = svc.clock.now_ms() + MIN
        ge = await _grid_event(st, ge_start, end, round(0.9 * avail, 3), preempt=True)
        assert await wait_for(lambda: ge in st.runner.running, 20)
        assert await _status(svc, GridEvent, ge) == "active"

        # The grid event is running as soon as its plan is made; its commands and the request's
        # preempted marks are written right after, so wait for them.
        async def preempted_commands() -> list[Any]:
            return [c for c in await _commands(svc, rid) if c.status == CommandStatus.preempted]

        async def some_preempted() -> bool:
            return bool(await preempted_commands())

        assert await wait_for(some_preempted, 20), "the grid event took no device from the request"
        preempted = await preempted_commands()
        assert all(ge in (c.reason or "") for c in preempted)
        taken = {c.device_id for c in preempted}
        assert taken <= held

        # Those devices now serve the grid event (one command each, not two events at once).
        async def serving_grid_event() -> bool:
            return taken <= _live_devices(await _commands(svc, ge))

        assert await wait_for(serving_grid_event, 20)
        assert not taken & _live_devices(await _commands(svc, rid))

        # The request's closed loop sees the loss and tries to make it up.
        async def tried() -> bool:
            async with svc.db.session() as s:
                actions = (
                    await s.execute(
                        select(EventTimeline.action).where(
                            EventTimeline.event_id == rid, EventTimeline.ts_ms >= ge_start
                        )
                    )
                ).scalars()
                return any(a and "enlisted" in a for a in actions)

        assert await wait_for(tried, 20)
        snap = st.runner.snapshot_of(rid)
        assert snap is not None and snap["replaced"] >= len(taken)


async def test_preempting_grid_event_spares_the_request_while_free_devices_cover_it(  # type: ignore[no-untyped-def]
    fresh_pg_url, redis_url, services_factory
) -> None:
    """``preempt`` allows taking devices, it does not ask for it: a small grid event that the
    devices no commitment holds can cover leaves the request whole."""
    svc = await _services(services_factory, fresh_pg_url, redis_url)
    async with running_stack(svc, 160, seed=43, fleet_options={"never_answer_share": 0.0}) as st:
        rid, avail, end = await _running_request(st, 0.5)
        held = _live_devices(await _commands(svc, rid))
        ge = await _grid_event(st, svc.clock.now_ms() + MIN, end, round(0.1 * avail, 3), True)
        assert await wait_for(lambda: ge in st.runner.running, 20)

        async def grid_commanded() -> bool:
            return bool(_live_devices(await _commands(svc, ge)))

        assert await wait_for(grid_commanded, 20)
        cr_cmds = await _commands(svc, rid)
        assert not [c for c in cr_cmds if c.status == CommandStatus.preempted]
        assert not held & _live_devices(await _commands(svc, ge))


async def test_grid_event_without_preempt_gets_only_what_is_free(  # type: ignore[no-untyped-def]
    fresh_pg_url, redis_url, services_factory
) -> None:
    svc = await _services(services_factory, fresh_pg_url, redis_url)
    async with running_stack(svc, 160, seed=37, fleet_options={"never_answer_share": 0.0}) as st:
        rid, avail, end = await _running_request(st, 0.6)
        held = _live_devices(await _commands(svc, rid))
        ge = await _grid_event(st, svc.clock.now_ms() + MIN, end, round(0.7 * avail, 3), False)
        assert await wait_for(lambda: ge in st.runner.running, 20)
        cr_cmds = await _commands(svc, rid)
        assert not [c for c in cr_cmds if c.status == CommandStatus.preempted]
        assert held <= _live_devices(cr_cmds)
        assert not held & _live_devices(await _commands(svc, ge))
        # What the commitment holds is not free: the grid event's plan is short.
        async with svc.db.session() as s:
            plan = (await s.execute(select(Plan).where(Plan.event_id == ge))).scalars().one()
        assert any(i["shortfall_mw"] > 0 for i in plan.body["intervals"])


async def test_preempting_grid_event_shows_in_the_request_plan(  # type: ignore[no-untyped-def]
    fresh_pg_url, redis_url, services_factory
) -> None:
    """Before the window: the request's plan names the preempting grid event as what binds;
    without ``preempt`` the request's plan is whole and the grid event is the one short."""
    svc = await _services(services_factory, fresh_pg_url, redis_url)
    async with running_stack(svc, 160, seed=41, with_runner=False) as st:
        t0 = svc.clock.now_ms()
        assert await wait_for(lambda: svc.clock.now_ms() > t0 + 10 * MIN, 30)
        avail = await _available_mw(svc)
        start = (svc.clock.now_ms() // (15 * MIN) + 8) * 15 * MIN
        end = start + 60 * MIN
        rid = await _committed_request(svc, start, end, round(0.6 * avail, 3))
        planner = svc.planner
        ge_free = await _grid_event(st, start, end, round(0.7 * avail, 3), preempt=False)
        body = await planner.plan_for(rid, reason="test")
        assert all(i["shortfall_mw"] == 0 for i in body["intervals"]), body["intervals"]
        ge_body = await planner.plan_for(ge_free, reason="test")
        # The grid event is the one short: the request's commitment holds the devices.
        short = [i for i in ge_body["intervals"] if i["shortfall_mw"] > 0]
        assert short and {i["binding"] for i in short} == {f"preempted_by:{rid}"}
        async with svc.db.session() as s, s.begin():
            await s.execute(update(GridEvent).where(GridEvent.id == ge_free).values(preempt=True))
        body = await planner.plan_for(rid, reason="test")
        short = [i for i in body["intervals"] if i["shortfall_mw"] > 0]
        assert short and {i["binding"] for i in short} == {f"preempted_by:{ge_free}"}
        buyer = {"Authorization": "Bearer " + await _buyer_key(svc)}
        got = await st.client.get(f"/v1/capacity-requests/{rid}", headers=buyer)
        assert got.status_code == 200, got.text
        bindings = {i["binding"] for i in got.json()["plan"]["intervals"]}
        assert f"preempted_by:{ge_free}" in bindings


async def _buyer_key(svc: Any) -> str:
    from store.keys import create_api_key

    return await create_api_key(svc.db, BUYER, "hyperscaler", svc.clock.now_ms())


async def test_request_cancelled_while_active_restores_every_device(  # type: ignore[no-untyped-def]
    fresh_pg_url, redis_url, services_factory
) -> None:
    """The runner starts a request a few (wall) seconds before its window, so its commands are
    out while it is cancellable: a cancel then restores every device it commanded, and nothing
    is left under command."""
    svc = await _services(services_factory, fresh_pg_url, redis_url)
    async with running_stack(svc, 120, seed=43, fleet_options={"never_answer_share": 0.0}) as st:
        t0 = svc.clock.now_ms()
        assert await wait_for(lambda: svc.clock.now_ms() > t0 + 10 * MIN, 30)
        avail = await _available_mw(svc)
        # Due at once (inside the runner's lead), window opening 10 service minutes from now.
        start = svc.clock.now_ms() + 10 * MIN
        end = start + 60 * MIN
        rid = await _committed_request(svc, start, end, round(0.5 * avail, 3))
        st.runner.wake()
        assert await wait_for(lambda: rid in st.runner.running, 10, step_s=0.02)
        assert await _status(svc, CapacityRequest, rid) == "active"
        assert svc.clock.now_ms() < start
        r = await st.client.post(
            f"/v1/capacity-requests/{rid}/cancel",
            headers={"Authorization": "Bearer " + await _buyer_key(svc)},
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"

        async def all_restored() -> bool:
            cmds = await _commands(svc, rid)
            sent = {
                c.device_id
                for c in cmds
                if c.type != CommandType.restore and c.status != CommandStatus.restored
            }
            restored = {c.device_id for c in cmds if c.type == CommandType.restore}
            return bool(cmds) and sent <= restored

        assert await wait_for(all_restored, 20)
        assert await wait_for(lambda: st.sim.summary()["under_command"] == 0, 20)
        assert await _status(svc, CapacityRequest, rid) == "cancelled"
