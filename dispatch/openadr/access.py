"""Who sees what in the VTN, and how an object is answered: shared by the VTN's rules
(``vtn``) and its webhooks (``webhooks``), which notify a subscriber only of what it may see.

A business-logic client (``bl``) sees every object of its tenant; a VEN client sees every
program, the events that target it (no targets: the whole program; or targets naming its
venName or one of its resources' names; an event the service made for one ven's resource, its
dispatch, that ven alone), and only its own ven, resources, reports and
subscriptions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from store import openadr as db
from store.database import Database
from store.models import OpenAdrObject
from vpp.timefmt import to_rfc3339

PROGRAM, EVENT, REPORT, SUBSCRIPTION, VEN, RESOURCE = (
    "PROGRAM",
    "EVENT",
    "REPORT",
    "SUBSCRIPTION",
    "VEN",
    "RESOURCE",
)
OBJECT_TYPES = (PROGRAM, EVENT, REPORT, SUBSCRIPTION, VEN, RESOURCE)
# The server's fields, dropped from what a client sends (a client may send an object back).
METADATA = ("id", "createdDateTime", "modificationDateTime", "objectType")
# The field whose value is the object's unique name (409 when taken) and its scope.
NAME_FIELD = {PROGRAM: "programName", VEN: "venName", RESOURCE: "resourceName"}


@dataclass(frozen=True)
class Caller:
    """A client of the VTN, as its bearer token says."""

    client_id: str
    tenant_id: str
    role: str  # bl | ven
    ven_name: str | None
    scopes: frozenset[str]

    @property
    def is_bl(self) -> bool:
        return self.role == "bl"


@dataclass(frozen=True)
class Mine:
    """What a VEN client owns: its ven ids and the names events may target it by."""

    ven_ids: frozenset[str]
    names: frozenset[str]


def target_strings(targets: Any) -> set[str]:
    """3.1 targets are strings; 3.0-style ``{"type": …, "values": […]}`` targets are read too."""
    out: set[str] = set()
    for t in targets or []:
        if isinstance(t, str):
            out.add(t)
        elif isinstance(t, Mapping):
            out.update(v for v in t.get("values") or [] if isinstance(v, str))
    return out


def doc(vtn_name: str, row: OpenAdrObject) -> dict[str, Any]:
    """An object as the VTN answers it: its body and the server's metadata."""
    out = dict(row.body)
    out["id"] = row.id
    out["createdDateTime"] = to_rfc3339(row.created_ms)
    out["modificationDateTime"] = to_rfc3339(row.modified_ms)
    out["objectType"] = row.object_type
    if row.object_type in (REPORT, SUBSCRIPTION, VEN, RESOURCE):
        out["clientID"] = row.client_id or vtn_name
    if row.object_type == RESOURCE:
        out["venID"] = row.ven_id
    return out


async def mine(database: Database, caller: Caller) -> Mine:
    if caller.is_bl:
        return Mine(frozenset(), frozenset())
    vens = await db.list_objects(database, caller.tenant_id, VEN, client_id=caller.client_id)
    ven_ids = frozenset(v.id for v in vens)
    names = {str(v.unique_name) for v in vens if v.unique_name}
    if caller.ven_name:
        names.add(caller.ven_name)
    if ven_ids:
        resources = await db.list_objects(
            database, caller.tenant_id, RESOURCE, ven_ids=sorted(ven_ids)
        )
        names.update(str(r.unique_name) for r in resources if r.unique_name)
    return Mine(ven_ids, frozenset(names))


def sees(caller: Caller, mine: Mine, row: OpenAdrObject) -> bool:
    if row.tenant_id != caller.tenant_id:
        return False
    if caller.is_bl:
        return True
    kind = row.object_type
    if kind == PROGRAM:
        return True
    if kind == EVENT:
        if row.ven_id is not None:  # the service's event for one ven's resource
            return row.ven_id in mine.ven_ids
        targets = target_strings(row.body.get("targets"))
        return not targets or bool(targets & mine.names)
    if kind == VEN:
        return row.id in mine.ven_ids
    if kind == RESOURCE:
        return row.ven_id in mine.ven_ids
    return row.client_id == caller.client_id  # REPORT, SUBSCRIPTION
