"""A lost dependency is one log line per outage in the background loops, not a traceback per
tick; a bug still logs its traceback (issue 11, item 3)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.exceptions as redis_errors

from devices.outage_log import OutageLog
from dispatch.runner.loop import EventRunner
from tests.helpers.eventkit import wait_for
from tests.helpers.servers import private_redis
from tests.helpers.settings import make_settings
from vpp.clock import Clock


def test_an_outage_is_one_line_and_its_end_another(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.outage")
    outages = OutageLog(log, "job")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(50):  # fifty failed ticks of one outage
            assert outages.failed(redis_errors.ConnectionError("Connection refused"))
        outages.recovered()
        outages.recovered()  # nothing open: nothing logged
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("job: state_store unreachable (ConnectionError: Connection refused")
    assert lines[1].startswith("job: state_store back after ")
    assert all(r.exc_info is None for r in caplog.records)


def test_a_bug_is_no_outage() -> None:
    outages = OutageLog(logging.getLogger("test.outage"), "job")
    assert not outages.failed(KeyError("plan"))
    assert not outages.failed(OSError("raised in the job's own code"))
    assert outages.outages == 0
    # A call the caller knows went to the state store and timed out counts as its outage.
    assert outages.failed(TimeoutError(), "state_store") and outages.outages == 1


async def test_runner_and_lease_log_a_redis_outage_once(
    sqlite_url, services_factory, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Redis killed under a leading runner ticking every 80 ms: one line from the runner and one
    from the lease while it is down, no traceback; once it is back the runner leads again and
    each says the outage ended."""
    with private_redis() as r:
        settings = make_settings(sqlite_url, redis_url=r.url, time_scale=60.0, leader_lease_s=2.0)
        svc = await services_factory(settings, clock=Clock(60.0))
        runner = EventRunner(svc)
        with caplog.at_level(logging.INFO, logger="dispatch"):
            await runner.start()
            try:
                assert await wait_for(lambda: runner.is_leader, 10, 0.05)
                ticks = runner.ticks
                r.kill()
                await asyncio.sleep(3.0)  # its lease lapses after 1.6 s; renewals fail on
                assert runner.ticks > ticks + 10  # it kept ticking all along
                assert not runner.is_leader
                r.start()  # an empty Redis: the lease is taken again
                assert await wait_for(lambda: runner.is_leader, 10, 0.05)
                await asyncio.sleep(0.5)  # a few ticks as leader again
            finally:
                await runner.stop()
    records = [rec for rec in caplog.records if rec.name.startswith("dispatch")]
    messages = [rec.getMessage() for rec in records]
    assert not [rec for rec in records if rec.exc_info], messages
    down = [m for m in messages if "state_store unreachable" in m]
    assert sorted(m.split(":")[0] for m in down) == ["event runner", "leader lease"], messages
    back = [m.split(":")[0] for m in messages if "state_store back after" in m]
    assert sorted(back) == ["event runner", "leader lease"], messages
