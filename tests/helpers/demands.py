"""Demands for the optimiser and assignment tests: a 4-hour horizon of 15-minute intervals an
hour after ``NOW``, and demands placed in it by hours from its start."""

from __future__ import annotations

from typing import Any

from dispatch.types import Demand, Horizon
from tests.helpers.fleets import NOW, REGION

H = 3_600_000


def horizon(n: int = 16) -> Horizon:
    return Horizon(start_ms=NOW + H, interval_s=900, n_intervals=n)


def demand(
    id: str = "r1", mw: float = 0.01, start_h: float = 0.0, end_h: float = 2.0, **kw: object
) -> Demand:
    h = horizon()
    args: dict[str, Any] = {"region": REGION, **kw}
    return Demand(
        id=id,
        start_ms=h.start_ms + int(start_h * H),
        end_ms=h.start_ms + int(end_h * H),
        mw=mw,
        **args,
    )
