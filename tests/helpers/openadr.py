"""The VTN driven by the real ``openadr3`` client from PyPI: a live uvicorn server on the test's
event loop (the client is synchronous, so tests call it through ``asyncio.to_thread``), and a
response hook that checks every answer against the vendored OpenADR 3.1.0 description.

``openadr3``'s own ``validate=True`` checks nothing (0.5.0 stores the flag and never reads
it), so the check is ours: each response of the VTN is validated with
``api.openadr.schema.response_errors`` against the schema the spec names for that operation
(the object, a list of them, the problem object for an error, the token answer, …)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import httpx
import openadr3
import uvicorn

from api.openadr import schema
from api.openadr.router import PREFIX
from tests.helpers.mosquitto import free_port

_COLLECTIONS = {
    "programs": "program",
    "events": "event",
    "reports": "report",
    "subscriptions": "subscription",
    "vens": "ven",
    "resources": "resource",
}


def schema_for(method: str, path: str, status: int) -> tuple[str, bool] | None:
    """(schema name, is a list) the spec gives this answer, or None for none."""
    if status >= 400:
        return ("problem", False)
    rel = path[len(PREFIX) :] if path.startswith(PREFIX) else path
    parts = [p for p in rel.split("/") if p]
    if rel == "/auth/token":
        return ("clientCredentialResponse", False)
    if rel == "/auth/server":
        return ("authServerInfo", False)
    if rel == "/notifiers":
        return ("notifiersResponse", False)
    if parts and parts[-1] in _COLLECTIONS:
        return (_COLLECTIONS[parts[-1]], method == "GET")
    if len(parts) >= 2 and parts[-2] in _COLLECTIONS:
        return (_COLLECTIONS[parts[-2]], False)
    return None


@dataclass
class SpecCheck:
    """Response hook: every VTN answer is checked; ``checked`` counts them, a failure raises."""

    checked: int = 0
    seen: list[str] = field(default_factory=list)

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        path = response.request.url.path
        if not path.startswith(PREFIX):
            return
        found = schema_for(response.request.method, path, response.status_code)
        if found is None:
            return
        name, many = found
        body = response.json()
        items = body if many else [body]
        assert isinstance(items, list), f"{path}: expected a list, got {body!r}"
        for item in items:
            errors = schema.response_errors(name, item)
            assert not errors, (
                f"{response.request.method} {path} {response.status_code} {name}: {errors}"
            )
        self.checked += 1
        self.seen.append(f"{response.request.method} {path} {response.status_code}")


@dataclass
class LiveVtn:
    base_url: str  # …/openadr3/3.1.0
    check: SpecCheck

    def token(self, client_id: str, secret: str, scopes: list[str] | None = None) -> str:
        """A bearer token the way the client library gets one (GET /auth/server, then the form
        POST to its tokenURL)."""
        return openadr3.fetch_token(self.base_url, client_id, secret, scopes=scopes)

    def client(self, token: str, kind: str = "bl") -> openadr3.OpenADRClient:
        make = openadr3.create_bl_client if kind == "bl" else openadr3.create_ven_client
        spec = str(resources.files("api.openadr.spec") / schema.SPEC_FILE)
        c = make(self.base_url, token, spec_path=spec, validate=True)
        c._http.event_hooks["response"].append(self.check)
        return c


@contextlib.asynccontextmanager
async def live_vtn(app: Any) -> AsyncIterator[LiveVtn]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) on this event loop."""
    async with serve(app) as base:
        yield LiveVtn(base + PREFIX, SpecCheck())


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Any ASGI app served by uvicorn on 127.0.0.1 on this event loop; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def event_body(program_id: str, start: str, values: list[float], *, units: str = "KW",
               duration: str = "PT15M", **extra: Any) -> dict[str, Any]:  # fmt: skip
    """An event of DISPATCH_SETPOINT_RELATIVE intervals, as a utility would send it (with the
    nulls one common client sends where the schema has none)."""
    return {
        "programID": program_id,
        "eventName": "peak shave",
        "intervalPeriod": {"start": start, "duration": duration, "randomizeStart": None},
        "payloadDescriptors": [
            {"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
             "payloadType": "DISPATCH_SETPOINT_RELATIVE", "units": units}
        ],
        "intervals": [
            {"id": i, "intervalPeriod": None,
             "payloads": [{"type": "DISPATCH_SETPOINT_RELATIVE", "values": [v]}]}
            for i, v in enumerate(values)
        ],
        **extra,
    }  # fmt: skip
