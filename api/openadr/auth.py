"""OAuth2 client credentials for the VTN (``POST /auth/token``): ``client_id`` and
``client_secret`` in the form body or in an HTTP Basic header; a bearer token with an expiry
(``VPP_OPENADR_TOKEN_TTL_S``) and the spec's scopes. A client gets the scopes of its role; the
scopes it asks for are trimmed to those (never refused for asking too much; 400
``invalid_scope`` only when none is left)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote

from fastapi import Depends, HTTPException, Request

from api.deps import get_services
from dispatch.openadr.access import Caller
from dispatch.services import Services
from store import openadr as db
from vpp.timefmt import to_rfc3339

ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "bl": ("read_all", "read_targets", "read_ven_objects", "write_programs", "write_events",
           "write_subscriptions", "write_vens"),
    "ven": ("read_targets", "read_ven_objects", "write_reports", "write_subscriptions",
            "write_vens"),
}  # fmt: skip
# read_all reads everything the narrower read scopes do.
READ_TARGETS = ("read_targets", "read_all")
READ_VEN_OBJECTS = ("read_ven_objects", "read_all")


def granted(role: str, asked: str | None) -> list[str]:
    allowed = ROLE_SCOPES[role]
    if not asked or not asked.strip():
        return list(allowed)
    wanted = asked.split()
    return [s for s in allowed if s in wanted]


class TokenError(Exception):
    """An RFC 6749 error of the token endpoint."""

    def __init__(self, status: int, error: str, description: str) -> None:
        self.status, self.error, self.description = status, error, description
        super().__init__(description)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise TokenError(
            401, "invalid_client", "the Basic header is not base64 of id:secret"
        ) from None
    client_id, sep, secret = raw.partition(":")
    if not sep:
        raise TokenError(401, "invalid_client", "the Basic header is not base64 of id:secret")
    return unquote(client_id), unquote(secret)


async def issue(
    services: Services, form: dict[str, str], authorization: str | None
) -> dict[str, Any]:
    """The token answer, or TokenError."""
    grant = form.get("grant_type")
    if grant is None:
        raise TokenError(400, "invalid_request", "grant_type: missing")
    if grant != "client_credentials":
        raise TokenError(
            400, "unsupported_grant_type", f"grant_type: {grant!r} is not client_credentials"
        )
    basic = basic_credentials(authorization)
    client_id, secret = (
        basic if basic is not None else (form.get("client_id"), form.get("client_secret"))
    )
    if not client_id or not secret:
        raise TokenError(400, "invalid_request", "client_id and client_secret: missing")
    client = await db.check_secret(services.db, client_id, secret)
    if client is None:
        raise TokenError(401, "invalid_client", "unknown client, wrong secret or revoked client")
    scopes = granted(client.role, form.get("scope"))
    if not scopes:
        raise TokenError(
            400, "invalid_scope", f"none of the scopes asked is allowed to a {client.role} client"
        )
    ttl_s = services.settings.openadr_token_ttl_s
    token, _ = await db.issue_token(
        services.db, client.client_id, scopes, services.clock.now_ms(), ttl_s
    )
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": int(ttl_s),
        "scope": " ".join(scopes),
    }


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


async def current_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    header = request.headers.get("authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing bearer token: send Authorization: Bearer <access_token>")
    record = await db.find_token(services.db, token.strip())
    if record is None:
        raise _unauthorized("invalid bearer token")
    if record.client.revoked_ms is not None:
        when = to_rfc3339(record.client.revoked_ms)
        raise _unauthorized(f"client {record.client.client_id} was revoked at {when}")
    if services.clock.now_ms() >= record.expires_ms:
        raise _unauthorized(f"bearer token expired at {to_rfc3339(record.expires_ms)}")
    c = record.client
    return Caller(c.client_id, c.tenant_id, c.role, c.ven_name, record.scopes)


def needs(*scopes: str) -> Callable[..., Coroutine[Any, Any, Caller]]:
    """Dependency: a live token holding one of ``scopes`` (401, then 403 naming them)."""

    async def dependency(caller: Caller = Depends(current_caller)) -> Caller:
        if not caller.scopes & set(scopes):
            raise HTTPException(
                403,
                f"scope: this call needs {' or '.join(scopes)}; the token has "
                f"{' '.join(sorted(caller.scopes)) or 'none'}",
            )
        return caller

    return dependency
