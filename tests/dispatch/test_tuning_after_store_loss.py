"""The forecast tuning a calibrator learnt lives in the state store as a cache: when the store
is lost, a process that still has it installed puts it back, and a process started after the
loss adopts it (instead of forecasting on defaults until the next daily calibration)."""

from __future__ import annotations

import orjson

from dispatch.forecast_service import TUNING_KEY, ForecastService, tuning_to_json
from tests.helpers.settings import REDIS_URL, make_settings
from vpp.forecast.model import QuantileMap, ShockParams

REGION = "ERCOT-NORTH"


async def test_a_lost_tuning_is_put_back_by_a_process_that_has_it(
    services_factory, sqlite_url: str
) -> None:  # type: ignore[no-untyped-def]
    svc = await services_factory(make_settings(sqlite_url, redis_url=REDIS_URL))
    learnt = ForecastService(svc)
    shocks = ShockParams(temp_sigma_c=2.5)
    info = {"learnt_ms": 1_000, "days": 20, "samples": 0}
    learnt.set_tuning(REGION, shocks=shocks, info=info)
    key = TUNING_KEY.format(region=REGION)
    await svc.state.set_value(key, orjson.dumps(tuning_to_json(shocks, QuantileMap(), info)))

    await svc.state.flush_prefix()  # Redis restarted empty
    assert await svc.state.get_value(key) is None
    await learnt.load_tuning(REGION, force=True)  # its next periodic read
    assert await svc.state.get_value(key) is not None

    started_after = ForecastService(svc)
    got = await started_after.tuning_info(REGION)
    assert got["learnt"] is True and got["days"] == 20
    assert got["temp_sigma_c"] == 2.5


async def test_an_older_tuning_in_the_store_gives_way_to_a_newer_one(
    services_factory, sqlite_url: str
) -> None:  # type: ignore[no-untyped-def]
    svc = await services_factory(make_settings(sqlite_url))
    key = TUNING_KEY.format(region=REGION)
    newer = ForecastService(svc)
    newer.set_tuning(
        REGION, shocks=ShockParams(temp_sigma_c=3.0), info={"learnt_ms": 2_000, "days": 30}
    )
    old = {"learnt_ms": 1_000, "days": 10}
    await svc.state.set_value(key, orjson.dumps(tuning_to_json(ShockParams(), QuantileMap(), old)))
    await newer.load_tuning(REGION, force=True)
    assert (await ForecastService(svc).tuning_info(REGION))["days"] == 30
