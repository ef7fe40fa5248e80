"""Webhooks of the VTN's subscriptions: on every create, update and delete of an object, each
subscription of the tenant whose ``objectOperations`` name that object type and operation, and
whose client may see the object, gets a POST of the spec's notification to its ``callbackUrl``
(``Authorization: Bearer <bearerToken>`` when it gave one). Sent in the background: a failure
is logged and counted, never a failed request. Callback URLs at private, loopback or
link-local addresses are refused unless ``VPP_OPENADR_WEBHOOK_PRIVATE`` is true."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

from devices.edges import Edges
from dispatch.openadr import access
from store import openadr as db
from store.models import OpenAdrObject
from vpp.errors import InvalidInput

log = logging.getLogger(__name__)


def _private(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


async def check_callback_url(url: Any, field: str, *, allow_private: bool) -> None:
    """InvalidInput naming the field unless ``url`` is an http(s) URL whose host resolves only
    to public addresses (any address when ``allow_private``)."""
    if not isinstance(url, str):
        raise InvalidInput(field, "must be a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(field, f"{url!r} is not an http(s) URL")
    if allow_private:
        return
    host = parts.hostname
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        except (OSError, UnicodeError):
            raise InvalidInput(field, f"host {host!r} does not resolve") from None
        addresses = [
            str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)
        ]
    if not addresses or any(_private(a) for a in addresses):
        raise InvalidInput(
            field,
            f"{host!r} is a private, loopback or link-local address: the VTN does not call "
            "those back (VPP_OPENADR_WEBHOOK_PRIVATE=true allows them)",
        )


class Webhooks:
    """Sends the notifications of one process, each in a task of its own."""

    def __init__(self, services: Edges) -> None:
        self.services = services
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.sent = 0
        self.failed = 0

    def emit(self, row: OpenAdrObject, operation: str, doc: dict[str, Any]) -> None:
        """Notify the subscribers of this change, in the background."""
        try:
            task = asyncio.get_running_loop().create_task(self._notify(row, operation, doc))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the notifications under way (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        await self.drain(2.0)
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _notify(self, row: OpenAdrObject, operation: str, doc: dict[str, Any]) -> None:
        try:
            subs = await db.list_objects(self.services.db, row.tenant_id, access.SUBSCRIPTION)
            calls: list[tuple[str, str | None]] = []
            for sub in subs:
                if sub.id == row.id and operation == "DELETE":
                    continue
                targets = _wanted(sub.body, row, operation, doc)
                if not targets:
                    continue
                client = await db.get_client(self.services.db, str(sub.client_id))
                if client is None or client.revoked_ms is not None:
                    continue
                owner = access.Caller(
                    client.client_id, client.tenant_id, client.role, client.ven_name, frozenset()
                )
                if not access.sees(owner, await access.mine(self.services.db, owner), row):
                    continue
                calls.extend(targets)
            if not calls:
                return
            note = {
                "objectType": row.object_type,
                "operation": operation,
                "object": doc,
                "targets": doc.get("targets") if isinstance(doc.get("targets"), list) else None,
            }
            await asyncio.gather(*(self._post(url, token, note) for url, token in calls))
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed += 1
            log.exception("openadr webhooks for %s %s", row.object_type, row.id)

    async def _post(self, url: str, token: str | None, note: dict[str, Any]) -> None:
        settings = self.services.settings
        try:
            await check_callback_url(
                url, "callbackUrl", allow_private=settings.openadr_webhook_private
            )
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=settings.openadr_webhook_timeout_s)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await self._client.post(url, json=note, headers=headers)
            if resp.status_code >= 300:
                raise RuntimeError(f"answered {resp.status_code}")
            self.sent += 1
        except Exception as exc:
            self.failed += 1
            log.warning("openadr webhook %s: %s", url, exc)


def _wanted(
    sub: dict[str, Any], row: OpenAdrObject, operation: str, doc: dict[str, Any]
) -> list[tuple[str, str | None]]:
    """The (callbackUrl, bearerToken) pairs of a subscription that ask for this change."""
    program_id = sub.get("programID")
    if program_id is not None:
        related = {"PROGRAM": row.id, "EVENT": row.parent_id}.get(row.object_type)
        if related is not None and related != program_id:
            return []
    out = []
    for op in sub.get("objectOperations") or []:
        if row.object_type in (op.get("objects") or []) and operation in (
            op.get("operations") or []
        ):
            out.append((str(op.get("callbackUrl")), op.get("bearerToken")))
    return out
