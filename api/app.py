"""The FastAPI application: thin routers over the services, plus the background components
(ingest worker, forecaster, event runner) when it runs as ``vpp serve``."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from vpp.clock import Clock
from vpp.services import Services
from vpp.settings import Settings, get_settings

log = logging.getLogger(__name__)

ROUTERS = [
    "api.routers.health",
    "api.routers.devices",
    "api.routers.fleet",
    "api.routers.forecast",
    "api.routers.capacity_requests",
    "api.routers.grid_events",
    "api.routers.events",
    "api.routers.settlement",
    "api.routers.dashboard",
]

# Background components started by `vpp serve`: "module:factory", each factory(services) returns
# an object with async start() and stop().
COMPONENTS = [
    "devices.ingest:IngestWorker",
    "dispatch.runner:EventRunner",
    "dispatch.market:MarketHousekeeper",
]

DESCRIPTION = """
Residential flexibility (batteries, thermostats, solar) sold as firm capacity.

Every `/v1` call needs `Authorization: Bearer <api key>`; a key has one tenant and one role
(`admin`, `operator`, `fleet`, `hyperscaler`). 401 without a valid key, 403 when the role may not
make the call, 404 for another tenant's object exactly as for a missing one. Errors are JSON
`{"detail": …}` naming the offending field. Units: kW for one device, MW for aggregates, RFC 3339
UTC timestamps, ISO 8601 durations.
"""


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def create_app(
    settings: Settings | None = None,
    services: Services | None = None,
    run_components: bool = False,
    clock: Clock | None = None,
) -> FastAPI:
    """``services`` given: the caller owns it (tests). ``run_components``: start ingest and the
    event runner in this process (``vpp serve``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = services is None
        svc = services or await Services.create(settings or get_settings(), clock=clock)
        app.state.services = svc
        started = []
        if run_components:
            for path in COMPONENTS:
                try:
                    factory = _load(path)
                except (ImportError, AttributeError):
                    log.warning("component %s not available", path)
                    continue
                comp = factory(svc)
                await comp.start()
                svc.components[path] = comp
                started.append(path)
        try:
            yield
        finally:
            for path in reversed(started):
                comp = svc.components.pop(path)
                try:
                    await asyncio.wait_for(comp.stop(), 30)
                except Exception:
                    log.exception("stopping %s", path)
            if own:
                await svc.close()

    app = FastAPI(
        title="VPP aggregation service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name each offending field plainly ("body.mw: must be > 0") and keep the detail list.
        errors = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            errors.append({"field": loc, "message": e.get("msg", "invalid"), "type": e.get("type")})
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": message, "errors": errors})

    for path in ROUTERS:
        module = importlib.import_module(path)
        app.include_router(module.router)
    return app
