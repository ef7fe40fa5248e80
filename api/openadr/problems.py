"""Errors of the VTN as the spec's problem object (``{"type", "title", "status", "detail"}``,
``application/problem+json`` is not asked: the spec declares ``application/json``).

Every route of the VTN is a :class:`ProblemRoute`: a domain error, an HTTP error, a request the
framework could not read and a lost dependency each become a problem with its status
(InvalidInput 400, NotFound 404, Conflict 409, Forbidden 403, Unavailable 503)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from devices.outages import as_unavailable
from vpp.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound, Unavailable

log = logging.getLogger(__name__)

STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidInput, 400),
    (NotFound, 404),
    (Conflict, 409),
    (Forbidden, 403),
    (Unavailable, 503),
)


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(status_code=status, content=body, headers=headers)


def domain_problem(exc: DomainError) -> JSONResponse:
    status = next((code for cls, code in STATUS if isinstance(exc, cls)), 400)
    headers = {"Retry-After": str(int(exc.retry_after_s))} if isinstance(exc, Unavailable) else None
    return problem(status, exc.detail, headers)


class ProblemRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except DomainError as exc:
                return domain_problem(exc)
            except HTTPException as exc:
                return problem(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)
            except RequestValidationError as exc:
                parts = []
                for e in exc.errors():
                    loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
                    parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
                return problem(400, "; ".join(parts) or "invalid request")
            except Exception as exc:
                unavailable = as_unavailable(exc)
                if unavailable is None:
                    raise
                log.warning("%s %s: %s unavailable (%r)", request.method, request.url.path,
                            unavailable.dependency, exc)  # fmt: skip
                return domain_problem(unavailable)

        return route
