"""Group the fleet into clusters (region × kind × state bucket × eligible demands).

Each cluster is a "virtual battery" the optimiser allots to demands: a count of devices, the mean
power and energy of a battery in it, the mean expected shed of a thermostat for each demand's
event length, mean costs. Everything is computed with numpy over all devices at once; the
device rows are returned sorted by (cluster, priority) so the assignment takes prefixes.

Per device and demand, the flexibility counted is:
- battery: power min(max discharge, (energy above max(reserve, 20 %)) × 0.949 / window hours)
  sustained over the demand window, or its power/energy pair for the LP;
- thermostat: the average shed of the RC model over a rotation block (the demand window split
  into blocks of at most 2 h, 3 h for grid events), less customer overrides (~10 % at 2 h,
  linear in the block length) and less the recovery energy of blocks that end inside the window;
- solar: nothing (curtailment only; it never adds load reduction or export).
Each device's inputs (state of charge, reserve, setpoint, offset, outdoor temperature, and the
defaults for readings it has not sent) come from ``vpp.flexibility``, as for the fleet view and
the forecast. Devices that have used their season's events or hours, or have not rested since
their last event, are not eligible; the MW they would have given is reported as
``fatigue_lost_mw``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dispatch.types import Demand, DeviceUsage, DispatchParams, Horizon
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT, FleetSnapshot
from vpp.flexibility import ThermostatInputs, battery_inputs, thermostat_inputs

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

MAX_DEMANDS = 40  # eligibility masks are packed in an int64 key
# The longest a battery is counted to keep serving its home from its last reading before its
# window (a reading up to 5 minutes old and the runner's lead; see build_clusters).
MAX_DRAIN_AHEAD_H = 0.5
_COST_BITS, _LRU_BITS, _AGE_BITS = 10, 20, 10


@dataclass(frozen=True)
class DemandWindow:
    """A demand on the horizon's grid: intervals [a, b), hours, thermostat rotation blocks."""

    a: int
    b: int
    hours: float
    block_bounds: npt.NDArray[np.int64]  # interval bounds of the thermostat blocks (k + 1 values)
    block_h: float  # mean thermostat block length (hours)
    max_block_h: float  # longest block (hours)
    block_limit_h: float  # longest block allowed for this demand

    @property
    def n_blocks(self) -> int:
        return len(self.block_bounds) - 1


def demand_window(d: Demand, horizon: Horizon, params: DispatchParams) -> DemandWindow:
    a, b = horizon.window(d.start_ms, d.end_ms)
    m = b - a
    dt_h = horizon.dt_h
    limit_h = params.thermostat_hard_max_h if d.is_grid_event else params.thermostat_max_event_h
    per_block = max(1, math.floor(limit_h / dt_h + 1e-9))
    k = max(1, -(-m // per_block)) if m > 0 else 1
    bounds = a + np.round(np.linspace(0, m, k + 1)).astype(np.int64)
    lengths = np.diff(bounds)
    return DemandWindow(
        a=a,
        b=b,
        hours=m * dt_h,
        block_bounds=bounds,
        block_h=(m / k) * dt_h if m > 0 else 0.0,
        max_block_h=float(lengths.max(initial=0)) * dt_h,
        block_limit_h=limit_h,
    )


@dataclass
class Clusters:
    """Clusters plus the per-device rows they are built from, sorted by (cluster, priority)."""

    horizon: Horizon
    regions: list[str]
    demand_ids: list[str]
    windows: list[DemandWindow]
    n_fleet: int
    # Device rows (only devices eligible for at least one demand), in (cluster, priority) order.
    device_index: I64
    row_cluster: I64
    starts: I64  # rows of cluster c are starts[c]:starts[c+1]
    row_power_kw: F64  # battery max discharge above its pre-event output (0 for thermostats)
    row_energy_kwh: F64  # battery AC energy above reserve net of pre-event output (see below)
    row_shed_kw: F64  # (rows, demands): thermostat expected shed while active; battery sustained
    row_recovery_kwh: F64  # (rows, demands) thermostat snapback after its block
    row_offset_c: F64  # thermostat offset to command (cut to comfort and device max)
    row_energy_cost: F64  # $ per kWh delivered (wear + incentive)
    row_event_cost: F64  # $ per device-event (comfort/fatigue, grows with season use)
    # Per cluster.
    region_code: npt.NDArray[np.int32]
    kind_code: npt.NDArray[np.int8]
    bucket: I64
    mask: I64  # bit j: eligible for demand j
    count: I64
    power_mw: F64  # mean per device
    energy_mwh: F64  # mean per device
    shed_mw: F64  # (clusters, demands) mean per active device
    recovery_mwh: F64  # (clusters, demands) mean per device-event
    energy_cost_per_mwh: F64
    event_cost: F64  # mean per device-event
    fatigue_lost_mw: F64  # (demands,) sustained MW of devices held back by budgets or rest
    # Battery output before the event, kW (0 for thermostats): a battery's setpoint is this plus
    # the increment planned on row_power_kw / row_energy_kwh.
    row_pre_kw: F64 = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.count)

    @property
    def n_demands(self) -> int:
        return len(self.demand_ids)

    def eligible(self) -> npt.NDArray[np.bool_]:
        """(clusters, demands) eligibility."""
        bits = np.int64(1) << np.arange(self.n_demands, dtype=np.int64)
        return (self.mask[:, None] & bits[None, :]) != 0

    def key(self, c: int) -> tuple[str, str, int, int]:
        from vpp.domain import KIND_BY_CODE

        return (
            self.regions[int(self.region_code[c])],
            KIND_BY_CODE[int(self.kind_code[c])].value,
            int(self.bucket[c]),
            int(self.mask[c]),
        )


def _thermostat_shed(
    inp: ThermostatInputs, w: DemandWindow, params: DispatchParams
) -> tuple[F64, F64]:
    """(expected kW shed while active, recovery kWh) for one demand's rotation blocks."""
    L = max(w.block_h, 1e-6)
    shed, _, rec = inp.shed(L)
    override = min(params.thermostat_override_at_2h * L / 2.0, 0.5)
    inside = (w.n_blocks - 1) / w.n_blocks  # share of blocks whose snapback falls in the window
    net = (shed * L * (1.0 - override) - rec * inside) / L
    asked = inp.offset_c > 0
    return np.where(asked, np.maximum(net, 0.0), 0.0), np.where(asked, rec, 0.0)


def _cost_bin(cost_per_mwh: F64, ratio: float) -> tuple[I64, F64]:
    """Log-spaced bucket of a cost and the position inside it (0..1)."""
    pos = np.log1p(np.maximum(cost_per_mwh, 0.0)) / math.log(ratio)
    b = np.floor(pos)
    return np.clip(b, 0, 63).astype(np.int64), np.clip(pos - b, 0.0, 1.0)


def _dense_labels(keys: I64) -> tuple[I64, int]:
    """Label equal keys 0..k-1 in key order: a bincount when the keys are small (no sort)."""
    if keys.size and keys.min() >= 0 and keys.max() < 1 << 24:
        present = np.bincount(keys, minlength=1) > 0
        label = np.cumsum(present) - 1
        return label[keys].astype(np.int64), int(present.sum())
    ukeys, inv = np.unique(keys, return_inverse=True)
    return inv.astype(np.int64).reshape(-1), len(ukeys)


def build_clusters(
    fleet: FleetSnapshot,
    usage: DeviceUsage,
    horizon: Horizon,
    params: DispatchParams,
    demands: Sequence[Demand] = (),
    *,
    exclude: np.ndarray | None = None,
    granularity: str = "cluster",
) -> Clusters:
    """Clusters of the devices eligible for ``demands``.

    ``exclude``: boolean mask or indices of devices not to use (booked on overlapping events,
    opted out, stale). ``granularity="device"`` makes every device its own cluster (the
    device-level LP the benchmark compares against).
    """
    params.validate()
    n = len(fleet)
    usage.validate(n)
    demands = list(demands)
    if len(demands) > MAX_DEMANDS:
        raise ValueError(f"demands: at most {MAX_DEMANDS} demands per plan, got {len(demands)}")
    if len({d.id for d in demands}) != len(demands):
        raise ValueError("demands: ids must be unique")
    nd = len(demands)
    windows = [demand_window(d, horizon, params) for d in demands]

    usable = fleet.dispatchable() & (fleet.kind_codes != SOLAR)
    # Only the regions something is asked of (the rest would be eligible for nothing).
    wanted = np.zeros(max(len(fleet.regions), 1) + 1, bool)
    for d in demands:
        wanted[fleet.region_code(d.region)] = True  # unknown region: -1, the spare last slot
    wanted[-1] = False
    usable &= wanted[fleet.region_codes]
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            if ex.shape != (n,):
                raise ValueError(f"exclude: boolean mask must have {n} values, got {ex.shape}")
            usable &= ~ex
        else:
            if ex.size and (ex.min() < 0 or ex.max() >= n):
                raise ValueError("exclude: device index out of range")
            usable[ex.astype(np.int64)] = False
    cand = np.flatnonzero(usable).astype(np.int64)
    kind = fleet.kind_codes[cand]
    region = fleet.region_codes[cand]
    is_bat = kind == BATTERY
    is_th = kind == THERMOSTAT
    bat_rows = np.flatnonzero(is_bat)
    th_rows = np.flatnonzero(is_th)
    m = len(cand)

    power_kw = np.zeros(m)
    energy_kwh = np.zeros(m)
    pre_kw = np.zeros(m)
    if bat_rows.size:
        b_inp = battery_inputs(fleet, cand[bat_rows])
        max_kw, total_kwh = b_inp.max_discharge_kw, b_inp.energy_kwh()
        # Output before the event: what the battery already gives its home (self-consumption,
        # ≥ 0). Settlement subtracts it, and it drains the same energy during the window.
        pre_kw[bat_rows] = np.clip(b_inp.output_w / 1000.0, 0.0, max_kw)
        # Plan on the increment over what the battery already gives its home: a battery at
        # 1.5 kW before the event, commanded to 5 kW, delivers 3.5 kW, and its energy above the
        # reserve must last the window at the full 5 kW. So power = max discharge − pre-event,
        # energy = energy above reserve − pre-event × the longest window (then for a window of
        # h hours, energy / h ≤ usable / h − pre-event: never past the reserve).
        longest_h = max((w.hours for w in windows if w.b > w.a), default=0.0)
        # And until its command takes effect it keeps serving its home from the charge it last
        # reported: a reading up to 5 minutes old, the runner's lead before the window. Planned
        # without that, an energy-limited battery reaches its reserve minutes before the end
        # and the last interval falls short. (Capped: a charge read now says little about a
        # window hours ahead, which the forecast values.)
        first_a = min((w.a for w in windows if w.b > w.a), default=None)
        if first_a is not None:
            recv = fleet.state["recv_ms"][cand[bat_rows]]
            ahead_ms = horizon.interval_start_ms(first_a) - recv
            ahead_h = np.clip(ahead_ms / 3_600_000.0, 0.0, MAX_DRAIN_AHEAD_H)
            total_kwh = np.maximum(total_kwh - pre_kw[bat_rows] * ahead_h, 0.0)
        power_kw[bat_rows] = np.maximum(max_kw - pre_kw[bat_rows], 0.0)
        energy_kwh[bat_rows] = np.maximum(total_kwh - pre_kw[bat_rows] * longest_h, 0.0)
    offset_c = np.full(m, np.nan)
    shed_kw = np.zeros((m, nd))
    recovery_kwh = np.zeros((m, nd))
    th_inp = (
        thermostat_inputs(
            fleet,
            cand[th_rows],
            offset_c=params.thermostat_offset_c,
            min_offset_c=params.thermostat_min_offset_c,
        )
        if th_rows.size
        else None
    )
    if th_inp is not None:
        offset_c[th_rows] = th_inp.offset_c
    shed_cache: dict[tuple[float, int], tuple[F64, F64]] = {}
    for j, w in enumerate(windows):
        if w.b <= w.a:
            continue
        if bat_rows.size:
            shed_kw[bat_rows, j] = np.minimum(
                power_kw[bat_rows], energy_kwh[bat_rows] / max(w.hours, 1e-9)
            )
        if th_inp is not None and w.max_block_h <= w.block_limit_h + 1e-9:
            key = (round(w.block_h, 9), w.n_blocks)
            if key not in shed_cache:
                shed_cache[key] = _thermostat_shed(th_inp, w, params)
            shed_kw[th_rows, j], recovery_kwh[th_rows, j] = shed_cache[key]

    # Eligibility: region, capacity, season budgets and rest since the last event.
    events = usage.events_this_season[cand]
    hours = usage.hours_this_season[cand]
    last_end = usage.last_event_end_ms[cand]
    max_events = np.where(is_bat, usage.max_events_battery, usage.max_events_thermostat)
    max_hours = np.where(is_bat, usage.max_hours_battery, usage.max_hours_thermostat)
    rest_ms = np.where(is_bat, params.battery_min_rest_h, params.min_rest_h) * 3_600_000.0
    mask = np.zeros(m, np.int64)
    fatigue_lost_mw = np.zeros(nd)
    for j, (d, w) in enumerate(zip(demands, windows, strict=True)):
        able = (region == fleet.region_code(d.region)) & (shed_kw[:, j] > 1e-9)
        event_h = np.where(is_bat, w.hours, w.max_block_h)
        rested = (last_end <= 0) | (last_end + rest_ms <= d.start_ms)
        within = (events < max_events) & (hours + event_h <= max_hours + 1e-9) & rested
        ok = able & within
        mask |= ok.astype(np.int64) << j
        held = able & ~within
        fatigue_lost_mw[j] = (
            float(
                np.sum(
                    np.where(is_th[held], shed_kw[held, j] / max(w.n_blocks, 1), shed_kw[held, j])
                )
            )
            / 1000.0
        )
    keep = mask != 0

    # Costs: energy ($/kWh) and per device-event (grows with how much of the budget is used).
    energy_cost = usage.cost_per_kwh[cand] + np.where(is_bat, params.wear_cost_per_kwh, 0.0)
    event_base = np.where(is_bat, params.battery_event_cost, params.thermostat_event_cost)
    event_cost = event_base * (1.0 + events / np.maximum(max_events, 1))

    # State bucket: batteries by hours at full power and cost; thermostats by cost per MWh.
    ref_kwh = np.where(
        is_bat,
        np.maximum(energy_kwh, 1e-3),
        np.maximum(shed_kw.max(axis=1, initial=0.0) * params.thermostat_max_event_h, 1e-3),
    )
    cost_per_mwh = energy_cost * 1000.0 + event_cost / ref_kwh * 1000.0
    cbin, cpos = _cost_bin(cost_per_mwh, params.cost_bucket_ratio)
    dur_h = np.where(power_kw > 0, energy_kwh / np.maximum(power_kw, 1e-9), 0.0)
    # Each demand's window length is an edge too: a battery either side of it is limited by
    # power or by energy over that window, and a cluster should not mix the two.
    edges = np.unique(
        np.concatenate(
            [
                np.asarray(params.battery_duration_edges_h, dtype=float),
                [w.hours for w in windows if w.hours > 0],
            ]
        )
    )
    dbin = np.searchsorted(edges, dur_h).astype(np.int64)
    bucket = np.where(is_bat, dbin * 64 + cbin, cbin)

    sel = np.flatnonzero(keep)
    if granularity == "device":
        ckey = np.arange(len(sel), dtype=np.int64)
    elif granularity == "cluster":
        n_regions = max(len(fleet.regions), 1)
        n_buckets = (len(edges) + 1) * 64
        ckey = (
            (mask[sel] * n_regions + region[sel].astype(np.int64)) * 2 + is_th[sel]
        ) * n_buckets + bucket[sel]
    else:
        raise ValueError(f"granularity: 'cluster' or 'device', got {granularity!r}")
    inv, nc = _dense_labels(ckey)

    # Priority inside a cluster: cheapest, least recently used, freshest (one int64 sort key).
    now = fleet.now_ms
    cost_q = np.minimum((cpos[sel] * (1 << _COST_BITS)).astype(np.int64), (1 << _COST_BITS) - 1)
    since_h = np.where(last_end[sel] > 0, (now - last_end[sel]) / 3_600_000.0, np.inf)
    lru_q = (1 << _LRU_BITS) - 1 - np.clip(since_h, 0, (1 << _LRU_BITS) - 1).astype(np.int64)
    age_s = (now - fleet.state["recv_ms"][cand[sel]]) / 10_000.0
    age_q = np.clip(age_s, 0, (1 << _AGE_BITS) - 1).astype(np.int64)
    sort_key = (
        (inv << (_COST_BITS + _LRU_BITS + _AGE_BITS))
        | (cost_q << (_LRU_BITS + _AGE_BITS))
        | (lru_q << _AGE_BITS)
        | age_q
    )
    perm = np.argsort(sort_key)
    order = sel[perm]
    row_cluster = inv[perm]
    counts = np.bincount(row_cluster, minlength=nc).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def mean(values: F64) -> F64:
        return np.bincount(row_cluster, weights=values, minlength=nc) / np.maximum(counts, 1)

    first = starts[:-1]
    shed_o = shed_kw[order]
    rec_o = recovery_kwh[order]
    return Clusters(
        horizon=horizon,
        regions=list(fleet.regions),
        demand_ids=[d.id for d in demands],
        windows=windows,
        n_fleet=n,
        device_index=cand[order],
        row_cluster=row_cluster,
        starts=starts,
        row_power_kw=power_kw[order],
        row_energy_kwh=energy_kwh[order],
        row_shed_kw=shed_o,
        row_recovery_kwh=rec_o,
        row_offset_c=offset_c[order],
        row_energy_cost=energy_cost[order],
        row_event_cost=event_cost[order],
        region_code=region[order][first] if nc else np.zeros(0, np.int32),
        kind_code=kind[order][first] if nc else np.zeros(0, np.int8),
        bucket=bucket[order][first] if nc else np.zeros(0, np.int64),
        mask=mask[order][first] if nc else np.zeros(0, np.int64),
        count=counts,
        power_mw=mean(power_kw[order]) / 1000.0,
        energy_mwh=mean(energy_kwh[order]) / 1000.0,
        shed_mw=np.stack([mean(shed_o[:, j]) for j in range(nd)], axis=1) / 1000.0
        if nd
        else np.zeros((nc, 0)),
        recovery_mwh=np.stack([mean(rec_o[:, j]) for j in range(nd)], axis=1) / 1000.0
        if nd
        else np.zeros((nc, 0)),
        energy_cost_per_mwh=mean(energy_cost[order]) * 1000.0,
        event_cost=mean(event_cost[order]),
        fatigue_lost_mw=fatigue_lost_mw,
        row_pre_kw=pre_kw[order],
    )
