"""Request and response bodies of /v1/capacity-requests (the v1 contract, with added fields)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.times import Rfc3339Ms
from vpp.domain import DEFAULT_FIRMNESS, Direction, RequestStatus

MAX_REQUEST_MW = 100_000.0


class CapacityRequestIn(BaseModel):
    """A buyer's ask: firm MW in a region and a window."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "region": "ERCOT-NORTH",
                    "mw": 25,
                    "start": "2026-07-15T19:00:00Z",
                    "end": "2026-07-15T21:00:00Z",
                    "firmness": 0.9,
                    "direction": "load_reduction",
                }
            ]
        }
    )

    region: str = Field(
        min_length=1,
        max_length=64,
        description="ISO zone the capacity is needed in, e.g. ERCOT-NORTH",
    )
    mw: float = Field(
        gt=0,
        le=MAX_REQUEST_MW,
        allow_inf_nan=False,
        description="MW asked for, held over the whole window (0 < mw ≤ 100 000)",
    )
    start: Rfc3339Ms = Field(
        description="window start, RFC 3339 with an offset (UTC preferred); at least the "
        "service's minimum notice ahead of now. Capacity is booked on the 15-minute grid: a "
        "window off the grid books the 15-minute intervals it touches"
    )
    end: Rfc3339Ms = Field(
        description="window end, RFC 3339 with an offset; after start and within the forecast "
        "horizon (48 h by default). Events last at most 5 h: a longer window is quoted "
        "'rejected' with the rule in reason"
    )
    firmness: float = Field(
        DEFAULT_FIRMNESS,
        ge=0.5,
        le=0.99,
        allow_inf_nan=False,
        description="probability the MW is delivered (0.9 = P90), 0.5–0.99",
    )
    direction: Direction = Field(
        Direction.load_reduction,
        description="load_reduction (less drawn from the grid) or net_export (exports count too)",
    )
    max_price_per_mwh: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="the most the buyer pays per MWh (recorded)"
    )


class PlanInterval(BaseModel):
    start: str = Field(description="interval start, RFC 3339 UTC")
    target_mw: float = Field(description="MW asked of the fleet in this interval")
    planned_mw: float = Field(description="MW the plan expects the fleet to deliver")
    shortfall_mw: float = Field(description="target − planned, when the fleet cannot cover it")
    binding: str = Field(
        description="what limits the interval: none, fleet_power, fleet_energy, fatigue_budget, "
        "no_devices, time_limit or preempted_by:<id>"
    )


class DevicesOfKind(BaseModel):
    assigned: float = Field(description="devices the plan allots to this request")
    reserve: float = Field(description="devices held back as replacement reserve")
    mw: float = Field(description="peak planned MW from this kind")


class PlanOut(BaseModel):
    version: int = Field(description="rises each time the plan is re-made")
    created_at: str = Field(description="when this version was made, RFC 3339 UTC")
    interval_s: int = Field(description="plan interval length in seconds")
    solver: str = Field(description="glop, pdlp, or greedy (fallback)")
    status: str = Field(description="solver status")
    reason: str | None = Field(None, description="why this version was made")
    available_mw: float = Field(description="MW the region's fleet could deliver when planned")
    intervals: list[PlanInterval] = Field(description="the plan per interval of the window")
    devices_by_kind: dict[str, DevicesOfKind] = Field(
        description="per device kind (battery, thermostat): devices allotted and in reserve"
    )


class BookedInterval(BaseModel):
    start: str = Field(description="15-minute ledger interval start, RFC 3339 UTC")
    mw: float = Field(description="MW booked for this request in the interval")


class DeliveryInterval(BaseModel):
    start: str = Field(description="settlement interval start, RFC 3339 UTC")
    end: str = Field(description="settlement interval end, RFC 3339 UTC")
    target_mw: float = Field(description="MW committed for the interval")
    delivered_mw: float = Field(description="MW measured (baseline − actual)")
    performance: float = Field(description="delivered ÷ committed, capped at 1")


class DeliverySummaryOut(BaseModel):
    """An event's delivery in one figure per question: the same figures on every screen (the
    request's JSON, its CSV, the dashboard, the demo's report), from one function over the
    same intervals."""

    delivered_mw: float = Field(
        description="MW delivered, averaged over the counted intervals weighted by their "
        "length within the window (MWh ÷ h; not floored: a rebound shows)"
    )
    committed_mw: float = Field(description="MW committed, averaged the same way")
    performance: float | None = Field(
        description="Σ min(delivered, committed) × h ÷ Σ committed × h over the counted "
        "intervals, delivered floored at 0 (null when nothing was committed)"
    )
    intervals: int = Field(
        description="settlement intervals counted: the lines inside the committed window (a "
        "partial last interval counts for its own length)"
    )
    expected_intervals: int = Field(
        description="settlement intervals of the window; more than intervals while some are "
        "not measured yet (those are not counted)"
    )


class CapacityRequestOut(BaseModel):
    id: str = Field(description="cr-<12 hex>")
    status: RequestStatus = Field(
        description="quoted → committed → active → completed, or rejected / cancelled / expired"
    )
    quoted_mw: float = Field(
        description="MW offered: at most what the forecast holds at this firmness, less the "
        "safety margin and what is already committed, and at most the MW asked"
    )
    firmness: float = Field(description="probability the MW is delivered, as asked (0.5–0.99)")
    quote_expires_at: str | None = Field(
        description="RFC 3339 UTC; commit before this (null for a rejected request)"
    )
    reason: str | None = Field(
        None, description="why the request was rejected, or why the quote is short"
    )
    region: str = Field(description="ISO zone, e.g. ERCOT-NORTH")
    mw: float = Field(description="MW asked for")
    committed_mw: float = Field(description="MW booked in the ledger (0 unless committed)")
    start: str = Field(description="window start, RFC 3339 UTC")
    end: str = Field(description="window end, RFC 3339 UTC")
    direction: Direction = Field(description="load_reduction or net_export")
    max_price_per_mwh: float | None = Field(
        None, description="the most the buyer pays per MWh, as asked (recorded)"
    )
    tenant_id: str = Field(description="the buyer's tenant")
    created_at: str = Field(description="when the request was made, RFC 3339 UTC")
    updated_at: str = Field(description="its last status change, RFC 3339 UTC")
    booked: list[BookedInterval] = Field(
        default_factory=list, description="the ledger rows of this request (once committed)"
    )
    plan: PlanOut | None = Field(None, description="the latest dispatch plan, once committed")
    intervals: list[DeliveryInterval] = Field(
        default_factory=list,
        description="once the window has run: per settlement interval target and delivered MW",
    )
    delivery: DeliverySummaryOut | None = Field(
        None,
        description="once measured (request detail only): delivered MW, committed MW and "
        "performance over the intervals, the figures every screen shows",
    )
    performance: float | None = Field(
        None,
        description="Σ min(delivered, committed) × h ÷ Σ committed × h over the settled "
        "intervals (delivery.performance)",
    )
    settled: bool = Field(
        False,
        description="true once every interval of the window is settled: intervals and "
        "performance are final. Before that (the window running, or just ended and its last "
        "readings not yet in) they cover the intervals measured so far",
    )


class QuotePreviewOut(BaseModel):
    """What POST /v1/capacity-requests would answer now, worked out but not stored."""

    status: Literal["quoted", "rejected"] = Field(
        description="what the quote would be: quoted, or rejected (reason says why)"
    )
    quoted_mw: float = Field(description="MW a quote made now would offer (0 if rejected)")
    available_mw: float | None = Field(
        description="the most this window could be quoted at this firmness: the least free MW "
        "over its 15-minute intervals (null when a rule rejects the window)"
    )
    reason: str | None = Field(None, description="why it would be rejected or short")
    binding_interval: str | None = Field(
        None, description="the interval with the least free MW, RFC 3339 UTC"
    )
    quote_would_expire_at: str | None = Field(
        None, description="when a quote made now would expire, RFC 3339 UTC (null unless quoted)"
    )
    intervals: int = Field(description="15-minute ledger intervals the window touches")
    region: str = Field(description="ISO zone, as asked")
    mw: float = Field(description="MW asked for")
    firmness: float = Field(description="probability asked for (0.5–0.99)")
    start: str = Field(description="window start, RFC 3339 UTC")
    end: str = Field(description="window end, RFC 3339 UTC")
    stored: Literal[False] = Field(
        False, description="always false: nothing is stored, booked or audited"
    )


class CapacityRequestList(BaseModel):
    items: list[CapacityRequestOut] = Field(description="this page, newest first")
    total: int = Field(description="requests matching the filters")
    limit: int = Field(description="page size asked for")
    offset: int = Field(description="requests skipped before this page")


ListStatus = Literal[
    "quoted", "committed", "active", "completed", "rejected", "cancelled", "expired"
]
# Spelled out for the OpenAPI query parameter; the vocabulary is RequestStatus's.
assert set(get_args(ListStatus)) == {s.value for s in RequestStatus}
