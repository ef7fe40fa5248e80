"""Service endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

import vpp.metrics  # noqa: F401  (registers every metric before the first scrape)
from api.deps import get_services
from devices.outages import RETRY_AFTER_S
from dispatch.services import Services

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="Process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database, broker and state store reachable",
    responses={
        503: {
            "description": "a dependency is down; `checks` says which (database, broker, "
            "state_store: ok or unreachable) and `detail` names the ones down; `Retry-After` "
            "in seconds"
        }
    },
)
async def readyz(services: Services = Depends(get_services)) -> JSONResponse:
    async def db_ok() -> bool:
        try:
            async with services.db.session() as s:
                await s.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def broker_ok() -> bool:
        if services.ingest is not None:
            return bool(services.ingest.connected)
        try:
            # Without an ingest worker in this process: the broker must accept a connection
            # (the credential manager's ping alone says nothing when it manages no credentials).
            if not await asyncio.wait_for(_broker_accepts(services.settings.mqtt_url), 3):
                return False
            return bool(await asyncio.wait_for(services.credentials.ping(), 3))
        except Exception:
            return False

    async def state_ok() -> bool:
        try:
            return bool(await asyncio.wait_for(services.state.ping(), 3))
        except Exception:
            return False

    db, broker, state = await asyncio.gather(db_ok(), broker_ok(), state_ok())
    checks = {"database": db, "broker": broker, "state_store": state}
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": dict.fromkeys(checks, "ok")})
    down = [name for name, up in checks.items() if not up]
    return JSONResponse(
        status_code=503,
        content={
            "status": "not ready",
            # The service's error shape too: `detail` names each dependency that is down.
            "detail": "; ".join(f"{name}: unreachable" for name in down),
            "checks": {k: "ok" if v else "unreachable" for k, v in checks.items()},
        },
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _broker_accepts(mqtt_url: str) -> bool:
    """True for the in-process broker, else when the broker's port takes a TCP connection."""
    from devices.mqtt import parse_mqtt_url

    cfg = parse_mqtt_url(mqtt_url)
    if cfg.is_memory:
        return True
    try:
        _, writer = await asyncio.open_connection(cfg.host, cfg.port)
    except OSError:
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
