"""Typical-year weather per region, from the files pvlib ships (no download at run time).

pvlib bundles three typical-meteorological-year files; each region is mapped to the closest in
climate: hot and humid (Miami, TMY2) for Texas and Florida zones, temperate (Greensboro NC,
TMY3) for PJM, New York and California zones, cold (Sand Point AK, TMY3) for northern zones. A
region not in the table gets the temperate year. ``sample`` maps any epoch time onto the typical
year (by local hour of year), so the same weather repeats every year.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

HOURS_PER_YEAR = 8760

REGION_CLIMATE: dict[str, str] = {
    "ERCOT-NORTH": "hot",
    "ERCOT-HOUSTON": "hot",
    "ERCOT-SOUTH": "hot",
    "ERCOT-WEST": "hot",
    "FPL": "hot",
    "CAISO-SP15": "temperate",
    "CAISO-NP15": "temperate",
    "PJM-DOM": "temperate",
    "PJM-AEP": "temperate",
    "NYISO-J": "temperate",
    "MISO-NORTH": "cold",
    "AK": "cold",
}


# Where each region's homes are placed on a map (and by the simulator): the zone's main load
# centre. Weather comes from the climate's file; only the position differs.
REGION_CENTRE: dict[str, tuple[float, float]] = {
    "ERCOT-NORTH": (32.78, -96.80),  # Dallas
    "ERCOT-HOUSTON": (29.76, -95.37),
    "ERCOT-SOUTH": (29.42, -98.49),  # San Antonio
    "ERCOT-WEST": (31.99, -102.08),  # Midland
    "FPL": (25.76, -80.19),  # Miami
    "CAISO-SP15": (34.05, -118.24),  # Los Angeles
    "CAISO-NP15": (37.77, -122.42),  # San Francisco
    "PJM-DOM": (37.54, -77.44),  # Richmond
    "PJM-AEP": (39.96, -82.99),  # Columbus
    "NYISO-J": (40.71, -74.01),  # New York City
    "MISO-NORTH": (44.98, -93.27),  # Minneapolis
    "AK": (61.22, -149.90),  # Anchorage
}


def region_centre(region: str) -> tuple[float, float]:
    """(lat, lon) of a region's load centre; the weather site for regions not in the table."""
    if region in REGION_CENTRE:
        return REGION_CENTRE[region]
    w = weather_for_region(region)
    return (w.latitude, w.longitude)


@dataclass(frozen=True)
class WeatherYear:
    name: str
    latitude: float
    longitude: float
    tz_offset_h: float
    ghi_w_m2: npt.NDArray[np.float64]  # 8760 hourly values, local standard time
    temp_c: npt.NDArray[np.float64]

    def sample(
        self, epoch_ms: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(GHI W/m², air temperature °C) at each epoch-ms time, linearly interpolated."""
        local_ms = np.asarray(epoch_ms, dtype=float) + self.tz_offset_h * 3_600_000.0
        stamp = local_ms.astype("int64").astype("datetime64[ms]")
        year_start = stamp.astype("datetime64[Y]").astype("datetime64[ms]")
        # Hour of the local year; a leap year's extra day folds onto the typical year's end.
        hour = np.minimum((stamp - year_start).astype("int64") / 3_600_000.0, HOURS_PER_YEAR - 1e-6)
        lo = np.floor(hour).astype(int) % HOURS_PER_YEAR
        hi = (lo + 1) % HOURS_PER_YEAR
        frac = hour - np.floor(hour)
        ghi = self.ghi_w_m2[lo] * (1 - frac) + self.ghi_w_m2[hi] * frac
        temp = self.temp_c[lo] * (1 - frac) + self.temp_c[hi] * frac
        return ghi, temp


def _data_dir() -> Path:
    import pvlib

    return Path(pvlib.__file__).parent / "data"


@lru_cache(maxsize=8)
def load_climate(climate: str) -> WeatherYear:
    import pvlib

    d = _data_dir()
    if climate == "hot":
        df, meta = pvlib.iotools.read_tmy2(str(d / "12839.tm2"))
        ghi = df["GHI"].to_numpy(float)
        temp = df["DryBulb"].to_numpy(float) / 10.0  # TMY2 stores tenths of °C
        tz = float(meta["TZ"])
    else:
        fname = "703165TY.csv" if climate == "cold" else "723170TYA.CSV"
        df, meta = pvlib.iotools.read_tmy3(str(d / fname), map_variables=True)
        ghi = df["ghi"].to_numpy(float)
        temp = df["temp_air"].to_numpy(float)
        tz = float(meta["TZ"])
    # The epoch-hour mapping above aligns index 0 with Jan 1 00:00 of a 365-day year.
    return WeatherYear(
        name=str(meta.get("City") or meta.get("Name", climate)).strip('"'),
        latitude=float(meta["latitude"]),
        longitude=float(meta["longitude"]),
        tz_offset_h=tz,
        ghi_w_m2=ghi[:HOURS_PER_YEAR],
        temp_c=temp[:HOURS_PER_YEAR],
    )


def climate_of(region: str) -> str:
    return REGION_CLIMATE.get(region, "temperate")


def weather_for_region(region: str) -> WeatherYear:
    return load_climate(climate_of(region))
