"""Domain errors as HTTP answers: the one place a :class:`vpp.errors.DomainError` class becomes a
status code. The body is the service's error shape, ``{"detail": "<field>: <message>"}``, plus
``errors`` (and a bulk import's ``bad_rows``) when the error lists its problems one by one."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return JSONResponse(status_code=status_of(exc), content=error_body(exc))


def install(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, domain_error)
