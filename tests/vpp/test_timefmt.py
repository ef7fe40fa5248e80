"""vpp.timefmt: the one wire format for times and the one parser."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpp.timefmt import EXAMPLE, TimeFormatError, parse_rfc3339, to_rfc3339

WIRE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# Years 1..9999, the range both ends can represent.
EPOCH_MS = st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999)


def test_formats_utc_with_three_millisecond_digits() -> None:
    assert to_rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert to_rfc3339(1_784_061_000_000) == "2026-07-14T20:30:00.000Z"
    assert to_rfc3339(1_784_061_000_007) == "2026-07-14T20:30:00.007Z"
    assert to_rfc3339(1_784_061_000_120) == "2026-07-14T20:30:00.120Z"
    assert to_rfc3339(-1) == "1969-12-31T23:59:59.999Z"
    assert to_rfc3339(-62_135_596_800_000) == "0001-01-01T00:00:00.000Z"
    assert to_rfc3339(None) is None


def test_a_float_is_floored_to_the_millisecond() -> None:
    assert to_rfc3339(1_784_061_000_123.9) == "2026-07-14T20:30:00.123Z"
    assert to_rfc3339(-0.5) == "1969-12-31T23:59:59.999Z"


def test_numpy_integers_format() -> None:
    np = pytest.importorskip("numpy")
    assert to_rfc3339(np.int64(1_784_061_000_000)) == "2026-07-14T20:30:00.000Z"


def test_outside_the_representable_years_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        to_rfc3339(10**20)
    with pytest.raises(ValueError):
        to_rfc3339(float("nan"))


@given(EPOCH_MS)
def test_round_trip_and_always_the_wire_shape(ms: int) -> None:
    text = to_rfc3339(ms)
    assert WIRE.fullmatch(text), text
    assert parse_rfc3339(text) == ms


@given(EPOCH_MS)
def test_agrees_with_datetime(ms: int) -> None:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert to_rfc3339(ms) == dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(
    EPOCH_MS.filter(lambda ms: -62_135_510_400_000 < ms < 253_402_214_400_000),  # a day in
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
    st.sampled_from([":", ""]),
)
def test_a_numeric_offset_names_the_same_instant(ms: int, offset_min: int, colon: str) -> None:
    tz = timezone(timedelta(minutes=offset_min))
    local = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).astimezone(tz)
    text = local.isoformat(timespec="milliseconds")  # ...+HH:MM
    text = text[:-3] + colon + text[-2:]
    assert parse_rfc3339(text) == ms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-07-15T17:00:00Z", "2026-07-15T17:00:00.000Z"),
        ("2026-07-15t17:00:00z", "2026-07-15T17:00:00.000Z"),
        ("2026-07-15 17:00:00Z", "2026-07-15T17:00:00.000Z"),
        ("  2026-07-15T17:00:00Z\n", "2026-07-15T17:00:00.000Z"),
        ("2026-07-15T19:00:00+02:00", "2026-07-15T17:00:00.000Z"),
        ("2026-07-15T12:00:00-0500", "2026-07-15T17:00:00.000Z"),
        ("2026-07-15T17:00:00-00:00", "2026-07-15T17:00:00.000Z"),
        ("2026-07-15T17:00Z", "2026-07-15T17:00:00.000Z"),  # seconds left out
        ("2026-07-15T17:00:00.5Z", "2026-07-15T17:00:00.500Z"),
        ("2026-07-15T17:00:00.12Z", "2026-07-15T17:00:00.120Z"),
        ("2026-07-15T17:00:00.123Z", "2026-07-15T17:00:00.123Z"),
        ("2026-07-15T17:00:00.123000Z", "2026-07-15T17:00:00.123Z"),  # the old grid-event form
        ("2026-07-15T17:00:00.123999999Z", "2026-07-15T17:00:00.123Z"),  # cut, not rounded
        ("2026-07-16T01:30:00.250+08:30", "2026-07-15T17:00:00.250Z"),
        ("1969-12-31T23:59:59.9999Z", "1969-12-31T23:59:59.999Z"),
    ],
)
def test_parses_offsets_and_any_fraction(text: str, expected: str) -> None:
    assert to_rfc3339(parse_rfc3339(text)) == expected


def test_a_time_without_an_offset_is_refused_unless_utc_is_assumed() -> None:
    with pytest.raises(TimeFormatError, match=r"^start: .*no offset"):
        parse_rfc3339("2026-07-15T17:00:00", "start")
    assert parse_rfc3339("2026-07-15T17:00:00", "start", assume_utc=True) == parse_rfc3339(
        "2026-07-15T17:00:00Z"
    )
    assert parse_rfc3339("2026-07-15T17:00:00.5", assume_utc=True) % 1000 == 500


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tomorrow",
        "2026-07-15",  # a date is not a time
        "2026-07-15T17Z",
        "2026-7-15T17:00:00Z",
        "2026-07-15T17:00:00.Z",
        "2026-07-15T17:00:00,5Z",
        "2026-07-15T17:00:00+2",
        "2026-07-15T17:00:00+02:00:00",
        "2026-07-15T17:00:00 UTC",
        "2026-07-15T17:00:00ZZ",
        "2026-13-15T17:00:00Z",
        "2026-02-30T17:00:00Z",
        "2026-07-15T24:00:00Z",
        "2026-07-15T17:60:00Z",
        "2026-07-15T17:00:60Z",  # no leap seconds
        "2026-07-15T17:00:00+24:00",
        "2026-07-15T17:00:00+01:60",
        "٢٠٢٦-07-15T17:00:00Z",  # digits other than ASCII
        "1784061000000",
    ],
)
def test_errors_name_the_field(text: str) -> None:
    with pytest.raises(TimeFormatError) as info:
        parse_rfc3339(text, "end")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == "end" and str(err) == f"end: {err.reason}"
    assert str(err).startswith("end: ")


def test_a_non_string_is_refused_naming_the_field() -> None:
    with pytest.raises(TimeFormatError, match=r"^start: an RFC 3339 string .* not int"):
        parse_rfc3339(1_784_061_000, "start")  # type: ignore[arg-type]


def test_the_message_shows_an_example_and_a_cut_input() -> None:
    with pytest.raises(TimeFormatError) as info:
        parse_rfc3339("x" * 500, "start")
    assert EXAMPLE in info.value.reason and len(info.value.reason) < 120
    assert parse_rfc3339(EXAMPLE) == 1_784_134_800_000


def test_default_field_name() -> None:
    with pytest.raises(TimeFormatError, match=r"^time: "):
        parse_rfc3339("soon")
