"""Shared fixtures: a PostgreSQL database per session (and a migrated template to clone per
test), SQLite files, the Redis and MQTT addresses, and factories for Services and an API client.
Where the servers are and how a test builds its Settings: :mod:`tests.helpers.settings`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import psycopg
import pytest

from tests.helpers.mosquitto import MosquittoBroker, mosquitto_available, run_mosquitto
from tests.helpers.settings import MQTT_URL, PG_ADMIN_DSN, REDIS_URL, RUN_ID, make_settings
from vpp.clock import Clock
from vpp.settings import Settings


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (async URL)."""
    name = f"vpp_t_{RUN_ID}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template(pg_url: str) -> Iterator[str]:
    """A migrated database nobody connects to, cloned for each test that needs its own:
    CREATE DATABASE … TEMPLATE copies it in milliseconds instead of re-running migrations."""
    from store.migrate import upgrade

    name = f"vpp_t_{RUN_ID}_tpl"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    upgrade(pg_url.rsplit("/", 1)[0] + "/" + name)
    yield name
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def fresh_pg_url(pg_url: str, pg_template: str) -> Iterator[str]:
    """A migrated database of its own for one test."""
    name = f"vpp_t_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield pg_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite+aiosqlite:///{tmp_path}/vpp.db"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """Runs the test once on SQLite and once on PostgreSQL (an empty database each)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/vpp.db"
    return request.getfixturevalue("fresh_pg_url")


@pytest.fixture()
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture()
def mqtt_url() -> str:
    return MQTT_URL


@pytest.fixture(scope="module")
def mosquitto_broker() -> Iterator[MosquittoBroker]:
    """A private Mosquitto with the project's config and dynamic security, one per test module,
    topic root ``vpp/v1`` (skips when Mosquitto is not installed)."""
    if not mosquitto_available():
        pytest.skip("mosquitto with the dynamic-security plugin is not installed")
    with run_mosquitto() as broker:
        yield broker


@pytest.fixture()
def settings_sqlite(sqlite_url: str) -> Settings:
    return make_settings(sqlite_url)


@pytest.fixture()
def settings_pg(fresh_pg_url: str) -> Settings:
    return make_settings(fresh_pg_url, redis_url=REDIS_URL, mqtt_url=MQTT_URL)


ServicesFactory = Callable[..., Awaitable["Services"]]  # type: ignore[name-defined]  # noqa: F821


@pytest.fixture()
async def services_factory() -> AsyncIterator[ServicesFactory]:
    """``await services_factory(settings, clock=None)``: migrated database, ready Services;
    closed (and Redis keys removed) after the test."""
    from devices.mqtt import InProcessBroker
    from dispatch.services import Services
    from store.migrate import upgrade

    made: list[Services] = []

    async def factory(settings: Settings, clock: Clock | None = None) -> Services:
        import asyncio

        if f"_{RUN_ID}_" not in settings.database_url:  # template clones are migrated already
            await asyncio.to_thread(upgrade, settings.database_url)
        svc = await Services.create(settings, clock=clock or Clock())
        if svc.broker is not None:
            svc.broker = InProcessBroker()  # a broker per test: no cross-test messages
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        flush = getattr(svc.state, "flush_prefix", None)
        try:
            if flush is not None:
                await flush()
        except Exception:
            pass  # the test pointed the store at a server that is not there
        await svc.close()


@pytest.fixture()
async def api_factory(services_factory: ServicesFactory):  # type: ignore[no-untyped-def]
    """``client, keys = await api_factory(settings)``: an httpx client on the ASGI app and a
    function ``await keys(tenant, role)`` that makes API keys."""
    from api.app import create_app
    from store.keys import create_api_key

    clients: list[httpx.AsyncClient] = []

    async def factory(settings: Settings, clock: Clock | None = None, services=None):  # type: ignore[no-untyped-def]
        svc = services or await services_factory(settings, clock)
        app = create_app(services=svc)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        clients.append(client)

        async def make_key(tenant: str, role: str) -> dict[str, str]:
            key = await create_api_key(svc.db, tenant, role, svc.clock.now_ms())
            return {"Authorization": f"Bearer {key}"}

        client.services = svc  # type: ignore[attr-defined]
        return client, make_key

    yield factory
    for c in clients:
        await c.aclose()
