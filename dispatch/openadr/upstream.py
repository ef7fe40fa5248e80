"""The service as an OpenADR 3.1 VEN of upstream utility VTNs (``VPP_OPENADR_UPSTREAM``).

For each configured upstream the leading replica polls every ``VPP_OPENADR_UPSTREAM_POLL_S``
wall seconds:

- OAuth2 client credentials: the token URL from ``GET {url}/auth/server``, then a form
  ``POST`` of client_id and client_secret; a new token before it expires or after a 401.
- On first contact its own ven object upstream (``GET /vens?venName=…``, else ``POST /vens``).
- ``GET /programs`` (only the configured programNames, if any) and each program's
  ``GET /events?programID=…``. A program's region is the configured one (``regions``:
  programName → region), else the one the program names (``vpp.openadr.program_region``).
- Each event becomes grid events of the core (``dispatch.events``), one per run of equal
  ``DISPATCH_SETPOINT_RELATIVE`` values (``vpp.openadr.event_demand``), tenant
  ``openadr-upstream``, source ``openadr-upstream``, source_id ``<ven_name>@<host:port>/<event
  id>`` (found again after a restart: polling is idempotent). A changed event keeps its
  unchanged runs (begun ones too), aborts the others and raises the new ones; an event gone
  upstream has its live grid events aborted.
- Delivery per settlement interval (the VTN's own report body, ``vpp.openadr.delivery_report``,
  clientName the ven_name) once its grid events have begun: ``POST /reports`` the first time
  (or the one found by ``GET /reports?eventID=…&clientName=…`` after a restart), ``PUT`` when it
  changed, until final.

A failed poll never stops the loop: the upstream counts as down (``vpp_openadr_upstream_up`` 0,
``vpp_openadr_upstream_failures_total``, ``/readyz`` ``openadr_upstream``), and the next
1, 3, 7, … (at most 10) polls are skipped (``vpp_openadr_upstream_skipped_total``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from devices.edges import Edges
from dispatch import events as es
from dispatch.leadership import Leadership
from dispatch.openadr.reports import ENDED, STALE_MS, delivered
from dispatch.openadr.vtn import LIVE, reconcile
from dispatch.periodic import Periodic
from store import audit
from vpp import metrics
from vpp.domain import AuditAction
from vpp.errors import Conflict, InvalidInput
from vpp.openadr import delivery_report, event_demand, program_region
from vpp.settings import OpenAdrUpstream

log = logging.getLogger(__name__)

SOURCE = es.SOURCE_OPENADR_UPSTREAM
TENANT = "openadr-upstream"
MAX_SKIP = 10
PAGE = 50
TIMEOUT_S = 10.0
SOURCE_ID_MAX = 128  # GridEvent.source_id


class UpstreamError(Exception):
    """The upstream VTN answered with an error (or not at all)."""


class UpstreamLink:
    """One upstream VTN: its token, our ven there, the reports we wrote, and its health."""

    def __init__(self, services: Edges, cfg: OpenAdrUpstream, http: httpx.AsyncClient) -> None:
        self.services = services
        self.cfg = cfg
        self.http = http
        self.url = cfg.url.rstrip("/")
        self.name = f"{cfg.ven_name}@{urlsplit(self.url).netloc}"
        self.prefix = self.name + "/"
        self._token: str | None = None
        self._token_until = 0.0
        self.ven_id: str | None = None
        # upstream event id → (report id, the body last written, final)
        self.reports: dict[str, tuple[str, dict[str, Any], bool]] = {}
        self.up: bool | None = None  # None: not polled yet (in this process)
        self.failures = 0  # consecutive
        self.skip = 0
        self.error: str | None = None
        self._warned: set[str] = set()

    # --- health -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        status = "waiting" if self.up is None else "ok" if self.up else "failing"
        return {"upstream": self.name, "status": status, "failures": self.failures,
                "error": self.error}  # fmt: skip

    async def tick(self) -> bool:
        """One poll, unless backing off; True if it ran and worked. Never raises (but
        CancelledError)."""
        if self.skip > 0:
            self.skip -= 1
            metrics.OPENADR_UPSTREAM_SKIPPED.labels(self.name).inc()
            return False
        try:
            await self.poll()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self.skip = min(2**self.failures - 1, MAX_SKIP)
            self.up = False
            self.error = _short(exc)
            metrics.OPENADR_UPSTREAM_UP.labels(self.name).set(0)
            metrics.OPENADR_UPSTREAM_FAILURES.labels(self.name).inc()
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(level, "openadr upstream %s: poll failed (%s); skipping the next %d polls",
                    self.name, self.error, self.skip, exc_info=not isinstance(
                        exc, UpstreamError | httpx.HTTPError))  # fmt: skip
            return False
        if self.failures:
            log.warning("openadr upstream %s: back after %d failed polls", self.name, self.failures)
        self.up, self.failures, self.error = True, 0, None
        metrics.OPENADR_UPSTREAM_UP.labels(self.name).set(1)
        return True

    # --- one poll ---------------------------------------------------------------------------
    async def poll(self) -> None:
        await self._ensure_ven()
        programs = await self._get_all("/programs")
        seen: dict[str, dict[str, Any]] = {}
        for program in programs:
            name = program.get("programName")
            if self.cfg.programs and name not in self.cfg.programs:
                continue
            region = self._region(program)
            for ev in await self._get_all("/events", programID=str(program.get("id"))):
                if not isinstance(ev.get("id"), str):
                    continue
                seen[ev["id"]] = ev
                if region is not None:
                    await self._sync_event(ev, region)
        now = self.services.clock.now_ms()
        for g in await es.grid_events_of_sources(self.services, SOURCE, self.prefix):
            gone = str(g.source_id)[len(self.prefix) :] not in seen
            if gone and _live(g, now):
                await self._abort(g.info.id)
        for ev_id, ev in seen.items():
            await self._report(ev_id, ev)
        for ev_id in set(self.reports) - set(seen):
            del self.reports[ev_id]

    def _region(self, program: dict[str, Any]) -> str | None:
        name = str(program.get("programName"))
        region = self.cfg.regions.get(name)
        try:
            if region is not None:
                if not self.services.regions.is_sold(region):
                    raise InvalidInput("regions", f"unknown region {region!r}")
                return region
            return program_region(program, self.services.regions.sold())
        except InvalidInput as exc:
            self._warn_once(f"program:{program.get('id')}",
                            "program %r has no region we sell in (%s: %s); its events are "
                            "not taken (map it in VPP_OPENADR_UPSTREAM regions)",
                            name, exc.field, exc.message)  # fmt: skip
            return None

    async def _sync_event(self, ev: dict[str, Any], region: str) -> None:
        sid = self.prefix + ev["id"]
        if len(sid) > SOURCE_ID_MAX:
            self._warn_once(f"long:{sid}", "event %s: %r is longer than %d characters; not "
                            "taken", ev["id"], sid, SOURCE_ID_MAX)  # fmt: skip
            return
        now = self.services.clock.now_ms()
        try:
            wanted = event_demand(ev, now)  # ended runs too: their grid events are kept
        except Exception as exc:  # pure: whatever the upstream sent, this event only
            field, message = (exc.field, exc.message) if isinstance(exc, InvalidInput) else (
                "event", _short(exc))  # fmt: skip
            self._warn_once(f"event:{ev['id']}:{ev.get('modificationDateTime')}",
                            "event %s is not taken as it is (%s: %s); its grid events stay",
                            ev["id"], field, message)  # fmt: skip
            return
        raised = await es.grid_events_of_source(self.services, SOURCE, sid)
        keep, new = reconcile(raised, region, wanted, now)
        for g in raised:
            if _live(g, now) and g.info.id not in keep:
                await self._abort(g.info.id)
        specs = []
        for run in new:
            spec = es.GridEventSpec(region, run.mw, run.start_ms, run.end_ms)
            try:
                es.check_grid_events(self.services, [spec])
            except InvalidInput as exc:
                self._warn_once(f"run:{sid}:{run}",
                                "event %s: the run of %g MW is not taken (%s: %s)",
                                ev["id"], run.mw, exc.field, exc.message)  # fmt: skip
                continue
            specs.append(spec)
        if specs:
            recs = await es.create_grid_events(
                self.services, TENANT, specs, source=SOURCE, source_id=sid
            )
            for rec in recs:
                await self._audit(AuditAction.grid_event_created, rec)

    async def _abort(self, grid_event_id: str) -> None:
        try:
            rec = await es.abort_grid_event(self.services, grid_event_id)
        except Conflict:
            return  # it ended meanwhile
        await self._audit(AuditAction.grid_event_aborted, rec)

    async def _audit(self, action: AuditAction, rec: es.EventRecord) -> None:
        info = rec.info
        detail = {"region": info.region, "mw": info.mw, "start_ms": info.start_ms,
                  "end_ms": info.end_ms, "status": info.status, "source": rec.source,
                  "source_id": rec.source_id}  # fmt: skip
        actor = audit.Actor("openadr", TENANT, self.cfg.client_id[:32])
        await audit.record(
            self.services.db, actor, action, self.services.clock.now_ms(), info.id, detail
        )

    async def _report(self, ev_id: str, ev: dict[str, Any]) -> None:
        known = self.reports.get(ev_id)
        if known is not None and known[2]:
            return
        grids = await es.grid_events_of_source(self.services, SOURCE, self.prefix + ev_id)
        now = self.services.clock.now_ms()
        if not grids or all(now < g.info.start_ms for g in grids):
            return
        if known is None and all(
            g.info.status in ENDED and now > g.info.end_ms + STALE_MS for g in grids
        ):
            return  # long over (e.g. aborted before it ran): not reported now
        intervals, final = await delivered(self.services, grids)
        body = delivery_report(ev_id, ev.get("eventName"), self.cfg.ven_name, intervals)
        if known is None:
            found = await self._get_all("/reports", eventID=ev_id, clientName=self.cfg.ven_name)
            if found:
                doc = found[0]
                known = (str(doc["id"]), {k: doc.get(k) for k in body}, False)
        if known is None:
            r = await self._call("POST", "/reports", json=body)
            report_id = str(r.json()["id"])
        else:
            report_id = known[0]
            if known[1] != body:
                await self._call("PUT", f"/reports/{report_id}", json=body)
        self.reports[ev_id] = (report_id, body, final)

    async def _ensure_ven(self) -> None:
        if self.ven_id is not None:
            return
        found = await self._get_all("/vens", venName=self.cfg.ven_name)
        if found:
            self.ven_id = str(found[0]["id"])
            return
        r = await self._call("POST", "/vens", json={"venName": self.cfg.ven_name})
        self.ven_id = str(r.json()["id"])
        log.info("openadr upstream %s: created our ven %s", self.name, self.ven_id)

    # --- HTTP ---------------------------------------------------------------------------------
    async def _get_all(self, path: str, **params: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        skip = 0
        while True:
            r = await self._call("GET", path, params={**params, "skip": skip, "limit": PAGE})
            page = r.json()
            if not isinstance(page, list):
                raise UpstreamError(f"GET {path}: not a list")
            out += [o for o in page if isinstance(o, dict)]
            if len(page) < PAGE:
                return out
            skip += PAGE

    async def _call(
        self, method: str, path: str, *, params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:  # fmt: skip
        for attempt in range(2):
            token = await self._bearer()
            r = await self.http.request(method, self.url + path, params=params, json=json,
                                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            if r.status_code == 401 and attempt == 0:
                self._token = None  # expired or revoked: a new token, once
                continue
            break
        if r.status_code >= 400:
            raise UpstreamError(f"{method} {path}: {r.status_code} {_detail(r)}")
        return r

    async def _bearer(self) -> str:
        if self._token is not None and time.monotonic() < self._token_until:
            return self._token
        token_url = self.url + "/auth/token"
        r = await self.http.get(self.url + "/auth/server")
        if r.status_code < 400:
            found = r.json().get("tokenURL") if isinstance(r.json(), dict) else None
            token_url = str(found or token_url)
        form = {"grant_type": "client_credentials", "client_id": self.cfg.client_id,
                "client_secret": self.cfg.client_secret.get_secret_value()}  # fmt: skip
        r = await self.http.post(token_url, data=form)
        if r.status_code >= 400:
            raise UpstreamError(f"token: {r.status_code} {_detail(r)}")
        doc = r.json()
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError("token: the answer has no access_token")
        ttl = doc.get("expires_in")
        ttl_s = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else 3600.0
        self._token, self._token_until = token, time.monotonic() + 0.9 * ttl_s
        return token

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("openadr upstream %s: " + msg, self.name, *args)


class UpstreamVens(Periodic):
    """The poller of every configured upstream VTN, acting on the leader only."""

    task_name = "openadr-upstream"

    def __init__(self, services: Edges, *, leadership: Leadership | None = None) -> None:
        self.services = services
        self.leadership = leadership
        self.period_s = services.settings.openadr_upstream_poll_s
        self._task = None
        self.http = httpx.AsyncClient(timeout=TIMEOUT_S)
        self.links = [
            UpstreamLink(services, c, self.http) for c in services.settings.openadr_upstream
        ]

    async def tick(self) -> None:
        for link in self.links:
            await link.tick()

    def describe(self) -> list[dict[str, Any]]:
        return [link.describe() for link in self.links]

    async def _run(self) -> None:
        while True:
            if self.leadership is None or self.leadership.is_leader:
                await self.tick()
            await asyncio.sleep(self.period_s)

    async def stop(self) -> None:
        await super().stop()
        await self.http.aclose()


def _live(g: es.EventRecord, now_ms: int) -> bool:
    """Scheduled or running, and not past its end (the runner closes those: not aborted)."""
    return g.info.status in LIVE and g.info.end_ms > now_ms


def _detail(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:200]
    if isinstance(doc, dict):
        return str(doc.get("detail") or doc.get("error_description") or doc.get("title") or doc)[
            :200
        ]
    return str(doc)[:200]


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
