"""API keys and tenants: keys are stored hashed; a key has one tenant and one role, may expire,
may be revoked, and may carry its own rate limit. Creating and revoking a key writes its audit
row in the same transaction."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from store import audit
from store.database import Database
from store.models import ApiKey, Tenant
from vpp.domain import AuditAction, Role
from vpp.errors import InvalidInput, NotFound


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(6)
    return key_id, f"vpp_{key_id}_{secrets.token_urlsafe(32)}"


async def ensure_tenant(db: Database, tenant_id: str, now_ms: int) -> None:
    async with db.session() as session, session.begin():
        exists = (await session.execute(select(Tenant.id).where(Tenant.id == tenant_id))).first()
        if not exists:
            session.add(Tenant(id=tenant_id, name=tenant_id, created_ms=now_ms))


async def create_api_key(
    db: Database,
    tenant_id: str,
    role: Role | str,
    now_ms: int,
    label: str = "",
    *,
    expires_ms: int | None = None,
    rate_limit_per_s: float | None = None,
    rate_limit_burst: int | None = None,
    actor: audit.Actor = audit.LOCAL,
) -> str:
    """Create the tenant if needed and a key for it; returns the key (shown once). The key id
    is the part between ``vpp_`` and the next ``_``."""
    role = Role(role)
    if not tenant_id or len(tenant_id) > 64:
        raise ValueError("tenant: 1 to 64 characters")
    if expires_ms is not None and expires_ms <= now_ms:
        raise ValueError("expires: must be in the future")
    if rate_limit_per_s is not None and not rate_limit_per_s > 0:
        raise ValueError("rate_limit_per_s: must be > 0")
    if rate_limit_burst is not None and rate_limit_burst < 1:
        raise ValueError("rate_limit_burst: must be ≥ 1")
    await ensure_tenant(db, tenant_id, now_ms)
    key_id, key = new_key()
    async with db.session() as session, session.begin():
        session.add(
            ApiKey(
                id=key_id,
                tenant_id=tenant_id,
                role=role.value,
                key_hash=hash_key(key),
                label=label,
                created_ms=now_ms,
                expires_ms=expires_ms,
                rate_limit_per_s=rate_limit_per_s,
                rate_limit_burst=rate_limit_burst,
            )
        )
        detail: dict[str, object] = {"tenant": tenant_id, "role": role.value}
        if label:
            detail["label"] = label[:200]
        if expires_ms is not None:
            detail["expires_ms"] = expires_ms
        if rate_limit_per_s is not None or rate_limit_burst is not None:
            detail["rate_limit"] = {"per_s": rate_limit_per_s, "burst": rate_limit_burst}
        audit.add(session, actor, AuditAction.key_created, now_ms, key_id, detail)
    return key


def key_id_of(key: str) -> str | None:
    """The public id inside a key (``vpp_<id>_<secret>``), or None if it has none."""
    parts = key.split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "vpp" and parts[1] else None


async def revoke_api_key(
    db: Database, key_id: str, now_ms: int, actor: audit.Actor = audit.LOCAL
) -> tuple[ApiKey, bool]:
    """Revoke a key by id. Returns (key, changed): revoking a revoked key changes nothing and
    writes no second audit row. NotFound naming ``key_id`` if there is no such key."""
    if not key_id or len(key_id) > 32:
        raise InvalidInput("key_id", "1 to 32 characters")
    async with db.session() as session, session.begin():
        row = await session.get(ApiKey, key_id, with_for_update=True)
        if row is None:
            raise NotFound("key_id", f"no API key {key_id!r}")
        if row.revoked_ms is not None:
            return row, False
        row.revoked_ms = now_ms
        audit.add(
            session,
            actor,
            AuditAction.key_revoked,
            now_ms,
            key_id,
            {"tenant": row.tenant_id, "role": row.role},
        )
    return row, True


async def find_key(db: Database, digest: str) -> ApiKey | None:
    """The key with this hash, revoked and expired ones included (the caller says which)."""
    async with db.session() as session:
        return (
            await session.execute(select(ApiKey).where(ApiKey.key_hash == digest))
        ).scalar_one_or_none()
