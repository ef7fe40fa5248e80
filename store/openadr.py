"""The OpenADR 3.1 VTN's storage: clients (secrets stored as SHA-256), bearer tokens (SHA-256,
scopes, expiry) and the VTN's objects (one table, JSON bodies, on SQLite and PostgreSQL).

No rules of the VTN live here (who may see or write what: ``dispatch.openadr``); this is rows
in and rows out."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from store.database import Database
from store.keys import ensure_tenant
from store.models import OpenAdrClient, OpenAdrObject, OpenAdrToken
from vpp.errors import Conflict, InvalidInput, NotFound

ROLES = ("bl", "ven")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    tenant_id: str
    role: str  # bl | ven
    ven_name: str | None
    revoked_ms: int | None


def _record(row: OpenAdrClient) -> ClientRecord:
    return ClientRecord(row.client_id, row.tenant_id, row.role, row.ven_name, row.revoked_ms)


async def create_client(
    db: Database, tenant_id: str, role: str, now_ms: int, *, ven_name: str | None = None
) -> tuple[str, str]:
    """A new client of the VTN: (client_id, client_secret); the secret is shown once."""
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
    if not tenant_id or len(tenant_id) > 64:
        raise InvalidInput("tenant", "1 to 64 characters")
    if ven_name is not None and role != "ven":
        raise InvalidInput("ven_name", "only a ven client has a ven name")
    if ven_name is not None and not 1 <= len(ven_name) <= 128:
        raise InvalidInput("ven_name", "1 to 128 characters")
    await ensure_tenant(db, tenant_id, now_ms)
    client_id = f"{role}-{secrets.token_hex(8)}"
    secret = secrets.token_urlsafe(32)
    async with db.session() as s, s.begin():
        s.add(
            OpenAdrClient(
                client_id=client_id,
                tenant_id=tenant_id,
                role=role,
                ven_name=ven_name,
                secret_hash=digest(secret),
                created_ms=now_ms,
            )
        )
    return client_id, secret


async def revoke_client(db: Database, client_id: str, now_ms: int) -> tuple[ClientRecord, bool]:
    """Revoke a client and drop its tokens; (client, changed)."""
    async with db.session() as s, s.begin():
        row = await s.get(OpenAdrClient, client_id, with_for_update=True)
        if row is None:
            raise NotFound("client_id", f"no OpenADR client {client_id!r}")
        changed = row.revoked_ms is None
        if changed:
            row.revoked_ms = now_ms
        await s.execute(delete(OpenAdrToken).where(OpenAdrToken.client_id == client_id))
        return _record(row), changed


async def check_secret(db: Database, client_id: str, secret: str) -> ClientRecord | None:
    """The client if the secret is its own and it is not revoked, else None."""
    async with db.session() as s:
        row = await s.get(OpenAdrClient, client_id)
    if row is None or row.revoked_ms is not None:
        return None
    if not secrets.compare_digest(row.secret_hash, digest(secret)):
        return None
    return _record(row)


async def issue_token(
    db: Database, client_id: str, scopes: Sequence[str], now_ms: int, ttl_s: float
) -> tuple[str, int]:
    """A new bearer token for the client: (token, expires_ms). Expired tokens of the client
    are dropped on the way."""
    token = secrets.token_urlsafe(32)
    expires_ms = now_ms + round(ttl_s * 1000)
    async with db.session() as s, s.begin():
        await s.execute(
            delete(OpenAdrToken).where(
                OpenAdrToken.client_id == client_id, OpenAdrToken.expires_ms <= now_ms
            )
        )
        s.add(
            OpenAdrToken(
                token_hash=digest(token),
                client_id=client_id,
                scopes=" ".join(scopes),
                created_ms=now_ms,
                expires_ms=expires_ms,
            )
        )
    return token, expires_ms


@dataclass(frozen=True)
class TokenRecord:
    client: ClientRecord
    scopes: frozenset[str]
    expires_ms: int


async def find_token(db: Database, token: str) -> TokenRecord | None:
    async with db.session() as s:
        row = (
            await s.execute(
                select(OpenAdrToken, OpenAdrClient)
                .join(OpenAdrClient, OpenAdrClient.client_id == OpenAdrToken.client_id)
                .where(OpenAdrToken.token_hash == digest(token))
            )
        ).first()
    if row is None:
        return None
    tok, client = row
    return TokenRecord(_record(client), frozenset(tok.scopes.split()), int(tok.expires_ms))


async def get_client(db: Database, client_id: str) -> ClientRecord | None:
    async with db.session() as s:
        row = await s.get(OpenAdrClient, client_id)
    return _record(row) if row is not None else None


# --- objects --------------------------------------------------------------------------------------
def new_object_id(object_type: str) -> str:
    return f"{object_type.lower()[:3]}-{secrets.token_hex(6)}"


async def get_object(db: Database, tenant_id: str, object_type: str, oid: str) -> OpenAdrObject:
    async with db.session() as s:
        row = await s.get(OpenAdrObject, oid)
    if row is None or row.tenant_id != tenant_id or row.object_type != object_type:
        raise NotFound("id", f"no {object_type.lower()} {oid!r}")
    return row


async def list_objects(
    db: Database,
    tenant_id: str,
    object_type: str,
    *,
    parent_id: str | None = None,
    ven_ids: Sequence[str] | None = None,
    client_id: str | None = None,
) -> list[OpenAdrObject]:
    """The tenant's objects of a type, oldest first, optionally of one parent, of some VENs or
    of one client."""
    q = select(OpenAdrObject).where(
        OpenAdrObject.tenant_id == tenant_id, OpenAdrObject.object_type == object_type
    )
    if parent_id is not None:
        q = q.where(OpenAdrObject.parent_id == parent_id)
    if ven_ids is not None:
        q = q.where(OpenAdrObject.ven_id.in_(list(ven_ids)))
    if client_id is not None:
        q = q.where(OpenAdrObject.client_id == client_id)
    async with db.session() as s:
        rows = (await s.execute(q.order_by(OpenAdrObject.created_ms, OpenAdrObject.id))).scalars()
        return list(rows.all())


async def find_named(
    db: Database, tenant_id: str, object_type: str, parent_id: str, unique_name: str
) -> OpenAdrObject | None:
    """The object of this type, parent and unique name (its unique key), if any."""
    q = select(OpenAdrObject).where(
        OpenAdrObject.tenant_id == tenant_id,
        OpenAdrObject.object_type == object_type,
        OpenAdrObject.parent_id == parent_id,
        OpenAdrObject.unique_name == unique_name,
    )
    async with db.session() as s:
        return (await s.execute(q)).scalars().first()


def _conflict(object_type: str, name: str | None) -> Conflict:
    field = {"PROGRAM": "programName", "VEN": "venName", "RESOURCE": "resourceName"}.get(
        object_type, "name"
    )
    return Conflict(field, f"a {object_type.lower()} named {name!r} exists already")


async def insert_object(db: Database, row: OpenAdrObject) -> OpenAdrObject:
    """Store a new object; Conflict naming the name field if its unique name is taken."""
    await _check_unique(db, row)
    try:
        async with db.session() as s, s.begin():
            s.add(row)
    except IntegrityError:
        raise _conflict(row.object_type, row.unique_name) from None
    return row


async def _check_unique(db: Database, row: OpenAdrObject, exclude_id: str | None = None) -> None:
    if row.unique_name is None:
        return
    q = select(OpenAdrObject.id).where(
        OpenAdrObject.tenant_id == row.tenant_id,
        OpenAdrObject.object_type == row.object_type,
        OpenAdrObject.parent_id == row.parent_id,
        OpenAdrObject.unique_name == row.unique_name,
    )
    if exclude_id is not None:
        q = q.where(OpenAdrObject.id != exclude_id)
    async with db.session() as s:
        if (await s.execute(q)).first() is not None:
            raise _conflict(row.object_type, row.unique_name)


async def update_object(
    db: Database,
    oid: str,
    body: dict[str, Any],
    now_ms: int,
    *,
    unique_name: str | None = None,
    parent_id: str | None = None,
    state: str | None = None,
) -> OpenAdrObject:
    """Replace an object's body (and its name, parent, state); Conflict if the name is
    taken by another."""
    async with db.session() as s:
        current = await s.get(OpenAdrObject, oid)
    if current is None:
        raise NotFound("id", f"no object {oid!r}")
    probe = OpenAdrObject(
        tenant_id=current.tenant_id,
        object_type=current.object_type,
        parent_id=parent_id if parent_id is not None else current.parent_id,
        unique_name=unique_name,
    )
    await _check_unique(db, probe, exclude_id=oid)
    try:
        async with db.session() as s, s.begin():
            row = await s.get(OpenAdrObject, oid, with_for_update=True)
            if row is None:
                raise NotFound("id", f"no object {oid!r}")
            row.body = body
            row.modified_ms = max(now_ms, row.created_ms)
            row.unique_name = unique_name
            if parent_id is not None:
                row.parent_id = parent_id
            if state is not None:
                row.state = state
    except IntegrityError:
        raise _conflict(current.object_type, unique_name) from None
    return row


async def delete_object(db: Database, oid: str) -> None:
    async with db.session() as s, s.begin():
        await s.execute(delete(OpenAdrObject).where(OpenAdrObject.id == oid))


async def count_children(db: Database, tenant_id: str, object_type: str, parent_id: str) -> int:
    from sqlalchemy import func

    async with db.session() as s:
        n = await s.scalar(
            select(func.count()).where(
                OpenAdrObject.tenant_id == tenant_id,
                OpenAdrObject.object_type == object_type,
                OpenAdrObject.parent_id == parent_id,
            )
        )
    return int(n or 0)
