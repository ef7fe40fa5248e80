"""The OpenADR 3.1 VTN's rules, over its stored objects (``store.openadr``) and the core's grid
events (``dispatch.events``), with no HTTP in them (``api/openadr`` is the HTTP side).

Tenancy: every object belongs to the tenant of the client that made it, and a client sees only
its tenant's. A business-logic client (``bl``) sees all of them; a VEN client sees every
program, the events that target it (no targets: the whole program; or targets naming its
venName or one of its resources' names), and only its own ven, resources, reports and
subscriptions. Another VEN's object answers as a missing one (NotFound).

A BL's event in a program becomes grid events of the program's region, one per run of equal
``DISPATCH_SETPOINT_RELATIVE`` values (``vpp.openadr.event_demand``), raised through the same
service path as ``POST /v1/grid-events`` (``dispatch.events.create_grid_events``), with
``source`` ``openadr`` and ``source_id`` the event's id. Updating the event keeps the grid
events whose run is unchanged, aborts the others and raises the new runs; deleting it aborts
them. Everything is checked before anything is changed."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from devices.edges import Edges
from dispatch import events as es
from dispatch.openadr import access
from dispatch.openadr.access import (
    EVENT,
    METADATA,
    PROGRAM,
    REPORT,
    RESOURCE,
    SUBSCRIPTION,
    VEN,
    Caller,
    Mine,
    target_strings,
)
from dispatch.openadr.ven_devices import VenDevices
from dispatch.openadr.webhooks import Webhooks, check_callback_url
from store import audit
from store import openadr as db
from store.models import OpenAdrObject
from vpp.domain import AuditAction, GridEventStatus
from vpp.errors import Conflict, Forbidden, InvalidInput, NotFound
from vpp.openadr import Run, event_demand, program_region, resolve_intervals
from vpp.timefmt import to_rfc3339

log = logging.getLogger(__name__)

LIVE = (GridEventStatus.scheduled.value, GridEventStatus.active.value)


class Vtn:
    """The VTN of one process: its objects, their rules, and the webhooks they fire."""

    def __init__(self, services: Edges) -> None:
        self.services = services
        self.webhooks = Webhooks(services)
        self.devices = VenDevices(services)

    @property
    def db(self) -> Any:
        return self.services.db

    def now_ms(self) -> int:
        return int(self.services.clock.now_ms())

    # --- views ----------------------------------------------------------------------------
    def doc(self, row: OpenAdrObject) -> dict[str, Any]:
        return access.doc(self.services.settings.openadr_vtn_name, row)

    async def mine(self, caller: Caller) -> Mine:
        return await access.mine(self.db, caller)

    def sees(self, caller: Caller, mine: Mine, row: OpenAdrObject) -> bool:
        return access.sees(caller, mine, row)

    async def _visible(self, caller: Caller, kind: str, oid: str) -> OpenAdrObject:
        row = await db.get_object(self.db, caller.tenant_id, kind, oid)
        if not self.sees(caller, await self.mine(caller), row):
            raise NotFound("id", f"no {kind.lower()} {oid!r}")
        return row

    async def get(self, caller: Caller, kind: str, oid: str) -> dict[str, Any]:
        row = await self._visible(caller, kind, oid)
        if kind == EVENT and not caller.is_bl:
            await self.devices.received([row])
        return self.doc(row)

    async def search(
        self, caller: Caller, kind: str, filters: Mapping[str, Any], skip: int, limit: int
    ) -> list[dict[str, Any]]:
        rows = await db.list_objects(self.db, caller.tenant_id, kind)
        mine = await self.mine(caller)
        report_programs: dict[str, str | None] = {}
        if kind == REPORT and filters.get("programID"):
            for ev in await db.list_objects(self.db, caller.tenant_id, EVENT):
                report_programs[ev.id] = ev.parent_id
        now = self.now_ms()
        found = []
        for row in rows:
            if not self.sees(caller, mine, row):
                continue
            if not _matches(row, filters, report_programs, now):
                continue
            found.append(row)
        page = found[skip : skip + limit]
        if kind == EVENT and not caller.is_bl:
            await self.devices.received(page)
        return [self.doc(row) for row in page]

    # --- writes ---------------------------------------------------------------------------
    async def create(self, caller: Caller, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        body = clean(body)
        now = self.now_ms()
        oid = db.new_object_id(kind)
        row = OpenAdrObject(
            id=oid,
            tenant_id=caller.tenant_id,
            object_type=kind,
            client_id=caller.client_id,
            body=body,
            created_ms=now,
            modified_ms=now,
        )
        runs: list[Run] = []
        region = ""
        device: Any = None
        readings: list[tuple[str, bytes]] = []
        event: OpenAdrObject | None = None
        if kind == PROGRAM:
            program_region(body, self.services.regions.sold())
            row.parent_id, row.unique_name = "", body["programName"]
        elif kind == EVENT:
            program = await self._program_of(caller, body)
            region = program_region(program.body, self.services.regions.sold())
            runs = self._check_runs(region, event_demand(body, now), now)
            row.parent_id = program.id
        elif kind == REPORT:
            event = await self._referenced(caller, EVENT, body.get("eventID"), "eventID")
            row.parent_id = event.id
            mine = await self.mine(caller)
            row.ven_id = min(mine.ven_ids) if mine.ven_ids else None
            readings = await self.devices.readings(caller, mine, body)
        elif kind == SUBSCRIPTION:
            await self._check_subscription(caller, body)
            row.parent_id = body.get("programID")
        elif kind == VEN:
            await self._check_ven(caller, body, None)
            row.parent_id, row.unique_name = "", body["venName"]
            owner = body.pop("clientID", None) if caller.is_bl else None
            row.client_id = owner or caller.client_id
            row.ven_id = oid
        elif kind == RESOURCE:
            ven = await self._referenced(caller, VEN, body.get("venID"), "venID", not_found=True)
            body.pop("venID", None)
            body.pop("clientID", None)
            row.parent_id = row.ven_id = ven.id
            row.client_id = ven.client_id
            row.unique_name = body["resourceName"]
            device = self.devices.spec(oid, body, ven)
        await db.insert_object(self.db, row)
        if (kind == EVENT and runs) or device is not None:
            try:
                if device is not None:
                    await self.devices.onboard(caller.tenant_id, device)
                else:
                    await self._raise(caller, oid, region, runs)
            except Exception:
                await db.delete_object(self.db, oid)
                raise
        if readings:
            await self.devices.report(readings, event)
        doc = self.doc(row)
        self.webhooks.emit(row, "CREATE", doc)
        return doc

    async def update(
        self, caller: Caller, kind: str, oid: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        row = await self._visible(caller, kind, oid)
        body = clean(body)
        now = self.now_ms()
        unique_name: str | None = None
        parent_id: str | None = None
        old_device: Any = None
        new_device: Any = None
        readings: list[tuple[str, bytes]] = []
        event: OpenAdrObject | None = None
        if kind == PROGRAM:
            region = program_region(body, self.services.regions.sold())
            old = program_region(row.body, self.services.regions.sold())
            if region != old and await db.count_children(self.db, caller.tenant_id, EVENT, oid):
                raise Conflict("targets", f"the program has events: its region stays {old}")
            unique_name = body["programName"]
        elif kind == EVENT:
            program = await self._program_of(caller, body)
            region = program_region(program.body, self.services.regions.sold())
            wanted = [r for r in event_demand(body, now) if r.end_ms > now]
            current = [
                g for g in await es.grid_events_of_source(self.services, es.SOURCE_OPENADR, oid)
                if g.info.status in LIVE
            ]  # fmt: skip
            keep, new_runs = reconcile(current, region, wanted, now)
            new_runs = self._check_runs(region, new_runs, now)
            parent_id = program.id
        elif kind == REPORT:
            event = await self._referenced(caller, EVENT, body.get("eventID"), "eventID")
            parent_id = event.id
            readings = await self.devices.readings(caller, await self.mine(caller), body)
        elif kind == SUBSCRIPTION:
            await self._check_subscription(caller, body)
        elif kind == VEN:
            await self._check_ven(caller, body, row)
            body.pop("clientID", None)
            unique_name = body["venName"]
        elif kind == RESOURCE:
            given = body.pop("venID", None)
            body.pop("clientID", None)
            if given is not None and given != row.ven_id:
                raise InvalidInput("venID", "a resource stays with its ven")
            unique_name = body["resourceName"]
            ven = await db.get_object(self.db, row.tenant_id, VEN, str(row.ven_id))
            try:
                old_device = self.devices.spec(oid, row.body, ven)
            except InvalidInput:
                old_device = None  # stored before resources joined the fleet
            new_device = self.devices.spec(oid, body, ven)
            self.devices.check_change(old_device, new_device)
        row = await db.update_object(
            self.db, oid, body, now, unique_name=unique_name, parent_id=parent_id
        )
        if kind == RESOURCE:
            await self.devices.changed(row.tenant_id, old_device, new_device)
        if readings:
            await self.devices.report(readings, event)
        if kind == EVENT:
            for g in current:
                if g.info.id not in keep:
                    await self._abort(caller, g.info.id)
            if new_runs:
                await self._raise(caller, oid, region, new_runs)
        doc = self.doc(row)
        self.webhooks.emit(row, "UPDATE", doc)
        return doc

    async def delete(self, caller: Caller, kind: str, oid: str) -> dict[str, Any]:
        row = await self._visible(caller, kind, oid)
        if kind == PROGRAM and await db.count_children(self.db, caller.tenant_id, EVENT, oid):
            raise Conflict("programID", "the program has events: delete them first")
        doc = self.doc(row)
        if kind == EVENT:
            for g in await es.grid_events_of_source(self.services, es.SOURCE_OPENADR, oid):
                if g.info.status in LIVE:
                    await self._abort(caller, g.info.id)
        removed = [row]
        if kind == VEN:
            removed += await db.list_objects(self.db, caller.tenant_id, RESOURCE, parent_id=oid)
        # Devices first: a device that cannot be offboarded (state store down) keeps its
        # resource.
        await self.devices.offboard(
            caller.tenant_id, [r.id for r in removed if r.object_type == RESOURCE]
        )
        for r in reversed(removed):
            await db.delete_object(self.db, r.id)
        for r in removed:
            self.webhooks.emit(r, "DELETE", doc if r is row else self.doc(r))
        return doc

    # --- helpers --------------------------------------------------------------------------
    async def _referenced(
        self, caller: Caller, kind: str, oid: Any, field: str, *, not_found: bool = False
    ) -> OpenAdrObject:
        """The object a body names, if the caller sees it; else InvalidInput (or NotFound)
        naming the field."""
        err = NotFound if not_found else InvalidInput
        if not isinstance(oid, str) or not oid:
            raise InvalidInput(field, "is required")
        try:
            return await self._visible(caller, kind, oid)
        except NotFound:
            raise err(field, f"no {kind.lower()} {oid!r}") from None

    async def _program_of(self, caller: Caller, body: Mapping[str, Any]) -> OpenAdrObject:
        return await self._referenced(caller, PROGRAM, body.get("programID"), "programID")

    def _check_runs(self, region: str, runs: list[Run], now: int) -> list[Run]:
        """The runs as grid events of the region, checked as ``POST /v1/grid-events`` checks
        one (InvalidInput naming the intervals)."""
        specs = [es.GridEventSpec(region, r.mw, r.start_ms, r.end_ms) for r in runs]
        for k, spec in enumerate(specs):
            try:
                es.check_grid_events(self.services, [spec])
            except InvalidInput as exc:
                raise InvalidInput(
                    "intervals",
                    f"the run of {runs[k].mw:g} MW from {to_rfc3339(runs[k].start_ms)} to "
                    f"{to_rfc3339(runs[k].end_ms)}: {exc.field} {exc.message}",
                ) from None
        return runs

    async def _raise(self, caller: Caller, oid: str, region: str, runs: list[Run]) -> None:
        specs = [es.GridEventSpec(region, r.mw, r.start_ms, r.end_ms) for r in runs]
        recs = await es.create_grid_events(
            self.services, caller.tenant_id, specs, source=es.SOURCE_OPENADR, source_id=oid
        )
        for rec in recs:
            await self._audit(caller, AuditAction.grid_event_created, rec)

    async def _abort(self, caller: Caller, grid_event_id: str) -> None:
        try:
            rec = await es.abort_grid_event(self.services, grid_event_id)
        except Conflict:
            return  # it ended meanwhile
        await self._audit(caller, AuditAction.grid_event_aborted, rec)

    async def _audit(self, caller: Caller, action: AuditAction, rec: es.EventRecord) -> None:
        """The audit row of a grid event raised or aborted for an OpenADR event (actor
        ``openadr``, the tenant and client id of the BL)."""
        info = rec.info
        detail = {"region": info.region, "mw": info.mw, "start_ms": info.start_ms,
                  "end_ms": info.end_ms, "status": info.status, "source": rec.source,
                  "source_id": rec.source_id}  # fmt: skip
        actor = audit.Actor("openadr", caller.tenant_id, caller.client_id[:32])
        await audit.record(self.db, actor, action, self.now_ms(), info.id, detail)

    async def _check_subscription(self, caller: Caller, body: Mapping[str, Any]) -> None:
        program_id = body.get("programID")
        if program_id is not None:
            await self._referenced(caller, PROGRAM, program_id, "programID")
        for i, op in enumerate(body.get("objectOperations") or []):
            await check_callback_url(
                op.get("callbackUrl"),
                f"objectOperations[{i}].callbackUrl",
                allow_private=self.services.settings.openadr_webhook_private,
            )

    async def _check_ven(
        self, caller: Caller, body: Mapping[str, Any], current: OpenAdrObject | None
    ) -> None:
        name = body.get("venName")
        if caller.is_bl:
            owner = body.get("clientID")
            if current is None and owner is not None:
                client = await db.get_client(self.db, str(owner))
                if client is None or client.tenant_id != caller.tenant_id or client.role != "ven":
                    raise InvalidInput("clientID", f"no VEN client {owner!r}")
            return
        if caller.ven_name is not None and name != caller.ven_name:
            raise Forbidden(
                "venName", f"this client's ven is named {caller.ven_name!r}, not {name!r}"
            )
        if current is None and (await self.mine(caller)).ven_ids:
            raise Conflict("venName", "this client has its ven already")


def clean(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without the server's fields and without nulls (liberal: a null is as if the
    field were left out)."""
    return {k: drop_nulls(v) for k, v in body.items() if k not in METADATA and v is not None}


def drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def same_run(g: es.EventRecord, region: str, run: Run) -> bool:
    """``g`` was raised for ``run``: same region, MW and end, and the run's start, or the moment
    ``g`` was raised if the run had begun by then (a grid event never starts in the past)."""
    i = g.info
    if i.region != region or i.end_ms != run.end_ms or not math.isclose(i.mw, run.mw):
        return False
    return i.start_ms == run.start_ms or run.start_ms < i.start_ms == g.created_ms


def reconcile(
    raised: list[es.EventRecord], region: str, wanted: list[Run], now_ms: int
) -> tuple[set[str], list[Run]]:
    """An outside event's runs against the grid events already raised for it: the ids of the
    live ones to keep (any other live one is to be aborted) and the runs to raise (from now if
    begun; an ended run is not raised). A run that a raised grid event matches is not raised
    again, whatever that grid event's status (one an operator aborted stays aborted); kept runs
    include begun and just ended ones."""
    keep: set[str] = set()
    new: list[Run] = []
    for run in wanted:
        matched = [g for g in raised if same_run(g, region, run)]
        if matched:
            keep.update(g.info.id for g in matched if g.info.status in LIVE)
        elif run.end_ms > now_ms:
            new.append(Run(max(run.start_ms, now_ms), run.end_ms, run.mw))
    return keep, new


def _matches(
    row: OpenAdrObject, filters: Mapping[str, Any], report_programs: Mapping[str, Any], now: int
) -> bool:
    body = row.body
    kind = row.object_type
    targets = filters.get("targets")
    if targets and not set(targets) & target_strings(body.get("targets")):
        return False
    for name in ("programName", "venName", "resourceName", "clientName", "eventID", "venID"):
        want = filters.get(name)
        if want is None:
            continue
        have = row.ven_id if name == "venID" else body.get(name)
        if kind == REPORT and name == "eventID":
            have = row.parent_id
        if have != want:
            return False
    program_id = filters.get("programID")
    if program_id is not None:
        if kind == EVENT and row.parent_id != program_id:
            return False
        if kind == SUBSCRIPTION and body.get("programID") != program_id:
            return False
        if kind == REPORT and report_programs.get(str(row.parent_id)) != program_id:
            return False
    objects = filters.get("objects")
    if objects and kind == SUBSCRIPTION:
        subscribed = {o for op in body.get("objectOperations") or [] for o in op.get("objects", [])}
        if not set(objects) & subscribed:
            return False
    if filters.get("active") and kind == EVENT:
        try:
            ends = [iv.end_ms for iv in resolve_intervals(body, now)]
        except InvalidInput:
            ends = []
        if ends and max(ends) <= now:
            return False
    return True


def filters_of(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query parameters as search filters (``targets`` may repeat; 3.0-style ``targetType`` /
    ``targetValues`` name a venName, resourceName or programName)."""
    out: dict[str, Any] = {}
    target_type = None
    target_values: list[str] = []
    for k, v in pairs:
        if k == "targets":
            out.setdefault("targets", []).append(v)
        elif k == "targetType":
            target_type = v
        elif k == "targetValues":
            target_values.append(v)
        else:
            out[k] = v
    if target_values:
        key = {"VEN_NAME": "venName", "RESOURCE_NAME": "resourceName"}.get(str(target_type))
        if key is not None:
            out[key] = target_values[0]
        elif target_type == "PROGRAM_NAME":
            out["programName"] = target_values[0]
        else:
            out.setdefault("targets", []).extend(target_values)
    return out
