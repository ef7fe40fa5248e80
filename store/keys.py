"""API keys and tenants: keys are stored hashed; a key has one tenant and one role."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from store.database import Database
from store.models import ApiKey, Tenant
from vpp.domain import Role


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
    db: Database, tenant_id: str, role: Role | str, now_ms: int, label: str = ""
) -> str:
    """Create the tenant if needed and a key for it; returns the key (shown once)."""
    role = Role(role)
    if not tenant_id or len(tenant_id) > 64:
        raise ValueError("tenant: 1 to 64 characters")
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
            )
        )
    return key
