"""Storage on SQLite and PostgreSQL: the migration builds exactly the models' schema, and every
model round-trips its values (epoch ms beyond 32 bits, JSON, booleans, NULLs) on both."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.exc import IntegrityError

from store.database import Database, sync_url
from store.history_partitions import include_name, is_partition_name
from store.migrate import alembic_config, upgrade
from store.models import (
    ApiKey,
    Base,
    CapacityRequest,
    Command,
    Device,
    GridEvent,
    LedgerEntry,
    OpenAdrClient,
    OpenAdrObject,
    OpenAdrToken,
    Plan,
    RegionLock,
    SettlementLine,
    TelemetryInterval,
    Tenant,
)

NOW = 1_784_061_000_000  # needs 64 bits


def schema_diff(url: str) -> list[Any]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_name": include_name}
            )
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(sync_url(url))
    try:
        names = set(inspect(engine).get_table_names()) - {"alembic_version"}
        return {n for n in names if not is_partition_name(n)}  # the history's days: not models
    finally:
        engine.dispose()


def test_migration_builds_the_models_schema_and_runs_twice(db_url: str) -> None:
    upgrade(db_url)
    assert tables(db_url) == set(Base.metadata.tables)
    assert schema_diff(db_url) == []
    upgrade(db_url)  # already at head: nothing to do, no error
    command.downgrade(alembic_config(db_url), "base")
    assert tables(db_url) == set()
    upgrade(db_url)
    assert tables(db_url) == set(Base.metadata.tables)


@pytest.fixture()
async def db(db_url: str) -> Any:
    await asyncio.to_thread(upgrade, db_url)
    database = Database(db_url)
    yield database
    await database.dispose()


def values_of(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


async def roundtrip(db: Database, *objs: Any) -> None:
    expected = [(type(o), values_of(o)) for o in objs]
    async with db.session() as s, s.begin():
        s.add_all(objs)
    async with db.session() as s:
        for model, want in expected:
            pk = [want[c.key] for c in model.__table__.primary_key.columns]
            got = await s.get(model, pk[0] if len(pk) == 1 else tuple(pk))
            assert got is not None, model
            assert values_of(got) == want, model.__name__


async def test_every_model_round_trips(db: Database) -> None:
    await roundtrip(db, Tenant(id="acme", name="Acme Fleet", created_ms=NOW))
    await roundtrip(
        db,
        ApiKey(
            id="k1",
            tenant_id="acme",
            role="fleet",
            key_hash="a" * 64,
            label="ops",
            created_ms=NOW,
            revoked_ms=None,
        ),
        Device(
            id="bat-1",
            tenant_id="acme",
            transport="openadr",
            kind="battery",
            site_id="s1",
            region="ERCOT-NORTH",
            feeder="F-1",
            vendor="oem",
            lat=32.9,
            lon=-96.8,
            enrolled=True,
            offboarded_ms=None,
            created_ms=NOW,
            updated_ms=NOW + 1,
            capacity_wh=13_500.0,
            max_discharge_w=5_000.0,
            max_charge_w=5_000.0,
            backup_reserve_pct=20.0,
            max_events_per_season=12,
            max_hours_per_season=60.0,
        ),
        Device(
            id="th-1",
            tenant_id="acme",
            transport="mqtt",
            kind="thermostat",
            site_id="s2",
            region="PJM-DOM",
            enrolled=False,
            created_ms=NOW,
            updated_ms=NOW,
            hvac_rated_w=5_600.0,
            comfort_max_c=27.5,
            comfort_min_c=18.0,
            max_offset_c=2.0,
        ),
        TelemetryInterval(
            device_id="bat-1",
            interval_start_ms=NOW,
            samples=5,
            power_w=-1_250.5,
            soc_pct=81.25,
            indoor_c=None,
            setpoint_c=None,
            hvac_w=None,
            outdoor_c=None,
        ),
        CapacityRequest(
            id="cr-000000000001",
            tenant_id="acme",
            region="ERCOT-NORTH",
            mw=12.5,
            start_ms=NOW + 3_600_000,
            end_ms=NOW + 7_200_000,
            firmness=0.9,
            direction="load_reduction",
            max_price_per_mwh=None,
            priority=50,
            status="quoted",
            quoted_mw=10.0,
            quote_expires_ms=NOW + 900_000,
            reason=None,
            idempotency_key="idem-1",
            body_hash="b" * 64,
            performance=None,
            created_ms=NOW,
            updated_ms=NOW,
        ),
        RegionLock(region="ERCOT-NORTH", version=3),
        GridEvent(
            id="ge-000000000001",
            tenant_id="acme",
            region="ERCOT-NORTH",
            mw=4.0,
            start_ms=NOW,
            end_ms=NOW + 3_600_000,
            priority=100,
            preempt=True,
            status="scheduled",
            created_ms=NOW,
            updated_ms=NOW,
            source="openadr",
            source_id="eve-000000000001",
        ),
        Command(
            id="c-1",
            event_id="cr-000000000001",
            device_id="bat-1",
            type="battery_discharge",
            setpoint_w=4_800.0,
            valid_from_ms=NOW,
            valid_until_ms=NOW + 7_200_000,
            randomize_start_s=30,
            status="pending",
            attempts=0,
            created_ms=NOW,
        ),
        SettlementLine(
            event_id="cr-000000000001",
            interval_start_ms=NOW,
            interval_end_ms=NOW + 300_000,
            target_mw=12.5,
            baseline_mw=20.0,
            actual_mw=8.0,
            delivered_mw=12.0,
            method="meter_before_after",
            inputs={"baseline_days": ["2026-07-13"], "raw": [1.5, 2.25], "n": 3},
        ),
    )
    await roundtrip(
        db,
        OpenAdrClient(
            client_id="ven-0000000000000001",
            tenant_id="acme",
            role="ven",
            ven_name="oem-cloud",
            secret_hash="b" * 64,
            created_ms=NOW,
            revoked_ms=None,
        ),
    )
    await roundtrip(
        db,
        OpenAdrToken(
            token_hash="c" * 64,
            client_id="ven-0000000000000001",
            scopes="read_targets write_reports",
            created_ms=NOW,
            expires_ms=NOW + 3_600_000,
        ),
        OpenAdrObject(
            id="ven-000000000001",
            tenant_id="acme",
            object_type="VEN",
            client_id="ven-0000000000000001",
            ven_id="ven-000000000001",
            parent_id="",
            unique_name="oem-cloud",
            state=None,
            body={"venName": "oem-cloud", "attributes": [{"type": "X", "values": [1, "a", None]}]},
            created_ms=NOW,
            modified_ms=NOW + 1,
        ),
    )
    await roundtrip(
        db,
        LedgerEntry(
            request_id="cr-000000000001", interval_start_ms=NOW, region="ERCOT-NORTH", mw=10.0
        ),
    )
    plan = Plan(
        event_id="cr-000000000001",
        version=2,
        created_ms=NOW,
        interval_s=300,
        start_ms=NOW,
        body={"intervals": [{"target_mw": 12.5, "binding": "energy"}], "clusters": {"a": 1.0}},
    )
    async with db.session() as s, s.begin():
        s.add(plan)
    async with db.session() as s:
        got = (await s.execute(select(Plan).where(Plan.event_id == "cr-000000000001"))).scalar_one()
        assert got.id is not None and got.version == 2
        assert got.body == {
            "intervals": [{"target_mw": 12.5, "binding": "energy"}],
            "clusters": {"a": 1.0},
        }


async def test_constraints_hold_on_both_databases(db: Database) -> None:
    async with db.session() as s, s.begin():
        s.add(Tenant(id="acme", name="", created_ms=NOW))
    # A device of a tenant that does not exist.
    with pytest.raises(IntegrityError):
        async with db.session() as s, s.begin():
            s.add(
                Device(
                    id="x",
                    tenant_id="ghost",
                    kind="solar",
                    site_id="s",
                    region="ERCOT-NORTH",
                    enrolled=True,
                    created_ms=NOW,
                    updated_ms=NOW,
                    rated_w=1.0,
                )
            )

    # Two requests of one tenant with the same idempotency key.
    def request(rid: str) -> CapacityRequest:
        return CapacityRequest(
            id=rid,
            tenant_id="acme",
            region="ERCOT-NORTH",
            mw=1.0,
            start_ms=NOW,
            end_ms=NOW + 1,
            status="quoted",
            idempotency_key="same",
            created_ms=NOW,
            updated_ms=NOW,
        )

    async with db.session() as s, s.begin():
        s.add(request("cr-a"))
    with pytest.raises(IntegrityError):
        async with db.session() as s, s.begin():
            s.add(request("cr-b"))
