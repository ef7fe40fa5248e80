"""Regions: the load zones the service knows, as data.

A region is one load zone of an ISO/RTO, named ``<ISO>-<the ISO's own zone code>``
(``ERCOT-WEST``, ``CAISO-NP15``, ``PJM-COMED``, ``MISO-Z4``, ``NYISO-J``, ``ISONE-NEMA``,
``SPP-KCPL``). The registry lives in the database (``store.regions``), seeded by the migration
with :data:`SEED_REGIONS`; an admin adds or corrects zones over ``/v1/regions``. Each zone carries
the time zone and the load centre its weather, solar geometry and local evening are taken at.

``VPP_REGIONS`` narrows what is sold: devices may be onboarded and capacity quoted only in those
zones (empty, the default: every zone of the registry).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vpp.errors import FieldError

Climate = Literal["hot", "temperate", "cold"]
CLIMATES: tuple[str, ...] = get_args(Climate)
ISOS = ("ERCOT", "CAISO", "PJM", "MISO", "NYISO", "ISONE", "SPP")
NAME_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{1,15}-[A-Z0-9_]{1,24}$")
EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True)
class Region:
    name: str  # <ISO>-<zone code>
    iso: str
    zone: str  # the ISO's own code of the zone
    label: str  # where it is, for people
    time_zone: str  # IANA
    latitude: float  # the zone's load centre
    longitude: float
    climate: str  # hot | temperate | cold

    @property
    def utc_offset_h(self) -> float:
        """The zone's standard-time offset from UTC (hours). Local hours in the forecast and
        the simulator are standard time: a summer evening peak sits an hour later on the clock."""
        return standard_offset_h(self.time_zone)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "iso": self.iso,
            "zone": self.zone,
            "label": self.label,
            "time_zone": self.time_zone,
            "latitude": self.latitude,
            "longitude": self.longitude,
            "climate": self.climate,
        }


@lru_cache(maxsize=256)
def standard_offset_h(time_zone: str) -> float:
    tz = ZoneInfo(time_zone)
    # January 15 is standard time everywhere in the US (DST runs March to November).
    off = datetime(2025, 1, 15, 12, tzinfo=tz).utcoffset()
    return off.total_seconds() / 3600.0 if off is not None else 0.0


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def _z(iso: str, zone: str, label: str, tz: str, lat: float, lon: float, climate: str) -> Region:
    return Region(f"{iso}-{zone}", iso, zone, label, tz, lat, lon, climate)


_CT, _ET, _PT, _MT = "America/Chicago", "America/New_York", "America/Los_Angeles", "America/Denver"

# Every load zone of the seven US ISOs/RTOs, at its largest load centre. ERCOT: the four
# competitive load zones and the four non-opt-in entities' zones; CAISO: the three trading-hub
# zones; PJM: the transmission zones; MISO: the ten local resource zones; NYISO: zones A–K;
# ISO-NE: the eight load zones; SPP: the legacy balancing-authority load zones.
SEED_REGIONS: tuple[Region, ...] = (
    _z("ERCOT", "NORTH", "North Texas (Dallas–Fort Worth)", _CT, 32.78, -96.80, "hot"),
    _z("ERCOT", "HOUSTON", "Houston", _CT, 29.76, -95.37, "hot"),
    _z(
        "ERCOT",
        "SOUTH",
        "South Texas (Corpus Christi, Rio Grande Valley)",
        _CT,
        27.80,
        -97.40,
        "hot",
    ),
    _z("ERCOT", "WEST", "West Texas (Midland–Odessa, Abilene)", _CT, 31.99, -102.08, "hot"),
    _z("ERCOT", "AEN", "Austin Energy", _CT, 30.27, -97.74, "hot"),
    _z("ERCOT", "CPS", "CPS Energy (San Antonio)", _CT, 29.42, -98.49, "hot"),
    _z(
        "ERCOT", "LCRA", "Lower Colorado River Authority (Central Texas)", _CT, 30.05, -97.50, "hot"
    ),
    _z("ERCOT", "RAYBN", "Rayburn Country (Northeast Texas)", _CT, 33.10, -96.10, "hot"),
    _z(
        "CAISO",
        "NP15",
        "Northern California (San Francisco Bay Area)",
        _PT,
        37.77,
        -122.42,
        "temperate",
    ),
    _z("CAISO", "ZP26", "Central California (Fresno, Bakersfield)", _PT, 36.74, -119.79, "hot"),
    _z(
        "CAISO",
        "SP15",
        "Southern California (Los Angeles, San Diego)",
        _PT,
        34.05,
        -118.24,
        "temperate",
    ),
    _z("PJM", "AECO", "Atlantic City Electric (South Jersey)", _ET, 39.36, -74.42, "temperate"),
    _z(
        "PJM",
        "AEP",
        "AEP (Ohio, West Virginia, Indiana, Virginia)",
        _ET,
        39.96,
        -82.99,
        "temperate",
    ),
    _z(
        "PJM",
        "APS",
        "Allegheny Power (Western Maryland, West Virginia)",
        _ET,
        39.64,
        -77.72,
        "temperate",
    ),
    _z("PJM", "ATSI", "FirstEnergy Ohio (Cleveland, Akron, Toledo)", _ET, 41.50, -81.69, "cold"),
    _z("PJM", "BGE", "Baltimore Gas and Electric", _ET, 39.29, -76.61, "temperate"),
    _z("PJM", "COMED", "Commonwealth Edison (Chicago)", _CT, 41.88, -87.63, "cold"),
    _z("PJM", "DAY", "Dayton Power and Light", _ET, 39.76, -84.19, "temperate"),
    _z(
        "PJM", "DEOK", "Duke Energy Ohio and Kentucky (Cincinnati)", _ET, 39.10, -84.51, "temperate"
    ),
    _z(
        "PJM",
        "DOM",
        "Dominion (Virginia, Northeast North Carolina)",
        _ET,
        37.54,
        -77.44,
        "temperate",
    ),
    _z("PJM", "DPL", "Delmarva Power", _ET, 39.74, -75.55, "temperate"),
    _z("PJM", "DUQ", "Duquesne Light (Pittsburgh)", _ET, 40.44, -80.00, "temperate"),
    _z("PJM", "EKPC", "East Kentucky Power Cooperative", _ET, 37.99, -84.18, "temperate"),
    _z("PJM", "JCPL", "Jersey Central Power and Light", _ET, 40.22, -74.27, "temperate"),
    _z("PJM", "METED", "Metropolitan Edison (Reading, York)", _ET, 40.34, -75.93, "temperate"),
    _z("PJM", "OVEC", "Ohio Valley Electric", _ET, 38.77, -82.99, "temperate"),
    _z("PJM", "PECO", "PECO (Philadelphia)", _ET, 39.95, -75.17, "temperate"),
    _z("PJM", "PENELEC", "Pennsylvania Electric (Erie, Johnstown)", _ET, 41.00, -78.50, "cold"),
    _z("PJM", "PEPCO", "Pepco (Washington DC)", _ET, 38.91, -77.04, "temperate"),
    _z("PJM", "PPL", "PPL Electric (Allentown, Harrisburg)", _ET, 40.60, -75.49, "temperate"),
    _z("PJM", "PSEG", "PSE&G (Northern New Jersey)", _ET, 40.74, -74.17, "temperate"),
    _z("PJM", "RECO", "Rockland Electric", _ET, 41.05, -74.13, "temperate"),
    _z("MISO", "Z1", "Minnesota, North Dakota, Western Wisconsin", _CT, 44.98, -93.27, "cold"),
    _z("MISO", "Z2", "Eastern Wisconsin, Upper Michigan", _CT, 43.04, -87.91, "cold"),
    _z("MISO", "Z3", "Iowa", _CT, 41.59, -93.62, "cold"),
    _z("MISO", "Z4", "Illinois (Ameren Illinois)", _CT, 39.80, -89.64, "temperate"),
    _z("MISO", "Z5", "Missouri (Ameren Missouri)", _CT, 38.63, -90.20, "temperate"),
    _z("MISO", "Z6", "Indiana, Western Kentucky", _ET, 39.77, -86.16, "temperate"),
    _z("MISO", "Z7", "Michigan (Lower Peninsula)", _ET, 42.33, -83.05, "cold"),
    _z("MISO", "Z8", "Arkansas", _CT, 34.75, -92.29, "hot"),
    _z("MISO", "Z9", "Louisiana, East Texas", _CT, 30.45, -91.19, "hot"),
    _z("MISO", "Z10", "Mississippi", _CT, 32.30, -90.18, "hot"),
    _z("NYISO", "A", "West (Buffalo)", _ET, 42.89, -78.88, "cold"),
    _z("NYISO", "B", "Genesee (Rochester)", _ET, 43.16, -77.61, "cold"),
    _z("NYISO", "C", "Central (Syracuse)", _ET, 43.05, -76.15, "cold"),
    _z("NYISO", "D", "North (Plattsburgh)", _ET, 44.70, -73.45, "cold"),
    _z("NYISO", "E", "Mohawk Valley (Utica)", _ET, 43.10, -75.23, "cold"),
    _z("NYISO", "F", "Capital (Albany)", _ET, 42.65, -73.76, "cold"),
    _z("NYISO", "G", "Hudson Valley (Poughkeepsie)", _ET, 41.70, -73.92, "temperate"),
    _z("NYISO", "H", "Millwood (Northern Westchester)", _ET, 41.20, -73.80, "temperate"),
    _z("NYISO", "I", "Dunwoodie (Southern Westchester)", _ET, 40.93, -73.90, "temperate"),
    _z("NYISO", "J", "New York City", _ET, 40.71, -74.01, "temperate"),
    _z("NYISO", "K", "Long Island", _ET, 40.79, -73.13, "temperate"),
    _z("ISONE", "ME", "Maine (Portland)", _ET, 43.66, -70.26, "cold"),
    _z("ISONE", "NH", "New Hampshire (Manchester)", _ET, 42.99, -71.46, "cold"),
    _z("ISONE", "VT", "Vermont (Burlington)", _ET, 44.48, -73.21, "cold"),
    _z("ISONE", "CT", "Connecticut (Hartford)", _ET, 41.76, -72.68, "temperate"),
    _z("ISONE", "RI", "Rhode Island (Providence)", _ET, 41.82, -71.41, "temperate"),
    _z(
        "ISONE",
        "SEMA",
        "Southeastern Massachusetts (Brockton, Cape Cod)",
        _ET,
        41.90,
        -70.95,
        "temperate",
    ),
    _z(
        "ISONE",
        "WCMA",
        "Western and Central Massachusetts (Worcester, Springfield)",
        _ET,
        42.26,
        -71.80,
        "cold",
    ),
    _z("ISONE", "NEMA", "Northeastern Massachusetts (Boston)", _ET, 42.36, -71.06, "temperate"),
    _z("SPP", "CSWS", "AEP West (Tulsa, Shreveport)", _CT, 36.15, -95.99, "hot"),
    _z("SPP", "EDE", "Empire District (Joplin)", _CT, 37.08, -94.51, "temperate"),
    _z("SPP", "GRDA", "Grand River Dam Authority (Northeast Oklahoma)", _CT, 36.31, -95.32, "hot"),
    _z("SPP", "INDN", "Independence Power and Light", _CT, 39.09, -94.42, "temperate"),
    _z("SPP", "KACY", "Kansas City Board of Public Utilities", _CT, 39.11, -94.63, "temperate"),
    _z("SPP", "KCPL", "Evergy Metro (Kansas City)", _CT, 39.10, -94.58, "temperate"),
    _z("SPP", "LES", "Lincoln Electric System", _CT, 40.81, -96.70, "cold"),
    _z("SPP", "MPS", "Evergy Missouri West", _CT, 38.95, -94.40, "temperate"),
    _z("SPP", "NPPD", "Nebraska Public Power District", _CT, 40.70, -99.08, "cold"),
    _z("SPP", "OKGE", "OG&E (Oklahoma City)", _CT, 35.47, -97.52, "hot"),
    _z("SPP", "OPPD", "Omaha Public Power District", _CT, 41.26, -95.93, "cold"),
    _z("SPP", "SECI", "Sunflower Electric (Western Kansas)", _CT, 38.06, -97.93, "temperate"),
    _z("SPP", "SPRM", "City Utilities of Springfield", _CT, 37.21, -93.29, "temperate"),
    _z("SPP", "SPS", "Southwestern Public Service (Amarillo, Lubbock)", _CT, 35.22, -101.83, "hot"),
    _z(
        "SPP",
        "WFEC",
        "Western Farmers Electric Cooperative (Western Oklahoma)",
        _CT,
        35.05,
        -98.24,
        "hot",
    ),
    _z("SPP", "WR", "Evergy Kansas Central (Wichita, Topeka)", _CT, 37.69, -97.34, "temperate"),
)
SEED_BY_NAME: dict[str, Region] = {r.name: r for r in SEED_REGIONS}


REGION_FIELDS = ("iso", "zone", "label", "time_zone", "latitude", "longitude", "climate")


def region_problems(body: Mapping[str, Any], *, partial: bool) -> list[FieldError]:
    """What is wrong with a region's fields, each naming its field. ``partial``: a PATCH, where
    absent fields keep their value (but ``name`` cannot change)."""
    out: list[FieldError] = []
    for key in body:
        if key not in (*REGION_FIELDS, "name"):
            out.append(
                FieldError(key, "unknown field (one of name, " + ", ".join(REGION_FIELDS) + ")")
            )
    if partial:
        if "name" in body:
            out.append(FieldError("name", "a region's name cannot change"))
    else:
        name = body.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            out.append(
                FieldError("name", "must look like <ISO>-<zone code>, upper case, e.g. MISO-Z4")
            )
        for key in ("iso", "time_zone", "latitude", "longitude"):
            if key not in body:
                out.append(FieldError(key, "required"))
    for key in ("iso", "zone", "label"):
        if key in body and (not isinstance(body[key], str) or not body[key].strip()):
            out.append(FieldError(key, "must be a non-empty string"))
    if "time_zone" in body:
        tz = body["time_zone"]
        try:
            if not isinstance(tz, str):
                raise ZoneInfoNotFoundError
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            out.append(FieldError("time_zone", "must be an IANA time zone, e.g. America/Chicago"))
    for key, lo, hi in (("latitude", -90.0, 90.0), ("longitude", -180.0, 180.0)):
        if key in body:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                out.append(FieldError(key, f"must be a number in [{lo:g}, {hi:g}]"))
    if "climate" in body and body["climate"] not in CLIMATES:
        out.append(FieldError("climate", "must be one of " + ", ".join(CLIMATES)))
    name, iso = body.get("name"), body.get("iso")
    named = not partial and isinstance(name, str) and isinstance(iso, str)
    if named and not str(name).startswith(f"{iso}-"):
        out.append(FieldError("name", "must start with its iso and a hyphen"))
    return out


def region_from(body: Mapping[str, Any], base: Region | None = None) -> Region:
    """A region from checked fields (:func:`region_problems` found none); ``base``: a PATCH."""
    if base is not None:
        fields = {k: body[k] for k in REGION_FIELDS if k in body}
        if "latitude" in fields:
            fields["latitude"] = float(fields["latitude"])
        if "longitude" in fields:
            fields["longitude"] = float(fields["longitude"])
        return replace(base, **fields)
    name = str(body["name"])
    iso = str(body["iso"])
    return Region(
        name=name,
        iso=iso,
        zone=str(body.get("zone") or name[len(iso) + 1 :]),
        label=str(body.get("label") or name),
        time_zone=str(body["time_zone"]),
        latitude=float(body["latitude"]),
        longitude=float(body["longitude"]),
        climate=str(body.get("climate") or "temperate"),
    )


def describe_regions(names: Sequence[str], limit: int = 12) -> str:
    """Regions for an error message: all of them if few, else a count, a few and a hint."""
    if len(names) <= limit:
        return "one of " + (", ".join(names) or "none")
    some = ", ".join(names[:4])
    return f"one of {len(names)} load zones, such as {some}: GET /v1/regions lists them"


class RegionBook:
    """The registry as this process knows it, and the part of it that is sold.

    Starts as the seed (what every migrated database holds) so it answers before the database
    is reached; ``store.regions`` replaces it with the database's rows."""

    def __init__(self, regions: Iterable[Region] = SEED_REGIONS, sold: Sequence[str] = ()) -> None:
        self._by_name: dict[str, Region] = {r.name: r for r in regions}
        self._narrow = tuple(sold)

    def replace_all(self, regions: Iterable[Region]) -> None:
        self._by_name = {r.name: r for r in regions}

    def put(self, region: Region) -> None:
        self._by_name[region.name] = region

    def get(self, name: str) -> Region | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def all(self) -> list[Region]:
        return sorted(self._by_name.values(), key=lambda r: (r.iso, r.name))

    def sold(self) -> list[str]:
        """Names of the regions sold: ``VPP_REGIONS`` in its order or, without it, every region
        of the registry. A name of ``VPP_REGIONS`` the registry lacks is sold still (as before
        the registry; its weather and local time are those of :meth:`locate`)."""
        if self._narrow:
            return list(self._narrow)
        return [r.name for r in self.all()]

    def unregistered(self) -> list[str]:
        """Names ``VPP_REGIONS`` sells that the registry lacks (worth a warning at start)."""
        return [n for n in self._narrow if n not in self._by_name]

    def is_sold(self, name: str) -> bool:
        return name in self._narrow if self._narrow else name in self._by_name

    def describe_sold(self) -> str:
        """The sold regions for an error message (:func:`describe_regions`)."""
        return describe_regions(self.sold())

    def locate(self, name: str) -> Region:
        """A region by name, or (for a name no registry holds, say a test's) a temperate zone
        at the centre of the contiguous US, so weather and local time still have an answer."""
        r = self._by_name.get(name) or SEED_BY_NAME.get(name)
        if r is not None:
            return r
        return Region(name, name.split("-")[0], name, name, _CT, 39.83, -98.58, "temperate")
