"""GET /v1/forecast: available MW per interval as P50 and P90, with what is already committed."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from api.deps import get_services, require_roles
from vpp.errors import InvalidInput
from vpp.timefmt import TimeFormatError, parse_rfc3339, to_rfc3339

router = APIRouter()

_DURATION = re.compile(
    r"^P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


class ForecastInterval(BaseModel):
    start: str = Field(description="interval start, RFC 3339 UTC")
    p50_mw: float = Field(description="MW the fleet delivers with 50 % probability")
    p90_mw: float = Field(description="MW the fleet delivers with at least 90 % probability")
    committed_mw: float = Field(description="MW already booked for this interval")
    firm_mw: float | None = Field(None, description="MW at the requested firmness, if asked")


class ForecastOut(BaseModel):
    region: str = Field(description="ISO zone asked for")
    step: str = Field(description="ISO 8601 duration of each interval")
    calibrated: bool = Field(
        description="false while the region has too little history: the brief's defaults apply"
    )
    calibration: dict[str, Any] | None = Field(
        None,
        description="the shock sizes and quantile correction in use, learnt from the region's "
        "own history once a day: days and PIT samples learnt from (0: defaults), the guard and "
        "scenario level of the P90, the temperature-forecast error sigma",
    )
    n_devices: int = Field(description="devices of the region the forecast is made from")
    firmness: float | None = Field(None, description="the firmness asked for, if any")
    event: str = Field(description="ISO 8601 length of the event each interval is valued in")
    intervals: list[ForecastInterval] = Field(description="one row per step of the window")


def parse_duration_s(text: str) -> int:
    """ISO 8601 duration (PT15M, PT1H, P1D, PT900S) → whole seconds."""
    match = _DURATION.match(text.strip().upper()) if text else None
    if match is None or not any(match.groupdict().values()) or text.strip().upper().endswith("T"):
        raise ValueError("an ISO 8601 duration such as PT15M")
    g = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    seconds = g["d"] * 86_400 + g["h"] * 3_600 + g["m"] * 60 + g["s"]
    if seconds != int(seconds):
        raise ValueError("must be a whole number of seconds")
    return int(seconds)


def format_duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"PT{seconds // 3600}H"
    if seconds % 60 == 0:
        return f"PT{seconds // 60}M"
    return f"PT{seconds}S"


@router.get(
    "/v1/forecast",
    response_model=ForecastOut,
    response_model_exclude_none=True,
    tags=["fleet"],
    summary="Available MW per interval: P50, P90 and already committed",
    responses={422: {"description": "a bad region, start, end, step or firmness (named)"}},
)
async def get_forecast(
    region: str = Query(..., min_length=1, max_length=64, description="ISO zone, e.g. ERCOT-NORTH"),
    start: str | None = Query(None, description="RFC 3339 UTC; default now"),
    end: str | None = Query(None, description="RFC 3339 UTC; default now + the 48 h horizon"),
    step: str = Query("PT15M", description="ISO 8601 duration dividing the window"),
    firmness: float | None = Query(
        None,
        ge=0.5,
        le=0.99,
        allow_inf_nan=False,
        description="also answer firm_mw, the MW held with this probability (0.5–0.99)",
    ),
    event: str | None = Query(
        None,
        description="length of the event each interval is valued in (ISO 8601, PT15M–PT5H); "
        "default the window, cut to 5 h",
    ),
    services: Any = Depends(get_services),
    _principal: Any = Depends(require_roles("admin", "operator", "fleet", "hyperscaler")),
) -> dict[str, Any]:
    forecaster = services.forecast
    now_ms = int(services.clock.now_ms())
    try:
        step_s = parse_duration_s(step)
    except ValueError as exc:
        raise InvalidInput("step", str(exc)) from exc
    try:
        # A time without an offset is read as UTC here (the query parameters always allowed it).
        start_ms = parse_rfc3339(start, "start", assume_utc=True) if start else now_ms
        end_ms = parse_rfc3339(end, "end", assume_utc=True) if end else None
    except TimeFormatError as exc:
        raise InvalidInput(exc.field, exc.reason) from exc
    if end_ms is None:
        # Default: as many whole steps as fit before the horizon.
        horizon_ms = int(services.settings.forecast_horizon_h * 3_600_000)
        step_ms = max(step_s, 1) * 1000
        if step_ms > horizon_ms:
            horizon_h = services.settings.forecast_horizon_h
            raise InvalidInput("step", f"longer than the {horizon_h:g} h forecast horizon")
        end_ms = start_ms + max((now_ms + horizon_ms - start_ms) // step_ms, 1) * step_ms
    try:
        event_h = parse_duration_s(event) / 3600.0 if event else None
    except ValueError as exc:
        raise InvalidInput("event", str(exc)) from exc
    # A bad region, window, step or firmness raises ForecastInputError (an InvalidInput: 422).
    result = await forecaster.forecast(region, start_ms, end_ms, step_s, firmness, event_h=event_h)
    committed = await forecaster.committed_mw(region, result.starts_ms, step_s)
    intervals = []
    for i, s in enumerate(result.starts_ms.tolist()):
        row: dict[str, Any] = {
            "start": to_rfc3339(s),
            "p50_mw": round(float(result.p50_mw[i]), 4),
            "p90_mw": round(float(result.p90_mw[i]), 4),
            "committed_mw": round(float(committed[i]), 4),
        }
        if firmness is not None:
            row["firm_mw"] = round(float(result.firm_mw[i]), 4)
        intervals.append(row)
    return {
        "region": region,
        "step": format_duration(step_s),
        "calibrated": bool(result.calibrated),
        "calibration": await forecaster.tuning_info(region),
        "n_devices": int(result.n_devices),
        "firmness": firmness,
        "event": format_duration(round(result.event_h * 3600)),
        "intervals": intervals,
    }


__all__ = ["format_duration", "parse_duration_s", "router"]
