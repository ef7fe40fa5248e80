"""Schemathesis over the VTN's own OpenAPI: the vendored OpenADR 3.1.0 description (the operations
the VTN implements; the MQTT topic paths, which answer 501, are left out), served under
``/openadr3/3.1.0``. Whatever a client sends, the VTN answers without a 5xx, with a status and a
body the description declares, and every error is the spec's problem object with its status.

Where 3.1.0 leaves out an answer every secured operation can give (401 without a valid token
on ``PUT /programs/{id}``, 409 on ``DELETE /programs/{id}`` while events use it and on ``POST
/vens`` for a venName taken), the test adds it to its copy of the description, and marks every
optional field nullable (the VTN takes null for one, as real clients send it).
``api.openadr.schema`` also patches the contradictory objectType of ven and resource (the
issue's conventions)."""

from __future__ import annotations

import asyncio
import copy
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
from api.openadr.router import PREFIX
from api.openadr.schema import openapi
from store.openadr import create_client, issue_token
from tests.helpers.settings import make_settings
from vpp.clock import Clock

TOKENS: dict[str, str] = {}
_STATE: dict[str, Any] = {}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc = _STATE.get("services")
    if svc is None:
        svc = await _build_services()
    app.state.services = svc
    try:
        yield
    finally:
        if _STATE.get("closing"):
            _STATE.pop("services", None)
            await svc.close()


async def _build_services() -> Any:
    from dispatch.services import Services
    from store.migrate import upgrade

    s = _STATE["settings"]
    await asyncio.to_thread(upgrade, s.database_url)
    svc = await Services.create(s, clock=Clock())
    _STATE["services"] = svc
    now = svc.clock.now_ms()
    for role in ("bl", "ven"):
        cid, _ = await create_client(svc.db, "st-grid", role, now)
        from api.openadr.auth import ROLE_SCOPES

        TOKENS[role], _ = await issue_token(svc.db, cid, ROLE_SCOPES[role], now, 86_400)
    return svc


def _description() -> dict[str, Any]:
    doc = copy.deepcopy(openapi())
    doc["servers"] = [{"url": PREFIX}]
    doc["paths"] = {p: v for p, v in doc["paths"].items() if not p.startswith("/notifiers/mqtt")}
    unauthorized = {"$ref": "#/components/responses/unauthorized"}
    for item in doc["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and "responses" in op and op.get("security"):
                op["responses"].setdefault("401", unauthorized)
    conflict = {"$ref": "#/components/responses/conflict"}
    doc["paths"]["/programs/{programID}"]["delete"]["responses"].setdefault("409", conflict)
    doc["paths"]["/vens"]["post"]["responses"].setdefault("409", conflict)
    # The VTN takes null for every optional field (liberal, as real clients send it).
    _nullable_optionals(doc)
    return doc


def _nullable_optionals(node: Any) -> None:
    if isinstance(node, list):
        for n in node:
            _nullable_optionals(n)
        return
    if not isinstance(node, dict):
        return
    props = node.get("properties")
    if isinstance(props, dict):
        required = set(node.get("required", []))
        for name, prop in list(props.items()):
            if name in required or not isinstance(prop, dict):
                continue
            if "$ref" in prop:
                props[name] = {"allOf": [prop], "nullable": True}
            else:
                prop["nullable"] = True
    for value in node.values():
        _nullable_optionals(value)


def _make_app() -> FastAPI:
    app = create_app(settings=make_settings("sqlite+aiosqlite://"))
    app.router.lifespan_context = _lifespan
    return app


APP = _make_app()
_ASGI_APP: Any = APP
schema = schemathesis.openapi.from_dict(_description())
schema.app = APP


@pytest.fixture(scope="module")
def live_app() -> Iterator[FastAPI]:
    with tempfile.TemporaryDirectory() as tmp:
        _STATE["settings"] = make_settings(f"sqlite+aiosqlite:///{Path(tmp) / 'vpp.db'}")
        with st_asgi.get_client(_ASGI_APP):
            pass
        try:
            yield APP
        finally:
            _STATE["closing"] = True
            with st_asgi.get_client(_ASGI_APP):
                pass
            st_asgi.shutdown_lifespans()
            _STATE.clear()
            TOKENS.clear()


# Passed to this test only: @schemathesis.check would register it for every schemathesis test
# of the session, /v1's too, whose errors are not OpenADR problem objects.
def errors_are_problems(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx body is the spec's problem object carrying the response's status."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and body.get("detail"), response.text[:200]
    assert body.get("status") == response.status_code, response.text[:200]
    return None


def _auth_for(case: Any) -> dict[str, str]:
    meta = getattr(case, "meta", None)
    headers = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    if headers is not None and headers.mode.is_negative:
        return {}
    if case.path.startswith("/auth/"):
        return {}
    role = "ven" if case.path.startswith("/reports") and case.method != "GET" else "bl"
    return {"Authorization": f"Bearer {TOKENS[role]}"}


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("VPP_SCHEMATHESIS_EXAMPLES", "15")),
    derandomize=not os.environ.get("VPP_SCHEMATHESIS_RANDOM"),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_vtn_operations_conform(case: Any, live_app: FastAPI) -> None:
    case.call_and_validate(
        headers=_auth_for(case),
        additional_checks=[errors_are_problems],
        # A schema-valid body may still be refused (a program naming no region the service
        # sells in, an event of an unknown program): 400 naming the field, checked above.
        excluded_checks=[positive_data_acceptance],
    )
