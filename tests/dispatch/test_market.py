"""The market: ledger arithmetic, quotes, commits, cancels and plans, on SQLite and PostgreSQL.

The forecaster is replaced by :class:`tests.helpers.market.StubForecast` (a ForecastService whose
P90 is set by the test), so the figures a buyer would check are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from dispatch import events as es
from dispatch.housekeeping import MarketHousekeeper
from dispatch.market import (
    RequestInput,
    ledger_slots,
    make_quote,
    sellable_mw,
    validate_input,
    window_rule,
)
from dispatch.planner import material_change
from store.models import LedgerEntry, Tenant
from tests.helpers.fleets import fleet_of
from tests.helpers.market import install_stub
from tests.helpers.settings import make_settings
from vpp.clock import ManualClock
from vpp.errors import Conflict, InvalidInput, NotFound
from vpp.fleet.snapshot import FleetSnapshot

H = 3_600_000
SLOT = 900_000
NOW = 1_784_061_000_000  # 2026-07-14T20:30:00Z, on the 15-minute grid
REGION = "ERCOT-NORTH"


def inp(mw: float = 5.0, start_h: float = 2.0, end_h: float = 4.0, **kw: Any) -> RequestInput:
    return RequestInput(
        region=kw.pop("region", REGION),
        mw=mw,
        start_ms=NOW + int(start_h * H),
        end_ms=NOW + int(end_h * H),
        **kw,
    )


# --- pure ledger arithmetic ---------------------------------------------------------------------
def test_ledger_slots_cover_the_window_on_the_15_minute_grid() -> None:
    assert ledger_slots(NOW, NOW + H).tolist() == [NOW + i * SLOT for i in range(4)]
    # Off the grid: every slot the window touches is booked.
    off = ledger_slots(NOW + 5 * 60_000, NOW + H + 60_000)
    assert off[0] == NOW and off[-1] == NOW + H and len(off) == 5


def test_sellable_is_firm_capped_at_p90_less_margin() -> None:
    p90 = np.array([10.0, 10.0, 0.0])
    firm_low = np.array([12.0, 8.0, 1.0])  # a 0.5 firmness sees more than the P90
    s = sellable_mw(firm_low, p90, 5.0)
    np.testing.assert_allclose(s, [9.5, 7.5, 0.0])


def test_quote_is_min_over_intervals_capped_and_floored() -> None:
    slots = ledger_slots(NOW, NOW + H)
    p90 = np.array([10.0, 8.0, 10.0, 10.0])
    committed = np.array([0.0, 2.0, 9.0, 0.0])
    q = make_quote(20.0, 0.9, slots, p90, p90, committed, 5.0)
    # Interval 2: 10 − 0.5 − 9 = 0.5 MW free.
    assert q.status == "quoted" and q.quoted_mw == pytest.approx(0.5)
    assert q.binding_slot_ms == int(slots[2])
    assert q.reason is not None and "partial" in q.reason and "0.5 of 20 MW" in q.reason
    full = make_quote(0.25, 0.9, slots, p90, p90, committed, 5.0)
    assert full.quoted_mw == 0.25 and full.reason is None
    none = make_quote(1.0, 0.9, slots, p90, p90, committed + 0.5, 5.0)
    assert none.status == "rejected" and none.quoted_mw == 0.0
    assert none.reason is not None and "no capacity" in none.reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mw": 0.0}, "mw"),
        ({"mw": -1.0}, "mw"),
        ({"mw": 100_001.0}, "mw"),
        ({"end_h": 2.0}, "end"),
        ({"end_h": 1.0}, "end"),
        ({"start_h": -1.0, "end_h": 1.0}, "start"),
        ({"start_h": 47.0, "end_h": 49.0}, "end"),
        ({"firmness": 0.4}, "firmness"),
        ({"firmness": 0.995}, "firmness"),
        ({"region": "MARS-1"}, "region"),
        ({"direction": "sideways"}, "direction"),
    ],
)
def test_bad_input_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_input(
            inp(**change),
            NOW,
            {REGION},
            horizon_h=48.0,
            min_notice_s=0.0,
            max_mw=100_000.0,
        )
    assert err.value.field == field
    assert err.value.detail.startswith(f"{field}: ")


def test_notice_and_event_length_rules() -> None:
    with pytest.raises(InvalidInput) as err:
        validate_input(
            inp(start_h=0.5, end_h=2.0), NOW, {REGION}, horizon_h=48, min_notice_s=3600, max_mw=1e5
        )
    assert err.value.field == "start" and "notice" in err.value.message
    assert window_rule(inp(start_h=1.0, end_h=6.0)) is None
    rule = window_rule(inp(start_h=1.0, end_h=6.5))
    assert rule is not None and "5 h" in rule


def test_idempotency_hash_depends_on_the_body_only() -> None:
    assert inp().body_hash() == inp().body_hash()
    assert inp().body_hash() != inp(mw=5.001).body_hash()


def test_material_change_threshold() -> None:
    assert not material_change(10.0, 10.4)  # < 5 %
    assert material_change(10.0, 9.4)
    assert not material_change(1.0, 1.15)  # < 0.2 MW floor
    assert material_change(1.0, 1.25)


# --- the market on a real database --------------------------------------------------------------
@pytest.fixture()
async def market_env(db_url: str, services_factory: Callable[..., Any]) -> Any:
    clock = ManualClock(NOW)
    services = await services_factory(make_settings(db_url), clock)
    async with services.db.session() as s, s.begin():
        s.add_all([Tenant(id="acme", created_ms=NOW), Tenant(id="other", created_ms=NOW)])
    install_stub(services, p90_mw=10.0)
    return services, clock


async def ledger_total(services: Any) -> float:
    async with services.db.session() as s:
        return float(
            (await s.execute(select(func.coalesce(func.sum(LedgerEntry.mw), 0.0)))).scalar()
        )


async def test_quote_commit_cancel_keep_the_ledger_within_p90_less_margin(market_env: Any) -> None:
    services, _clock = market_env
    market = services.market
    a, replayed = await market.quote("acme", inp(mw=6.0))
    assert not replayed and a.status == "quoted" and a.quoted_mw == 6.0
    assert a.id.startswith("cr-") and len(a.id) == 15
    b, _ = await market.quote("other", inp(mw=6.0, start_h=3.0, end_h=5.0))
    assert b.quoted_mw == 6.0  # quotes do not book anything
    a, changed = await market.commit(a.id, "acme")
    assert changed and a.status == "committed"
    starts, mw = await market.booked_mw(a.id)
    assert starts.tolist() == ledger_slots(a.start_ms, a.end_ms).tolist()
    assert set(mw.tolist()) == {6.0}
    # B overlaps A for an hour: 9.5 − 6 = 3.5 MW free there, less than B's quote.
    with pytest.raises(Conflict) as err:
        await market.commit(b.id, "other")
    assert "capacity no longer available: 3.5 MW free" in str(err.value)
    assert await ledger_total(services) == pytest.approx(6.0 * 8)
    # A new quote sees what is left.
    c, _ = await market.quote("other", inp(mw=6.0, start_h=3.0, end_h=5.0))
    assert c.quoted_mw == pytest.approx(3.5) and "partial" in (c.reason or "")
    # Cancelling A releases its rows; B can then commit.
    a, changed = await market.cancel(a.id, "acme")
    assert changed and a.status == "cancelled"
    assert await ledger_total(services) == 0.0
    b, _ = await market.commit(b.id, "other")
    assert b.status == "committed"
    committed = await market.committed_mw(REGION, ledger_slots(b.start_ms, b.end_ms))
    assert committed.tolist() == [6.0] * 8


async def test_state_errors_leave_the_ledger_unchanged(market_env: Any) -> None:
    services, clock = market_env
    market = services.market
    q, _ = await market.quote("acme", inp(mw=2.0))
    with pytest.raises(NotFound) as err:
        await market.commit(q.id, "other")  # another tenant's id looks missing
    await market.cancel(q.id, "acme")
    with pytest.raises(Conflict) as err:
        await market.commit(q.id, "acme")
    assert "request is cancelled" in str(err.value)
    # Expired quote.
    q2, _ = await market.quote("acme", inp(mw=2.0))
    clock.advance(services.settings.quote_ttl_s + 1)
    with pytest.raises(Conflict) as err:
        await market.commit(q2.id, "acme")
    assert "quote expired at" in str(err.value)
    assert (await market.get(q2.id, "acme")).status == "expired"
    # Committed request, due once its window opens: the runner's status moves (committed →
    # active when it starts the event, active → completed when it closes it) refuse cancel.
    q3, _ = await market.quote("acme", inp(mw=2.0))
    await market.commit(q3.id, None)  # operator scope
    before = await ledger_total(services)
    clock.advance(2 * 3600)
    due = await es.due_events(services, clock.now_ms())
    assert [e.id for e in due] == [q3.id]
    assert await es.set_status(services, due[0], "active", only_from=("committed",))
    assert await es.due_events(services, clock.now_ms()) == []
    with pytest.raises(Conflict) as err:
        await market.cancel(q3.id, "acme")
    assert "request is active" in str(err.value)
    assert await es.set_status(services, due[0], "completed", only_from=("active",))
    with pytest.raises(Conflict) as err:
        await market.cancel(q3.id, "acme")
    assert "request is completed" in str(err.value)
    assert await ledger_total(services) == before


async def test_expire_quotes_and_idempotency_key(market_env: Any) -> None:
    services, clock = market_env
    market = services.market
    a, replayed = await market.quote("acme", inp(mw=1.0), idempotency_key="k1")
    again, replayed = await market.quote("acme", inp(mw=1.0), idempotency_key="k1")
    assert replayed and again.id == a.id
    other_tenant, replayed = await market.quote("other", inp(mw=1.0), idempotency_key="k1")
    assert not replayed and other_tenant.id != a.id
    with pytest.raises(InvalidInput) as err:
        await market.quote("acme", inp(mw=2.0), idempotency_key="k1")
    assert err.value.field == "Idempotency-Key"
    clock.advance(services.settings.quote_ttl_s)
    assert await market.expire_quotes(clock.now_ms()) == 2
    rows, total = await market.list_requests("acme")
    assert total == 1 and rows[0].status == "expired"
    # The housekeeper does the same on its own.
    late, _ = await market.quote("acme", inp(mw=1.0, start_h=3.0, end_h=4.0))
    clock.advance(services.settings.quote_ttl_s)
    expired, replanned = await MarketHousekeeper(
        services.market, services.planner, services.clock
    ).tick()
    assert expired == 1 and replanned == []
    assert (await market.get(late.id, "acme")).status == "expired"


async def test_rejected_when_nothing_is_free_and_window_rule(market_env: Any) -> None:
    services, _clock = market_env
    stub = services.forecast
    stub.p90_at[NOW + 3 * H] = 0.0  # one interval holds nothing
    market = services.market
    r, _ = await market.quote("acme", inp(mw=1.0))
    assert r.status == "rejected" and r.quoted_mw == 0.0
    assert r.quote_expires_ms is None and "interval 2026-07-14T23:30:00.000Z" in (r.reason or "")
    with pytest.raises(Conflict) as err:
        await market.commit(r.id, "acme")
    assert "rejected" in str(err.value)
    long, _ = await market.quote("acme", inp(mw=1.0, start_h=2.0, end_h=8.0))
    assert long.status == "rejected" and "at most 5 h" in (long.reason or "")


# --- plans --------------------------------------------------------------------------------------
async def test_plan_is_stored_and_remade_when_the_fleet_changes(market_env: Any) -> None:
    services, clock = market_env
    fleet = {"snap": fleet_of("b" * 400)}  # 2 MW of batteries

    async def snapshot(force: bool = False) -> FleetSnapshot:
        return fleet["snap"]

    services.fleet.snapshot = snapshot
    market = services.market
    planner = services.planner
    q, _ = await market.quote("acme", inp(mw=1.0))
    await market.commit(q.id, "acme")
    body = await planner.plan_for(q.id, reason="committed")
    assert body["version"] == 1 and body["demand_ids"] == [q.id]
    assert len(body["intervals"]) == 8
    assert all(iv["target_mw"] == pytest.approx(1.0) for iv in body["intervals"])
    assert all(iv["planned_mw"] == pytest.approx(1.0, rel=1e-3) for iv in body["intervals"])
    assert body["devices_by_kind"]["battery"]["assigned"] > 0
    assert body["available_mw"] == pytest.approx(2.0, rel=0.05)
    # Nothing changed: refresh leaves the plan alone.
    assert await planner.refresh(clock.now_ms()) == []
    # Half the batteries drop out: re-planned, version 2, with a shortfall.
    fleet["snap"] = fleet_of("b" * 150)
    assert await planner.refresh(clock.now_ms()) == [q.id]
    latest = await planner.latest(q.id)
    assert latest is not None and latest.version == 2
    assert "fleet changed" in latest.body["reason"]
    assert sum(iv["shortfall_mw"] for iv in latest.body["intervals"]) > 0
    # An overlapping commitment changes the demands: re-planned jointly.
    q2, _ = await market.quote("other", inp(mw=0.2, start_h=3.0, end_h=4.0))
    await market.commit(q2.id, "other")
    assert q.id in await planner.refresh(clock.now_ms())
    latest = await planner.latest(q.id)
    assert latest is not None and latest.version == 3
    assert set(latest.body["demand_ids"]) == {q.id, q2.id}
    # A cancelled request is not planned.
    await market.cancel(q2.id, "other")
    with pytest.raises(ValueError, match="cancelled"):
        await planner.plan_for(q2.id)
