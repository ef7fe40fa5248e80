"""A VEN's resources as fleet devices reached over OpenADR (no I/O of HTTP here).

- **Resources join the fleet.** A resource whose attributes name a ``KIND`` is one device of
  the fleet (``vpp.openadr.resource_device``: KIND, REGION, MAX_POWER_EXPORT,
  MAX_POWER_CONSUMPTION in kW, STORAGE_USABLE_CAPACITY in kWh; an aggregated group is one device
  of the summed figures), onboarded through ``devices.onboarding`` in the VEN client's tenant
  with ``transport`` ``openadr`` (no broker login). Its device id is the resource's id, its
  vendor the ven's name (the VEN's cloud is the dependency the forecast's vendor shocks model).
  Updating the figures updates the device; KIND and REGION stay (delete the resource and make
  another); deleting the resource (or its ven) offboards it. A resource without KIND is stored
  and is no device.
- **Commands become events** (:class:`VenCommands`, the event runner's second sink): a device's
  command is one OpenADR event in a program ``vpp-dispatch-<REGION>`` of the device's tenant
  (made on first use), targeting the ven's name and the resource's name, seen by that VEN alone;
  its one interval runs from ``valid_from`` to ``valid_until`` with the setpoint
  (``vpp.openadr.dispatch_event``). The event's unique name is ``<event id>/<device id>``: a
  re-send updates it, a ``restore`` cuts it to end now.
- **Reports become telemetry** (:meth:`VenDevices.report`): each interval of a device's resource
  carrying ``USAGE`` is a telemetry reading (``vpp.openadr.report_readings``), checked as the
  MQTT path checks one and handed to this process's ingest worker as if it came on the device's
  telemetry topic. The VEN reading an event the service made for a device acknowledges its
  command as ``received``, a report on it as ``started`` (through ingest, as MQTT acks)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select

from devices import onboarding
from devices.edges import Edges
from devices.ingest import IngestWorker
from devices.telemetry import Limits, Rejected, validate_telemetry
from dispatch.openadr.access import EVENT, PROGRAM, RESOURCE, VEN, Caller, Mine, doc
from dispatch.openadr.webhooks import Webhooks
from store import openadr as db
from store.models import Command, Device, OpenAdrObject
from vpp.domain import KIND_CODE, CommandType, DeviceKind
from vpp.errors import Conflict, InvalidInput, NotFound, Unavailable
from vpp.openadr import (
    AGGREGATED,
    REGION_ATTRIBUTE,
    cut_event,
    dispatch_event,
    report_readings,
    resource_device,
)

log = logging.getLogger(__name__)

PROGRAM_PREFIX = "vpp-dispatch-"
_SPEC = TypeAdapter(onboarding.DeviceSpec)
# The attribute each device field comes from (for errors that name what the VEN sent).
_ATTRIBUTE_OF = {
    "capacity_wh": "STORAGE_USABLE_CAPACITY (kWh)",
    "max_discharge_w": "MAX_POWER_EXPORT (kW)",
    "max_charge_w": "MAX_POWER_CONSUMPTION (kW)",
    "rated_w": "MAX_POWER_EXPORT (kW)",
    "hvac_rated_w": "MAX_POWER_CONSUMPTION (kW)",
}
_FIGURES = tuple(_ATTRIBUTE_OF)
DEVICE_IDS_TTL_S = 1.0


class VenDevices:
    """The fleet side of a VEN's resources and reports, for the VTN's rules (``vtn.Vtn``)."""

    def __init__(self, services: Edges) -> None:
        self.services = services
        self.limits = Limits.from_settings(services.settings)
        # This process's ingest worker (``Services.start_background`` attaches it): reports'
        # telemetry goes in there as if it came over MQTT.
        self.ingest: IngestWorker | None = None

    # --- resources ---------------------------------------------------------------------------
    def spec(self, oid: str, body: Mapping[str, Any], ven: OpenAdrObject) -> Any:
        """The device spec a resource describes (None: no KIND, no device); InvalidInput naming
        the attribute when it is not a valid one."""
        fields = resource_device(body, self.services.regions.sold())
        if fields is None:
            return None
        vendor = (ven.unique_name or ven.id)[:64]
        try:
            return _SPEC.validate_python({**fields, "id": oid, "site_id": oid, "vendor": vendor})
        except ValidationError as exc:
            e = exc.errors(include_url=False)[0]
            name = next((str(p) for p in e.get("loc", ()) if str(p) in _ATTRIBUTE_OF), None)
            what = _ATTRIBUTE_OF.get(name or "", "attributes")
            raise InvalidInput("attributes", f"{what}: {e.get('msg')} (in W or Wh)") from None

    async def onboard(self, tenant_id: str, spec: Any) -> None:
        await onboarding.onboard(
            self.services,
            [spec],
            tenant_id=tenant_id,
            indexed=False,
            transport=onboarding.TRANSPORT_OPENADR,
        )

    def check_change(self, old: Any, new: Any) -> None:
        if old is None:
            return
        if new is None or (old.kind, old.region) != (new.kind, new.region):
            raise InvalidInput(
                "attributes",
                f"a resource in the fleet keeps its KIND ({old.kind}) and {REGION_ATTRIBUTE} "
                f"({old.region}): delete it and create another",
            )

    async def changed(self, tenant_id: str, old: Any, new: Any) -> None:
        """Apply a checked change (``check_change``) to the device."""
        if new is None:
            return
        if old is None:
            await self.onboard(tenant_id, new)
            return
        patch = {
            f: getattr(new, f)
            for f in _FIGURES
            if hasattr(new, f) and getattr(new, f) != getattr(old, f)
        }
        if patch:
            try:
                await onboarding.update_device(self.services, new.id, tenant_id, patch)
            except onboarding.DeviceNotFound:
                pass  # offboarded through /v1 meanwhile: the resource alone changes

    async def offboard(self, tenant_id: str, resource_ids: Sequence[str]) -> None:
        """Offboard the devices of these resources (those that are devices)."""
        for rid in resource_ids:
            try:
                await onboarding.offboard(self.services, rid, tenant_id)
            except onboarding.DeviceNotFound:
                continue

    # --- reports -----------------------------------------------------------------------------
    async def readings(
        self, caller: Caller, mine: Mine, body: Mapping[str, Any]
    ) -> list[tuple[str, bytes]]:
        """The telemetry a VEN's report carries for its devices: (device id, contract JSON),
        each checked as ingest checks one; InvalidInput naming the field, nothing taken, when a
        resource is not the VEN's or a reading is not valid."""
        if caller.is_bl or not mine.ven_ids:
            return []
        resources = await db.list_objects(
            self.services.db, caller.tenant_id, RESOURCE, ven_ids=sorted(mine.ven_ids)
        )
        by_name = {r.unique_name: r for r in resources}
        regions = self.services.regions.sold()
        now = int(self.services.clock.now_ms())
        out: list[tuple[str, bytes]] = []
        for i, res in enumerate(body.get("resources") or []):
            if not isinstance(res, Mapping):
                raise InvalidInput(f"resources[{i}]", "must be an object")
            name = res.get("resourceName")
            if name == AGGREGATED:
                continue
            row = by_name.get(name) if isinstance(name, str) else None
            if row is None:
                raise InvalidInput(
                    f"resources[{i}].resourceName", f"no resource {name!r} of this client's ven"
                )
            try:
                fields = resource_device(row.body, regions)
            except InvalidInput:
                fields = None
            if fields is None:
                continue  # a resource that is no fleet device: its report is only stored
            kind = str(fields["kind"])
            for reading in report_readings(res, i, kind, now):
                payload = orjson.dumps(reading.telemetry)
                r = validate_telemetry(payload, KIND_CODE[DeviceKind(kind)], None, now, self.limits)
                if type(r) is Rejected:
                    raise InvalidInput(
                        f"resources[{i}].intervals",
                        f"the reading at {reading.ts_ms}: {r.field} {r.message}",
                    )
                out.append((row.id, payload))
        if out and self.ingest is None:
            raise Unavailable("ingest", "no ingest worker in this process takes reports")
        return out

    async def report(self, readings: list[tuple[str, bytes]], event: OpenAdrObject | None) -> None:
        """Hand a stored report's readings to ingest; a report on an event the service made for
        a device acknowledges that device's command (``started``)."""
        ingest = self.ingest
        if ingest is None:
            return
        for device_id, payload in readings:
            ingest.offer(device_id, "telemetry", payload)
        if event is not None:
            await self._ack([event], "started")

    async def received(self, events: Sequence[OpenAdrObject]) -> None:
        """The VEN has read these events: the commands they carry are ``received``."""
        await self._ack(events, "received")

    async def _ack(self, events: Sequence[OpenAdrObject], status: str) -> None:
        """Acknowledge the command each of these events carries (the service's dispatch
        events: unique name ``<event id>/<device id>``) through ingest, as a device's MQTT ack
        would be; the runner's ack handling moves only forward, so a repeat changes nothing."""
        ingest = self.ingest
        pairs = [
            tuple(e.unique_name.rsplit("/", 1))
            for e in events
            if e.object_type == EVENT and e.ven_id is not None and e.unique_name
            and "/" in e.unique_name
        ]  # fmt: skip
        if ingest is None or not pairs:
            return
        now = int(self.services.clock.now_ms())
        for event_id, device_id in pairs:
            async with self.services.db.session() as s:
                cid = await s.scalar(
                    select(Command.id)
                    .where(
                        Command.event_id == event_id,
                        Command.device_id == device_id,
                        Command.type != CommandType.restore.value,
                    )
                    .order_by(Command.created_ms.desc())
                    .limit(1)
                )
            if cid is not None:
                ack = {"command_id": cid, "status": status, "ts": now}
                ingest.offer(device_id, "ack", orjson.dumps(ack))


class VenCommands:
    """The event runner's sink for devices reached over OpenADR: their commands as VTN events."""

    def __init__(self, services: Edges, webhooks: Webhooks | None = None) -> None:
        self.services = services
        self.webhooks = webhooks
        self._ids: npt.NDArray[np.object_] = np.zeros(0, object)
        self._ids_at = float("-inf")

    async def device_ids(self) -> npt.NDArray[np.object_]:
        """The ids of live devices reached over OpenADR (read again once a wall second)."""
        if time.monotonic() - self._ids_at >= DEVICE_IDS_TTL_S:
            async with self.services.db.session() as s:
                ids = (
                    await s.execute(
                        select(Device.id).where(
                            Device.transport == onboarding.TRANSPORT_OPENADR,
                            Device.offboarded_ms.is_(None),
                        )
                    )
                ).scalars()
                self._ids = np.array(sorted(ids), dtype=object)
            self._ids_at = time.monotonic()
        return self._ids

    async def mask(self, device_ids: npt.NDArray[np.object_]) -> npt.NDArray[np.bool_]:
        """Which of ``device_ids`` are reached over OpenADR (vectorised; all False without
        any)."""
        ids = await self.device_ids()
        if ids.size == 0 or len(device_ids) == 0:
            return np.zeros(len(device_ids), bool)
        return np.isin(device_ids, ids)

    async def send(self, device_ids: Sequence[str], bodies: Sequence[bytes]) -> None:
        """Each command (the contract's JSON) as the OpenADR event of its device."""
        for device_id, body in zip(device_ids, bodies, strict=True):
            await self._one(device_id, orjson.loads(body))

    async def _one(self, device_id: str, cmd: Mapping[str, Any]) -> None:
        database = self.services.db
        async with database.session() as s:
            res = await s.get(OpenAdrObject, device_id)
            device = await s.get(Device, device_id)
        if res is None or res.object_type != RESOURCE or device is None:
            log.warning("openadr: no resource for device %s; command %s dropped", device_id,
                        cmd.get("command_id"))  # fmt: skip
            return
        tenant = res.tenant_id
        ven = await db.get_object(database, tenant, VEN, str(res.ven_id))
        program = await self._program(tenant, device.region)
        unique = f"{cmd['event_id']}/{device_id}"
        row = await db.find_named(database, tenant, EVENT, program.id, unique)
        now = int(self.services.clock.now_ms())
        if cmd["type"] == CommandType.restore.value:
            if row is None:
                return
            body = cut_event(row.body, now)
        else:
            body = dispatch_event(
                program_id=program.id,
                event_name=f"vpp dispatch {cmd['event_id']}",
                targets=[str(ven.unique_name), str(res.unique_name)],
                command=cmd,
            )
        if row is not None:
            row = await db.update_object(database, row.id, body, now, unique_name=unique)
            self._emit(row, "UPDATE")
            return
        row = OpenAdrObject(
            id=db.new_object_id(EVENT),
            tenant_id=tenant,
            object_type=EVENT,
            client_id=None,
            ven_id=ven.id,
            parent_id=program.id,
            unique_name=unique,
            body=body,
            created_ms=now,
            modified_ms=now,
        )
        await db.insert_object(database, row)
        self._emit(row, "CREATE")

    async def _program(self, tenant_id: str, region: str) -> OpenAdrObject:
        """The tenant's program of the service's dispatch events in ``region`` (made once)."""
        name = PROGRAM_PREFIX + region
        database = self.services.db
        found = await db.find_named(database, tenant_id, PROGRAM, "", name)
        if found is not None:
            return found
        now = int(self.services.clock.now_ms())
        body = {
            "programName": name,
            "programLongName": f"the VPP's dispatch of its fleet in {region}",
            "attributes": [{"type": REGION_ATTRIBUTE, "values": [region]}],
        }
        row = OpenAdrObject(
            id=db.new_object_id(PROGRAM), tenant_id=tenant_id, object_type=PROGRAM,
            client_id=None, parent_id="", unique_name=name, body=body,
            created_ms=now, modified_ms=now,
        )  # fmt: skip
        try:
            await db.insert_object(database, row)
        except Conflict:  # made meanwhile
            found = await db.find_named(database, tenant_id, PROGRAM, "", name)
            if found is None:
                raise NotFound("programID", f"no program {name!r}") from None
            return found
        self._emit(row, "CREATE")
        return row

    def _emit(self, row: OpenAdrObject, operation: str) -> None:
        if self.webhooks is not None:
            self.webhooks.emit(row, operation, doc(self.services.settings.openadr_vtn_name, row))
