"""The FastAPI application: thin routers over the services, plus the background components
(ingest worker, forecaster, event runner) when it runs as ``vpp serve``."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import errors
from api.openadr import router as openadr
from api.openadr.problems import problem as openadr_problem
from api.routers import (
    audit,
    capacity_requests,
    dashboard,
    devices,
    events,
    fleet,
    forecast,
    grid_events,
    health,
    regions,
    settlement,
)
from dispatch.services import Services
from vpp.clock import Clock
from vpp.settings import Settings, get_settings

log = logging.getLogger(__name__)

ROUTERS = [
    health.router,
    devices.router,
    fleet.router,
    regions.router,
    forecast.router,
    capacity_requests.router,
    grid_events.router,
    events.router,
    settlement.router,
    audit.router,
    dashboard.router,
    openadr.router,
]

DESCRIPTION = """
Residential flexibility (batteries, thermostats, solar) sold as firm capacity.

Every `/v1` call needs `Authorization: Bearer <api key>`; a key has one tenant and one role
(`admin`, `operator`, `fleet`, `hyperscaler`). 401 without a valid key (unknown, revoked or
expired), 403 when the role may not make the call, 429 with `Retry-After` when the key is over its
rate limit, 404 for another tenant's object exactly as for a missing one. Errors are JSON
`{"detail": …}` naming the offending field; a dependency that is down (database, state store,
broker) answers 503 naming it, with `Retry-After`. Units: kW for one device, MW for aggregates,
RFC 3339 UTC timestamps, ISO 8601 durations.
"""


def create_app(
    settings: Settings | None = None,
    services: Services | None = None,
    run_background: bool = False,
    clock: Clock | None = None,
) -> FastAPI:
    """``services`` given: the caller owns it (tests). ``run_background``: start ingest, the
    event runner, quote housekeeping and the calibrator in this process (``vpp serve``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = services is None
        svc = services or await Services.create(settings or get_settings(), clock=clock)
        app.state.services = svc
        if run_background:
            await svc.start_background()
        try:
            yield
        finally:
            if run_background:
                await svc.stop_background()
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if request.url.path.startswith(openadr.PREFIX + "/"):
            # The VTN answers the spec's problem object, for a path or method it lacks too.
            headers = dict(exc.headers or {})
            if exc.status_code == 405:
                headers["Allow"] = ", ".join(_route_methods(openadr.router, request.url.path))
            return openadr_problem(exc.status_code, str(exc.detail), headers)
        if exc.status_code == 405:
            # Starlette names only the methods of the first route matching the path; list every
            # method the path has (GET and POST /v1/devices are two routes).
            allowed = _allowed_methods(app, request)
            if allowed:
                return JSONResponse(
                    status_code=405,
                    content={"detail": f"method: {request.method} not allowed here"},
                    headers={"Allow": ", ".join(allowed)},
                )
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
            # FastAPI's answer to a body that is not UTF-8: the service's 422 naming the body,
            # as for any other unreadable JSON.
            return JSONResponse(
                status_code=422,
                content={
                    "detail": "body: not valid JSON (not UTF-8 text)",
                    "errors": [{"field": "body", "message": "not valid JSON (not UTF-8 text)"}],
                },
            )
        return await http_exception_handler(request, exc)

    errors.install(app)

    for router in ROUTERS:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods the OpenAPI document lists for the request's path."""
    patterns: list[tuple[re.Pattern[str], list[str]]] | None = getattr(
        app.state, "allow_patterns", None
    )
    if patterns is None:
        patterns = [
            (
                re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$"),
                sorted(m.upper() for m in item if m in _HTTP_METHODS),
            )
            for path, item in app.openapi().get("paths", {}).items()
        ]
        app.state.allow_patterns = patterns
    path = request.url.path
    # A literal path wins over a template (POST /v1/devices/bulk, not /v1/devices/{device_id}).
    literal = [listed for pattern, listed in patterns if pattern.pattern == _literal(path)]
    matched = literal or [listed for pattern, listed in patterns if pattern.match(path)]
    return sorted({m for listed in matched for m in listed})


def _route_methods(router: Any, path: str) -> list[str]:
    """The methods of the router's routes whose path matches (the VTN's routes are not in
    /openapi.json)."""
    found: set[str] = set()
    for route in router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            found.update(getattr(route, "methods", None) or ())
    return sorted(found - {"HEAD"})


def _literal(path: str) -> str:
    return "^" + re.escape(path) + "$"


_BODY_PARSE_ERROR = "There was an error parsing the body"
_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


# --- OpenAPI: one error shape, every error an operation can answer declared -----------------
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "type": "string",
            "description": "What is wrong, naming each offending field (`field: message; …`).",
        },
        "errors": {
            "type": "array",
            "description": "Every problem found: `field`, `message` and, in a bulk import, the "
            "row `index`.",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {
                    "index": {"type": ["integer", "null"], "description": "Row (bulk import)."},
                    "field": {"type": "string", "description": "The offending field."},
                    "message": {"type": "string", "description": "What is wrong with it."},
                    "type": {"type": ["string", "null"], "description": "Error code."},
                },
            },
        },
        "bad_rows": {
            "type": ["integer", "null"],
            "description": "Bulk import: how many rows are bad.",
        },
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_STANDARD = {
    "401": "no valid API key (`Authorization: Bearer <key>` missing, unknown or revoked)",
    "403": "the key's role may not do this",
    "404": "no such object for this key (another tenant's looks the same as a missing one)",
    "422": "a parameter or body field is invalid; `detail` names it",
    "429": "the key is over its rate limit; `Retry-After` says in how many seconds to retry",
    "503": "a dependency is down (`database`, `state_store` or `broker`: `detail` names it); "
    "try again after `Retry-After` seconds",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}
# Operations any role may call: they never answer 403.
ANY_ROLE = {("get", "/v1/fleet"), ("get", "/v1/forecast")}


def document_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """Every error answer in the document gets the one error shape the service sends
    (``{"detail": "field: message", "errors": [...]}``, never FastAPI's list-shaped
    ``HTTPValidationError``), and every /v1 operation declares the errors it can answer: 401 and
    403 (role rules), 404 when it names an object by id, 422 when it takes input."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            if path.startswith("/v1/"):
                wanted = ["401"]
                if (method, path) not in ANY_ROLE:
                    wanted.append("403")
                if "{" in path:
                    wanted.append("404")
                if op.get("parameters") or op.get("requestBody"):
                    wanted.append("422")
                wanted.append("429")
                wanted.append("503")
                for code in wanted:
                    responses.setdefault(code, {"description": _STANDARD[code]})
            if "503" in responses:
                responses["503"].setdefault("headers", _RETRY_AFTER)
            for code, resp in responses.items():
                if not str(code).startswith(("4", "5")):
                    continue
                content = resp.setdefault("content", {})
                body = content.get("application/json")
                schema = (body or {}).get("schema", {})
                if body is None or not schema or "HTTPValidationError" in str(schema.get("$ref")):
                    content["application/json"] = {"schema": _ERROR_REF}
    return doc
