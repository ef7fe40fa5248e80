"""``vpp serve`` started while one of its dependencies is down (issue 11, item 3: "the process
never exits; everything resumes by itself").

A real ``vpp serve`` process on a private broker, Redis or PostgreSQL that is down when it
starts. Checked as an operator would: the process stays up, ``/healthz`` answers, ``/readyz``
answers 503 naming the dependency; once the dependency is started the same process turns ready
without a restart and runs a grid event (commands published to the emulated batteries and
acknowledged); the log holds no traceback and names the outage in one line, not one per tick."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest

from tests.helpers.eventkit import wait_for
from tests.helpers.mosquitto import mosquitto_available, run_mosquitto
from tests.helpers.replicas import Cluster, cluster, kill_broker, start_broker_again
from tests.helpers.servers import postgres_available, private_postgres, private_redis

N_BATTERIES = 12
MW = 0.03  # 6 of the 12 batteries at their 5 kW

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
]


async def readyz(c: Cluster, port: int) -> tuple[int, dict[str, Any]]:
    """Status and body of ``/readyz`` (0 and {} while nothing answers on the port)."""
    try:
        r = await c.http[port].get("/readyz")
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, dict(r.json())


async def wait_unready_naming(c: Cluster, port: int, dependency: str) -> dict[str, Any]:
    """Wait for ``/readyz`` to answer; it must be a 503 naming ``dependency``."""
    seen: dict[str, Any] = {}

    async def answered() -> bool:
        status, body = await readyz(c, port)
        seen.update(status=status, body=body)
        return status != 0

    assert await wait_for(answered, 40, 0.3), c.tail()
    assert seen["status"] == 503, seen
    body = seen["body"]
    assert body["checks"][dependency] == "unreachable", body
    assert dependency in body["detail"], body
    return dict(body)


async def still_up_and_unready(c: Cluster, port: int, dependency: str) -> None:
    """A few seconds later: the process has not exited and still says what is down."""
    await asyncio.sleep(2.0)
    assert c.procs[port].poll() is None, c.tail()
    assert (await c.http[port].get("/healthz")).status_code == 200
    status, body = await readyz(c, port)
    assert status == 503 and body["checks"][dependency] == "unreachable", body


async def ready_then_event_runs(c: Cluster, port: int) -> None:
    """``/readyz`` turns 200 without a restart; a grid event is then planned, its commands
    published to the batteries and acknowledged."""
    from store.models import Command

    async def ready() -> bool:
        return (await readyz(c, port))[0] == 200

    assert await wait_for(ready, 30, 0.3), c.tail()
    await c.onboard(N_BATTERIES)
    emu = c.emulator
    assert emu is not None
    await c.wait_service_ms(c.clock.now_ms() + 2 * 60_000)  # every battery has reported
    start = (c.clock.now_ms() // 60_000 + 2) * 60_000
    ev = await c.grid_event(port, MW, start, start + 10 * 60_000)

    async def commanded_and_acked() -> bool:
        rows = [r for r in await c.rows(Command, ev) if r.type != "restore"]
        got = {d for d, ids in emu.dispatch_commands(ev).items() if ids}
        return (
            bool(rows)
            and {r.device_id for r in rows} <= got
            and all(r.ack_ms is not None for r in rows)
        )

    assert await wait_for(commanded_and_acked, 30, 0.2), c.tail()


def assert_quiet_log(c: Cluster, outage_line: str) -> None:
    """No traceback, and the outage logged once by the leader lease, not once per renewal."""
    text = c.log.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]
    assert text.count(outage_line) == 1, text[-4000:]


async def test_serve_started_with_the_broker_down(fresh_pg_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with run_mosquitto() as broker:
        kill_broker(broker, None)
        async with cluster(fresh_pg_url, broker, tmp_path) as c:
            port = c.serve()
            await wait_unready_naming(c, port, "broker")
            await still_up_and_unready(c, port, "broker")
            proc = start_broker_again(broker)
            try:
                await ready_then_event_runs(c, port)
            finally:
                kill_broker(broker, proc)
            text = c.log.read_text(errors="replace")
            assert "Traceback" not in text, text[-4000:]
            assert "event runner: connected to the broker" in text, text[-4000:]


async def test_serve_started_with_redis_down(fresh_pg_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with run_mosquitto() as broker, private_redis() as redis:
        redis.kill()
        async with cluster(fresh_pg_url, broker, tmp_path, VPP_REDIS_URL=redis.url) as c:
            port = c.serve()
            body = await wait_unready_naming(c, port, "state_store")
            assert body["replica"]["leader"] is False  # nobody leads without the lease store
            await still_up_and_unready(c, port, "state_store")
            redis.start()  # empty, as after a loss
            await ready_then_event_runs(c, port)
            assert (await c.leaders()) == [port]
            assert_quiet_log(c, "leader lease: state_store unreachable")


@pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL binaries")
async def test_serve_started_with_postgres_down(fresh_pg_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from store.database import Database

    with run_mosquitto() as broker, private_postgres() as pg:
        pg.stop()
        # The cluster's own database stays unused: this process's is the private, unmigrated one.
        async with cluster(fresh_pg_url, broker, tmp_path, VPP_DATABASE_URL=pg.url) as c:
            c.db = Database(pg.url)
            try:
                port = c.serve()
                await wait_unready_naming(c, port, "database")
                await still_up_and_unready(c, port, "database")
                # Any other call: the service's 503 naming the database, never a 500.
                r = await c.http[port].get("/v1/fleet")
                assert r.status_code == 503 and r.headers["retry-after"], r.text
                assert r.json()["detail"].startswith("database:"), r.text
                pg.start()  # migrations run once it answers, then the service starts
                await ready_then_event_runs(c, port)
                text = c.log.read_text(errors="replace")
                assert "Traceback" not in text, text[-4000:]
                assert text.count("vpp serve start: database unreachable") == 1, text[-4000:]
            finally:
                with contextlib.suppress(Exception):
                    await c.db.dispose()
