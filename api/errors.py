"""Domain errors as HTTP answers: the one place a :class:`vpp.errors.DomainError` class becomes a
status code. The body is the service's error shape, ``{"detail": "<field>: <message>"}``, plus
``errors`` (and a bulk import's ``bad_rows``) when the error lists its problems one by one.

A lost dependency is never a 500: the connection failures of the database, the state store and
the broker, wherever they surface, become :class:`vpp.errors.Unavailable` here
(``devices.outages``) and answer ``503`` naming the dependency, with ``Retry-After``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from devices.outages import OUTAGE_TYPES, as_unavailable
from vpp.errors import (
    Conflict,
    DomainError,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unavailable,
)

# Most specific first; a bare DomainError is a bad request.
STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidInput, 422),
    (NotFound, 404),
    (Conflict, 409),
    (Forbidden, 403),
    (Unavailable, 503),
)
DEFAULT_STATUS = 400


def status_of(exc: DomainError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return DEFAULT_STATUS


def field_error_doc(e: FieldError) -> dict[str, Any]:
    out: dict[str, Any] = {"field": e.field, "message": e.message}
    if e.index is not None:
        out = {"index": e.index, **out}
    return out


def error_body(exc: DomainError) -> dict[str, Any]:
    if not exc.errors:
        return {"detail": exc.detail}
    out: dict[str, Any] = {"detail": exc.detail, "errors": [field_error_doc(e) for e in exc.errors]}
    rows = {e.index for e in exc.errors if e.index is not None}
    if rows:
        out["bad_rows"] = len(rows)
    return out


log = logging.getLogger(__name__)


def headers_of(exc: DomainError) -> dict[str, str] | None:
    if isinstance(exc, Unavailable):
        return {"Retry-After": str(int(exc.retry_after_s))}
    return None


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return JSONResponse(
        status_code=status_of(exc), content=error_body(exc), headers=headers_of(exc)
    )


async def outage_error(request: Request, exc: Exception) -> JSONResponse:
    """A driver's connection failure: 503 naming the dependency; anything else goes on up
    (a 500: a bug must stay visible)."""
    unavailable = as_unavailable(exc)
    if unavailable is None:
        raise exc
    where = f"{request.method} {request.url.path}"
    log.warning("%s: %s unavailable (%r)", where, unavailable.dependency, exc)
    return await domain_error(request, unavailable)


def install(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, domain_error)
    for cls in OUTAGE_TYPES:
        app.add_exception_handler(cls, outage_error)
