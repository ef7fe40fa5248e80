"""Synthetic fleets for tests, back-tests and benchmarks (pure: numpy in, plain data out).

A :class:`SyntheticFleet` is a :class:`FleetSnapshot` plus the hidden truth of each device (its
real online rate, opt-out propensity, PV size, home load, and RC parameters) that a simulator uses
to decide what the fleet could actually deliver. The forecaster never sees the truth: it learns it
from simulated history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vpp import physics
from vpp.domain import FreshnessCode
from vpp.fleet.records import empty_state
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT, FleetSnapshot

F64 = npt.NDArray[np.float64]


@dataclass
class SyntheticFleet:
    snap: FleetSnapshot
    online_p: F64  # true long-run online rate
    optout_r: F64  # true opt-out rate at a 2 h event
    pv_w: F64  # PV rated W of the device's home (batteries: charges it), else 0
    load_scale: F64  # home load against the typical profile
    r_c_per_kw: F64
    c_kwh_per_c: F64


def make_fleet(
    n_devices: int,
    regions: list[str],
    *,
    seed: int = 0,
    now_ms: int = 0,
    n_vendors: int = 4,
    kind_mix: tuple[float, float, float] = (0.35, 0.2, 0.45),
    mean_online: float = 0.93,
    mean_optout: tuple[float, float] = (0.04, 0.13),
) -> SyntheticFleet:
    """A fleet spread evenly over ``regions``: batteries, solar (on battery homes) and thermostats.

    Kinds are assigned in proportion ``kind_mix`` (battery, solar, thermostat); the solar devices
    are the PV of the first battery homes of their region, so ``n_solar / n_battery`` of battery
    homes charge from the sun.
    """
    rng = np.random.default_rng(seed)
    n = int(n_devices)
    region_codes = (np.arange(n) % max(len(regions), 1)).astype(np.int32)
    u = rng.random(n)
    kind = np.where(
        u < kind_mix[0], BATTERY, np.where(u < kind_mix[0] + kind_mix[1], SOLAR, THERMOSTAT)
    ).astype(np.int8)
    vendor = rng.choice(
        n_vendors,
        size=n,
        p=np.linspace(2.0, 1.0, n_vendors) / np.linspace(2.0, 1.0, n_vendors).sum(),
    ).astype(np.int32)
    bat = kind == BATTERY
    th = kind == THERMOSTAT
    sol = kind == SOLAR

    nan = np.full(n, np.nan)
    capacity = np.where(bat, rng.choice([10_000.0, 13_500.0, 13_500.0, 16_000.0], n), np.nan)
    max_dis = np.where(bat, rng.choice([5_000.0, 5_000.0, 7_600.0, 11_500.0], n), np.nan)
    max_chg = np.where(bat, np.minimum(max_dis, 7_600.0), np.nan)
    reserve = np.where(bat, rng.choice([20.0, 20.0, 25.0, 30.0, 40.0], n), np.nan)
    rated = np.where(sol, rng.uniform(4_000.0, 9_000.0, n), np.nan)
    hvac = np.where(th, rng.uniform(3_500.0, 7_000.0, n), np.nan)
    setpoint = np.where(th, rng.choice([22.0, 23.0, 23.5, 24.0, 24.5, 25.0, 26.0], n), np.nan)
    comfort_max = np.where(th, setpoint + rng.choice([1.0, 2.0, 3.0, 3.0], n), np.nan)
    comfort_min = np.where(th, 17.0, np.nan)
    max_offset = np.where(th, rng.choice([1.5, 2.0, 2.0, 3.0], n), np.nan)

    state = np.repeat(empty_state(), n)
    state["recv_ms"] = now_ms
    state["ts_ms"] = now_ms
    state["kind"] = kind
    state["soc_pct"] = np.where(bat, rng.uniform(25.0, 95.0, n), np.nan)
    state["backup_reserve_pct"] = reserve
    state["setpoint_c"] = setpoint
    state["indoor_c"] = setpoint
    state["mode"] = np.where(th, physics.MODE_COOL, -1)

    # Pair solar devices with battery homes of the same region.
    pv_w = np.zeros(n)
    for code in range(len(regions)):
        b_idx = np.flatnonzero(bat & (region_codes == code))
        s_idx = np.flatnonzero(sol & (region_codes == code))
        m = min(b_idx.size, s_idx.size)
        pv_w[b_idx[:m]] = rated[s_idx[:m]]

    # Heterogeneous truth: Beta-distributed rates around the means.
    conc = 12.0
    online_p = rng.beta(mean_online * conc, (1 - mean_online) * conc, n)
    r_mean = np.where(bat, mean_optout[0], np.where(th, mean_optout[1], 0.0))
    optout_r = np.where(sol, 0.0, rng.beta(np.maximum(r_mean, 1e-3) * 8, (1 - r_mean) * 8, n))
    ids = np.array([f"d{i:07d}" for i in range(n)], dtype=object)
    snap = FleetSnapshot(
        now_ms=now_ms,
        device_ids=ids,
        tenant_ids=np.full(n, "t-1", dtype=object),
        region_codes=region_codes,
        regions=list(regions),
        kind_codes=kind,
        vendor_codes=vendor,
        vendors=[f"vendor-{v}" for v in range(n_vendors)],
        feeder_codes=np.zeros(n, np.int32),
        feeders=[""],
        enrolled=np.ones(n, bool),
        capacity_wh=capacity,
        max_discharge_w=max_dis,
        max_charge_w=max_chg,
        backup_reserve_pct=reserve,
        rated_w=rated,
        hvac_rated_w=hvac,
        comfort_max_c=comfort_max,
        comfort_min_c=comfort_min,
        max_offset_c=max_offset,
        lat=nan.copy(),
        lon=nan.copy(),
        state=state,
        online=np.ones(n, bool),
        freshness=np.full(n, FreshnessCode.fresh, np.int8),
    )
    return SyntheticFleet(
        snap=snap,
        online_p=online_p,
        optout_r=optout_r,
        pv_w=pv_w,
        load_scale=rng.lognormal(0.0, 0.3, n),
        r_c_per_kw=2.0 * rng.lognormal(0.0, 0.1, n),
        c_kwh_per_c=2.0 * rng.lognormal(0.0, 0.1, n),
    )
