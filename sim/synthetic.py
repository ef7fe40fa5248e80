"""Synthetic fleets for the forecast back-test, the dispatch bench and the tests (pure: numpy in,
plain data out).

- :func:`make_fleet`: the back-test's fleet, a :class:`SyntheticFleet`: a snapshot plus the hidden
  truth of each device (its real online rate, opt-out propensity, PV size, home load and RC
  parameters) that a simulator uses to decide what the fleet could actually deliver. The
  forecaster never sees the truth: it learns it from simulated history. Devices are spread evenly
  over the regions, all online and fresh at ``now_ms``; the solar devices are the PV of battery
  homes.
- :func:`synthetic_fleet` and :func:`synthetic_usage`: a realistic summer afternoon for the
  dispatch bench and tests. 35 % batteries (13.5 kWh / 5 kW mostly, some 11.5 kW and 10 kWh units;
  SOC 20–100 %; customer reserves 10–50 %), 50 % thermostats (5.6 kW class units, 22–25.5 °C
  cooling setpoints on a 29–38 °C afternoon, comfort limits 1–4 °C above, some with no limit or
  max offset registered), 15 % solar. About 97 % online, 95 % fresh, 98 % enrolled. Vectorised: a
  million devices take about a second (most of it the device id strings).
- :func:`assemble`: the :class:`FleetSnapshot` around columns built elsewhere (both samplers, and
  the tests' hand-built fleets).

Each sampler draws from its own ``numpy`` generator in a fixed order, which the published back-test
and bench figures depend on: a new draw goes after the existing ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dispatch.types import DeviceUsage
from vpp import physics
from vpp.domain import FreshnessCode
from vpp.fleet.records import empty_state
from vpp.fleet.registry import FLOAT_COLUMNS
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT, FleetSnapshot, compute_freshness

F64 = npt.NDArray[np.float64]

DEFAULT_REGIONS = ("ERCOT-NORTH", "ERCOT-HOUSTON", "CAISO-SP15", "PJM-DOM")


def blank_state(n: int, kind: npt.ArrayLike, recv_ms: npt.ArrayLike) -> np.ndarray:
    """``n`` state records of the given kinds, received (and timestamped) at ``recv_ms``, every
    reading NaN."""
    state = np.repeat(empty_state(), n)
    state["recv_ms"] = recv_ms
    state["ts_ms"] = state["recv_ms"]
    state["kind"] = kind
    return state


def assemble(
    now_ms: int,
    kind_codes: npt.ArrayLike,
    region_codes: npt.ArrayLike,
    regions: Sequence[str],
    state: np.ndarray,
    *,
    device_ids: npt.ArrayLike | None = None,
    tenant: str = "tenant-1",
    vendor_codes: npt.ArrayLike | None = None,
    vendors: Sequence[str] = ("acme",),
    feeders: Sequence[str] = ("",),
    enrolled: npt.ArrayLike | None = None,
    online: npt.ArrayLike | None = None,
    freshness: npt.ArrayLike | None = None,
    **registry: npt.ArrayLike,
) -> FleetSnapshot:
    """A snapshot of ``len(kind_codes)`` devices. Registry columns (``FLOAT_COLUMNS``) not
    given are NaN; ids default to ``dev-<i>``, everyone is enrolled and online, on feeder 0 of
    vendor 0, and freshness is judged on ``state["recv_ms"]`` (5-minute reports, offline after
    15 minutes)."""
    unknown = set(registry) - set(FLOAT_COLUMNS)
    if unknown:
        raise TypeError(f"not registry columns: {sorted(unknown)}")
    kind = np.asarray(kind_codes, dtype=np.int8)
    n = kind.size
    if device_ids is None:
        ids = np.char.add("dev-", np.arange(n).astype(str)).astype(object)
    else:
        ids = np.asarray(device_ids, dtype=object)
    cols = {
        name: np.broadcast_to(np.asarray(registry.get(name, np.nan), dtype=float), (n,)).copy()
        for name in FLOAT_COLUMNS
    }
    up = np.ones(n, bool) if online is None else np.asarray(online, dtype=bool)
    if freshness is None:
        fresh = compute_freshness(state["recv_ms"], up, now_ms, 300.0, 900.0)
    else:
        fresh = np.broadcast_to(np.asarray(freshness, dtype=np.int8), (n,)).copy()
    return FleetSnapshot(
        now_ms=now_ms,
        device_ids=ids,
        tenant_ids=np.full(n, tenant, dtype=object),
        region_codes=np.asarray(region_codes, dtype=np.int32),
        regions=list(regions),
        kind_codes=kind,
        vendor_codes=(
            np.zeros(n, np.int32) if vendor_codes is None else np.asarray(vendor_codes, np.int32)
        ),
        vendors=list(vendors),
        feeder_codes=np.zeros(n, np.int32),
        feeders=list(feeders),
        enrolled=np.ones(n, bool) if enrolled is None else np.asarray(enrolled, dtype=bool),
        state=state,
        online=up,
        freshness=fresh,
        index={d: i for i, d in enumerate(ids)},
        **cols,
    )


# --- the back-test's fleet, with its hidden truth -------------------------------------------------
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

    state = blank_state(n, kind, now_ms)
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
    snap = assemble(
        now_ms,
        kind,
        region_codes,
        regions,
        state,
        device_ids=[f"d{i:07d}" for i in range(n)],
        tenant="t-1",
        vendor_codes=vendor,
        vendors=[f"vendor-{v}" for v in range(n_vendors)],
        freshness=FreshnessCode.fresh,
        capacity_wh=capacity,
        max_discharge_w=max_dis,
        max_charge_w=max_chg,
        backup_reserve_pct=reserve,
        rated_w=rated,
        hvac_rated_w=hvac,
        comfort_max_c=comfort_max,
        comfort_min_c=comfort_min,
        max_offset_c=max_offset,
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


# --- the dispatch bench's afternoon -------------------------------------------------------------
def synthetic_fleet(
    n: int,
    regions: list[str] | tuple[str, ...] = DEFAULT_REGIONS,
    seed: int = 0,
    now_ms: int = 1_784_061_000_000,
    *,
    kind_shares: tuple[float, float, float] = (0.35, 0.15, 0.50),  # battery, solar, thermostat
) -> FleetSnapshot:
    rng = np.random.default_rng(seed)
    regions = list(regions)
    kind = rng.choice(
        np.array([BATTERY, SOLAR, THERMOSTAT], dtype=np.int8),
        size=n,
        p=np.asarray(kind_shares) / np.sum(kind_shares),
    )
    bat = kind == BATTERY
    sol = kind == SOLAR
    th = kind == THERMOSTAT
    region = rng.integers(0, len(regions), n).astype(np.int32)

    model = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    capacity = np.where(bat, np.choose(model, [13_500.0, 13_500.0, 10_000.0]), np.nan)
    max_dis = np.where(bat, np.choose(model, [5_000.0, 11_500.0, 5_000.0]), np.nan)
    reserve = np.where(bat, rng.choice([10.0, 20.0, 30.0, 40.0, 50.0], n), np.nan)
    rated = np.where(sol, rng.uniform(4_000, 9_000, n), np.nan)
    hvac = np.where(th, rng.choice([3_500.0, 4_500.0, 5_600.0], n, p=[0.2, 0.3, 0.5]), np.nan)
    setpoint = rng.uniform(22.0, 25.5, n)
    comfort_max = np.where(th & (rng.random(n) > 0.05), setpoint + rng.uniform(1.0, 4.0, n), np.nan)
    comfort_min = np.where(th, setpoint - 3.0, np.nan)
    max_offset = np.where(th & (rng.random(n) > 0.1), rng.uniform(1.0, 3.0, n), np.nan)

    # Latest state.
    stale = rng.random(n) < 0.03
    age_ms = np.where(stale, rng.uniform(700_000, 2_000_000, n), rng.uniform(0, 500_000, n))
    st = blank_state(n, kind, now_ms - age_ms.astype(np.int64))
    st["grid_up"] = 1
    soc = np.clip(rng.beta(4, 2, n) * 100.0, 5.0, 100.0)
    st["soc_pct"] = np.where(bat, soc, np.nan)
    st["backup_reserve_pct"] = np.where(bat, reserve, np.nan)
    st["power_w"] = np.where(bat, 0.0, np.where(sol, rated * 0.6, np.nan))
    outdoor_region = rng.uniform(29.0, 38.0, len(regions))
    outdoor = outdoor_region[region] + rng.normal(0.0, 1.0, n)
    mode = rng.choice(
        np.array([physics.MODE_COOL, physics.MODE_AUTO, physics.MODE_OFF], dtype=np.int8),
        size=n,
        p=[0.85, 0.08, 0.07],
    )
    st["mode"] = np.where(th, mode, -1)
    st["setpoint_c"] = np.where(th, setpoint, np.nan)
    st["indoor_c"] = np.where(th, setpoint + rng.uniform(-0.3, 0.5, n), np.nan)
    st["outdoor_c"] = np.where(th & (rng.random(n) > 0.05), outdoor, np.nan)
    st["hvac_w"] = np.where(th, hvac * 0.5, np.nan)

    online = rng.random(n) > 0.03
    vendors = ["acme", "volta", "thermo"]
    return assemble(
        now_ms,
        kind,
        region,
        regions,
        st,
        online=online,
        vendor_codes=rng.integers(0, len(vendors), n),
        vendors=vendors,
        feeders=["f-1"],
        enrolled=rng.random(n) > 0.02,
        capacity_wh=capacity,
        max_discharge_w=max_dis,
        max_charge_w=max_dis,
        backup_reserve_pct=reserve,
        rated_w=rated,
        hvac_rated_w=hvac,
        comfort_max_c=comfort_max,
        comfort_min_c=comfort_min,
        max_offset_c=max_offset,
        lat=rng.uniform(25.0, 45.0, n),
        lon=rng.uniform(-120.0, -75.0, n),
    )


def synthetic_usage(n: int, seed: int = 0, now_ms: int = 1_784_061_000_000) -> DeviceUsage:
    """Season so far: a few events each, some devices still resting from yesterday."""
    rng = np.random.default_rng(seed + 1)
    events = np.minimum(rng.poisson(4.0, n), 14).astype(np.int32)
    hours = events * rng.uniform(1.0, 2.5, n)
    day = 86_400_000
    ago = np.where(
        rng.random(n) < 0.1, rng.uniform(0.1, 0.8, n) * day, rng.uniform(1.0, 60.0, n) * day
    )
    last_end = np.where(events > 0, now_ms - ago, 0).astype(np.int64)
    return DeviceUsage(
        events_this_season=events,
        hours_this_season=hours,
        last_event_end_ms=last_end,
        cost_per_kwh=rng.uniform(0.02, 0.10, n),
    )
