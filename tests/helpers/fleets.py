"""Hand-built fleets for tests that need exact figures, and a stand-in for the fleet cache.

:func:`fleet_of` makes identical, dispatchable devices, one per letter of ``kinds``, on
:func:`sim.synthetic.assemble` (random fleets: ``sim.synthetic``). What each kind is unless the
test says otherwise:

- ``b`` battery: 13.5 kWh, 5 kW each way, reserve 20 %, full, idle;
- ``t`` thermostat: 5.6 kW unit cooling to 24 °C (home at 24 °C, 35 °C outside, drawing 2.8 kW),
  comfort 18–27 °C, max offset 2 °C;
- ``s`` solar: 7.6 kW rated, producing 4.56 kW.

All in one region (a second region, ``OTHER_REGION``, has no devices), enrolled, online and
fresh (their last report ``age_s`` before ``now_ms``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.synthetic import assemble, blank_state
from vpp import physics
from vpp.fleet.registry import FLOAT_COLUMNS
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT, FleetSnapshot

NOW = 1_784_061_000_000  # 2026-07-14T20:30:00Z, on the 15-minute grid
REGION = "ERCOT-NORTH"
OTHER_REGION = "CAISO-SP15"

KIND_LETTERS = {"b": BATTERY, "t": THERMOSTAT, "s": SOLAR}
DEFAULTS: dict[int, dict[str, float]] = {
    BATTERY: {
        "capacity_wh": 13_500.0,
        "max_discharge_w": 5_000.0,
        "max_charge_w": 5_000.0,
        "backup_reserve_pct": 20.0,
        "soc_pct": 100.0,
        "power_w": 0.0,
    },
    THERMOSTAT: {
        "hvac_rated_w": 5_600.0,
        "comfort_max_c": 27.0,
        "comfort_min_c": 18.0,
        "max_offset_c": 2.0,
        "mode": physics.MODE_COOL,
        "setpoint_c": 24.0,
        "indoor_c": 24.0,
        "outdoor_c": 35.0,
        "hvac_w": 2_800.0,
    },
    SOLAR: {"rated_w": 7_600.0, "power_w": 4_560.0},
}


def fleet_of(
    kinds: str,
    region: str = REGION,
    *,
    now_ms: int = NOW,
    age_s: float = 10.0,
    **cols: Any,
) -> FleetSnapshot:
    """One device per letter of ``kinds`` (``b``, ``t``, ``s``), ids ``dev-<i>``. ``cols`` set a
    registry column (``capacity_wh``, …) or a state field (``soc_pct``, ``recv_ms``, …) of every
    device: a scalar, or an array with a value per device."""
    n = len(kinds)
    kind = np.array([KIND_LETTERS[k] for k in kinds], dtype=np.int8)
    state = blank_state(n, kind, now_ms - int(age_s * 1000))
    state["grid_up"] = 1
    registry: dict[str, Any] = {name: np.full(n, np.nan) for name in FLOAT_COLUMNS}
    for code, values in DEFAULTS.items():
        rows = kind == code
        for name, value in values.items():
            target = registry[name] if name in registry else state[name]
            target[rows] = value
    # A battery reports the reserve it was registered with.
    state["backup_reserve_pct"] = registry["backup_reserve_pct"]
    for name, value in cols.items():  # backup_reserve_pct is both: registered and reported
        if name not in registry and name not in (state.dtype.names or ()):
            raise TypeError(f"fleet_of: {name} is neither a registry column nor a state field")
        if name in registry:
            registry[name] = np.broadcast_to(np.asarray(value, dtype=float), (n,)).copy()
        if name in (state.dtype.names or ()):
            state[name] = value
    regions = [region] + ([OTHER_REGION] if region != OTHER_REGION else [])
    return assemble(now_ms, kind, np.zeros(n, np.int32), regions, state, **registry)


class FixedFleet:
    """Stands in for the fleet cache (``services.fleet``): hands out whatever snapshot the test
    sets in ``snap``."""

    def __init__(self, snap: FleetSnapshot) -> None:
        self.snap = snap

    async def snapshot(self, force: bool = False) -> FleetSnapshot:
        return self.snap
