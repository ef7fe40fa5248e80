"""Plain data the optimiser takes and returns: horizon, demands, device usage, parameters, plan,
assignment. No I/O here; ``to_json``/``from_json`` give the stored form (orjson bytes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from vpp.domain import (
    BATTERY_WEAR_COST_PER_KWH,
    COMMAND_BY_CODE,
    COMMAND_CODE,
    KIND_BY_CODE,
    PENALTY_PER_MWH,
    THERMOSTAT_DEFAULT_OFFSET_C,
    THERMOSTAT_HARD_MAX_EVENT_H,
    THERMOSTAT_MAX_EVENT_H,
    CommandType,
    Direction,
)
from vpp.flexibility import THERMOSTAT_MIN_OFFSET_C

F64 = npt.NDArray[np.float64]

GRID_EVENT_PRIORITY = 100
REQUEST_PRIORITY = 50

# Why a demand interval is short. "preempted_by:<id>" is built on the fly.
BINDING_NONE = "none"
BINDING_POWER = "fleet_power"
BINDING_ENERGY = "fleet_energy"
BINDING_FATIGUE = "fatigue_budget"
BINDING_NO_DEVICES = "no_devices"
BINDING_TIME_LIMIT = "time_limit"

# The command codes the optimiser assigns (Assignment.command_type, vpp.domain.COMMAND_CODE).
CMD_BATTERY = COMMAND_CODE[CommandType.battery_discharge]
CMD_THERMOSTAT = COMMAND_CODE[CommandType.thermostat_offset]
CMD_SOLAR = COMMAND_CODE[CommandType.solar_curtail]


def _finite(name: str, value: float, *, minimum: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be a number, got {value!r}") from exc
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


@dataclass(frozen=True)
class Horizon:
    start_ms: int
    interval_s: int
    n_intervals: int

    def __post_init__(self) -> None:
        if not isinstance(self.start_ms, int | np.integer):
            raise ValueError(f"horizon.start_ms: must be an integer, got {self.start_ms!r}")
        if not isinstance(self.interval_s, int | np.integer) or self.interval_s <= 0:
            raise ValueError(
                f"horizon.interval_s: must be a positive integer, got {self.interval_s!r}"
            )
        if not isinstance(self.n_intervals, int | np.integer) or not 0 < self.n_intervals <= 10_000:
            raise ValueError(
                f"horizon.n_intervals: must be an integer in 1..10000, got {self.n_intervals!r}"
            )

    @property
    def dt_h(self) -> float:
        return self.interval_s / 3600.0

    @property
    def end_ms(self) -> int:
        return int(self.start_ms + self.n_intervals * self.interval_s * 1000)

    def interval_start_ms(self, t: int) -> int:
        return int(self.start_ms + t * self.interval_s * 1000)

    def window(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        """Intervals [a, b) that overlap [start_ms, end_ms) (a partial interval counts whole:
        devices run for the whole interval, the conservative side for delivery)."""
        step = self.interval_s * 1000
        a = max(0, (start_ms - self.start_ms) // step)
        b = min(self.n_intervals, -(-(end_ms - self.start_ms) // step))
        return int(a), int(max(a, b))


@dataclass(frozen=True)
class Demand:
    """A capacity request or grid event overlapping the horizon.

    ``mw`` is a constant, or one value per horizon interval (values outside the window are
    ignored). ``priority``: higher first. A grid event without ``preempt`` is served only from
    what the commitments leave free; with ``preempt`` it may take their devices.
    """

    id: str
    region: str
    start_ms: int
    end_ms: int
    mw: float | F64
    priority: int = REQUEST_PRIORITY
    direction: str = Direction.load_reduction.value
    is_grid_event: bool = False
    preempt: bool = False
    firm: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("demand.id: must be a non-empty string")
        if not isinstance(self.region, str) or not self.region:
            raise ValueError(f"demand.region: must be a non-empty string ({self.id})")
        for name in ("start_ms", "end_ms"):
            if not isinstance(getattr(self, name), int | np.integer):
                raise ValueError(f"demand.{name}: must be an integer epoch ms ({self.id})")
        if self.end_ms <= self.start_ms:
            raise ValueError(f"demand.end_ms: must be after start_ms ({self.id})")
        if self.direction not in (Direction.load_reduction.value, Direction.net_export.value):
            raise ValueError(
                f"demand.direction: must be 'load_reduction' or 'net_export', got "
                f"{self.direction!r} ({self.id})"
            )
        if not isinstance(self.priority, int | np.integer) or isinstance(self.priority, bool):
            raise ValueError(f"demand.priority: must be an integer ({self.id})")
        if np.ndim(self.mw) == 0:
            _finite(f"demand.mw ({self.id})", float(self.mw), minimum=0.0)  # type: ignore[arg-type]
        else:
            arr = np.asarray(self.mw, dtype=float)
            if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(
                    f"demand.mw: must be a finite non-negative number or 1-D array ({self.id})"
                )

    def mw_profile(self, horizon: Horizon) -> F64:
        """Requested MW per horizon interval (0 outside the demand's window)."""
        a, b = horizon.window(self.start_ms, self.end_ms)
        out = np.zeros(horizon.n_intervals)
        if np.ndim(self.mw) == 0:
            out[a:b] = float(self.mw)  # type: ignore[arg-type]
        else:
            arr = np.asarray(self.mw, dtype=float)
            if arr.shape != (horizon.n_intervals,):
                raise ValueError(
                    f"demand.mw: array must have one value per horizon interval "
                    f"({horizon.n_intervals}), got {arr.shape} ({self.id})"
                )
            out[a:b] = arr[a:b]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["mw"] = float(self.mw) if np.ndim(self.mw) == 0 else np.asarray(self.mw).tolist()  # type: ignore[arg-type]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Demand:
        mw = d["mw"]
        return cls(**{**d, "mw": np.asarray(mw, dtype=float) if isinstance(mw, list) else mw})


@dataclass
class DeviceUsage:
    """Per-device use this season (aligned with the fleet snapshot's rows) and the budgets."""

    events_this_season: npt.NDArray[np.int32]
    hours_this_season: F64
    last_event_end_ms: npt.NDArray[np.int64]  # 0 = never
    cost_per_kwh: F64  # customer incentive paid per kWh delivered
    max_events_thermostat: int = 12
    max_hours_thermostat: float = 60.0
    max_events_battery: int = 60
    max_hours_battery: float = 200.0

    @classmethod
    def empty(cls, n: int, cost_per_kwh: float = 0.0) -> DeviceUsage:
        return cls(
            events_this_season=np.zeros(n, np.int32),
            hours_this_season=np.zeros(n),
            last_event_end_ms=np.zeros(n, np.int64),
            cost_per_kwh=np.full(n, float(cost_per_kwh)),
        )

    def validate(self, n: int) -> None:
        for name in (
            "events_this_season",
            "hours_this_season",
            "last_event_end_ms",
            "cost_per_kwh",
        ):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(
                    f"usage.{name}: expected {n} values (one per device), got {arr.shape}"
                )
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ValueError(f"usage.{name}: must be finite")
            if np.any(arr < 0):
                raise ValueError(f"usage.{name}: must be non-negative")


@dataclass
class DispatchParams:
    reserve_pct: float = 15.0  # replacement reserve, 10–20 %
    time_limit_s: float = 1.0
    solver: str = "glop"  # or "pdlp"
    solver_parameters: str = ""  # solver-specific, text format (e.g. GLOP "use_dual_simplex:true")
    wear_cost_per_kwh: float = BATTERY_WEAR_COST_PER_KWH
    thermostat_offset_c: float = THERMOSTAT_DEFAULT_OFFSET_C
    thermostat_min_offset_c: float = THERMOSTAT_MIN_OFFSET_C  # below this: not asked
    thermostat_max_event_h: float = THERMOSTAT_MAX_EVENT_H
    thermostat_hard_max_h: float = THERMOSTAT_HARD_MAX_EVENT_H  # grid events may run this long
    thermostat_override_at_2h: float = 0.10  # share of customers overriding by 2 h (linear in h)
    thermostat_event_cost: float = 1.0  # $ per device-event (comfort), grows with season use
    battery_event_cost: float = 0.2
    min_rest_h: float = 20.0  # thermostats: at most one event a day
    battery_min_rest_h: float = 0.0
    value_per_mwh: float = PENALTY_PER_MWH  # value of delivering 1 MWh at priority 0
    reserve_shortfall_weight: float = 0.05  # share of a demand's value a missing reserve MWh costs
    coverage_floor_weight: float = 0.05  # reward on the worst interval's covered share
    cluster_peak_cost_per_mw: float = 0.1  # $ per MW of a cluster's peak: flattest of equal plans
    # Cluster state buckets: battery hours at full power (energy/power); cost per MWh ratio.
    battery_duration_edges_h: tuple[float, ...] = (
        0.25,
        0.5,
        0.75,
        1.0,
        1.25,
        1.5,
        1.75,
        2.0,
        2.25,
        2.5,
        3.0,
        3.5,
        4.0,
        5.0,
        6.0,
        8.0,
    )
    cost_bucket_ratio: float = 1.25

    def validate(self) -> None:
        if not 0.0 <= self.reserve_pct <= 50.0:
            raise ValueError(f"params.reserve_pct: must be within 0..50, got {self.reserve_pct}")
        _finite("params.time_limit_s", self.time_limit_s, minimum=0.0)
        if self.solver not in ("glop", "pdlp"):
            raise ValueError(f"params.solver: 'glop' or 'pdlp', got {self.solver!r}")
        if not 0 < self.thermostat_max_event_h <= self.thermostat_hard_max_h:
            raise ValueError("params.thermostat_max_event_h: must be in (0, thermostat_hard_max_h]")
        if self.cost_bucket_ratio <= 1.0:
            raise ValueError("params.cost_bucket_ratio: must be > 1")


def _arr(a: np.ndarray, nd: int = 6) -> Any:
    return np.round(np.asarray(a, dtype=float), nd).tolist()


@dataclass
class Plan:
    """MW per demand and interval, what is short and why, and MW per cluster × demand × interval.

    Cluster rows are identified by (region, kind, bucket, mask) so a later snapshot can be
    matched to them; ``cluster_devices`` / ``cluster_alloc`` / ``cluster_reserve`` count devices.
    """

    horizon: Horizon
    demand_ids: list[str]
    requested_mw: F64  # (n_demands, n_intervals)
    planned_mw: F64
    shortfall_mw: F64
    binding: list[list[str]]  # per demand, per interval
    reserve_mw: F64  # (n_demands,) sustained MW held in replacement reserve
    recovery_mwh: F64  # (n_demands,) thermostat snapback energy after their blocks
    cluster_region: list[str]
    cluster_kind: list[str]
    cluster_bucket: npt.NDArray[np.int64]
    cluster_mask: npt.NDArray[np.int64]
    cluster_devices: npt.NDArray[np.int64]
    cluster_mw: F64  # (n_clusters, n_demands, n_intervals)
    cluster_alloc: F64  # (n_clusters, n_demands) devices allotted
    cluster_reserve: F64  # (n_clusters, n_demands) devices held as reserve
    solver: str
    objective: float
    status: str
    solve_s: float = 0.0
    build_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def demand(self, demand_id: str) -> dict[str, Any]:
        j = self.demand_ids.index(demand_id)
        return {
            "id": demand_id,
            "requested_mw": self.requested_mw[j].tolist(),
            "planned_mw": self.planned_mw[j].tolist(),
            "shortfall_mw": self.shortfall_mw[j].tolist(),
            "binding": self.binding[j],
            "reserve_mw": float(self.reserve_mw[j]),
        }

    def cluster_key(self, c: int) -> tuple[str, str, int, int]:
        return (
            self.cluster_region[c],
            self.cluster_kind[c],
            int(self.cluster_bucket[c]),
            int(self.cluster_mask[c]),
        )

    def to_json(self) -> bytes:
        # Cluster × demand rows are stored sparsely: only rows that carry devices.
        cs, ds = np.nonzero((self.cluster_alloc > 0) | (self.cluster_reserve > 0))
        rows = [
            {
                "c": int(c),
                "d": int(d),
                "alloc": round(float(self.cluster_alloc[c, d]), 6),
                "reserve": round(float(self.cluster_reserve[c, d]), 6),
                "mw": _arr(self.cluster_mw[c, d]),
            }
            for c, d in zip(cs, ds, strict=True)
        ]
        doc = {
            "horizon": {
                "start_ms": self.horizon.start_ms,
                "interval_s": self.horizon.interval_s,
                "n_intervals": self.horizon.n_intervals,
            },
            "demand_ids": self.demand_ids,
            "requested_mw": _arr(self.requested_mw),
            "planned_mw": _arr(self.planned_mw),
            "shortfall_mw": _arr(self.shortfall_mw),
            "binding": self.binding,
            "reserve_mw": _arr(self.reserve_mw),
            "recovery_mwh": _arr(self.recovery_mwh),
            "clusters": {
                "region": self.cluster_region,
                "kind": self.cluster_kind,
                "bucket": self.cluster_bucket.tolist(),
                "mask": self.cluster_mask.tolist(),
                "devices": self.cluster_devices.tolist(),
            },
            "cluster_rows": rows,
            "solver": self.solver,
            "objective": float(self.objective),
            "status": self.status,
            "solve_s": self.solve_s,
            "build_s": self.build_s,
            "notes": self.notes,
        }
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, data: bytes | str) -> Plan:
        doc = orjson.loads(data)
        h = Horizon(**doc["horizon"])
        nd, nt = len(doc["demand_ids"]), h.n_intervals
        cl = doc["clusters"]
        nc = len(cl["region"])
        cluster_mw = np.zeros((nc, nd, nt))
        alloc = np.zeros((nc, nd))
        reserve = np.zeros((nc, nd))
        for r in doc["cluster_rows"]:
            cluster_mw[r["c"], r["d"]] = r["mw"]
            alloc[r["c"], r["d"]] = r["alloc"]
            reserve[r["c"], r["d"]] = r["reserve"]

        def m(key: str) -> F64:
            return np.asarray(doc[key], dtype=float).reshape(nd, nt)

        return cls(
            horizon=h,
            demand_ids=list(doc["demand_ids"]),
            requested_mw=m("requested_mw"),
            planned_mw=m("planned_mw"),
            shortfall_mw=m("shortfall_mw"),
            binding=[list(b) for b in doc["binding"]],
            reserve_mw=np.asarray(doc["reserve_mw"], dtype=float),
            recovery_mwh=np.asarray(doc["recovery_mwh"], dtype=float),
            cluster_region=list(cl["region"]),
            cluster_kind=list(cl["kind"]),
            cluster_bucket=np.asarray(cl["bucket"], dtype=np.int64),
            cluster_mask=np.asarray(cl["mask"], dtype=np.int64),
            cluster_devices=np.asarray(cl["devices"], dtype=np.int64),
            cluster_mw=cluster_mw,
            cluster_alloc=alloc,
            cluster_reserve=reserve,
            solver=doc["solver"],
            objective=float(doc["objective"]),
            status=doc["status"],
            solve_s=float(doc.get("solve_s", 0.0)),
            build_s=float(doc.get("build_s", 0.0)),
            notes=list(doc.get("notes", [])),
        )


@dataclass
class Assignment:
    """Devices handed each demand's MW, one row a device (a device appears at most once).

    Batteries discharge at ``setpoint_kw × profiles[profile, t]`` in intervals
    [start_interval, end_interval) (``profile`` −1 means flat); thermostats hold their offset in
    [start_interval, end_interval) (a rotation block). Reserve rows (``is_reserve``) are standby
    devices the event runner enlists via :func:`dispatch.assign.replacements`.
    """

    horizon: Horizon
    demands: list[Demand]
    device_index: npt.NDArray[np.int64]
    demand_index: npt.NDArray[np.int32]
    kind_code: npt.NDArray[np.int8]
    setpoint_kw: F64  # battery: peak discharge kW; thermostat: expected shed kW
    expected_kw: F64  # expected average delivery while active
    start_interval: npt.NDArray[np.int32]
    end_interval: npt.NDArray[np.int32]  # exclusive
    is_reserve: npt.NDArray[np.bool_]
    profile: npt.NDArray[np.int32]
    profiles: F64  # (n_profiles, n_intervals) multipliers in [0, 1]
    command_type: npt.NDArray[np.int8]  # vpp.domain.COMMAND_CODE
    setpoint_w: F64  # battery_discharge (NaN otherwise)
    offset_c: F64  # thermostat_offset (NaN otherwise)
    limit_w: F64  # solar_curtail (NaN otherwise)
    reserve_pct: float = 15.0

    def __len__(self) -> int:
        return len(self.device_index)

    @property
    def reserve_devices(self) -> npt.NDArray[np.int64]:
        """Reserve devices, listed separately (fleet row indices, priority order)."""
        return self.device_index[self.is_reserve]

    @property
    def active_devices(self) -> npt.NDArray[np.int64]:
        return self.device_index[~self.is_reserve]

    def setpoint_kw_at(self, t: int) -> F64:
        """kW each row should deliver in interval t (0 outside its active intervals)."""
        active = (self.start_interval <= t) & (t < self.end_interval)
        mult = np.where(
            self.profile >= 0,
            self.profiles[np.maximum(self.profile, 0), t] if len(self.profiles) else 1.0,
            1.0,
        )
        return np.where(active, self.setpoint_kw * mult, 0.0)

    def expected_mw(self, include_reserve: bool = False) -> F64:
        """Expected MW per demand and interval from the assigned devices."""
        nd, nt = len(self.demands), self.horizon.n_intervals
        rows = np.ones(len(self), bool) if include_reserve else ~self.is_reserve
        out = np.zeros((nd, nt))
        flat = rows & (self.profile < 0)
        diff = np.zeros((nd, nt + 1))
        np.add.at(
            diff, (self.demand_index[flat], self.start_interval[flat]), self.expected_kw[flat]
        )
        np.add.at(diff, (self.demand_index[flat], self.end_interval[flat]), -self.expected_kw[flat])
        out += np.cumsum(diff, axis=1)[:, :nt]
        shaped = rows & (self.profile >= 0)
        if shaped.any() and len(self.profiles):
            per_profile = np.bincount(
                self.profile[shaped], weights=self.setpoint_kw[shaped], minlength=len(self.profiles)
            )
            prof_demand = np.zeros(len(self.profiles), np.int64)
            prof_demand[self.profile[shaped]] = self.demand_index[shaped]
            contrib = per_profile[:, None] * self.profiles
            np.add.at(out, prof_demand, contrib)
        return out / 1000.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for code in np.unique(self.kind_code):
            k = self.kind_code == code
            out[KIND_BY_CODE[int(code)].value] = {
                "assigned": int(np.count_nonzero(k & ~self.is_reserve)),
                "reserve": int(np.count_nonzero(k & self.is_reserve)),
                "peak_kw": round(float(self.setpoint_kw[k & ~self.is_reserve].sum()), 3),
            }
        return out

    def command(self, row: int) -> dict[str, Any]:
        """The kind-appropriate command fields for one row (the runner adds ids and validity)."""
        ct = COMMAND_BY_CODE[int(self.command_type[row])]
        doc: dict[str, Any] = {"type": ct.value}
        if ct is CommandType.battery_discharge:
            doc["setpoint_w"] = float(self.setpoint_w[row])
        elif ct is CommandType.thermostat_offset:
            doc["offset_c"] = float(self.offset_c[row])
        else:
            doc["limit_w"] = float(self.limit_w[row])
        h = self.horizon
        doc["valid_from"] = h.interval_start_ms(int(self.start_interval[row]))
        doc["valid_until"] = h.interval_start_ms(int(self.end_interval[row]))
        return doc

    def to_json(self) -> bytes:
        def nan_none(a: np.ndarray) -> list[Any]:
            return [None if math.isnan(v) else round(v, 4) for v in a.tolist()]

        doc = {
            "horizon": {
                "start_ms": self.horizon.start_ms,
                "interval_s": self.horizon.interval_s,
                "n_intervals": self.horizon.n_intervals,
            },
            "demands": [d.to_dict() for d in self.demands],
            "device_index": self.device_index.tolist(),
            "demand_index": self.demand_index.tolist(),
            "kind_code": self.kind_code.tolist(),
            "setpoint_kw": _arr(self.setpoint_kw, 4),
            "expected_kw": _arr(self.expected_kw, 4),
            "start_interval": self.start_interval.tolist(),
            "end_interval": self.end_interval.tolist(),
            "is_reserve": self.is_reserve.tolist(),
            "profile": self.profile.tolist(),
            "profiles": _arr(self.profiles, 6),
            "command_type": self.command_type.tolist(),
            "setpoint_w": nan_none(self.setpoint_w),
            "offset_c": nan_none(self.offset_c),
            "limit_w": nan_none(self.limit_w),
            "reserve_pct": self.reserve_pct,
            "summary": self.summary(),
        }
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, data: bytes | str) -> Assignment:
        doc = orjson.loads(data)
        h = Horizon(**doc["horizon"])

        def f(key: str) -> F64:
            return np.array([np.nan if v is None else v for v in doc[key]], dtype=float)

        profiles = np.asarray(doc["profiles"], dtype=float).reshape(-1, h.n_intervals)
        return cls(
            horizon=h,
            demands=[Demand.from_dict(d) for d in doc["demands"]],
            device_index=np.asarray(doc["device_index"], dtype=np.int64),
            demand_index=np.asarray(doc["demand_index"], dtype=np.int32),
            kind_code=np.asarray(doc["kind_code"], dtype=np.int8),
            setpoint_kw=f("setpoint_kw"),
            expected_kw=f("expected_kw"),
            start_interval=np.asarray(doc["start_interval"], dtype=np.int32),
            end_interval=np.asarray(doc["end_interval"], dtype=np.int32),
            is_reserve=np.asarray(doc["is_reserve"], dtype=bool),
            profile=np.asarray(doc["profile"], dtype=np.int32),
            profiles=profiles,
            command_type=np.asarray(doc["command_type"], dtype=np.int8),
            setpoint_w=f("setpoint_w"),
            offset_c=f("offset_c"),
            limit_w=f("limit_w"),
            reserve_pct=float(doc.get("reserve_pct", 15.0)),
        )

    @classmethod
    def empty(
        cls, horizon: Horizon, demands: list[Demand], reserve_pct: float = 15.0
    ) -> Assignment:
        z = np.zeros(0)
        return cls(
            horizon=horizon,
            demands=demands,
            device_index=np.zeros(0, np.int64),
            demand_index=np.zeros(0, np.int32),
            kind_code=np.zeros(0, np.int8),
            setpoint_kw=z,
            expected_kw=z,
            start_interval=np.zeros(0, np.int32),
            end_interval=np.zeros(0, np.int32),
            is_reserve=np.zeros(0, bool),
            profile=np.zeros(0, np.int32),
            profiles=np.zeros((0, horizon.n_intervals)),
            command_type=np.zeros(0, np.int8),
            setpoint_w=z,
            offset_c=z,
            limit_w=z,
            reserve_pct=reserve_pct,
        )
