"""The one timestamp format on the wire, and the one parser.

Every time the service writes out (HTTP JSON, the settlement CSV, the CLI's and the demo's
output) is :func:`to_rfc3339`: RFC 3339 in UTC with exactly three millisecond digits and ``Z``,
``2026-07-15T17:00:00.000Z``. Times read in go through :func:`parse_rfc3339`, which returns epoch
milliseconds. Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import overload

__all__ = ["EXAMPLE", "TimeFormatError", "parse_rfc3339", "to_rfc3339"]

EXAMPLE = "2026-07-15T17:00:00Z"
"""An input example for error messages and help texts."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Date, T (or t or a space), hours and minutes, seconds and any fraction of them, then Z, z or a
# numeric offset (+HH:MM or +HHMM); without the offset the time is naive.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)


class TimeFormatError(ValueError):
    """A time that is not RFC 3339 (or lacks a required offset). ``str()`` is ``field: reason``,
    the service's error shape; ``reason`` alone is there for callers that name the field
    themselves."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@overload
def to_rfc3339(epoch_ms: int | float) -> str: ...
@overload
def to_rfc3339(epoch_ms: None) -> None: ...
def to_rfc3339(epoch_ms: int | float | None) -> str | None:
    """Epoch ms → ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC, always three ms digits); None → None.
    A fractional ms is floored."""
    if epoch_ms is None:
        return None
    ms = math.floor(epoch_ms) if isinstance(epoch_ms, float) else int(epoch_ms)
    seconds, frac = divmod(ms, 1000)
    try:
        dt = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"epoch ms {epoch_ms!r} is outside the years 1–9999") from None
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
        f"T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{frac:03d}Z"
    )


def parse_rfc3339(text: str, field: str = "time", *, assume_utc: bool = False) -> int:
    """RFC 3339 → epoch ms (UTC). Takes ``Z``, ``z`` or a numeric offset (``+02:00``,
    ``-0500``), ``T``, ``t`` or a space between date and time, and any number of fractional
    second digits (cut to the millisecond, towards the past); the seconds may be left out.
    Without an offset the time is refused unless ``assume_utc``, which reads it as UTC.

    Raises :class:`TimeFormatError` (a ValueError) naming ``field``."""
    if not isinstance(text, str):
        kind = type(text).__name__
        raise TimeFormatError(field, f"an RFC 3339 string such as {EXAMPLE}, not {kind}")
    given = text.strip()
    match = _RFC3339.fullmatch(given)
    if match is None:
        shown = given if len(given) <= 40 else given[:40] + "…"
        raise TimeFormatError(field, f"{shown!r} is not an RFC 3339 time such as {EXAMPLE}")
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = match.groups()
    if not (zulu or sign or assume_utc):
        raise TimeFormatError(field, f"{given!r} has no offset: add Z or ±HH:MM, as in {EXAMPLE}")
    try:
        dt = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), tzinfo=UTC
        )
    except ValueError as exc:
        raise TimeFormatError(field, f"{given!r} is not a valid time ({exc})") from None
    offset_min = 0
    if sign:
        if int(off_h) > 23 or int(off_m) > 59:
            raise TimeFormatError(field, f"{given!r} has an invalid offset")
        offset_min = (int(off_h) * 60 + int(off_m)) * (1 if sign == "+" else -1)
    ms = (dt - _EPOCH) // _MS + int((frac or "")[:3].ljust(3, "0"))
    return ms - offset_min * 60_000
