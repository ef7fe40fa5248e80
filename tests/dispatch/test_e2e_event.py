"""End to end on the real servers (PostgreSQL, Redis, Mosquitto): a simulated fleet of 2 000
devices in one region, a capacity request for most of its P90, committed, run at a sped-up clock.
During the event 10 % of the devices drop off and thermostat customers override (the
simulator's Weibull hazard, ~10 % by 2 h). Then: delivered within ±5 % of the target in at least
90 % of the settlement intervals, no battery below its reserve, every device restored, and the
measured performance within 3 % of the simulator's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from dispatch.settlement import performance
from tests.helpers.eventkit import running_stack, summer_clock, wait_for
from tests.helpers.settings import REDIS_URL, make_settings
from vpp.timefmt import to_rfc3339

SCALE = 80.0  # a 2-hour window in 90 wall seconds
N_DEVICES = 2000


@pytest.mark.slow
async def test_capacity_request_delivered_measured_and_settled(
    fresh_pg_url, mqtt_url, services_factory
) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(fresh_pg_url, redis_url=REDIS_URL, mqtt_url=mqtt_url, time_scale=SCALE)
    svc = await services_factory(settings, clock=summer_clock(SCALE))
    async with running_stack(svc, N_DEVICES, seed=21) as st:
        from store.keys import create_api_key

        buyer = {
            "Authorization": "Bearer "
            + await create_api_key(svc.db, "hyperco", "hyperscaler", svc.clock.now_ms())
        }
        # Pre-event history: 35 minutes of telemetry (meter-before, baselines, control levels).
        t0 = svc.clock.now_ms()
        assert await wait_for(lambda: svc.clock.now_ms() > t0 + 35 * 60_000, 60)
        start = (svc.clock.now_ms() // 900_000 + 1) * 900_000  # the next 15-minute boundary
        if start - svc.clock.now_ms() < 5 * 60_000:
            start += 900_000
        end = start + 2 * 3_600_000
        fc = await st.client.get(
            "/v1/forecast",
            params={"region": "ERCOT-NORTH", "start": to_rfc3339(start), "end": to_rfc3339(end)},
            headers=buyer,
        )
        assert fc.status_code == 200, fc.text
        p90 = min(i["p90_mw"] for i in fc.json()["intervals"])
        assert p90 > 0.5
        ask = round(0.75 * p90, 3)  # most of the P90
        q = await st.client.post(
            "/v1/capacity-requests",
            json={
                "region": "ERCOT-NORTH",
                "mw": ask,
                "start": to_rfc3339(start),
                "end": to_rfc3339(end),
            },
            headers=buyer,
        )
        assert q.status_code == 201 and q.json()["status"] == "quoted", q.text
        req_id = q.json()["id"]
        c = await st.client.post(f"/v1/capacity-requests/{req_id}/commit", headers=buyer)
        assert c.status_code == 200 and c.json()["status"] == "committed", c.text
        committed = float(c.json()["committed_mw"])

        async def status() -> str:
            r = await st.client.get(f"/v1/capacity-requests/{req_id}", headers=buyer)
            return str(r.json()["status"])

        assert await wait_for(lambda: svc.clock.now_ms() > start + 30 * 60_000, 90)
        assert await status() == "active"
        dropped = await st.sim.drop_devices(0.10)  # 10 % of the fleet falls off mid-event
        assert len(dropped) == N_DEVICES // 10

        # The window closes; thermostats are released over their stagger, then it settles.
        assert await wait_for(lambda: svc.clock.now_ms() > end + 32 * 60_000, 150)

        async def settled() -> bool:
            r = await st.client.get(f"/v1/capacity-requests/{req_id}", headers=buyer)
            b = r.json()
            return (
                b["status"] == "completed"
                and len(b["intervals"]) == 24
                and (b["performance"] is not None)
                and b["settled"]
            )

        assert await wait_for(settled, 60)
        body = (await st.client.get(f"/v1/capacity-requests/{req_id}", headers=buyer)).json()
        truth = st.sim.ground_truth()
        tl = await st.client.get(f"/v1/events/{req_id}/timeline", headers=buyer)
        for point in tl.json()["points"][::3]:
            print(point)
        # What each kind delivered per interval (batteries: output over baseline; thermostats:
        # baseline over load), for diagnosing a miss.
        from sqlalchemy import select

        from store.models import SettlementLine

        async with svc.db.session() as s:
            lines = (
                (
                    await s.execute(
                        select(SettlementLine)
                        .where(SettlementLine.event_id == req_id)
                        .order_by(SettlementLine.interval_start_ms)
                    )
                )
                .scalars()
                .all()
            )
        for ln in lines:
            b, th, ctl = ln.inputs["battery"], ln.inputs["thermostat"], ln.inputs["control"]
            print(
                f"bat {b['devices']:4d} {b['actual_output_kw'] - b['baseline_output_kw']:8.1f} kW"
                f" | th {th['devices']:4d} {th['baseline_load_kw'] - th['actual_load_kw']:8.1f} kW"
                f" | ratio {ctl['ratio']:.3f} drift {b['control_drift_kw']:.3f}"
            )

    target = np.array([i["target_mw"] for i in body["intervals"]])
    delivered = np.array([i["delivered_mw"] for i in body["intervals"]])
    members = truth.delivered_mw_members.get(req_id, {})
    starts = range(start, end, 300_000)
    true_mw = np.array([members.get(s, 0.0) for s in starts])
    within = np.abs(delivered - target) <= 0.05 * target
    measured_perf = float(body["performance"])
    true_perf = performance(delivered_mw=true_mw, committed_mw=target)
    print(
        f"\ncommitted {committed:.3f} MW (P90 {p90:.3f}); intervals within ±5 %: "
        f"{within.sum()}/{len(within)}; performance measured {measured_perf:.4f}, "
        f"ground truth {true_perf:.4f}; opted out {truth.opted_out.get(req_id, 0)}, "
        f"dropped {len(dropped)}"
    )
    print("target   ", target.round(3).tolist())
    print("measured ", delivered.round(3).tolist())
    print("truth    ", true_mw.round(3).tolist())
    assert truth.batteries_below_reserve == 0
    assert truth.under_command == []  # every device restored
    assert abs(measured_perf - true_perf) <= 0.03
    assert within.mean() >= 0.9, (
        f"delivered within ±5 % in {within.sum()}/{len(within)} intervals (needs ≥ 90 %); "
        f"performance {measured_perf:.3f} (truth {true_perf:.3f})"
    )
