"""Service endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

import vpp.metrics  # (importing it registers every metric before the first scrape)
from api.deps import get_services
from api.routers.fleet import current_view, fleet_summary
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
    description="Also `replica`: this process's owner id, whether it leads the singleton jobs "
    "(event runner, quote housekeeping, calibration) and who holds the leader lease now "
    "(`leader_id`, null when nobody does). Present where the background jobs run "
    "(`vpp serve`). With `VPP_OPENADR_UPSTREAM`: `openadr_upstream`, each upstream VTN's "
    "poll status (ok, failing, waiting: not polled by this replica yet), informational only.",
)
async def readyz(services: Services = Depends(get_services)) -> JSONResponse:
    checks = await dependency_checks(services)
    ok = all(checks.values())
    content: dict[str, object] = {
        "status": "ready" if ok else "not ready",
        "checks": {k: "ok" if v else "unreachable" for k, v in checks.items()},
    }
    replica = await _replica(services)
    if replica is not None:
        content["replica"] = replica
    if services.openadr_upstream is not None:
        # Informational: an upstream utility VTN down does not make this service unready.
        content["openadr_upstream"] = services.openadr_upstream.describe()
    if ok:
        return JSONResponse(content)
    # The service's error shape too: `detail` names each dependency that is down.
    down = [name for name, up in checks.items() if not up]
    content["detail"] = "; ".join(f"{name}: unreachable" for name in down)
    return JSONResponse(
        status_code=503, content=content, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


async def dependency_checks(services: Services) -> dict[str, bool]:
    """database, broker, state_store: whether each answers now (3 s each at most)."""

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

    async def db_bounded() -> bool:
        try:
            return await asyncio.wait_for(db_ok(), 3)
        except TimeoutError:
            return False

    db, broker, state = await asyncio.gather(db_bounded(), broker_ok(), state_ok())
    return {"database": db, "broker": broker, "state_store": state}


async def _replica(services: Services) -> dict[str, object] | None:
    """Who this process is among the replicas and who leads (None without background jobs)."""
    leadership = services.leadership
    if leadership is None:
        return None
    doc = leadership.describe()
    try:
        doc["leader_id"] = await asyncio.wait_for(leadership.holder(), 3)
    except Exception:
        doc["leader_id"] = None  # the state store is down: readiness says so
    return doc


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
async def metrics(services: Services = Depends(get_services)) -> Response:
    await _refresh_gauges(services)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _refresh_gauges(services: Services) -> None:
    """The gauges a scrape should see as of now: each dependency's health, and devices,
    online devices and MW available per region and kind from the cached fleet snapshot. A
    dependency down leaves the fleet gauges as they were (and says so in vpp_dependency_up)."""
    for name, up in (await dependency_checks(services)).items():
        vpp.metrics.DEPENDENCY_UP.labels(name).set(1.0 if up else 0.0)
    try:
        view = await asyncio.wait_for(current_view(services), 5)
    except Exception:
        return
    rows = fleet_summary(view, None)["regions"]
    for gauge in (
        vpp.metrics.FLEET_DEVICES,
        vpp.metrics.FLEET_ONLINE,
        vpp.metrics.FLEET_AVAILABLE_MW,
    ):
        gauge.clear()
    for r in rows:
        labels = (r["region"], r["kind"])
        vpp.metrics.FLEET_DEVICES.labels(*labels).set(r["registered"])
        vpp.metrics.FLEET_ONLINE.labels(*labels).set(r["online"])
        vpp.metrics.FLEET_AVAILABLE_MW.labels(*labels).set(r["available_mw"])
