"""A stand-in forecaster for the market tests: the P90 is whatever the test sets, so the figures
a buyer would check (sellable, quoted, free MW) are exact."""

from __future__ import annotations

from typing import Any

import numpy as np

from dispatch.forecast_service import ForecastService, validate_window
from vpp.forecast.model import ForecastResult


class StubForecast(ForecastService):
    """A forecaster with a set P90 per region (MW), optionally per slot; firmness moves the firm
    MW around the P90 (above it below 0.9, under it above 0.9)."""

    def __init__(self, services: Any, p90_mw: float = 10.0, delay_s: float = 0.0) -> None:
        super().__init__(services)
        self.p90_mw = p90_mw
        self.p90_at: dict[int, float] = {}
        self.delay_s = delay_s
        self.calls = 0

    async def forecast(  # type: ignore[override]
        self,
        region: str,
        start_ms: int,
        end_ms: int,
        step_s: int = 900,
        firmness: float | None = None,
        event_h: float | None = None,
    ) -> ForecastResult:
        import asyncio

        self.calls += 1
        s = self.services.settings
        validate_window(
            region,
            start_ms,
            end_ms,
            step_s,
            self.services.clock.now_ms(),
            s.forecast_horizon_h,
            set(self.services.regions.sold()),
            firmness,
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        starts = np.arange(start_ms, end_ms, step_s * 1000, dtype=np.int64)
        p90 = np.array([self.p90_at.get(int(t), self.p90_mw) for t in starts], dtype=float)
        f = 0.9 if firmness is None else firmness
        firm = p90 * (1.0 + (0.9 - f))
        return ForecastResult(
            region=region,
            starts_ms=starts,
            step_s=step_s,
            p50_mw=p90 * 1.2,
            p90_mw=p90,
            firm_mw=firm,
            calibrated=True,
            n_devices=100,
            firmness=firmness,
        )


def install_stub(services: Any, **kw: Any) -> StubForecast:
    stub = StubForecast(services, **kw)
    services.forecast = stub
    services.market.forecast = stub
    return stub
