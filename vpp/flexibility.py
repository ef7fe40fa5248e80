"""One valuation of a device's flexibility: the inputs the physics is evaluated at, pure.

The fleet view (/v1/fleet, /v1/devices), the optimiser's clusters, the dispatch runner and the
forecaster all read a device's state and registry attributes through :func:`battery_inputs` and
:func:`thermostat_inputs`, so a reading a device has not sent is filled the same way everywhere
and the same home is worth the same kW to each of them. :func:`available_kw` is what the fleet
view reports. The physics itself is in :mod:`vpp.physics`.

Defaults, one set (the brief's figures from :mod:`vpp.domain` where it has one):

Battery
- state of charge not reported: 0 % (a battery is worth nothing until it says how full it is);
  a reading is clipped to 0–100 %;
- reserve: the one the battery reports, else the registry's, else the 20 % floor; never below
  max(that, 20 %);
- capacity, max discharge, max charge not registered: 13.5 kWh, 5 kW, 5 kW;
- output not reported: 0 kW.

Thermostat
- mode not reported (or not cool/heat/auto), or no setpoint: not asked, 0 kW (no mode or
  setpoint is guessed); mode off: 0 kW;
- indoor temperature not reported: the setpoint;
- outdoor temperature: its own reading, else the median reading of its region, else
  ``DEFAULT_OUTDOOR_C``;
- heating when the mode is heat, or auto with the outdoor temperature below the setpoint;
- offset: the default +1.7 °C (``offset_c``), cut to the device's max offset (2 °C when none is
  registered) and to its comfort limit (none registered: no limit); below ``min_offset_c``
  (0.25 °C) it is not asked at all;
- HVAC rating not registered: 5.6 kW.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vpp import physics
from vpp.domain import (
    BATTERY_DEFAULT_CAPACITY_WH,
    BATTERY_DEFAULT_MAX_DISCHARGE_W,
    BATTERY_MIN_RESERVE_PCT,
    BATTERY_ONE_WAY_EFFICIENCY,
    THERMOSTAT_DEFAULT_MAX_OFFSET_C,
    THERMOSTAT_DEFAULT_OFFSET_C,
    THERMOSTAT_RATED_W,
)
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

# Outdoor temperature assumed for a thermostat that reports none and whose region has no reading.
DEFAULT_OUTDOOR_C = 30.0
# An offset smaller than this sheds nothing worth a command: the thermostat is not asked.
THERMOSTAT_MIN_OFFSET_C = 0.25
# Missing state of charge: nothing is counted until the battery reports one.
MISSING_SOC_PCT = 0.0


def _rows(snap: FleetSnapshot, rows: npt.ArrayLike | None) -> I64:
    if rows is None:
        return np.arange(len(snap), dtype=np.int64)
    r = np.asarray(rows)
    if r.dtype == bool:
        return np.flatnonzero(r).astype(np.int64)
    return r.astype(np.int64).reshape(-1)


def _filled(values: npt.ArrayLike, fill: float) -> F64:
    """NaN (and ±inf) → ``fill``."""
    return np.nan_to_num(np.asarray(values, dtype=float), nan=fill, posinf=fill, neginf=fill)


# --- Outdoor temperature --------------------------------------------------------------------------
def outdoor_temperatures(
    snap: FleetSnapshot,
    rows: npt.ArrayLike | None = None,
    *,
    reference: FleetSnapshot | None = None,
) -> F64:
    """Outdoor temperature of devices ``rows`` (all if None): their own reading, else the median
    reading of their region, else ``DEFAULT_OUTDOOR_C``.

    The median is over every device of the region in ``reference`` (default ``snap`` itself)
    that reports one, whichever devices ``rows`` picks: the optimiser planning a few devices and
    the fleet view looking at all of them fill a gap with the same figure. ``reference`` lets a
    one-device snapshot (GET /v1/devices/{id}) borrow its region's readings from the fleet."""
    idx = _rows(snap, rows)
    out = snap.state["outdoor_c"][idx].astype(float)
    missing = np.isnan(out)
    if not missing.any():
        return out
    ref = snap if reference is None else reference
    ref_out = ref.state["outdoor_c"]
    ref_has = ~np.isnan(ref_out)
    n_regions = len(snap.regions)
    codes = snap.region_codes[idx][missing].astype(np.int64)
    known = (codes >= 0) & (codes < n_regions)
    # One fill per region of the snapshot (an unknown region gets the default).
    fill = np.full(n_regions + 1, DEFAULT_OUTDOOR_C)
    for code in np.flatnonzero(np.bincount(codes[known], minlength=n_regions)):
        ref_code = int(code) if ref is snap else ref.region_code(snap.regions[int(code)])
        if ref_code < 0:
            continue
        vals = ref_out[ref_has & (ref.region_codes == ref_code)]
        if vals.size:
            fill[code] = float(np.median(vals.astype(float)))
    out[missing] = fill[np.where(known, codes, n_regions)]
    return out


# --- Batteries ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatteryInputs:
    """Per battery (rows of a snapshot), the figures its flexibility is valued at; all finite."""

    soc_pct: F64  # reported, clipped to 0–100; MISSING_SOC_PCT where none
    capacity_wh: F64  # registry, else BATTERY_DEFAULT_CAPACITY_WH
    max_discharge_w: F64  # registry, else BATTERY_DEFAULT_MAX_DISCHARGE_W
    max_charge_w: F64  # registry, else BATTERY_DEFAULT_MAX_DISCHARGE_W
    reserve_pct: F64  # effective floor: max(reported, else registry, else 20 %; 20 %)
    output_w: F64  # reported AC output (+ discharging, − charging), 0 where none

    @property
    def max_discharge_kw(self) -> F64:
        return self.max_discharge_w / 1000.0

    def energy_kwh(self) -> F64:
        """AC energy it can give above its reserve (kWh, 0.949 one way)."""
        usable_wh = physics.battery_energy_above_reserve_wh(
            self.soc_pct, self.capacity_wh, self.reserve_pct
        )
        return np.asarray(usable_wh * BATTERY_ONE_WAY_EFFICIENCY / 1000.0, dtype=float)

    def deliverable_kw(self, window_h: float | npt.ArrayLike) -> F64:
        """Power it holds for ``window_h`` hours (one value, or one per battery): min(max
        discharge, energy above reserve / h)."""
        return physics.battery_deliverable_kw(
            self.soc_pct, self.capacity_wh, self.max_discharge_w, self.reserve_pct, window_h
        )


def battery_inputs(
    snap: FleetSnapshot,
    rows: npt.ArrayLike | None = None,
    *,
    soc_pct: npt.ArrayLike | None = None,
) -> BatteryInputs:
    """The inputs of batteries ``rows`` (all if None; rows of another kind get the defaults).

    ``soc_pct`` (aligned with ``rows``): readings to value instead of the snapshot's (a past
    window's), NaN where there is none."""
    idx = _rows(snap, rows)
    st = snap.state  # fields read one by one: no copy of whole records
    soc = st["soc_pct"][idx].astype(float) if soc_pct is None else np.asarray(soc_pct, float)
    reported = st["backup_reserve_pct"][idx].astype(float)
    registered = _filled(snap.backup_reserve_pct[idx], BATTERY_MIN_RESERVE_PCT)
    reserve = np.where(np.isnan(reported), registered, reported)
    return BatteryInputs(
        soc_pct=np.clip(_filled(soc, MISSING_SOC_PCT), 0.0, 100.0),
        capacity_wh=np.maximum(_filled(snap.capacity_wh[idx], BATTERY_DEFAULT_CAPACITY_WH), 0.0),
        max_discharge_w=np.maximum(
            _filled(snap.max_discharge_w[idx], BATTERY_DEFAULT_MAX_DISCHARGE_W), 0.0
        ),
        max_charge_w=np.maximum(
            _filled(snap.max_charge_w[idx], BATTERY_DEFAULT_MAX_DISCHARGE_W), 0.0
        ),
        reserve_pct=physics.battery_reserve_pct(np.clip(reserve, 0.0, 100.0)),
        output_w=_filled(st["power_w"][idx], 0.0),
    )


# --- Thermostats ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThermostatInputs:
    """Per thermostat (rows of a snapshot), the figures its flexibility is valued at; all finite.

    Offsets are kept for both directions (the forecaster meets both heating and cooling as the
    outdoor temperature moves); ``heating`` and ``offset_c`` are at ``outdoor_c``, now."""

    mode: I64  # physics.MODE_* as reported, -1 where none
    usable: Bool  # mode cool/heat/auto and a setpoint: may be asked
    setpoint_c: F64  # reported (0 where none: then not usable)
    indoor_c: F64  # reported, else the setpoint
    outdoor_c: F64  # own reading, else its region's median, else DEFAULT_OUTDOOR_C
    rated_kw: F64  # HVAC electric rating, else THERMOSTAT_RATED_W
    offset_cool_c: F64  # offset a cooling event applies (0: not asked)
    offset_heat_c: F64  # offset a heating event applies (0: not asked)

    def heating_at(self, outdoor_c: npt.ArrayLike) -> Bool:
        """Heating, at the given outdoor temperatures (broadcast against the devices)."""
        out = np.asarray(outdoor_c, dtype=float)
        return np.asarray(
            (self.mode == physics.MODE_HEAT)
            | ((self.mode == physics.MODE_AUTO) & (out < self.setpoint_c)),
            dtype=bool,
        )

    def offset_at(self, heating: npt.ArrayLike) -> F64:
        return np.where(np.asarray(heating, dtype=bool), self.offset_heat_c, self.offset_cool_c)

    @property
    def heating(self) -> Bool:
        return self.heating_at(self.outdoor_c)

    @property
    def offset_c(self) -> F64:
        """The offset an event now would command (0: not asked)."""
        return self.offset_at(self.heating)

    def shed(self, window_h: float) -> tuple[F64, F64, F64]:
        """(average kW shed over ``window_h`` hours, hours fully off, recovery kWh afterwards) of
        an event starting now (:func:`vpp.physics.thermostat_shed`); 0 where not asked."""
        heating = self.heating
        offset = self.offset_at(heating)
        shed, t_off, rec = physics.thermostat_shed(
            self.indoor_c,
            self.setpoint_c,
            self.outdoor_c,
            offset,
            window_h,
            self.rated_kw,
            heating=heating,
        )
        asked = offset > 0
        return (
            np.where(asked, _filled(shed, 0.0), 0.0),
            np.where(asked, _filled(t_off, 0.0), 0.0),
            np.where(asked, _filled(rec, 0.0), 0.0),
        )


def thermostat_inputs(
    snap: FleetSnapshot,
    rows: npt.ArrayLike | None = None,
    outdoor_c: npt.ArrayLike | None = None,
    *,
    setpoint_c: npt.ArrayLike | None = None,
    offset_c: float = THERMOSTAT_DEFAULT_OFFSET_C,
    min_offset_c: float = THERMOSTAT_MIN_OFFSET_C,
) -> ThermostatInputs:
    """The inputs of thermostats ``rows`` (all if None).

    ``outdoor_c`` (aligned with ``rows``): temperatures to value at instead of
    :func:`outdoor_temperatures`. ``setpoint_c`` (aligned with ``rows``): setpoints to value
    instead of the snapshot's (a past window's), NaN where there is none. ``offset_c``: the offset
    an event asks for before the device's own limits; ``min_offset_c``: below it, not asked."""
    idx = _rows(snap, rows)
    st = snap.state  # fields read one by one: no copy of whole records
    mode = st["mode"][idx].astype(np.int64)
    sp_raw = (
        st["setpoint_c"][idx].astype(float) if setpoint_c is None else np.asarray(setpoint_c, float)
    )
    has_sp = np.isfinite(sp_raw)
    usable = (
        has_sp
        & (mode >= physics.MODE_COOL)
        & (mode <= physics.MODE_AUTO)
        & (offset_c >= min_offset_c)
    )
    setpoint = np.where(has_sp, sp_raw, 0.0)
    indoor_raw = st["indoor_c"][idx].astype(float)
    indoor = np.where(np.isfinite(indoor_raw), indoor_raw, setpoint)
    out = (
        outdoor_temperatures(snap, idx)
        if outdoor_c is None
        else _filled(np.broadcast_to(np.asarray(outdoor_c, float), idx.shape), DEFAULT_OUTDOOR_C)
    )
    offset = np.minimum(offset_c, _filled(snap.max_offset_c[idx], THERMOSTAT_DEFAULT_MAX_OFFSET_C))
    # Room to the comfort limit; none registered: no limit.
    room_cool = _filled(snap.comfort_max_c[idx], np.inf) - setpoint
    room_heat = setpoint - _filled(snap.comfort_min_c[idx], -np.inf)

    def cut(room: F64) -> F64:
        off = np.clip(np.minimum(offset, room), 0.0, None)
        return np.where(usable & (off >= min_offset_c), off, 0.0)

    return ThermostatInputs(
        mode=mode,
        usable=usable,
        setpoint_c=setpoint,
        indoor_c=indoor,
        outdoor_c=out,
        rated_kw=np.maximum(_filled(snap.hvac_rated_w[idx], THERMOSTAT_RATED_W), 0.0) / 1000.0,
        offset_cool_c=cut(room_cool),
        offset_heat_c=cut(room_heat),
    )


# --- What a device could deliver now --------------------------------------------------------------
def available_kw(
    snap: FleetSnapshot,
    window_h: float = 1.0,
    outdoor_c: npt.ArrayLike | None = None,
    only_dispatchable: bool = True,
) -> F64:
    """Flexibility each device could deliver now, held over ``window_h`` hours (kW).

    Battery: min(max discharge, energy above reserve × 0.949 / h). Thermostat: the RC model's
    average shed over ``window_h`` from its current indoor/outdoor state, with the default +1.7 °C
    offset cut to its max offset and comfort limit. Solar: nothing upward. ``outdoor_c`` (one per
    device of ``snap``): temperatures to use instead of :func:`outdoor_temperatures`.
    """
    kw = np.zeros(len(snap))
    bat = np.flatnonzero(snap.kind_codes == BATTERY)
    if bat.size:
        kw[bat] = battery_inputs(snap, bat).deliverable_kw(window_h)
    th = np.flatnonzero(snap.kind_codes == THERMOSTAT)
    if th.size:
        out = None if outdoor_c is None else np.asarray(outdoor_c, dtype=float)[th]
        kw[th] = thermostat_inputs(snap, th, out).shed(window_h)[0]
    if only_dispatchable:
        kw = np.where(snap.dispatchable(), kw, 0.0)
    return kw
