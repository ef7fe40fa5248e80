"""Times in request bodies: RFC 3339 with an offset on the wire, epoch ms in the model."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import PlainValidator, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

from vpp.timefmt import EXAMPLE, TimeFormatError, parse_rfc3339


def _epoch_ms(value: Any, info: ValidationInfo) -> int:
    try:
        return parse_rfc3339(value, info.field_name or "time")
    except TimeFormatError as exc:
        # The app's validation handler prefixes the field: pass the reason alone.
        raise PydanticCustomError("rfc3339", "{reason}", {"reason": exc.reason}) from None


Rfc3339Ms = Annotated[
    int,
    PlainValidator(_epoch_ms),
    WithJsonSchema({"type": "string", "format": "date-time", "examples": [EXAMPLE]}),
]
"""A body field given as RFC 3339 with an offset (vpp.timefmt.parse_rfc3339), held as epoch ms."""
