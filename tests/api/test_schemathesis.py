"""Schemathesis over every /v1 operation of the OpenAPI document: whatever a caller sends, the
service answers without a 5xx, with a status code and body the document declares, and every error
is JSON ``{"detail": …}``.

Schemathesis calls the ASGI app in process, on one event loop of its own (a blocking portal
thread). The services (SQLite + in-process broker and state store, as ``api_factory`` builds them)
must live on that loop, so the app's lifespan makes them there, seeds a few devices and makes the
API keys.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python import asgi as st_asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from store.keys import create_api_key
from tests.helpers.settings import make_settings
from vpp.clock import Clock
from vpp.settings import Settings

KEYS: dict[str, str] = {}
_STATE: dict[str, Any] = {}

SEED_DEVICES = [
    {
        "id": "st-bat-1",
        "kind": "battery",
        "site_id": "site-1",
        "region": "ERCOT-NORTH",
        "capacity_wh": 13500,
        "max_discharge_w": 5000,
        "max_charge_w": 5000,
    },
    {
        "id": "st-pv-1",
        "kind": "solar",
        "site_id": "site-1",
        "region": "ERCOT-NORTH",
        "rated_w": 7600,
    },
    {
        "id": "st-tstat-1",
        "kind": "thermostat",
        "site_id": "site-2",
        "region": "CAISO-SP15",
        "hvac_rated_w": 3500,
        "comfort_max_c": 26,
        "comfort_min_c": 19,
    },
]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Builds the services on the loop that serves the requests, as ``services_factory`` does.

    Schemathesis ends the app's lifespan after each operation's test and starts it again for the
    next; the services (and the seeded devices and keys) are made once and kept until the module
    fixture's teardown sets ``closing``."""
    svc = _STATE.get("services")
    if svc is None:
        svc = await _build_services(app)
    app.state.services = svc
    try:
        yield
    finally:
        if _STATE.get("closing"):
            _STATE.pop("services", None)
            await svc.close()


async def _build_services(app: FastAPI) -> Any:
    import httpx

    from devices.mqtt import InProcessBroker
    from dispatch.services import Services
    from store.migrate import upgrade

    test_settings: Settings = _STATE["settings"]
    await asyncio.to_thread(upgrade, test_settings.database_url)
    svc = await Services.create(test_settings, clock=Clock())
    if svc.broker is not None:
        svc.broker = InProcessBroker()
    _STATE["services"] = app.state.services = svc
    now = svc.clock.now_ms()
    KEYS["admin"] = await create_api_key(svc.db, "st-admin", "admin", now)
    KEYS["hyperscaler"] = await create_api_key(svc.db, "st-buyer", "hyperscaler", now)
    # A few real devices so the read endpoints have something to return.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            "/v1/devices/bulk",
            json=SEED_DEVICES,
            headers={"Authorization": f"Bearer {KEYS['admin']}"},
        )
        assert r.status_code == 201, r.text
    return svc


def _make_app() -> FastAPI:
    app = create_app(settings=make_settings("sqlite+aiosqlite://"))
    app.router.lifespan_context = _lifespan
    return app


APP = _make_app()
_ASGI_APP: Any = APP  # schemathesis types an ASGI app more narrowly than FastAPI declares itself
# The document is taken from the app object itself (no request, so nothing starts at import).
_loaded = schemathesis.openapi.from_dict(APP.openapi())
_loaded.app = APP  # calls (and the checks' own probes, e.g. without a key) go to the app in process
# Every /v1 operation; the service endpoints (/healthz, /readyz, /metrics, the dashboard) take no
# input and have their own tests in test_health.py / test_dashboard.py.
schema = _loaded.include(path_regex=r"^/v1/")


@pytest.fixture(scope="module")
def live_app() -> Iterator[FastAPI]:
    with tempfile.TemporaryDirectory() as tmp:
        _STATE["settings"] = make_settings(f"sqlite+aiosqlite:///{Path(tmp) / 'vpp.db'}")
        with st_asgi.get_client(_ASGI_APP):  # runs the lifespan on schemathesis' event loop
            pass
        try:
            yield APP
        finally:
            _STATE["closing"] = True
            with st_asgi.get_client(
                _ASGI_APP
            ):  # (re)start it so that ending it closes the services
                pass
            st_asgi.shutdown_lifespans()
            _STATE.clear()
            KEYS.clear()


@schemathesis.check
def errors_are_json_with_detail(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx body is a JSON object with a non-empty ``detail``."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except Exception as exc:
        raise AssertionError(
            f"{response.status_code} body is not JSON: {response.text[:200]!r}"
        ) from exc
    assert isinstance(body, dict) and body.get("detail"), (
        f"{response.status_code} body has no 'detail': {response.text[:200]!r}"
    )
    return None


def _auth_for(case: Any) -> dict[str, str]:
    """A valid key (hyperscaler for capacity requests, admin elsewhere), unless schemathesis made
    the headers invalid on purpose: then its missing or mangled Authorization stays as it is."""
    meta = getattr(case, "meta", None)
    headers = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    if headers is not None and headers.mode.is_negative:
        return {}
    capacity = case.path.startswith("/v1/capacity-requests")
    return {"Authorization": f"Bearer {KEYS['hyperscaler' if capacity else 'admin']}"}


@schema.parametrize()
@settings(
    # 25 per operation keeps the run to about half a minute; raise it for a deeper hunt.
    max_examples=int(os.environ.get("VPP_SCHEMATHESIS_EXAMPLES", "25")),
    # Deterministic by default; VPP_SCHEMATHESIS_RANDOM=1 draws new inputs on each run.
    derandomize=not os.environ.get("VPP_SCHEMATHESIS_RANDOM"),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_v1_operations_conform(case: Any, live_app: FastAPI) -> None:
    case.call_and_validate(
        headers=_auth_for(case),
        additional_checks=[errors_are_json_with_detail],
        # positive_data_acceptance expects every schema-valid request to succeed; the contract
        # has rules JSON Schema cannot state (a window in the future and within the horizon,
        # comfort_min_c below comfort_max_c, a region this service sells in), which are
        # answered 422 naming the field, and errors_are_json_with_detail checks that answer.
        excluded_checks=[positive_data_acceptance],
    )
