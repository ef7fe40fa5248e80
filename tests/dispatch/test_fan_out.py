"""A big event's fan-out (EventRunner.fan_out): commands stored in chunks, each chunk published
only once its rows are committed, every row marked sent, the table in memory whole afterwards;
and a failure halfway leaves no unstored command behind to be sent."""

from __future__ import annotations

import orjson
import pytest
from sqlalchemy import select

import dispatch.runner.loop as rmod
from dispatch.runner.commands import PENDING, SENT, CommandBatch
from dispatch.runner.loop import EventRunner
from dispatch.runner.table import Running
from store.models import Command
from tests.dispatch.test_runner import _batch_of, _fake_run
from tests.helpers.settings import make_settings
from vpp.clock import ManualClock
from vpp.domain import CommandStatus


class CheckingClient:
    """Records what is published and, at that moment, which of it is not committed yet."""

    def __init__(self, services) -> None:  # type: ignore[no-untyped-def]
        self.services = services
        self.published: list[str] = []
        self.unstored: list[str] = []

    async def publish_many(self, msgs):  # type: ignore[no-untyped-def]
        ids = [orjson.loads(m[1])["command_id"] for m in msgs]
        async with self.services.db.session() as s:  # its own connection: sees commits only
            q = select(Command.id).where(Command.id.in_(ids))
            stored = set((await s.execute(q)).scalars())
        self.unstored.extend(i for i in ids if i not in stored)
        self.published.extend(ids)
        return len(msgs)


async def _start(runner: EventRunner, batch: CommandBatch, now: int, chunk: int) -> Running:
    """What start_event does after planning: the first chunk stored, the run registered."""
    head = batch.take(0, chunk)
    async with runner.services.db.engine.begin() as conn:
        await runner.store.insert(conn, runner.store.records("ge-x", head, now))
    run = _fake_run(0, now)
    run.table = runner._table("ge-x", head)
    runner._register(run)
    return run


@pytest.mark.parametrize("n", [30, 7, 3])
async def test_each_chunk_is_committed_before_it_is_published(
    fresh_pg_url, services_factory, monkeypatch, n
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(rmod, "STORE_CHUNK", 7)
    clock = ManualClock(1_784_061_000_000)
    svc = await services_factory(make_settings(fresh_pg_url), clock=clock)
    runner = EventRunner(svc)
    assert await runner.leadership.renew()
    client = runner.client = CheckingClient(svc)
    now = clock.now_ms()
    batch = _batch_of(_fake_run(n, now))
    run = await _start(runner, batch, now, 7)
    await runner.fan_out(run, batch.take(7, n), now, None)

    assert client.unstored == []
    assert sorted(client.published) == sorted(batch.ids)  # each once
    t = run.table
    assert t.cmd_id.tolist() == batch.ids and (t.status == SENT).all()
    assert len(t.payload) == n and all(
        runner.by_cmd[c] == ("ge-x", i) for i, c in enumerate(batch.ids)
    )
    async with svc.db.session() as s:
        rows = list((await s.execute(select(Command))).scalars())
    assert len(rows) == n
    assert {r.status for r in rows} == {CommandStatus.sent.value}
    assert {r.attempts for r in rows} == {1} and all(r.sent_ms for r in rows)
    stats = runner.fan_out_stats
    assert stats["publish_s"] > 0 and (stats["store_s"] > 0) == (n > 7)


async def test_a_chunk_that_cannot_be_stored_is_never_sent(
    fresh_pg_url, services_factory, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(rmod, "STORE_CHUNK", 5)
    clock = ManualClock(1_784_061_000_000)
    svc = await services_factory(make_settings(fresh_pg_url), clock=clock)
    runner = EventRunner(svc)
    assert await runner.leadership.renew()
    client = runner.client = CheckingClient(svc)
    now = clock.now_ms()
    batch = _batch_of(_fake_run(20, now))
    run = await _start(runner, batch, now, 5)
    real_insert = runner.store.insert
    calls = {"n": 0}

    async def failing_insert(conn, records):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # the third chunk of the event (the first was stored by _start)
            raise ConnectionError("database went away")
        await real_insert(conn, records)

    monkeypatch.setattr(runner.store, "insert", failing_insert)
    with pytest.raises(ConnectionError):
        await runner.fan_out(run, batch.take(5, 20), now, None)
    assert client.unstored == []
    # The two stored chunks are in memory (and went out); nothing else is, so no later tick
    # publishes a command that has no row.
    assert run.table.cmd_id.tolist() == batch.ids[:10]
    assert sorted(client.published) == sorted(batch.ids[:10])
    await runner.publish_due(run, now)
    assert client.unstored == [] and not (run.table.status == PENDING).any()
