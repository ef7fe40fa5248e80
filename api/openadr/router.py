"""The OpenADR 3.1 VTN under ``/openadr3/3.1.0`` (``GET /openadr3/3.1.0/programs``): programs,
events, reports, subscriptions, vens, resources (also as the 3.0-style ``/vens/{venID}/
resources`` sub-paths), ``auth/server``, ``auth/token`` and ``GET /notifiers`` (webhooks; the
MQTT notifier binding answers 501). The rules are in ``dispatch.openadr``; this is HTTP: the
bearer token and its scopes, request bodies checked against the vendored spec (400 naming the
field), and the spec's problem object for every error.

The VTN's operations are documented by the vendored spec (``GET /openadr3/3.1.0/openapi.yaml``),
not in the service's own ``/openapi.json``."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from api.deps import get_services
from api.openadr import schema
from api.openadr.auth import (
    READ_TARGETS,
    READ_VEN_OBJECTS,
    TokenError,
    current_caller,
    issue,
    needs,
)
from api.openadr.problems import ProblemRoute, problem
from dispatch.openadr.access import EVENT, PROGRAM, REPORT, RESOURCE, SUBSCRIPTION, VEN, Caller
from dispatch.openadr.vtn import clean, drop_nulls, filters_of
from dispatch.services import Services
from vpp.errors import InvalidInput

PREFIX = "/openadr3/3.1.0"
router = APIRouter(
    prefix=PREFIX, route_class=ProblemRoute, include_in_schema=False, tags=["openadr"]
)

_OBJECT_ID = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_LIMIT = 50


class Collection:
    def __init__(
        self, path: str, kind: str, request_schema: str, read: tuple[str, ...], write: str
    ) -> None:
        self.path, self.kind, self.request_schema = path, kind, request_schema
        self.read, self.write = read, write


COLLECTIONS = (
    Collection("programs", PROGRAM, "programRequest", READ_TARGETS, "write_programs"),
    Collection("events", EVENT, "eventRequest", READ_TARGETS, "write_events"),
    Collection("reports", REPORT, "reportRequest", READ_VEN_OBJECTS, "write_reports"),
    Collection("subscriptions", SUBSCRIPTION, "subscriptionRequest", READ_VEN_OBJECTS,
               "write_subscriptions"),
    Collection("vens", VEN, "BlVenRequest", READ_VEN_OBJECTS, "write_vens"),
    Collection("resources", RESOURCE, "BlResourceRequest", READ_VEN_OBJECTS, "write_vens"),
)  # fmt: skip


def _object_id(value: str, field: str) -> str:
    if not _OBJECT_ID.match(value):
        raise InvalidInput(field, "must be 1 to 128 of a-z, A-Z, 0-9, _ and -")
    return value


async def _body(request: Request, col: Collection, ven_id: str | None = None) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("body", "not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    body = drop_nulls(body)
    if ven_id is not None:
        body["venID"] = ven_id
    schema.check_request(col.request_schema, body)
    return clean(body)


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(name, f"{raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise InvalidInput(name, f"must be within {lo}..{hi}")
    return value


def _filters(request: Request, path: str) -> dict[str, Any]:
    schema.check_query(path, request.query_params.multi_items())
    pairs = [(k, v) for k, v in request.query_params.multi_items() if k not in ("skip", "limit")]
    filters = filters_of(pairs)
    if "active" in filters:
        value = str(filters["active"]).lower()
        if value not in ("true", "false"):
            raise InvalidInput("active", "must be true or false")
        filters["active"] = value == "true"
    return filters


def _add_collection(col: Collection) -> None:
    kind = col.kind
    item = f"/{col.path}/{{object_id}}"

    async def search(request: Request, caller: Caller = Depends(needs(*col.read)),
                     services: Services = Depends(get_services)) -> Any:  # fmt: skip
        skip = _int(request, "skip", 0, 0, (1 << 31) - 1)
        limit = _int(request, "limit", MAX_LIMIT, 0, MAX_LIMIT)
        filters = _filters(request, f"/{col.path}")
        return await services.openadr.search(caller, kind, filters, skip, limit)

    async def create(request: Request, caller: Caller = Depends(needs(col.write)),
                     services: Services = Depends(get_services)) -> Any:  # fmt: skip
        doc = await services.openadr.create(caller, kind, await _body(request, col))
        return JSONResponse(doc, status_code=201)

    async def get(object_id: str, caller: Caller = Depends(needs(*col.read)),
                  services: Services = Depends(get_services)) -> Any:  # fmt: skip
        return await services.openadr.get(caller, kind, _object_id(object_id, "id"))

    async def update(object_id: str, request: Request, caller: Caller = Depends(needs(col.write)),
                     services: Services = Depends(get_services)) -> Any:  # fmt: skip
        oid = _object_id(object_id, "id")
        return await services.openadr.update(caller, kind, oid, await _body(request, col))

    async def delete(object_id: str, caller: Caller = Depends(needs(col.write)),
                     services: Services = Depends(get_services)) -> Any:  # fmt: skip
        return await services.openadr.delete(caller, kind, _object_id(object_id, "id"))

    router.add_api_route(f"/{col.path}", search, methods=["GET"], name=f"search_{col.path}")
    router.add_api_route(f"/{col.path}", create, methods=["POST"], name=f"create_{col.path}")
    router.add_api_route(item, get, methods=["GET"], name=f"get_{col.path}")
    router.add_api_route(item, update, methods=["PUT"], name=f"update_{col.path}")
    router.add_api_route(item, delete, methods=["DELETE"], name=f"delete_{col.path}")


for _col in COLLECTIONS:
    _add_collection(_col)

_RESOURCES = COLLECTIONS[-1]


# --- 3.0-style resources of one ven ---------------------------------------------------------------
async def _ven_of(services: Services, caller: Caller, ven_id: str) -> str:
    await services.openadr.get(caller, VEN, _object_id(ven_id, "venID"))
    return ven_id


@router.get("/vens/{ven_id}/resources")
async def search_ven_resources(ven_id: str, request: Request,
                               caller: Caller = Depends(needs(*READ_VEN_OBJECTS)),
                               services: Services = Depends(get_services)) -> Any:  # fmt: skip
    await _ven_of(services, caller, ven_id)
    filters = {**_filters(request, "/resources"), "venID": ven_id}
    skip = _int(request, "skip", 0, 0, (1 << 31) - 1)
    limit = _int(request, "limit", MAX_LIMIT, 0, MAX_LIMIT)
    return await services.openadr.search(caller, RESOURCE, filters, skip, limit)


@router.post("/vens/{ven_id}/resources")
async def create_ven_resource(ven_id: str, request: Request,
                              caller: Caller = Depends(needs("write_vens")),
                              services: Services = Depends(get_services)) -> Any:  # fmt: skip
    await _ven_of(services, caller, ven_id)
    body = await _body(request, _RESOURCES, ven_id)
    return JSONResponse(await services.openadr.create(caller, RESOURCE, body), status_code=201)


async def _resource_of(services: Services, caller: Caller, ven_id: str, resource_id: str) -> str:
    await _ven_of(services, caller, ven_id)
    doc = await services.openadr.get(caller, RESOURCE, _object_id(resource_id, "resourceID"))
    if doc.get("venID") != ven_id:
        from vpp.errors import NotFound

        raise NotFound("resourceID", f"no resource {resource_id!r} of ven {ven_id!r}")
    return resource_id


@router.get("/vens/{ven_id}/resources/{resource_id}")
async def get_ven_resource(ven_id: str, resource_id: str,
                           caller: Caller = Depends(needs(*READ_VEN_OBJECTS)),
                           services: Services = Depends(get_services)) -> Any:  # fmt: skip
    await _resource_of(services, caller, ven_id, resource_id)
    return await services.openadr.get(caller, RESOURCE, resource_id)


@router.put("/vens/{ven_id}/resources/{resource_id}")
async def update_ven_resource(ven_id: str, resource_id: str, request: Request,
                              caller: Caller = Depends(needs("write_vens")),
                              services: Services = Depends(get_services)) -> Any:  # fmt: skip
    await _resource_of(services, caller, ven_id, resource_id)
    body = await _body(request, _RESOURCES, ven_id)
    return await services.openadr.update(caller, RESOURCE, resource_id, body)


@router.delete("/vens/{ven_id}/resources/{resource_id}")
async def delete_ven_resource(ven_id: str, resource_id: str,
                              caller: Caller = Depends(needs("write_vens")),
                              services: Services = Depends(get_services)) -> Any:  # fmt: skip
    await _resource_of(services, caller, ven_id, resource_id)
    return await services.openadr.delete(caller, RESOURCE, resource_id)


# --- auth, notifiers, the description ------------------------------------------------------------
@router.get("/auth/server")
async def auth_server(request: Request) -> Any:
    return {"tokenURL": str(request.url_for("fetch_token"))}


@router.post("/auth/token", name="fetch_token")
async def fetch_token(request: Request, services: Services = Depends(get_services)) -> Any:
    try:
        form = await request.form()
    except Exception:
        return problem(400, "body: not an application/x-www-form-urlencoded form",
                       error="invalid_request")  # fmt: skip
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        answer = await issue(services, fields, request.headers.get("authorization"))
    except TokenError as exc:
        headers = {"WWW-Authenticate": 'Basic realm="openadr"'} if exc.status == 401 else None
        return problem(exc.status, exc.description, headers, error=exc.error,
                       error_description=exc.description)  # fmt: skip
    return JSONResponse(answer, headers={"Cache-Control": "no-store"})


@router.get("/notifiers")
async def notifiers(caller: Caller = Depends(current_caller)) -> Any:
    return {"WEBHOOK": True}


@router.get("/notifiers/mqtt/{rest:path}")
async def mqtt_topics(rest: str, caller: Caller = Depends(current_caller)) -> Any:
    return problem(
        501,
        "the MQTT notifier binding is not offered by this VTN (GET /notifiers lists WEBHOOK "
        "only): subscribe with a callbackUrl",
    )


@router.get("/openapi.yaml")
async def description() -> Response:
    return PlainTextResponse(schema.spec_text(), media_type="application/yaml")
