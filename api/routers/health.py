"""Service endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

import vpp.metrics  # noqa: F401  (registers every metric before the first scrape)
from api.deps import get_services
from vpp.services import Services

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="Process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database, broker and state store reachable",
    responses={503: {"description": "a dependency is down; the body says which"}},
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
        ingest = services.components.get("devices.ingest:IngestWorker")
        if ingest is not None and hasattr(ingest, "connected"):
            return bool(ingest.connected)
        try:
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
    ok = all(checks.values())
    return JSONResponse(
        status_code=200 if ok else 503,
        content={
            "status": "ready" if ok else "not ready",
            "checks": {k: "ok" if v else "unreachable" for k, v in checks.items()},
        },
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
