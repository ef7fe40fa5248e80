"""Typical-year weather per region, from the files pvlib ships (no download at run time).

pvlib bundles three typical-meteorological-year files: Miami FL (TMY2), Greensboro NC (TMY3)
and Sand Point AK (TMY3). A region takes its clouds and air temperature from the nearest of
them of its climate (a registry field; the distance is part of the answer:
``WeatherYear.source_km``) and its solar geometry from its own load centre and time zone: each
hour's clearness (the site's GHI over its clear-sky GHI) is applied to the clear-sky GHI at the
zone, hour by local hour of the year. So Los Angeles gets Greensboro's clouds but California's
sunrise, sunset and noon elevation. ``sample`` maps any epoch time onto the typical year (by
local standard hour of year), so the same weather repeats every year.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vpp.regions import Region, RegionBook, distance_km

HOURS_PER_YEAR = 8760
CLIMATE_DAYS = 15  # days of the typical year the climate at an hour is averaged over
# The bundled typical years, by file: climate label and format.
BUNDLED_YEARS: dict[str, tuple[str, str]] = {
    "12839.tm2": ("hot", "tmy2"),
    "723170TYA.CSV": ("temperate", "tmy3"),
    "703165TY.csv": ("cold", "tmy3"),
}
_SEED_BOOK = RegionBook()


def region_centre(region: str) -> tuple[float, float]:
    """(lat, lon) of a region's load centre (the seeded registry; see ``vpp.regions``)."""
    r = _SEED_BOOK.locate(region)
    return (r.latitude, r.longitude)


@dataclass(frozen=True)
class WeatherYear:
    name: str
    latitude: float
    longitude: float
    tz_offset_h: float
    ghi_w_m2: npt.NDArray[np.float64]  # 8760 hourly values, local standard time
    temp_c: npt.NDArray[np.float64]
    source: str = ""  # the bundled typical year the clouds and temperature come from
    source_km: float = 0.0  # how far that year's site is from this place

    def sample(
        self, epoch_ms: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(GHI W/m², air temperature °C) at each epoch-ms time, linearly interpolated."""
        lo, hi, frac = self._hours(epoch_ms)
        ghi = self.ghi_w_m2[lo] * (1 - frac) + self.ghi_w_m2[hi] * frac
        temp = self.temp_c[lo] * (1 - frac) + self.temp_c[hi] * frac
        return ghi, temp

    def climate_temp(self, epoch_ms: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The climate's air temperature (°C) at each time: the typical year's mean at the same
        hour over the surrounding ``CLIMATE_DAYS`` days. A typical year's own day is one draw
        of the weather, not its expectation; what a forecast adds is its departure from this."""
        lo, hi, frac = self._hours(epoch_ms)
        clim = self._temp_climate
        return np.asarray(clim[lo] * (1 - frac) + clim[hi] * frac, dtype=float)

    @cached_property
    def _temp_climate(self) -> npt.NDArray[np.float64]:
        return _climate(self.temp_c)

    def _hours(
        self, epoch_ms: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        local_ms = np.asarray(epoch_ms, dtype=float) + self.tz_offset_h * 3_600_000.0
        stamp = local_ms.astype("int64").astype("datetime64[ms]")
        year_start = stamp.astype("datetime64[Y]").astype("datetime64[ms]")
        # Hour of the local year; a leap year's extra day folds onto the typical year's end.
        hour = np.minimum((stamp - year_start).astype("int64") / 3_600_000.0, HOURS_PER_YEAR - 1e-6)
        lo = np.floor(hour).astype(np.int64) % HOURS_PER_YEAR
        return lo, (lo + 1) % HOURS_PER_YEAR, hour - np.floor(hour)


def _climate(hourly: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each hour's mean at the same hour of the ``CLIMATE_DAYS`` days around it."""
    days = hourly.reshape(-1, 24)
    k = CLIMATE_DAYS // 2
    wrapped = np.concatenate([days[-k:], days, days[:k]])  # the year wraps round
    sums = np.cumsum(np.vstack([np.zeros((1, 24)), wrapped]), axis=0)
    return np.asarray((sums[2 * k + 1 :] - sums[: -2 * k - 1]) / (2 * k + 1), float).ravel()


def _data_dir() -> Path:
    import pvlib

    return Path(pvlib.__file__).parent / "data"


@lru_cache(maxsize=8)
def load_site(fname: str) -> WeatherYear:
    """One bundled typical year as recorded, at its own site and time zone."""
    import pvlib

    d = _data_dir()
    if BUNDLED_YEARS[fname][1] == "tmy2":
        df, meta = pvlib.iotools.read_tmy2(str(d / fname))
        ghi = df["GHI"].to_numpy(float)
        temp = df["DryBulb"].to_numpy(float) / 10.0  # TMY2 stores tenths of °C
    else:
        df, meta = pvlib.iotools.read_tmy3(str(d / fname), map_variables=True)
        ghi = df["ghi"].to_numpy(float)
        temp = df["temp_air"].to_numpy(float)
    name = str(meta.get("City") or meta.get("Name", fname)).strip('"').strip().title()
    # The epoch-hour mapping of ``sample`` aligns index 0 with Jan 1 00:00 of a 365-day year.
    return WeatherYear(
        name=name,
        latitude=float(meta["latitude"]),
        longitude=float(meta["longitude"]),
        tz_offset_h=float(meta["TZ"]),
        ghi_w_m2=ghi[:HOURS_PER_YEAR],
        temp_c=temp[:HOURS_PER_YEAR],
        source=name,
        source_km=0.0,
    )


def _clear_sky_ghi(lat: float, lon: float, tz_offset_h: float) -> npt.NDArray[np.float64]:
    """Clear-sky GHI (Haurwitz) at the middle of each local-standard hour of a typical year
    (TMY values are for the hour ending at their stamp)."""
    import pandas as pd
    import pvlib

    local = pd.date_range("2025-01-01 00:00", periods=HOURS_PER_YEAR, freq="h") - pd.Timedelta(
        minutes=30
    )
    utc = (local - pd.Timedelta(hours=tz_offset_h)).tz_localize("UTC")
    zenith = pvlib.solarposition.ephemeris(utc, lat, lon)["apparent_zenith"]
    return np.asarray(pvlib.clearsky.haurwitz(zenith)["ghi"].to_numpy(float))


@lru_cache(maxsize=8)
def _clearness(fname: str) -> npt.NDArray[np.float64]:
    """The site's clearness index per hour: GHI over clear-sky GHI, where the sun is up enough
    to say; near dawn and dusk, the day's own mean."""
    site = load_site(fname)
    cs = _clear_sky_ghi(site.latitude, site.longitude, site.tz_offset_h)
    hourly = np.divide(site.ghi_w_m2, cs, out=np.zeros_like(cs), where=cs > 50.0)
    days = HOURS_PER_YEAR // 24
    daily = site.ghi_w_m2.reshape(days, 24).sum(1) / np.maximum(cs.reshape(days, 24).sum(1), 1.0)
    kt = np.where(cs > 50.0, hourly, np.repeat(daily, 24))
    return np.clip(kt, 0.0, 1.2)


def nearest_site(
    latitude: float, longitude: float, climate: str | None = None
) -> tuple[str, float]:
    """The bundled typical year nearest a point among those of ``climate`` (all of them if
    none is of that climate): (file, distance in km). Three sites cover the country thinly, so
    the climate comes first: Dallas is nearer Greensboro than Miami, but its summers are Miami's."""
    files = [f for f, (c, _) in BUNDLED_YEARS.items() if c == climate] or list(BUNDLED_YEARS)
    best = min(
        files,
        key=lambda f: distance_km(
            latitude, longitude, load_site(f).latitude, load_site(f).longitude
        ),
    )
    site = load_site(best)
    return best, distance_km(latitude, longitude, site.latitude, site.longitude)


@lru_cache(maxsize=512)
def weather_for(region: Region) -> WeatherYear:
    """A region's typical year: the nearest bundled year's clouds and temperature, the solar
    geometry of the zone's own load centre, in the zone's own (standard) time."""
    fname, km = nearest_site(region.latitude, region.longitude, region.climate)
    site = load_site(fname)
    tz = region.utc_offset_h
    ghi = _clearness(fname) * _clear_sky_ghi(region.latitude, region.longitude, tz)
    return WeatherYear(
        name=region.name,
        latitude=region.latitude,
        longitude=region.longitude,
        tz_offset_h=tz,
        ghi_w_m2=ghi,
        temp_c=site.temp_c,
        source=site.name,
        source_km=km,
    )


def weather_for_region(region: str) -> WeatherYear:
    """The typical year of a seeded region by name (``weather_for`` of a registry's row)."""
    return weather_for(_SEED_BOOK.locate(region))
