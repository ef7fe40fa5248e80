"""A simulated fleet: batteries, rooftop solar and thermostats with plausible physics.

Two layers:

- :class:`SimFleet`, the core: vectorised numpy state for N devices (no I/O). ``step`` advances
  the physics, ``telemetry_payloads`` builds the JSON the devices publish, ``apply_command``
  obeys (or refuses) a command and returns the acks to send. It also runs a counterfactual twin
  of every home (same weather, same load noise, no commands) in the same step, so
  ``ground_truth()`` knows what each event really delivered: Σ(counterfactual grid load − actual
  grid load) over the devices under command, per 5-minute settlement interval.
- :class:`FleetSimulator`, the I/O edge: onboards the fleet through the API, connects to MQTT
  (a few OEM-gateway connections publishing for many devices, or one connection per device
  with its own login and Last Will), publishes telemetry on the shared service clock, receives
  commands, publishes acks and injects faults.

Physics (vpp/physics.py):
- weather per region from pvlib's typical-year files (vpp/weather.py), a static micro-climate
  offset per home;
- every home has a base load (daily profile × a lognormal size × slow AR(1) noise);
- a battery home has rooftop PV (most of them); outside events the battery charges from the
  solar surplus and serves the home's deficit (self-consumption); it never goes below
  max(customer reserve, 20 %);
- thermostats hold their setpoint with the RC model: each step the unit runs at the power that
  brings the home back to its setpoint by the end of the step, within its rating (a duty-cycle
  average, the same as ``thermostat_hold_kw`` in steady state). An offset raises the cooling
  setpoint (lowers the heating one); the unit stays off while the home drifts to the new
  setpoint, then restarts there.
- customers override a thermostat event with a Weibull hazard on the time since it started
  (shape 1.2: the chance grows faster than the event's length; ~10 % by 2 h, ~21 % by 4 h).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from vpp.domain import (
    COMMAND_CODE,
    COMMAND_FIELD,
    COMMAND_KIND,
    KIND_BY_CODE,
    KIND_CODE,
    THERMOSTAT_C_KWH_PER_C,
    THERMOSTAT_COP,
    THERMOSTAT_DEFAULT_MAX_OFFSET_C,
    THERMOSTAT_Q_GAIN_KW,
    THERMOSTAT_R_C_PER_KW,
    THERMOSTAT_RATED_W,
    AckStatus,
    CommandType,
)
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT
from vpp.physics import (
    battery_reserve_pct,
    battery_step,
    rc_alpha,
    solar_power_w,
    thermostat_step,
)
from vpp.regions import RegionBook
from vpp.weather import region_centre, weather_for_region

# The simulator's region when neither its caller nor VPP_REGIONS names one.
DEFAULT_SIM_REGIONS = ("ERCOT-NORTH",)

if TYPE_CHECKING:
    import httpx

    from devices.mqtt import MqttClient, OutMessage
    from vpp.clock import Clock
    from vpp.settings import Settings

log = logging.getLogger(__name__)

FArray = npt.NDArray[np.float64]
IArray = npt.NDArray[np.int64]
BArray = npt.NDArray[np.bool_]

# Command type codes in the state arrays (vpp.domain.COMMAND_CODE); CMD_NONE: no command.
CMD_NONE = -1
CMD_DISCHARGE = COMMAND_CODE[CommandType.battery_discharge]
CMD_CHARGE = COMMAND_CODE[CommandType.battery_charge]
CMD_OFFSET = COMMAND_CODE[CommandType.thermostat_offset]
CMD_CURTAIL = COMMAND_CODE[CommandType.solar_curtail]
# The commands a device obeys (a restore is handled apart), by their wire name.
CMD_CODE: dict[str, int] = {t.value: COMMAND_CODE[t] for t in COMMAND_KIND}
CMD_KIND = {COMMAND_CODE[t]: KIND_CODE[k] for t, k in COMMAND_KIND.items()}
CMD_VALUE_FIELD = {COMMAND_CODE[t]: f for t, f in COMMAND_FIELD.items()}

DEFAULT_VENDORS = ("solara", "voltcell", "thermix", "homegrid")
MS_PER_H = 3_600_000.0
QOS1_WINDOW = 500  # QoS 1 messages handed to one connection at a time

# Home base load (kW) by local hour: low at night, a morning bump, an evening peak.
_LOAD_PROFILE_KW = np.array(
    [
        0.45,
        0.42,
        0.40,
        0.40,
        0.42,
        0.50,
        0.70,
        0.90,
        0.85,
        0.70,
        0.65,
        0.65,
        0.65,
        0.65,
        0.70,
        0.80,
        0.95,
        1.15,
        1.35,
        1.40,
        1.30,
        1.10,
        0.85,
        0.60,
    ],
)


@dataclass(frozen=True)
class FleetConfig:
    """How the simulated fleet is drawn. Shares are fractions of the devices."""

    n_devices: int
    regions: Sequence[str] = ("ERCOT-NORTH",)
    seed: int = 0
    id_prefix: str = "sim"
    thermostat_share: float = 0.40
    battery_share: float = 0.35  # the rest is solar
    large_battery_share: float = 0.30  # 11.5 kW units among the batteries
    battery_pv_share: float = 0.75  # battery homes with rooftop PV behind the battery
    # Batteries in self-consumption (charge from solar, serve the home); the rest sit idle in
    # backup mode outside events, which makes their pre-event output a flat 0 W.
    self_consumption_share: float = 1.0
    never_answer_share: float = 0.02  # devices whose command path is broken: no act, no ack
    opt_out_at_2h: float = 0.10  # thermostat customers who override by 2 h into an event
    opt_out_shape: float = 1.2  # Weibull shape (> 1: the hazard grows; ~21 % by 4 h)
    vendors: Sequence[str] = DEFAULT_VENDORS
    interval_s: float = 300.0  # telemetry cadence outside events
    event_interval_s: float = 60.0  # telemetry cadence while under a command
    settlement_interval_s: float = 300.0
    load_noise: float = 0.05  # relative σ of the home load's AR(1) noise
    # A device that lost its link drops its command after this long (domain brief: "after 10
    # minutes without contact a device reverts on its own").
    revert_after_lost_s: float = 600.0
    feeder_size: int = 500

    def __post_init__(self) -> None:
        if self.n_devices < 1:
            raise ValueError("n_devices: must be at least 1")
        if not self.regions:
            raise ValueError("regions: at least one region")
        for name in ("thermostat_share", "battery_share", "never_answer_share", "opt_out_at_2h"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: must be within [0, 1]")
        if self.thermostat_share + self.battery_share > 1.0 + 1e-9:
            raise ValueError("battery_share: thermostat_share + battery_share exceed 1")
        if self.interval_s <= 0 or self.event_interval_s <= 0:
            raise ValueError("interval_s: must be > 0")


@dataclass
class GroundTruth:
    """What the fleet really did, for checking the service's measurement and settlement."""

    settlement_interval_s: float
    # event_id -> {interval start (epoch ms) -> MW delivered, averaged over the interval}
    delivered_mw: dict[str, dict[int, float]]
    # event_id -> {interval start -> MW} counting every device that was commanded for the
    # event (also after its customer opted out, until the command's own end): the view of a
    # settlement that keeps opted-out homes in the event.
    delivered_mw_members: dict[str, dict[int, float]]
    device_ids: list[str]
    battery_ids: list[str]
    battery_min_soc_pct: FArray  # lowest SOC each battery reached since the start
    battery_reserve_pct: FArray  # effective reserve: max(customer setting, 20 %)
    under_command: list[str]  # devices still following a command (or about to start one)
    opted_out: dict[str, int]  # event_id -> thermostat customers who overrode
    acks_sent: dict[str, int]

    @property
    def batteries_below_reserve(self) -> int:
        return int(np.sum(self.battery_min_soc_pct < self.battery_reserve_pct - 1e-6))

    def on_intervals(
        self, event_id: str, starts_ms: Sequence[int], ends_ms: Sequence[int]
    ) -> list[float]:
        """What the event's own devices really delivered in each of the given intervals (the
        service's settlement intervals), MW averaged over the interval: summed over the devices
        commanded for the event from their command's start to its end or restore, opted out or
        not (``delivered_mw_members``: the devices a settlement counts), and only in these
        intervals (none before the window or in the restore stagger after it). Intervals of
        the truth's own grid are taken by their overlap, so the two grids need not align; an
        interval the truth has no row for delivered 0."""
        rows = self.delivered_mw_members.get(event_id, {})
        step = int(self.settlement_interval_s * 1000)
        out: list[float] = []
        for lo, hi in zip(starts_ms, ends_ms, strict=True):
            lo, hi = int(lo), int(hi)
            if hi <= lo:
                out.append(0.0)
                continue
            first = (lo // step) * step
            mwh = 0.0
            for s in range(first, hi, step):
                overlap = min(hi, s + step) - max(lo, s)
                if overlap > 0:
                    mwh += rows.get(s, 0.0) * overlap
            out.append(mwh / (hi - lo))
        return out

    def series(self, event_id: str | None = None) -> tuple[list[int], list[float]]:
        """(interval starts, MW) for one event, or summed over all events."""
        if event_id is not None:
            rows = self.delivered_mw.get(event_id, {})
            starts = sorted(rows)
            return starts, [rows[s] for s in starts]
        total: dict[int, float] = {}
        for rows in self.delivered_mw.values():
            for s, mw in rows.items():
                total[s] = total.get(s, 0.0) + mw
        starts = sorted(total)
        return starts, [total[s] for s in starts]


def _number(cmd: dict[str, Any], name: str) -> float | None:
    v = cmd.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


class SimFleet:
    """Vectorised state and physics of a simulated fleet (pure: no clock, no network)."""

    def __init__(self, config: FleetConfig, start_ms: int) -> None:
        self.config = cfg = config
        n = cfg.n_devices
        self.n = n
        rng = np.random.default_rng(cfg.seed)
        # Separate streams: the shared draws (weather noise, load) must not shift when
        # commands, opt-outs or faults consume random numbers.
        self._rng_load = np.random.default_rng([cfg.seed, 1])
        self._rng_behaviour = np.random.default_rng([cfg.seed, 2])
        self.t_ms = int(start_ms)

        # --- who is who ------------------------------------------------------------------
        u = rng.random(n)
        kind = np.full(n, SOLAR, dtype=np.int8)
        kind[u < cfg.thermostat_share] = THERMOSTAT
        kind[(u >= cfg.thermostat_share) & (u < cfg.thermostat_share + cfg.battery_share)] = BATTERY
        self.kind = kind
        self.is_battery: BArray = kind == BATTERY
        self.is_solar: BArray = kind == SOLAR
        self.is_thermostat: BArray = kind == THERMOSTAT
        self.regions = list(cfg.regions)
        self.region_idx = rng.integers(0, len(self.regions), n).astype(np.int16)
        self.vendors = list(cfg.vendors)
        self.vendor_idx = rng.integers(0, len(self.vendors), n).astype(np.int16)
        letter = {BATTERY: "b", SOLAR: "s", THERMOSTAT: "t"}
        kinds_list = kind.tolist()
        self.ids: list[str] = [
            f"{cfg.id_prefix}-{letter[k]}{i:06d}" for i, k in enumerate(kinds_list)
        ]
        self.index: dict[str, int] = {d: i for i, d in enumerate(self.ids)}
        self._weather = [weather_for_region(r) for r in self.regions]
        # Homes sit around their region's load centre; weather comes from the climate's file.
        site_lat = np.array([region_centre(r)[0] for r in self.regions])
        site_lon = np.array([region_centre(r)[1] for r in self.regions])
        self.tz_offset_h = np.array([w.tz_offset_h for w in self._weather])[self.region_idx]
        self.lat = site_lat[self.region_idx] + rng.uniform(-0.3, 0.3, n)
        self.lon = site_lon[self.region_idx] + rng.uniform(-0.3, 0.3, n)
        self.temp_offset_c = rng.normal(0.0, 0.7, n)
        self.mute: BArray = rng.random(n) < cfg.never_answer_share

        # --- home load and PV ------------------------------------------------------------
        self.load_scale = rng.lognormal(0.0, 0.3, n)
        self.load_noise = rng.normal(0.0, cfg.load_noise, n)
        pv_rated = np.zeros(n)
        pv_rated[self.is_solar] = rng.uniform(4000.0, 10000.0, int(self.is_solar.sum()))
        bat_pv = self.is_battery & (rng.random(n) < cfg.battery_pv_share)
        pv_rated[bat_pv] = rng.uniform(4000.0, 9000.0, int(bat_pv.sum()))
        self.pv_rated_w = pv_rated
        self.pv_factor = rng.uniform(0.75, 1.0, n)  # orientation and shading
        self.energy_wh = np.zeros(n)  # solar devices' cumulative counter

        # --- batteries -------------------------------------------------------------------
        nb = int(self.is_battery.sum())
        large = rng.random(n) < cfg.large_battery_share
        self.capacity_wh = np.where(self.is_battery, 13_500.0, 0.0)
        self.max_discharge_w = np.where(self.is_battery, np.where(large, 11_500.0, 5_000.0), 0.0)
        self.max_charge_w = self.max_discharge_w.copy()
        customer_reserve = np.zeros(n)
        customer_reserve[self.is_battery] = rng.choice([20.0, 20.0, 20.0, 25.0, 30.0, 40.0], nb)
        self.customer_reserve_pct = customer_reserve
        self.reserve_pct: FArray = np.where(
            self.is_battery, battery_reserve_pct(customer_reserve), 0.0
        )
        soc = np.zeros(n)
        soc[self.is_battery] = rng.uniform(0.0, 1.0, nb)
        low = np.maximum(self.reserve_pct + 10.0, 50.0)
        soc = np.where(self.is_battery, low + soc * (100.0 - low), 0.0)
        self.soc = soc
        self.soc_cf = soc.copy()
        self.self_consumption: BArray = self.is_battery & (
            rng.random(n) < cfg.self_consumption_share
        )
        self.battery_w = np.zeros(n)
        self.battery_w_cf = np.zeros(n)
        self.min_soc = soc.copy()

        # --- thermostats -----------------------------------------------------------------
        self.r = rng.uniform(0.8, 1.2, n) * THERMOSTAT_R_C_PER_KW
        self.c = rng.uniform(0.8, 1.2, n) * THERMOSTAT_C_KWH_PER_C
        self.cop = rng.uniform(0.9, 1.1, n) * THERMOSTAT_COP
        self.q_gain_kw = rng.uniform(0.6, 1.4, n) * THERMOSTAT_Q_GAIN_KW
        self.hvac_rated_w = np.where(
            self.is_thermostat, rng.choice([3500.0, 4500.0, THERMOSTAT_RATED_W], n), 0.0
        )
        self.sp_cool = np.round(rng.uniform(22.0, 26.0, n) * 2) / 2
        self.sp_heat = np.round(rng.uniform(18.0, 21.0, n) * 2) / 2
        self.comfort_max = self.sp_cool + rng.choice([2.0, 2.5, 3.0, 4.0], n)
        self.comfort_min = self.sp_heat - rng.choice([2.0, 2.5, 3.0, 4.0], n)
        self.max_offset_c = np.full(n, THERMOSTAT_DEFAULT_MAX_OFFSET_C)
        _, temp0 = self._weather_now(self.t_ms)
        self.indoor = self._initial_indoor(temp0)
        self.indoor_cf = self.indoor.copy()
        self.hvac_w = np.zeros(n)
        self.hvac_w_cf = np.zeros(n)
        self.outdoor_c = temp0
        self.heating: BArray = np.zeros(n, dtype=bool)
        self.pv_w = np.zeros(n)
        self.load_w = np.zeros(n)

        # --- commands --------------------------------------------------------------------
        self.cmd_type = np.full(n, CMD_NONE, dtype=np.int8)
        self.cmd_value = np.zeros(n)
        self.cmd_start_ms = np.zeros(n, dtype=np.int64)
        self.cmd_until_ms = np.zeros(n, dtype=np.int64)
        self.cmd_started: BArray = np.zeros(n, dtype=bool)
        self.cmd_event = np.full(n, -1, dtype=np.int32)
        # Devices still in an event after an opt-out (for the "members" ground truth).
        self.member_event = np.full(n, -1, dtype=np.int32)
        self.member_until_ms = np.zeros(n, dtype=np.int64)
        self.cmd_id: list[str | None] = [None] * n
        self._ack_status: dict[tuple[int, str], AckStatus] = {}  # last ack per (device, command)
        self._opted_out: set[tuple[int, int]] = set()  # (device, event index)
        self.event_ids: list[str] = []
        self._event_index: dict[str, int] = {}
        self._acks: list[tuple[int, dict[str, Any]]] = []
        self._delivered_wh: dict[tuple[int, int], float] = {}
        self._delivered_members_wh: dict[tuple[int, int], float] = {}
        self.opt_out_count: dict[int, int] = {}
        self.acks_sent: dict[str, int] = {}

        # --- telemetry and faults ----------------------------------------------------------
        self.alive: BArray = np.ones(n, dtype=bool)
        self.lost_ms = np.zeros(n, dtype=np.int64)  # when each dropped device lost its link
        self.clock_skew_ms = np.zeros(n, dtype=np.int64)
        self.seq = np.zeros(n, dtype=np.int64)
        phase = rng.random(n)
        self.next_due_ms = (self.t_ms + phase * cfg.interval_s * 1000.0).astype(np.int64)
        # The Weibull scale that puts opt_out_at_2h of the customers out by 2 h.
        p2 = min(max(cfg.opt_out_at_2h, 0.0), 0.999)
        self._opt_eta_h = (
            2.0 / (-math.log(1.0 - p2)) ** (1.0 / cfg.opt_out_shape) if p2 > 0 else math.inf
        )

    # ---- helpers -------------------------------------------------------------------------
    def _weather_now(self, t_ms: float) -> tuple[FArray, FArray]:
        ghi_r = np.empty(len(self.regions))
        temp_r = np.empty(len(self.regions))
        for j, w in enumerate(self._weather):
            g, t = w.sample(t_ms)
            ghi_r[j], temp_r[j] = float(g), float(t)
        return ghi_r[self.region_idx], temp_r[self.region_idx] + self.temp_offset_c

    def _initial_indoor(self, outdoor_c: FArray) -> FArray:
        t_eq = outdoor_c + self.r * self.q_gain_kw
        # A home starts at whichever setpoint it is holding, or free-running in between.
        return np.clip(t_eq, self.sp_heat, self.sp_cool)

    def _local_hour(self, t_ms: float) -> FArray:
        return ((t_ms / MS_PER_H + self.tz_offset_h) % 24.0).astype(float)

    def _base_load_w(self, t_ms: float) -> FArray:
        hour = self._local_hour(t_ms)
        lo = np.floor(hour).astype(int) % 24
        frac = hour - np.floor(hour)
        prof = _LOAD_PROFILE_KW[lo] * (1 - frac) + _LOAD_PROFILE_KW[(lo + 1) % 24] * frac
        return prof * 1000.0 * self.load_scale

    def _event_idx(self, event_id: str) -> int:
        idx = self._event_index.get(event_id)
        if idx is None:
            idx = len(self.event_ids)
            self.event_ids.append(event_id)
            self._event_index[event_id] = idx
        return idx

    def _ack(
        self, i: int, command_id: str, status: AckStatus, ts_ms: int, reason: str | None = None
    ) -> dict[str, Any]:
        self._ack_status[(i, command_id)] = status
        ack: dict[str, Any] = {
            "command_id": command_id,
            "status": status.value,
            "ts": int(ts_ms + self.clock_skew_ms[i]),
        }
        if reason:
            ack["reason"] = reason
        self.acks_sent[status.value] = self.acks_sent.get(status.value, 0) + 1
        return ack

    def _emit(self, i: int, status: AckStatus, ts_ms: int, reason: str | None = None) -> None:
        cid = self.cmd_id[i]
        if cid is not None and self.alive[i] and not self.mute[i]:
            self._acks.append((i, self._ack(i, cid, status, ts_ms, reason)))

    def _clear(self, idx: IArray | Sequence[int], keep_member: bool = False) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        if not keep_member:
            self.member_event[idx] = -1
        self.cmd_type[idx] = CMD_NONE
        self.cmd_started[idx] = False
        self.cmd_event[idx] = -1
        for i in idx.tolist():
            self.cmd_id[i] = None
        self.next_due_ms[idx] = np.minimum(self.next_due_ms[idx], self.t_ms)  # state on change

    # ---- physics ---------------------------------------------------------------------------
    def step(self, now_ms: int, dt_s: float) -> None:
        """Advance every home by ``dt_s`` seconds, ending at ``now_ms`` (powers are averages
        over the step). Starts, ends and customer overrides of commands happen here; their
        acks are queued for :meth:`drain_acks`."""
        if dt_s <= 0:
            return
        cfg = self.config
        t1 = int(now_ms)
        dt_ms = dt_s * 1000.0
        t0 = t1 - dt_ms
        dt_h = dt_s / 3600.0
        mid = t0 + dt_ms / 2

        # Share of the step each device's command is in force.
        has_cmd = self.cmd_type != CMD_NONE
        frac = np.zeros(self.n)
        if has_cmd.any():
            lo = np.maximum(self.cmd_start_ms, t0)
            hi = np.minimum(self.cmd_until_ms, t1)
            frac = np.where(has_cmd, np.clip((hi - lo) / dt_ms, 0.0, 1.0), 0.0)
            starting = np.flatnonzero(has_cmd & ~self.cmd_started & (frac > 0))
            if starting.size:
                self.cmd_started[starting] = True
                # Report after the first whole step under command: a reading is the step's
                # average power, and one straddling the switch-over would show a meter
                # half-way between the two levels (a real device reports what it does now).
                self.next_due_ms[starting] = int(t1 + dt_ms)
                start_ts = np.maximum(self.cmd_start_ms[starting], int(t0)).tolist()
                for i, ts in zip(starting.tolist(), start_ts, strict=True):
                    self._emit(i, AckStatus.started, ts)
        running = frac > 0

        # Weather, load and PV: one draw, shared by the actual homes and their twins.
        ghi, t_out = self._weather_now(mid)
        rho = math.exp(-dt_s / 1800.0)
        self.load_noise = rho * self.load_noise + math.sqrt(1 - rho * rho) * cfg.load_noise * (
            self._rng_load.standard_normal(self.n)
        )
        load = self._base_load_w(mid) * np.maximum(1.0 + self.load_noise, 0.2)
        pv_cf = solar_power_w(ghi * self.pv_factor, self.pv_rated_w, t_out)
        curtail = running & (self.cmd_type == CMD_CURTAIL)
        pv = pv_cf - np.where(curtail, frac * np.maximum(pv_cf - self.cmd_value, 0.0), 0.0)

        # Batteries: self-consumption (or idle) unless commanded.
        own_w = np.where(self.self_consumption, load - pv_cf, 0.0)
        own_w_act = np.where(self.self_consumption, load - pv, 0.0)
        req = own_w_act
        dis = running & (self.cmd_type == CMD_DISCHARGE)
        chg = running & (self.cmd_type == CMD_CHARGE)
        req = np.where(dis, frac * self.cmd_value + (1 - frac) * own_w_act, req)
        req = np.where(chg, -frac * self.cmd_value + (1 - frac) * own_w_act, req)
        b = self.is_battery
        self.soc, bat_w = battery_step(
            self.soc,
            np.where(b, req, 0.0),
            self.capacity_wh,
            self.max_discharge_w,
            self.max_charge_w,
            self.customer_reserve_pct,
            dt_s,
        )
        self.soc_cf, bat_w_cf = battery_step(
            self.soc_cf,
            np.where(b, own_w, 0.0),
            self.capacity_wh,
            self.max_discharge_w,
            self.max_charge_w,
            self.customer_reserve_pct,
            dt_s,
        )
        self.soc = np.where(b, self.soc, 0.0)
        self.soc_cf = np.where(b, self.soc_cf, 0.0)
        self.min_soc = np.minimum(self.min_soc, self.soc)

        # Thermostats: deadbeat duty cycle towards the (possibly offset) setpoint.
        off = np.where(running & (self.cmd_type == CMD_OFFSET), self.cmd_value, 0.0)
        cool_sp = np.minimum(self.sp_cool + off, np.maximum(self.comfort_max, self.sp_cool))
        heat_sp = np.maximum(self.sp_heat - off, np.minimum(self.comfort_min, self.sp_heat))
        a = rc_alpha(dt_h, self.r, self.c)
        t_eq = t_out + self.r * self.q_gain_kw
        self.indoor, hvac_kw, heating = self._thermostat(
            self.indoor, t_eq, t_out, a, dt_h, cool_sp, heat_sp
        )
        self.indoor_cf, hvac_kw_cf, _ = self._thermostat(
            self.indoor_cf, t_eq, t_out, a, dt_h, self.sp_cool, self.sp_heat
        )
        hvac_w = hvac_kw * 1000.0
        hvac_w_cf = hvac_kw_cf * 1000.0

        # Ground truth: the grid sees load + HVAC − PV − battery output.
        net = load + hvac_w - pv - bat_w
        net_cf = load + hvac_w_cf - pv_cf - bat_w_cf
        if running.any() or (self.member_event >= 0).any():
            diff_wh = (net_cf - net) * dt_h
            self._accumulate(self._delivered_wh, self.cmd_event, running, diff_wh, t0, t1)
            members = (self.member_event >= 0) & (self.member_until_ms > t0)
            self._accumulate(
                self._delivered_members_wh, self.member_event, members, diff_wh, t0, t1
            )

        self.load_w, self.pv_w, self.battery_w, self.battery_w_cf = load, pv, bat_w, bat_w_cf
        self.hvac_w, self.hvac_w_cf, self.heating, self.outdoor_c = (
            hvac_w,
            hvac_w_cf,
            heating,
            t_out,
        )
        self.energy_wh += np.where(self.is_solar, pv * dt_h, 0.0)
        self.t_ms = t1

        # Customer overrides (thermostats), a Weibull hazard on the time since the start.
        th_run = np.flatnonzero(running & (self.cmd_type == CMD_OFFSET) & ~self.mute)
        if th_run.size and math.isfinite(self._opt_eta_h):
            start = self.cmd_start_ms[th_run]
            e0 = np.maximum(t0 - start, 0.0) / MS_PER_H
            e1 = np.maximum(t1 - start, 0.0) / MS_PER_H
            k, eta = cfg.opt_out_shape, self._opt_eta_h
            p = 1.0 - np.exp(-((e1 / eta) ** k - (e0 / eta) ** k))
            out = th_run[self._rng_behaviour.random(th_run.size) < p]
            if out.size:
                for i in out.tolist():
                    ev = int(self.cmd_event[i])
                    self._opted_out.add((i, ev))
                    self.opt_out_count[ev] = self.opt_out_count.get(ev, 0) + 1
                    self._emit(i, AckStatus.opted_out, t1, "customer override")
                self._clear(out, keep_member=True)

        # Commands end by themselves at valid_until (a lost restore never strands a home).
        ended = np.flatnonzero((self.cmd_type != CMD_NONE) & (self.cmd_until_ms <= t1))
        if ended.size:
            for i in ended.tolist():
                self._emit(
                    i,
                    AckStatus.completed if self.cmd_started[i] else AckStatus.expired,
                    int(self.cmd_until_ms[i]),
                )
            self._clear(ended)
        done_members = (self.member_event >= 0) & (self.member_until_ms <= t1)
        self.member_event[done_members] = -1
        stranded = np.flatnonzero(
            ~self.alive
            & (self.cmd_type != CMD_NONE)
            & (t1 - self.lost_ms >= cfg.revert_after_lost_s * 1000)
        )
        if stranded.size:
            self._clear(stranded)

    def _thermostat(
        self,
        indoor: FArray,
        t_eq: FArray,
        t_out: FArray,
        a: FArray,
        dt_h: float,
        cool_sp: FArray,
        heat_sp: FArray,
    ) -> tuple[FArray, FArray, BArray]:
        """One RC step: the unit runs at the power that lands the home on its setpoint at the
        end of the step, within its rating (0 while the home is inside its deadband)."""
        free = a * indoor + (1 - a) * t_eq  # where the home drifts with the unit off
        denom = (1 - a) * self.r * self.cop
        rated_kw = self.hvac_rated_w / 1000.0
        cool_kw = np.clip((free - cool_sp) / denom, 0.0, rated_kw)
        heat_kw = np.clip((heat_sp - free) / denom, 0.0, rated_kw)
        heating = heat_kw > 0
        hvac_kw = np.where(heating, heat_kw, cool_kw)
        new = thermostat_step(
            indoor,
            t_out,
            hvac_kw,
            dt_h,
            heating=heating,
            r_c_per_kw=self.r,
            c_kwh_per_c=self.c,
            cop=self.cop,
            q_gain_kw=self.q_gain_kw,
        )
        new = np.where(self.is_thermostat, new, indoor)
        return new, np.where(self.is_thermostat, hvac_kw, 0.0), heating & self.is_thermostat

    def _accumulate(
        self,
        store: dict[tuple[int, int], float],
        event: npt.NDArray[np.int32],
        mask: BArray,
        diff_wh: FArray,
        t0: float,
        t1: float,
    ) -> None:
        idx = np.flatnonzero(mask & (event >= 0))
        if not idx.size:
            return
        per_event = np.bincount(event[idx], weights=diff_wh[idx])
        step_ms = self.config.settlement_interval_s * 1000.0
        # A step that crosses an interval boundary is split by time.
        boundary = math.floor(t1 / step_ms) * step_ms
        parts: list[tuple[int, float]]
        if t0 < boundary < t1:
            share_before = (boundary - t0) / (t1 - t0)
            parts = [(int(boundary - step_ms), share_before), (int(boundary), 1 - share_before)]
        else:
            parts = [(int(math.floor(t0 / step_ms) * step_ms), 1.0)]
        for ev in np.flatnonzero(per_event != 0).tolist():
            for start, share in parts:
                key = (ev, start)
                store[key] = store.get(key, 0.0) + float(per_event[ev]) * share

    # ---- commands --------------------------------------------------------------------------
    def apply_command(self, i: int, cmd: Any, now_ms: int) -> list[dict[str, Any]]:
        """Obey one command for device ``i``; returns the acks to publish now.

        Idempotent by ``command_id``: a command seen before acts once; seeing it again re-sends
        its latest ack (so a service retrying a lost ack stops retrying). Invalid commands are
        ``rejected`` with a reason naming the field; a command past ``valid_until`` is
        ``expired`` and ignored. A dropped or mute device answers nothing.
        """
        if not self.alive[i] or self.mute[i]:
            return []
        if not isinstance(cmd, dict):
            return []
        cid = cmd.get("command_id")
        if not isinstance(cid, str) or not cid:
            return []  # nothing to acknowledge against
        seen = self._ack_status.get((i, cid))
        if seen is not None:
            return [self._ack(i, cid, seen, now_ms)]
        typ = cmd.get("type")
        if typ == CommandType.restore:
            acks = [self._ack(i, cid, AckStatus.received, now_ms)]
            old = self.cmd_id[i]
            if self.cmd_type[i] != CMD_NONE and old is not None:
                # The command it ends is done too (said once, under that command's id).
                acks.append(self._ack(i, old, AckStatus.completed, now_ms, "restored"))
                self._clear([i])
            acks.append(self._ack(i, cid, AckStatus.completed, now_ms))
            return acks
        code = CMD_CODE.get(typ) if isinstance(typ, str) else None
        if code is None:
            return [
                self._ack(i, cid, AckStatus.rejected, now_ms, f"type: unknown command type {typ!r}")
            ]
        if self.kind[i] != CMD_KIND[code]:
            return [
                self._ack(
                    i,
                    cid,
                    AckStatus.rejected,
                    now_ms,
                    f"type: {typ} does not apply to a {KIND_BY_CODE[int(self.kind[i])].value}",
                )
            ]
        until = _number(cmd, "valid_until")
        if until is None:
            return [
                self._ack(i, cid, AckStatus.rejected, now_ms, "valid_until: required (epoch ms)")
            ]
        valid_from = _number(cmd, "valid_from")
        if valid_from is not None and valid_from > until:
            return [self._ack(i, cid, AckStatus.rejected, now_ms, "valid_from: after valid_until")]
        if until <= now_ms:
            return [self._ack(i, cid, AckStatus.expired, now_ms, "valid_until: already past")]
        start = float(now_ms) if valid_from is None else valid_from
        spread = _number(cmd, "randomize_start_s")
        if "randomize_start_s" in cmd and (spread is None or spread < 0):
            return [
                self._ack(i, cid, AckStatus.rejected, now_ms, "randomize_start_s: must be >= 0")
            ]
        field_name = CMD_VALUE_FIELD[code]
        value = _number(cmd, field_name)
        if value is None:
            return [self._ack(i, cid, AckStatus.rejected, now_ms, f"{field_name}: required number")]
        reason = self._check_value(i, code, value)
        if reason:
            return [self._ack(i, cid, AckStatus.rejected, now_ms, reason)]
        event_id = cmd.get("event_id")
        ev = self._event_idx(event_id if isinstance(event_id, str) and event_id else cid)
        if (i, ev) in self._opted_out:
            return [
                self._ack(i, cid, AckStatus.received, now_ms),
                self._ack(i, cid, AckStatus.opted_out, now_ms, "customer override"),
            ]
        if spread:
            start += float(self._rng_behaviour.uniform(0.0, spread)) * 1000.0
        start = max(start, float(now_ms))
        if start >= until:
            return [self._ack(i, cid, AckStatus.expired, now_ms, "valid_until: before the start")]
        self.cmd_type[i] = code
        self.cmd_value[i] = value
        self.cmd_start_ms[i] = int(start)
        self.cmd_until_ms[i] = int(until)
        self.cmd_started[i] = False
        self.cmd_event[i] = ev
        self.member_event[i] = ev
        self.member_until_ms[i] = int(until)
        self.cmd_id[i] = cid
        acks = [self._ack(i, cid, AckStatus.received, now_ms)]
        if start <= now_ms:
            # Starts at once: the unit changes mode now, the physics follows from this step.
            self.cmd_started[i] = True
            self.next_due_ms[i] = min(int(self.next_due_ms[i]), int(now_ms))
            acks.append(self._ack(i, cid, AckStatus.started, now_ms))
        return acks

    def _check_value(self, i: int, code: int, value: float) -> str | None:
        if code in (CMD_DISCHARGE, CMD_CHARGE):
            rating = self.max_discharge_w[i] if code == CMD_DISCHARGE else self.max_charge_w[i]
            if value <= 0:
                return "setpoint_w: must be > 0"
            if value > rating + 0.5:
                return f"setpoint_w: {value:.0f} W above the rating {rating:.0f} W"
        elif code == CMD_OFFSET:
            if value <= 0:
                return "offset_c: must be > 0"
            if value > self.max_offset_c[i] + 1e-9:
                return f"offset_c: {value:g} above the customer's maximum {self.max_offset_c[i]:g}"
        elif code == CMD_CURTAIL and value < 0:
            return "limit_w: must be >= 0"
        return None

    def apply_command_payload(self, i: int, payload: bytes, now_ms: int) -> list[dict[str, Any]]:
        """Parse a command message (bytes) and apply it; garbage is ignored."""
        try:
            cmd = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return []
        return self.apply_command(i, cmd, now_ms)

    def drain_acks(self) -> list[tuple[int, dict[str, Any]]]:
        """Acks produced by :meth:`step` (started, opted_out, completed, expired)."""
        out, self._acks = self._acks, []
        return out

    # ---- telemetry -------------------------------------------------------------------------
    def due(self, now_ms: int) -> BArray:
        return self.alive & (self.next_due_ms <= now_ms)

    def telemetry_payloads(
        self, now_ms: int, mask: BArray | None = None, *, advance: bool = True
    ) -> tuple[IArray, list[bytes]]:
        """(device indices, JSON payloads) for the devices in ``mask`` (default: those due).

        With ``advance`` the sequence numbers move on and the next report is scheduled: every
        ``interval_s``, or every ``event_interval_s`` while under a command.
        """
        if mask is None:
            mask = self.due(now_ms)
        idx = np.flatnonzero(mask)
        if not idx.size:
            return idx.astype(np.int64), []
        if advance:
            self.seq[idx] += 1
            under = self.cmd_type[idx] != CMD_NONE
            step_ms = np.where(under, self.config.event_interval_s, self.config.interval_s) * 1000
            # Keep the phase: the next report is one interval after the due time.
            nxt = self.next_due_ms[idx] + step_ms.astype(np.int64)
            self.next_due_ms[idx] = np.where(nxt <= now_ms, now_ms + step_ms, nxt)
        payloads: list[bytes] = [b""] * idx.size
        kinds = self.kind[idx]
        ts_all = now_ms + self.clock_skew_ms[idx]
        for code in (BATTERY, SOLAR, THERMOSTAT):
            pos = np.flatnonzero(kinds == code)
            if not pos.size:
                continue
            sel = idx[pos]
            ts = ts_all[pos].tolist()
            seq = self.seq[sel].tolist()
            if code == BATTERY:
                body = self._battery_bodies(sel, ts, seq)
            elif code == SOLAR:
                body = self._solar_bodies(sel, ts, seq)
            else:
                body = self._thermostat_bodies(sel, ts, seq)
            for p, b in zip(pos.tolist(), body, strict=True):
                payloads[p] = b
        return idx.astype(np.int64), payloads

    # The bodies are %-formatted into fixed templates: the same JSON as orjson.dumps of a dict,
    # about ten times faster when a hundred thousand results are kept (orjson's per-call buffer
    # then costs a malloc each). Every value is a finite int or float, or a fixed word.
    def _battery_bodies(self, sel: IArray, ts: list[int], seq: list[int]) -> list[bytes]:
        cmd = self.cmd_type[sel]
        started = self.cmd_started[sel]
        mode = np.where(
            started & (cmd == CMD_DISCHARGE),
            b"discharge",
            np.where(
                started & (cmd == CMD_CHARGE),
                b"charge",
                np.where(self.self_consumption[sel], b"self_consumption", b"backup"),
            ),
        ).tolist()
        rows = zip(
            ts,
            seq,
            np.round(self.soc[sel], 2).tolist(),
            _ints(self.battery_w[sel]),
            mode,
            self.customer_reserve_pct[sel].tolist(),
            _ints(self.load_w[sel]),
            _ints(self.pv_w[sel]),
            strict=True,
        )
        tpl = (
            b'{"ts":%d,"seq":%d,"soc_pct":%r,"power_w":%d,"mode":"%b","backup_reserve_pct":%r,'
            b'"grid":"up","home_load_w":%d,"pv_w":%d}'
        )
        return [tpl % row for row in rows]

    def _solar_bodies(self, sel: IArray, ts: list[int], seq: list[int]) -> list[bytes]:
        rows = zip(ts, seq, _ints(self.pv_w[sel]), _ints(self.energy_wh[sel]), strict=True)
        tpl = b'{"ts":%d,"seq":%d,"power_w":%d,"energy_wh":%d}'
        return [tpl % row for row in rows]

    def _thermostat_bodies(self, sel: IArray, ts: list[int], seq: list[int]) -> list[bytes]:
        heating = self.heating[sel]
        off = np.where(
            self.cmd_started[sel] & (self.cmd_type[sel] == CMD_OFFSET), self.cmd_value[sel], 0.0
        )
        setpoint = np.where(
            heating,
            np.maximum(
                self.sp_heat[sel] - off, np.minimum(self.comfort_min[sel], self.sp_heat[sel])
            ),
            np.minimum(
                self.sp_cool[sel] + off, np.maximum(self.comfort_max[sel], self.sp_cool[sel])
            ),
        )
        t_out = self.outdoor_c[sel]
        mode = np.where(
            heating | (t_out < (self.sp_heat[sel] + self.sp_cool[sel]) / 2 - 3), b"heat", b"cool"
        ).tolist()
        rows = zip(
            ts,
            seq,
            np.round(self.indoor[sel], 2).tolist(),
            np.round(setpoint, 2).tolist(),
            _ints(self.hvac_w[sel]),
            mode,
            np.round(t_out, 1).tolist(),
            strict=True,
        )
        tpl = (
            b'{"ts":%d,"seq":%d,"indoor_c":%r,"setpoint_c":%r,"hvac_w":%d,"mode":"%b",'
            b'"outdoor_c":%r}'
        )
        return [tpl % row for row in rows]

    # ---- faults ----------------------------------------------------------------------------
    def pick(self, fraction: float, mask: BArray | None = None) -> IArray:
        """A random ``fraction`` of the devices in ``mask`` (default: the live ones)."""
        pool = np.flatnonzero(self.alive if mask is None else mask)
        k = round(len(pool) * min(max(fraction, 0.0), 1.0))
        return np.sort(self._rng_behaviour.choice(pool, size=k, replace=False)).astype(np.int64)

    def drop(self, idx: IArray | Sequence[int], *, revert: bool = True) -> IArray:
        """Devices fall off: no telemetry, no commands received. With ``revert`` they also drop
        what they were doing (a power cycle); without it they run their last command until it
        expires (a cloud outage: the device works, its link does not)."""
        idx = np.asarray(idx, dtype=np.int64)
        idx = idx[self.alive[idx]]
        self.alive[idx] = False
        self.lost_ms[idx] = self.t_ms
        if revert:
            busy = idx[self.cmd_type[idx] != CMD_NONE]
            if busy.size:
                self._clear(busy)
        return idx

    def vendor_devices(self, vendor: str) -> IArray:
        if vendor not in self.vendors:
            raise ValueError(f"vendor: unknown {vendor!r} (one of {', '.join(self.vendors)})")
        return np.flatnonzero(self.vendor_idx == self.vendors.index(vendor)).astype(np.int64)

    def skew_clocks(self, idx: IArray | Sequence[int], skew_s: float) -> None:
        """Devices whose clocks run ``skew_s`` off (negative: behind, i.e. stale timestamps)."""
        self.clock_skew_ms[np.asarray(idx, dtype=np.int64)] = int(skew_s * 1000)

    def malformed_payloads(self, idx: IArray | Sequence[int], now_ms: int) -> list[bytes]:
        """Broken telemetry, one kind of breakage after another: bad JSON, not an object, a
        missing field, a wrong type, a value out of range."""
        out = []
        for j, i in enumerate(np.asarray(idx, dtype=np.int64).tolist()):
            ts = int(now_ms + self.clock_skew_ms[i])
            variant = j % 5
            if variant == 0:
                out.append(b'{"ts": ' + str(ts).encode() + b', "power_w": ')
            elif variant == 1:
                out.append(b"[1, 2, 3]")
            elif variant == 2:
                out.append(orjson.dumps({"seq": int(self.seq[i])}))  # no ts
            elif variant == 3:
                out.append(
                    orjson.dumps(
                        {
                            "ts": "yesterday",
                            "power_w": "lots",
                            "soc_pct": "full",
                            "indoor_c": None,
                            "setpoint_c": None,
                            "hvac_w": None,
                            "mode": 3,
                        }
                    )
                )
            else:
                out.append(
                    orjson.dumps(
                        {
                            "ts": ts,
                            "soc_pct": 250.0,
                            "power_w": -5.0,
                            "indoor_c": 900.0,
                            "setpoint_c": 22.0,
                            "hvac_w": -1.0,
                            "mode": "cool",
                        }
                    )
                )
        return out

    def oversized_payloads(
        self, idx: IArray | Sequence[int], now_ms: int, size: int = 5000
    ) -> list[bytes]:
        """Well-formed telemetry padded past the 4 KiB limit (under the broker's 8 KiB cap)."""
        _, bodies = self.telemetry_payloads(now_ms, self._mask(idx), advance=False)
        return [b[:-1] + b', "pad": "' + b"x" * max(size - len(b), 0) + b'"}' for b in bodies]

    def out_of_order_payloads(self, idx: IArray | Sequence[int], now_ms: int) -> list[bytes]:
        """Telemetry older than what the device already sent (lower seq, earlier ts)."""
        idx = np.asarray(idx, dtype=np.int64)
        _, bodies = self.telemetry_payloads(now_ms, self._mask(idx), advance=False)
        order = np.sort(idx)
        out = []
        back_ms = int(self.config.interval_s * 2000)
        for i, b in zip(order.tolist(), bodies, strict=True):
            d = orjson.loads(b)
            d["ts"] = int(d["ts"]) - back_ms
            d["seq"] = max(int(self.seq[i]) - 5, 0)
            out.append(orjson.dumps(d))
        return out

    def _mask(self, idx: IArray | Sequence[int]) -> BArray:
        m = np.zeros(self.n, dtype=bool)
        m[np.asarray(idx, dtype=np.int64)] = True
        return m

    # ---- onboarding and truth --------------------------------------------------------------
    def device_rows(self) -> list[dict[str, Any]]:
        """The body of ``POST /v1/devices/bulk``: one row per device."""
        feeders = (np.arange(self.n) // max(self.config.feeder_size, 1)).tolist()
        rows: list[dict[str, Any]] = []
        for i in range(self.n):
            k = int(self.kind[i])
            region = self.regions[int(self.region_idx[i])]
            row: dict[str, Any] = {
                "id": self.ids[i],
                "kind": KIND_BY_CODE[k].value,
                "site_id": f"site-{self.ids[i]}",
                "region": region,
                "feeder": f"{region}-F{feeders[i]:03d}",
                "vendor": self.vendors[int(self.vendor_idx[i])],
                "lat": round(float(self.lat[i]), 4),
                "lon": round(float(self.lon[i]), 4),
            }
            if k == BATTERY:
                row.update(
                    capacity_wh=float(self.capacity_wh[i]),
                    max_discharge_w=float(self.max_discharge_w[i]),
                    max_charge_w=float(self.max_charge_w[i]),
                    backup_reserve_pct=float(self.customer_reserve_pct[i]),
                )
            elif k == SOLAR:
                row["rated_w"] = round(float(self.pv_rated_w[i]))
            else:
                row.update(
                    hvac_rated_w=float(self.hvac_rated_w[i]),
                    comfort_max_c=float(self.comfort_max[i]),
                    comfort_min_c=float(self.comfort_min[i]),
                    max_offset_c=float(self.max_offset_c[i]),
                )
            rows.append(row)
        return rows

    def ground_truth(self) -> GroundTruth:
        hours = self.config.settlement_interval_s / 3600.0

        def to_mw(store: dict[tuple[int, int], float]) -> dict[str, dict[int, float]]:
            out: dict[str, dict[int, float]] = {}
            for (ev, start), wh in sorted(store.items()):
                out.setdefault(self.event_ids[ev], {})[start] = wh / hours / 1e6
            return out

        b = np.flatnonzero(self.is_battery)
        under = np.flatnonzero(self.cmd_type != CMD_NONE)
        return GroundTruth(
            settlement_interval_s=self.config.settlement_interval_s,
            delivered_mw=to_mw(self._delivered_wh),
            delivered_mw_members=to_mw(self._delivered_members_wh),
            device_ids=self.ids,
            battery_ids=[self.ids[i] for i in b.tolist()],
            battery_min_soc_pct=self.min_soc[b].copy(),
            battery_reserve_pct=self.reserve_pct[b].copy(),
            under_command=[self.ids[i] for i in under.tolist()],
            opted_out={self.event_ids[e]: c for e, c in self.opt_out_count.items()},
            acks_sent=dict(self.acks_sent),
        )


# =============================================================================================
# I/O edge
# =============================================================================================
@dataclass
class FaultPlan:
    """Faults the run loop injects by itself (rates per service minute, times in service
    seconds after the run starts)."""

    malformed_per_min: float = 0.0
    oversized_per_min: float = 0.0
    out_of_order_per_min: float = 0.0
    skew_fraction: float = 0.0
    skew_s: float = -600.0
    drop_fraction: float = 0.0
    drop_at_s: float | None = None
    vendor_outage: str | None = None
    vendor_outage_at_s: float | None = None


@dataclass
class SimStats:
    telemetry: int = 0
    acks: int = 0
    commands: int = 0
    malformed: int = 0
    oversized: int = 0
    out_of_order: int = 0
    dropped: int = 0
    ticks: int = 0
    step_seconds: float = 0.0
    publish_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


ClientFactory = Callable[..., "MqttClient"]


class FleetSimulator:
    """The simulated fleet on the wire: onboarding over HTTP, telemetry and commands over MQTT.

    ``mqtt_client_factory(client_id, username=None, password=None, will=None)`` makes clients
    (``Services.mqtt_client`` fits, for an in-process run); by default
    ``devices.mqtt.make_client`` on ``mqtt_url`` (or ``settings.mqtt_url``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        n_devices: int = 1000,
        regions: Sequence[str] | None = None,
        interval_s: float | None = None,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        credentials_file: str | Path | None = None,
        seed: int = 0,
        clock: Clock | None = None,
        mqtt_client_factory: ClientFactory | None = None,
        mqtt_url: str | None = None,
        gateway_username: str | None = None,
        gateway_password: str | None = None,
        gateways: int = 2,
        per_device_connections: bool = False,
        tick_s: float = 15.0,
        max_step_s: float = 60.0,
        id_prefix: str | None = None,
        faults: FaultPlan | None = None,
        fleet_options: dict[str, Any] | None = None,
    ) -> None:
        from vpp.clock import Clock as _Clock
        from vpp.settings import get_settings

        self.settings = settings or get_settings()
        s = self.settings
        self.clock = clock or _Clock(s.time_scale, s.time_origin)
        self.topic_root = s.topic_root.rstrip("/")
        self.mqtt_url = mqtt_url or s.mqtt_url
        opts = dict(fleet_options or {})
        cfg = FleetConfig(
            n_devices=n_devices,
            regions=tuple(regions or s.regions[:1] or DEFAULT_SIM_REGIONS),
            seed=seed,
            id_prefix=id_prefix or f"sim{seed}",
            interval_s=interval_s or s.telemetry_interval_s,
            settlement_interval_s=float(s.settlement_interval_min * 60),
            **opts,
        )
        book = RegionBook(sold=s.regions)
        unknown = [r for r in cfg.regions if not book.is_sold(r)]
        if unknown:
            raise ValueError(f"regions: {', '.join(unknown)} not sold ({book.describe_sold()})")
        self.fleet = SimFleet(cfg, self.clock.now_ms())
        self.api_url = (api_url or f"http://{s.api_host}:{s.api_port}").rstrip("/")
        self.api_key = api_key
        self.http_client = http_client
        self.credentials_file = Path(credentials_file) if credentials_file else None
        self.credentials: dict[str, str] = {}
        self._factory = mqtt_client_factory
        self.gateway_username = gateway_username
        self.gateway_password = gateway_password
        self.n_gateways = max(1, gateways)
        self.per_device = per_device_connections
        self.tick_s = tick_s
        self.max_step_s = max_step_s
        self.faults = faults or FaultPlan()
        self.stats = SimStats()
        self._clients: list[MqttClient] = []  # gateways, or one per device
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._status_topics = [self._topic(d, "status") for d in self.fleet.ids]
        self._telemetry_topics = [self._topic(d, "telemetry") for d in self.fleet.ids]
        self._ack_topics = [self._topic(d, "ack") for d in self.fleet.ids]
        self._pending_out: list[OutMessage] = []
        self._fault_debt = {"malformed": 0.0, "oversized": 0.0, "out_of_order": 0.0}
        self._run_id = secrets.token_hex(3)
        self._started_ms: int | None = None
        self._last_ms: int | None = None

    def _topic(self, device_id: str, leaf: str) -> str:
        return f"{self.topic_root}/devices/{device_id}/{leaf}"

    # ---- onboarding --------------------------------------------------------------------------
    async def onboard(self, chunk: int = 20_000) -> int:
        """Register the fleet (``POST /v1/devices/bulk``) and keep each device's MQTT password.

        With a ``credentials_file`` that exists, the credentials are read from it instead (a
        fleet onboarded by an earlier run); after onboarding they are written to it.
        Returns the number of devices with credentials.
        """
        if self.credentials_file is not None and self.credentials_file.exists():
            self.credentials = self._read_credentials(self.credentials_file)
            return len(self.credentials)
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        client = self.http_client or httpx.AsyncClient(base_url=self.api_url, timeout=600.0)
        rows = self.fleet.device_rows()
        try:
            for k in range(0, len(rows), chunk):
                part = rows[k : k + chunk]
                try:
                    resp = await client.post("/v1/devices/bulk", json=part, headers=headers)
                except httpx.HTTPError as exc:
                    raise RuntimeError(
                        f"onboarding failed: cannot reach the API at {self.api_url}: {exc} "
                        "(--api-url, or --no-onboard / --credentials-file)"
                    ) from None
                if resp.status_code >= 300:
                    raise RuntimeError(
                        f"onboarding failed: POST /v1/devices/bulk answered {resp.status_code}: "
                        f"{resp.text[:500]}"
                    )
                self.credentials.update(_credentials_from(resp.json()))
        finally:
            if self.http_client is None:
                await client.aclose()
        if self.credentials_file is not None:
            self._write_credentials(self.credentials_file)
        return len(self.credentials)

    def _read_credentials(self, path: Path) -> dict[str, str]:
        data = orjson.loads(path.read_bytes())
        creds = data.get("credentials") if isinstance(data, dict) else None
        if creds is None:
            creds = _credentials_from(data)
        missing = [d for d in self.fleet.ids if d not in creds]
        if missing:
            raise ValueError(
                f"credentials_file: {len(missing)} of this fleet's devices are missing (e.g. "
                f"{missing[0]}); the file belongs to another seed, size or id prefix"
            )
        return {str(k): str(v) for k, v in creds.items()}

    def _write_credentials(self, path: Path) -> None:
        cfg = self.fleet.config
        path.write_bytes(
            orjson.dumps(
                {
                    "id_prefix": cfg.id_prefix,
                    "seed": cfg.seed,
                    "n_devices": cfg.n_devices,
                    "regions": list(cfg.regions),
                    "credentials": self.credentials,
                }
            )
        )
        with contextlib.suppress(OSError):
            path.chmod(0o600)

    # ---- MQTT --------------------------------------------------------------------------------
    def _make_client(
        self,
        client_id: str,
        username: str | None,
        password: str | None,
        will: OutMessage | None,
    ) -> MqttClient:
        if self._factory is not None:
            return self._factory(client_id, username=username, password=password, will=will)
        from devices.mqtt import make_client

        return make_client(
            self.mqtt_url,
            client_id,
            username=username,
            password=password,
            will=will,
            ca_file=self.settings.mqtt_ca_file,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        # Runs on the client's network thread (paho) or inline (memory broker): just queue.
        self._inbox.append((topic, payload))
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        cmd_filter = f"{self.topic_root}/devices/+/cmd"
        if self.per_device:
            for i, dev in enumerate(self.fleet.ids):
                will = (self._status_topics[i], b"offline", 1, True)
                c = self._make_client(dev, dev, self.credentials.get(dev), will)
                c.on_message = self._on_message
                await c.subscribe([self._topic(dev, "cmd")], qos=1)
                self._clients.append(c)
            await asyncio.gather(*(c.connect() for c in self._clients))
        else:
            user, pw = self.gateway_username, self.gateway_password
            for g in range(self.n_gateways):
                # The gateway's Last Will only says the gateway is gone; device statuses are
                # published per device (retained) below.
                c = self._make_client(f"sim-gw-{self._run_id}-{g}", user, pw, None)
                c.on_message = self._on_message
                # One shared subscription: each command reaches exactly one gateway.
                await c.subscribe([f"$share/sim-{self._run_id}/{cmd_filter}"], qos=1)
                self._clients.append(c)
            await asyncio.gather(*(c.connect() for c in self._clients))
        # Retained "online" per device.
        everyone = list(range(self.fleet.n))
        await self._publish([(self._status_topics[i], b"online", 1, True) for i in everyone],
                            everyone)  # fmt: skip

    async def clear_statuses(self) -> None:
        """Remove the fleet's retained statuses from the broker (tests and benches)."""
        await self._publish(
            [(self._status_topics[i], b"", 1, True) for i in range(self.fleet.n)],
            list(range(self.fleet.n)),
        )

    async def disconnect(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                await c.disconnect()
        self._clients = []

    async def _publish(self, messages: list[OutMessage], device_idx: Sequence[int]) -> int:
        """Send each message on its device's connection: its own, or the gateway that speaks
        for it (device i → gateway i mod G, always the same one, so a device's messages keep
        their order: ingest drops telemetry older than the last it accepted)."""
        if not messages:
            return 0
        if self.per_device:
            for (t, p, q, r), i in zip(messages, device_idx, strict=True):
                c = self._clients[i]
                if c.connected:
                    c.publish_nowait(t, p, q, r)
            await asyncio.sleep(0)
            return len(messages)
        g = len(self._clients)
        if g == 1:
            return await self._publish_part(self._clients[0], messages)
        gateway = np.asarray(device_idx, dtype=np.int64) % g
        parts: list[list[OutMessage]] = [[] for _ in range(g)]
        for m, k in zip(messages, gateway.tolist(), strict=True):
            parts[k].append(m)
        counts = await asyncio.gather(
            *(self._publish_part(c, p) for c, p in zip(self._clients, parts, strict=True) if p)
        )
        return int(sum(counts))

    @staticmethod
    async def _publish_part(client: MqttClient, messages: list[OutMessage]) -> int:
        if not any(m[2] > 0 for m in messages):
            return await client.publish_many(messages)
        # QoS 1 in windows below the client's in-flight limit: paho looks for the next queued
        # message by scanning all of them on every PUBACK, so 100 000 at once never finish.
        n = 0
        for k in range(0, len(messages), QOS1_WINDOW):
            n += await client.publish_many(messages[k : k + QOS1_WINDOW])
        return n

    # ---- run loop ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Connect, then step, obey and publish until ``stop`` is set."""
        if not self._clients:
            await self.connect()
        assert self._wake is not None
        now = self.clock.now_ms()
        self._started_ms = now
        self._last_ms = now
        # The fleet was drawn at construction; onboarding may have taken a while since. Shift
        # its schedule (keeping each device's phase) instead of letting every report fall due.
        shift = max(now - self.fleet.t_ms, 0)
        self.fleet.next_due_ms += shift
        self.fleet.t_ms = now
        if self.faults.skew_fraction > 0:
            self.fleet.skew_clocks(self.fleet.pick(self.faults.skew_fraction), self.faults.skew_s)
        last_log = time.monotonic()
        try:
            while not stop.is_set():
                await self.tick()
                if time.monotonic() - last_log > 30:
                    last_log = time.monotonic()
                    log.info("simulator: %s", self.summary())
                wall = self.clock.wall_seconds(self.tick_s)
                self._wake.clear()
                waits = [
                    asyncio.ensure_future(self._wake.wait()),
                    asyncio.ensure_future(stop.wait()),
                ]
                _, pending = await asyncio.wait(
                    waits, timeout=wall, return_when=asyncio.FIRST_COMPLETED
                )
                for p in pending:
                    p.cancel()
        finally:
            await self.disconnect()

    async def tick(self) -> None:
        """One turn: advance the physics to now, obey queued commands, inject due faults,
        publish acks and due telemetry."""
        fleet = self.fleet
        now = self.clock.now_ms()
        last = self._last_ms if self._last_ms is not None else now
        t_start = time.perf_counter()
        max_ms = int(self.max_step_s * 1000)
        while last < now:
            nxt = min(now, last + max_ms)
            fleet.step(nxt, (nxt - last) / 1000.0)
            last = nxt
        self._last_ms = now
        out: list[OutMessage] = []
        owners: list[int] = []
        while self._inbox:
            topic, payload = self._inbox.popleft()
            parts = topic.rsplit("/", 2)
            i = fleet.index.get(parts[-2]) if len(parts) == 3 else None
            if i is None:
                continue
            self.stats.commands += 1
            for ack in fleet.apply_command_payload(i, payload, now):
                out.append((self._ack_topics[i], orjson.dumps(ack), 1, False))
                owners.append(i)
        for i, ack in fleet.drain_acks():
            out.append((self._ack_topics[i], orjson.dumps(ack), 1, False))
            owners.append(i)
        self.stats.acks += len(out)
        self.stats.step_seconds += time.perf_counter() - t_start
        await self._scheduled_faults(now)
        t_pub = time.perf_counter()
        if out:
            await self._publish(out, owners)
        idx, payloads = fleet.telemetry_payloads(now)
        if payloads:
            topics = self._telemetry_topics
            idx_list = idx.tolist()
            await self._publish(
                [(topics[i], p, 0, False) for i, p in zip(idx_list, payloads, strict=True)],
                idx_list,
            )
            self.stats.telemetry += len(payloads)
        await self._rate_faults(now)
        self.stats.publish_seconds += time.perf_counter() - t_pub
        self.stats.ticks += 1

    async def _scheduled_faults(self, now: int) -> None:
        f = self.faults
        if self._started_ms is None:
            return
        elapsed_s = (now - self._started_ms) / 1000.0
        if f.drop_fraction > 0 and f.drop_at_s is not None and elapsed_s >= f.drop_at_s:
            await self.drop_devices(f.drop_fraction)
            f.drop_at_s = None
        if (
            f.vendor_outage
            and f.vendor_outage_at_s is not None
            and elapsed_s >= f.vendor_outage_at_s
        ):
            await self.vendor_outage(f.vendor_outage)
            f.vendor_outage_at_s = None

    async def _rate_faults(self, now: int) -> None:
        f = self.faults
        minutes = self.tick_s / 60.0
        for name, rate, make in (
            ("malformed", f.malformed_per_min, self.fleet.malformed_payloads),
            ("oversized", f.oversized_per_min, self.fleet.oversized_payloads),
            ("out_of_order", f.out_of_order_per_min, self.fleet.out_of_order_payloads),
        ):
            if rate <= 0:
                continue
            self._fault_debt[name] += rate * minutes
            k = int(self._fault_debt[name])
            if k:
                self._fault_debt[name] -= k
                await self.inject(name, k, now, make)

    # ---- faults (API) ------------------------------------------------------------------------
    async def inject(
        self,
        name: str,
        count: int,
        now: int | None = None,
        make: Callable[..., list[bytes]] | None = None,
    ) -> int:
        """Publish ``count`` bad telemetry messages: ``malformed``, ``oversized`` or
        ``out_of_order``, on the telemetry topics of random live devices."""
        makers = {
            "malformed": self.fleet.malformed_payloads,
            "oversized": self.fleet.oversized_payloads,
            "out_of_order": self.fleet.out_of_order_payloads,
        }
        if name not in makers:
            raise ValueError(f"fault: unknown {name!r} (one of {', '.join(makers)})")
        make = make or makers[name]
        now = self.clock.now_ms() if now is None else now
        live = np.flatnonzero(self.fleet.alive)
        if not live.size or count <= 0:
            return 0
        idx = np.sort(
            self.fleet._rng_behaviour.choice(live, size=min(count, live.size), replace=False)
        )
        bodies = make(idx, now)
        msgs: list[OutMessage] = [
            (self._telemetry_topics[i], b, 0, False)
            for i, b in zip(idx.tolist(), bodies, strict=True)
        ]
        await self._publish(msgs, idx.tolist())
        setattr(self.stats, name, getattr(self.stats, name) + len(msgs))
        return len(msgs)

    async def drop_devices(
        self, which: float | Iterable[str], *, revert: bool = True, announce: bool = True
    ) -> list[str]:
        """Devices fall off: a fraction of the live ones, or the given ids. They stop
        publishing and hear no commands; ``announce`` leaves an ``offline`` status (the Last
        Will: the broker's own with per-device connections, a retained status from a
        gateway). Returns the dropped ids."""
        fleet = self.fleet
        if isinstance(which, int | float):
            idx = fleet.pick(float(which))
        else:
            try:
                idx = np.array([fleet.index[d] for d in which], dtype=np.int64)
            except KeyError as exc:
                raise ValueError(f"ids: unknown device {exc.args[0]!r}") from None
        idx = fleet.drop(idx, revert=revert)
        if announce and idx.size:
            if self.per_device:
                for i in idx.tolist():
                    _kill_connection(self._clients[i])
            else:
                await self._publish(
                    [(self._status_topics[i], b"offline", 1, True) for i in idx.tolist()],
                    idx.tolist(),
                )
        self.stats.dropped += int(idx.size)
        return [fleet.ids[i] for i in idx.tolist()]

    async def vendor_outage(self, vendor: str) -> list[str]:
        """An OEM cloud goes down: its devices go silent (no Last Will: the cloud's link to the
        service breaks, not each device's) and hear no commands, while they keep running what
        they were told until it expires or they have been 10 minutes out of contact."""
        ids = [self.fleet.ids[i] for i in self.fleet.vendor_devices(vendor).tolist()]
        return await self.drop_devices(ids, revert=False, announce=False)

    def skew_clocks(self, fraction: float, skew_s: float) -> list[str]:
        idx = self.fleet.pick(fraction)
        self.fleet.skew_clocks(idx, skew_s)
        return [self.fleet.ids[i] for i in idx.tolist()]

    def ground_truth(self) -> GroundTruth:
        return self.fleet.ground_truth()

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "devices": self.fleet.n,
            "alive": int(self.fleet.alive.sum()),
            "under_command": int((self.fleet.cmd_type != CMD_NONE).sum()),
            "telemetry": s.telemetry,
            "commands": s.commands,
            "acks": s.acks,
            "malformed": s.malformed,
            "oversized": s.oversized,
            "out_of_order": s.out_of_order,
            "dropped": s.dropped,
            "ticks": s.ticks,
            "ms_per_tick": round(1000 * (s.step_seconds + s.publish_seconds) / max(s.ticks, 1), 2),
        }


def _ints(values: FArray) -> list[int]:
    return np.rint(values).astype(np.int64).tolist()  # type: ignore[no-any-return]


def _kill_connection(client: MqttClient) -> None:
    """Lose a device's connection without a DISCONNECT so the broker sends its Last Will."""
    drop = getattr(client, "drop", None)
    if callable(drop):  # the in-process broker's client
        drop()
        return
    paho_client = getattr(client, "client", None)
    if paho_client is None:
        return
    with contextlib.suppress(Exception):
        sock = paho_client.socket()
        paho_client.loop_stop()  # no reconnect
        if sock is not None:
            import socket as _socket

            with contextlib.suppress(OSError):
                sock.shutdown(_socket.SHUT_RDWR)
            sock.close()


def _credentials_from(data: Any) -> dict[str, str]:
    """device_id -> MQTT password from an onboarding answer, however it is wrapped: a list of
    devices, ``{"devices": [...]}``, or ``{"credentials": {...}}``; each device carries
    ``{"mqtt": {"username", "password"}}`` (or flat ``username``/``password``)."""
    if isinstance(data, dict):
        if isinstance(data.get("credentials"), dict):
            return {str(k): str(v) for k, v in data["credentials"].items()}
        for key in ("devices", "items", "created", "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    out: dict[str, str] = {}
    if not isinstance(data, list):
        return out
    for d in data:
        if not isinstance(d, dict):
            continue
        nested = d.get("mqtt")
        mqtt: dict[str, Any] = nested if isinstance(nested, dict) else d
        user = mqtt.get("username") or d.get("id") or d.get("device_id")
        pw = mqtt.get("password")
        if user and pw:
            out[str(user)] = str(pw)
    return out
