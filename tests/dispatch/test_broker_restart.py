"""Broker restart during an event: the private Mosquitto is killed (``kill -9``) and started again
on the same port while a grid event's commands wait for their acks.

Real ``vpp serve``, a fresh PostgreSQL database, Redis under a unique prefix, and batteries
emulated from the contract alone (tests/helpers/emulator.py). The batteries act on their commands
but their first acks are lost (as they would be in a broker that dies); after the restart the
service sends every unacknowledged command again with the same ``command_id``, the acks are
recorded, and the closed loop carries the event to completion: every interval settled and
delivering, every device restored, no device given a second, different command."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.eventkit import wait_for
from tests.helpers.mosquitto import mosquitto_available, run_mosquitto
from tests.helpers.replicas import cluster, kill_broker, start_broker_again

N_BATTERIES = 40
# The runner settles an event in full two history intervals after its end (lines stored
# before that are the provisional ones, from the intervals' first readings).
SETTLED_AFTER_MS = 11 * 60_000
MW = 0.1


@pytest.mark.slow
@pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto")
async def test_broker_restart_mid_event_resends_unacked_with_same_id(
    fresh_pg_url, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from store.models import Command, EventTimeline, SettlementLine

    with run_mosquitto() as broker:
        # Acks wait 10 wall seconds: the re-sends seen here are the reconnect's, not retries.
        async with cluster(fresh_pg_url, broker, tmp_path, VPP_COMMAND_ACK_TIMEOUT_S="600") as c:
            port = c.serve()

            async def leads() -> bool:
                return await c.leaders() == [port]

            assert await wait_for(leads, 60, 0.3), c.tail()
            await c.onboard(N_BATTERIES)
            emu = c.emulator
            assert emu is not None
            t0 = c.clock.now_ms()
            await c.wait_service_ms(t0 + 10 * 60_000)
            start = (c.clock.now_ms() // 300_000 + 1) * 300_000
            end = start + 20 * 60_000
            rid = await c.grid_event(port, MW, start, end)
            emu.drop_acks = True  # the devices act, their acks are lost

            async def all_sent() -> bool:
                rows = [r for r in await c.rows(Command, rid) if r.type != "restore"]
                return bool(rows) and all(r.status == "sent" for r in rows)

            await c.wait_service_ms(start)
            assert await wait_for(all_sent, 20, 0.1), c.tail()
            unacked = [r.id for r in await c.rows(Command, rid) if r.type != "restore"]
            # Every battery acts on its command (its acks, "started" too, all lost so far).
            assert await wait_for(lambda: set(unacked) <= emu.started_ids(), 20, 0.1)
            first_copies = {cid: emu.copies(cid) for cid in unacked}
            assert all(n >= 1 for n in first_copies.values())  # delivered once, not acked

            kill_broker(broker, None)  # kill -9
            emu.drop_acks = False
            killed_ms = c.clock.now_ms()
            await asyncio.sleep(2.0)
            proc = start_broker_again(broker)
            try:

                async def acked() -> bool:
                    rows = [r for r in await c.rows(Command, rid) if r.type != "restore"]
                    return all(r.ack_ms is not None for r in rows)

                assert await wait_for(acked, 30, 0.2), c.tail()

                async def settled() -> bool:
                    return (
                        await c.event_status(rid) == "completed"
                        and len(await c.rows(SettlementLine, rid)) >= (end - start) // 300_000
                    )

                await c.wait_service_ms(end)
                assert await wait_for(settled, 60, 0.3), c.tail()
                await c.wait_service_ms(end + SETTLED_AFTER_MS)  # final, not provisional
                after = await c.rows(Command, rid)
                lines = sorted(await c.rows(SettlementLine, rid), key=lambda s: s.interval_start_ms)
                points = [p.ts_ms for p in await c.rows(EventTimeline, rid)]
            finally:
                kill_broker(broker, proc)  # stop ours; run_mosquitto's is already gone

    by_id = {r.id: r for r in after}
    # Every command unacknowledged at the crash went out again, same id, and was acknowledged.
    for cid in unacked:
        assert emu.copies(cid) > first_copies[cid], cid
        assert by_id[cid].status in ("received", "started", "completed"), by_id[cid].status
        # Sent again because the broker came back, not by the ack timeout's retry.
        assert by_id[cid].attempts == 1, (cid, by_id[cid].attempts)
    # No device got a second, different dispatch command: nothing was replaced for lost acks.
    dispatched = {d: ids for d, ids in emu.dispatch_commands(rid).items() if ids}
    assert dispatched and all(len(ids) == 1 for ids in dispatched.values()), dispatched
    # The closed loop carried on after the restart; every interval settled while delivering.
    assert any(p > killed_ms + 3 * 60_000 for p in points)
    assert [ln.interval_start_ms for ln in lines] == list(range(start, end, 300_000))
    assert all(ln.delivered_mw > 0.5 * MW for ln in lines), [ln.delivered_mw for ln in lines]
    assert set(dispatched) <= emu.restored(rid)
    assert emu.delivering_w() == 0.0
