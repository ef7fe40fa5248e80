"""The vendored OpenADR 3.1.0 description as JSON Schema: the VTN checks request bodies against
it (400 naming the field), and the tests check every answer against it.

OpenAPI 3.0 is not quite JSON Schema: ``nullable: true`` becomes ``anyOf`` with null, the
boolean ``exclusiveMaximum`` becomes the number form, ``discriminator`` is dropped. Two places
of 3.1.0 are patched, as the issue's conventions say: the ven and resource schemas require an
``objectType`` of ``BL_VEN_REQUEST`` / ``BL_RESOURCE_REQUEST`` where their ``objectMetadata``
requires ``VEN`` / ``RESOURCE`` (the answer follows ``objectMetadata``), and a request may
leave out ``objectType`` and ``clientID`` (the VTN knows the client from its token)."""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from vpp.errors import InvalidInput

SPEC_FILE = "openadr3-3.1.0.yaml"
_REQUEST_ONLY = ("objectType", "clientID")


@lru_cache(maxsize=1)
def spec_text() -> str:
    return (resources.files("api.openadr.spec") / SPEC_FILE).read_text(encoding="utf-8")


class _Loader(yaml.SafeLoader):
    """YAML as JSON sees it: a time stays a string (``example: 2023-06-15T09:30:00Z``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@lru_cache(maxsize=1)
def openapi() -> dict[str, Any]:
    """The vendored description as a dict, with the ven/resource patch applied."""
    doc: dict[str, Any] = yaml.load(spec_text(), Loader=_Loader)
    schemas = doc["components"]["schemas"]
    for name in ("BlVenRequest", "VenVenRequest", "BlResourceRequest", "VenResourceRequest"):
        s = schemas[name]
        s["properties"]["objectType"].pop("enum", None)
        s["required"] = [r for r in s.get("required", []) if r != "objectType"]
    # A ven's targets default reads "null          -" in 3.1.0 (a stray dash): null is meant.
    schemas["BlVenRequest"]["properties"]["targets"]["default"] = None
    return doc


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in ("discriminator", "example")}
    for bound, exclusive in (("maximum", "exclusiveMaximum"), ("minimum", "exclusiveMinimum")):
        flag = out.get(exclusive)
        if isinstance(flag, bool):
            out.pop(exclusive)
            if flag and bound in out:
                out[exclusive] = out.pop(bound)
    if out.pop("nullable", False):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def components() -> dict[str, Any]:
    return {"components": _convert(openapi()["components"])}


@lru_cache(maxsize=32)
def validator(name: str, *, request: bool = False) -> Draft202012Validator:
    """A validator of ``#/components/schemas/<name>``; ``request``: objectType and clientID
    may be left out (the ven and resource requests)."""
    root = copy.deepcopy(components())
    if request:
        for s in root["components"]["schemas"].values():
            if isinstance(s, dict) and "required" in s:
                s["required"] = [r for r in s["required"] if r not in _REQUEST_ONLY]
    root["$ref"] = f"#/components/schemas/{name}"
    return Draft202012Validator(root)


def field_of(error: ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [r for r in error.validator_value if r not in error.instance]
        if missing:
            out = f"{out}.{missing[0]}" if out else str(missing[0])
    return out or "body"


def check_request(name: str, body: Any) -> None:
    """InvalidInput naming the first offending field if ``body`` is not a valid ``name``."""
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    error = best_match(validator(name, request=True).iter_errors(body))
    if error is not None:
        message = error.message if len(error.message) <= 300 else error.message[:300] + "…"
        raise InvalidInput(field_of(error), message)


def response_errors(name: str, body: Any) -> list[str]:
    """Every way ``body`` fails ``#/components/schemas/<name>`` (the tests' response check)."""
    return [f"{field_of(e)}: {e.message}" for e in validator(name).iter_errors(body)]


@lru_cache(maxsize=32)
def _query_validators(path: str) -> dict[str, tuple[str, Draft202012Validator]]:
    """name → (type, validator) of the GET operation's query parameters."""
    op = openapi()["paths"].get(path, {}).get("get", {})
    out: dict[str, tuple[str, Draft202012Validator]] = {}
    for param in op.get("parameters", []):
        if param.get("in") != "query":
            continue
        root = copy.deepcopy(components())
        root.update(_convert(param.get("schema", {})))
        kind = _kind(root)
        out[param["name"]] = (kind, Draft202012Validator(root))
    return out


def _kind(root: dict[str, Any]) -> str:
    if "type" in root:
        return str(root["type"])
    ref = root.get("$ref", "")
    target = root["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    return str(target.get("type", "string"))


def check_query(path: str, items: Any) -> None:
    """InvalidInput naming the parameter if a query parameter the spec gives the GET of
    ``path`` does not match its schema (others are let through: 3.0-style ``targetType``)."""
    known = _query_validators(path)
    given: dict[str, list[str]] = {}
    for name, raw in items:
        given.setdefault(name, []).append(raw)
    for name, values in given.items():
        if name not in known:
            continue
        kind, check = known[name]
        value: Any = values
        if kind == "array":
            pass
        elif len(values) > 1:
            raise InvalidInput(name, "given more than once")
        elif kind == "integer":
            try:
                value = int(values[0])
            except ValueError:
                raise InvalidInput(name, f"{values[0]!r} is not an integer") from None
        elif kind == "boolean":
            if values[0].lower() not in ("true", "false"):
                raise InvalidInput(name, "must be true or false")
            value = values[0].lower() == "true"
        else:
            value = values[0]
        error = best_match(check.iter_errors(value))
        if error is not None:
            raise InvalidInput(name, error.message[:300])
