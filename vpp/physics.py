"""Device physics, pure and vectorised over devices (numpy arrays in, numpy arrays out; no I/O).

Units follow the contract on the device side (W, Wh, °C) except where a name says kW or h.
Every function accepts scalars or arrays that broadcast together.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vpp.domain import (
    BATTERY_MIN_RESERVE_PCT,
    BATTERY_ONE_WAY_EFFICIENCY,
    THERMOSTAT_C_KWH_PER_C,
    THERMOSTAT_COP,
    THERMOSTAT_Q_GAIN_KW,
    THERMOSTAT_R_C_PER_KW,
)

Array = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

# Thermostat mode codes in arrays (the contract's strings map onto these).
MODE_OFF, MODE_COOL, MODE_HEAT, MODE_AUTO = 0, 1, 2, 3
MODE_CODE = {"off": MODE_OFF, "cool": MODE_COOL, "heat": MODE_HEAT, "auto": MODE_AUTO}


# --- Battery -------------------------------------------------------------------------------------
def battery_reserve_pct(customer_reserve_pct: ArrayLike) -> Array:
    """Effective reserve: never below max(customer setting, 20 %)."""
    return np.maximum(np.asarray(customer_reserve_pct, dtype=float), BATTERY_MIN_RESERVE_PCT)


def battery_energy_above_reserve_wh(
    soc_pct: ArrayLike, capacity_wh: ArrayLike, reserve_pct: ArrayLike
) -> Array:
    soc = np.asarray(soc_pct, dtype=float)
    floor = battery_reserve_pct(reserve_pct)
    return np.maximum(soc - floor, 0.0) / 100.0 * np.asarray(capacity_wh, dtype=float)


def battery_deliverable_kw(
    soc_pct: ArrayLike,
    capacity_wh: ArrayLike,
    max_discharge_w: ArrayLike,
    reserve_pct: ArrayLike,
    window_h: ArrayLike,
) -> Array:
    """Power a battery can hold for the whole window: min(max discharge, usable energy × η / h)."""
    usable_wh = battery_energy_above_reserve_wh(soc_pct, capacity_wh, reserve_pct)
    hours = np.maximum(np.asarray(window_h, dtype=float), 1e-9)
    energy_limited_w = usable_wh * BATTERY_ONE_WAY_EFFICIENCY / hours
    return np.minimum(np.asarray(max_discharge_w, dtype=float), energy_limited_w) / 1000.0


def battery_step(
    soc_pct: ArrayLike,
    requested_power_w: ArrayLike,
    capacity_wh: ArrayLike,
    max_discharge_w: ArrayLike,
    max_charge_w: ArrayLike,
    reserve_pct: ArrayLike,
    dt_s: float,
) -> tuple[Array, Array]:
    """Advance batteries by ``dt_s`` at a requested AC power (+ discharge, − charge).

    Returns (new soc_pct, power actually delivered in W). Power is clipped to the ratings, a
    discharge stops at the reserve floor and a charge at 100 %; losses are 0.949 each way.
    """
    soc = np.asarray(soc_pct, dtype=float)
    cap = np.maximum(np.asarray(capacity_wh, dtype=float), 1e-9)
    power = np.clip(
        np.asarray(requested_power_w, dtype=float),
        -np.asarray(max_charge_w, dtype=float),
        np.asarray(max_discharge_w, dtype=float),
    )
    dt_h = dt_s / 3600.0
    floor = battery_reserve_pct(reserve_pct)
    # Discharge: stored energy falls by P/η; charge: rises by |P|·η.
    max_dis_w = np.maximum(soc - floor, 0.0) / 100.0 * cap * BATTERY_ONE_WAY_EFFICIENCY / dt_h
    max_chg_w = np.maximum(100.0 - soc, 0.0) / 100.0 * cap / BATTERY_ONE_WAY_EFFICIENCY / dt_h
    power = np.where(power > 0, np.minimum(power, max_dis_w), np.maximum(power, -max_chg_w))
    stored_delta_wh = (
        np.where(
            power > 0, -power / BATTERY_ONE_WAY_EFFICIENCY, -power * BATTERY_ONE_WAY_EFFICIENCY
        )
        * dt_h
    )
    new_soc = np.clip(soc + stored_delta_wh / cap * 100.0, 0.0, 100.0)
    return new_soc, power


# --- Thermostat (first-order RC home) -------------------------------------------------------------
def rc_alpha(
    dt_h: ArrayLike,
    r_c_per_kw: ArrayLike = THERMOSTAT_R_C_PER_KW,
    c_kwh_per_c: ArrayLike = THERMOSTAT_C_KWH_PER_C,
) -> Array:
    return np.exp(
        -np.asarray(dt_h, dtype=float) / (np.asarray(r_c_per_kw) * np.asarray(c_kwh_per_c))
    )


def thermostat_step(
    indoor_c: ArrayLike,
    outdoor_c: ArrayLike,
    hvac_kw: ArrayLike,
    dt_h: float,
    *,
    heating: ArrayLike = False,
    r_c_per_kw: ArrayLike = THERMOSTAT_R_C_PER_KW,
    c_kwh_per_c: ArrayLike = THERMOSTAT_C_KWH_PER_C,
    cop: ArrayLike = THERMOSTAT_COP,
    q_gain_kw: ArrayLike = THERMOSTAT_Q_GAIN_KW,
) -> Array:
    """T[k+1] = a·T[k] + (1−a)·(T_out + R·Q_gain − R·COP·P[k]) (cooling; heating adds heat)."""
    a = rc_alpha(dt_h, r_c_per_kw, c_kwh_per_c)
    r = np.asarray(r_c_per_kw, dtype=float)
    sign = np.where(np.asarray(heating, dtype=bool), 1.0, -1.0)
    target = (
        np.asarray(outdoor_c, dtype=float)
        + r * np.asarray(q_gain_kw, dtype=float)
        + sign * r * np.asarray(cop, dtype=float) * np.asarray(hvac_kw, dtype=float)
    )
    return a * np.asarray(indoor_c, dtype=float) + (1.0 - a) * target


def thermostat_hold_kw(
    setpoint_c: ArrayLike,
    outdoor_c: ArrayLike,
    rated_kw: ArrayLike,
    *,
    heating: ArrayLike = False,
    r_c_per_kw: ArrayLike = THERMOSTAT_R_C_PER_KW,
    cop: ArrayLike = THERMOSTAT_COP,
    q_gain_kw: ArrayLike = THERMOSTAT_Q_GAIN_KW,
) -> Array:
    """Average electric power that holds the home at its setpoint (the baseline load)."""
    r = np.asarray(r_c_per_kw, dtype=float)
    t_eq = np.asarray(outdoor_c, dtype=float) + r * np.asarray(q_gain_kw, dtype=float)
    gap = np.where(
        np.asarray(heating, dtype=bool),
        np.asarray(setpoint_c, dtype=float) - t_eq,
        t_eq - np.asarray(setpoint_c, dtype=float),
    )
    return np.clip(gap / (r * np.asarray(cop, dtype=float)), 0.0, np.asarray(rated_kw, dtype=float))


def thermostat_shed(
    indoor_c: ArrayLike,
    setpoint_c: ArrayLike,
    outdoor_c: ArrayLike,
    offset_c: ArrayLike,
    window_h: ArrayLike,
    rated_kw: ArrayLike,
    *,
    heating: ArrayLike = False,
    comfort_limit_c: ArrayLike | None = None,
    r_c_per_kw: ArrayLike = THERMOSTAT_R_C_PER_KW,
    c_kwh_per_c: ArrayLike = THERMOSTAT_C_KWH_PER_C,
    cop: ArrayLike = THERMOSTAT_COP,
    q_gain_kw: ArrayLike = THERMOSTAT_Q_GAIN_KW,
) -> tuple[Array, Array, Array]:
    """Average shed over an event of ``window_h`` hours with the setpoint moved by ``offset_c``.

    The unit is off until the home drifts to the new setpoint (``t_off``), then holds the new
    setpoint at a lower duty; so the average shed falls as the event gets longer. The offset is
    cut to the customer's comfort limit (``comfort_limit_c``: the max for cooling, the min for
    heating). Returns (average shed kW, hours fully off, recovery energy kWh after the event).
    """
    heat = np.asarray(heating, dtype=bool)
    r = np.asarray(r_c_per_kw, dtype=float)
    rc = r * np.asarray(c_kwh_per_c, dtype=float)
    cop_a = np.asarray(cop, dtype=float)
    sp = np.asarray(setpoint_c, dtype=float)
    indoor = np.asarray(indoor_c, dtype=float)
    offset = np.maximum(np.asarray(offset_c, dtype=float), 0.0)
    if comfort_limit_c is not None:
        room = np.where(
            heat,
            sp - np.asarray(comfort_limit_c, dtype=float),
            np.asarray(comfort_limit_c, dtype=float) - sp,
        )
        offset = np.clip(offset, 0.0, np.maximum(room, 0.0))
    t_eq = np.asarray(outdoor_c, dtype=float) + r * np.asarray(q_gain_kw, dtype=float)
    # Work in "gaps": how far the free-running equilibrium sits beyond a temperature, in the
    # direction the unit fights (positive means the unit must run). Cooling and heating then
    # share one formula.
    sign = np.where(heat, -1.0, 1.0)
    gap_set = sign * (t_eq - sp)
    gap_new = gap_set - offset
    gap_now = np.maximum(sign * (t_eq - indoor), gap_new)  # indoor already past new setpoint: 0 off
    rated = np.asarray(rated_kw, dtype=float)
    base_kw = np.clip(gap_set / (r * cop_a), 0.0, rated)
    new_kw = np.clip(gap_new / (r * cop_a), 0.0, rated)
    hours = np.maximum(np.asarray(window_h, dtype=float), 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_off = np.where(
            gap_new > 0,
            rc * np.log(np.maximum(gap_now, 1e-12) / np.maximum(gap_new, 1e-12)),
            np.inf,
        )
    t_off = np.where(base_kw > 0, np.minimum(t_off, hours), 0.0)
    shed_kwh = base_kw * t_off + (base_kw - new_kw) * (hours - t_off)
    avg_shed_kw = np.where(base_kw > 0, shed_kwh / hours, 0.0)
    # Drift from the setpoint reached by the end: the full offset once the unit restarts,
    # otherwise the free-running drift gap_set − gap_now·e^(−h/RC).
    free_drift_c = gap_set - gap_now * np.exp(-hours / rc)
    drift_c = np.clip(np.where(t_off < hours, offset, free_drift_c), 0.0, offset)
    recovery_kwh = np.where(
        base_kw > 0, np.asarray(c_kwh_per_c, dtype=float) * drift_c / cop_a, 0.0
    )
    return avg_shed_kw, t_off, recovery_kwh


def thermostat_flat_shed(
    setpoint_c: ArrayLike,
    outdoor_c: ArrayLike,
    offset_c: ArrayLike,
    window_h: ArrayLike,
    rated_kw: ArrayLike,
    *,
    heating: ArrayLike = False,
    r_c_per_kw: ArrayLike = THERMOSTAT_R_C_PER_KW,
    c_kwh_per_c: ArrayLike = THERMOSTAT_C_KWH_PER_C,
    cop: ArrayLike = THERMOSTAT_COP,
    q_gain_kw: ArrayLike = THERMOSTAT_Q_GAIN_KW,
) -> Array:
    """Shed per thermostat a fleet can hold FLAT for ``window_h`` hours (kW per device used).

    A home sheds its whole base load ``b`` until it has drifted to the new setpoint (``T`` hours
    from its setpoint), then only ``d = b − new duty``. A buyer of firm capacity wants the same
    MW at every interval, so the fleet starts ``F / b`` homes and enlists more each time a cohort
    fades: after ``k`` cohort lifetimes it has used ``F/b · Σ_{j≤k} (1 − d/b)^j`` homes, which
    gives, over a window of ``m = H/T`` lifetimes (at least one),
    ``F / N = d / (1 − (1 − d/b)^m)``: ``b`` for a short window, falling towards the steady
    ``d`` for a long one. Never above the average shed (energy bound); 0 where there is no base
    load to shed. This is what the forecaster quotes, where the average shed would promise the
    end of a two-hour window about twice what its homes give by then.
    """
    sp = np.asarray(setpoint_c, dtype=float)
    avg, t_off, _ = thermostat_shed(
        sp,
        sp,
        outdoor_c,
        offset_c,
        window_h,
        rated_kw,
        heating=heating,
        r_c_per_kw=r_c_per_kw,
        c_kwh_per_c=c_kwh_per_c,
        cop=cop,
        q_gain_kw=q_gain_kw,
    )
    # b: the duty that holds the setpoint; d: what stops once the home holds the moved one.
    hold = {"heating": heating, "r_c_per_kw": r_c_per_kw, "cop": cop, "q_gain_kw": q_gain_kw}
    offset = np.maximum(np.asarray(offset_c, dtype=float), 0.0)
    moved_sp = sp + np.where(np.asarray(heating, dtype=bool), -offset, offset)
    base_kw = thermostat_hold_kw(sp, outdoor_c, rated_kw, **hold)
    steady_kw = base_kw - thermostat_hold_kw(moved_sp, outdoor_c, rated_kw, **hold)
    hours = np.maximum(np.asarray(window_h, dtype=float), 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        lifetimes = np.maximum(hours / np.maximum(t_off, 1e-9), 1.0)
        fade = np.clip(1.0 - steady_kw / np.maximum(base_kw, 1e-12), 0.0, 1.0)
        flat = steady_kw / np.maximum(1.0 - fade**lifetimes, 1e-12)
    flat = np.where(t_off >= hours, avg, flat)  # never fades inside the window
    return np.where(base_kw > 0, np.clip(flat, 0.0, avg), 0.0)


# --- Solar --------------------------------------------------------------------------------------
def solar_power_w(
    irradiance_w_m2: ArrayLike,
    rated_w: ArrayLike,
    air_temp_c: ArrayLike = 25.0,
    *,
    gamma_pdc: float = -0.004,
    system_losses: float = 0.14,
) -> Array:
    """PVWatts DC model (as pvlib's ``pvwatts_dc``) with a cell-temperature rise and losses."""
    g = np.maximum(np.asarray(irradiance_w_m2, dtype=float), 0.0)
    cell_c = np.asarray(air_temp_c, dtype=float) + g * (45.0 - 20.0) / 800.0  # NOCT estimate
    dc = np.asarray(rated_w, dtype=float) * g / 1000.0 * (1.0 + gamma_pdc * (cell_c - 25.0))
    return np.maximum(dc * (1.0 - system_losses), 0.0)


# --- Additions for the forecaster ------------------------------------------------------------
def battery_soc_projection(
    soc_pct: ArrayLike,
    capacity_wh: ArrayLike,
    max_discharge_w: ArrayLike,
    max_charge_w: ArrayLike,
    reserve_pct: ArrayLike,
    pv_w: ArrayLike,
    load_w: ArrayLike,
    dt_s: float,
) -> Array:
    """State of charge after each step of self-consumption before a window (%).

    ``pv_w`` and ``load_w`` have the steps on their first axis (shape (T, ...), broadcasting with
    the device arrays). In each step the battery charges from the solar surplus (pv − load) and
    covers the home's deficit, within its ratings, the reserve floor and 0.949 each way: so a sunny
    afternoon fills it and an evening before the window drains it. Returns shape (T, ...): the
    state of charge at the END of each step (the window's start is the last one).
    """
    pv = np.asarray(pv_w, dtype=float)
    load = np.asarray(load_w, dtype=float)
    n_steps = np.broadcast_shapes(pv.shape, load.shape)[0] if pv.ndim or load.ndim else 0
    soc = np.asarray(soc_pct, dtype=float)
    out = []
    for k in range(n_steps):
        pv_k = pv[k] if pv.ndim else pv
        load_k = load[k] if load.ndim else load
        # Positive request = discharge to cover the deficit; negative = charge from the surplus.
        soc, _ = battery_step(
            soc, load_k - pv_k, capacity_wh, max_discharge_w, max_charge_w, reserve_pct, dt_s
        )
        out.append(soc)
    if not out:
        return np.asarray(soc, dtype=float)[np.newaxis]
    return np.stack(out)


def thermostat_off_hours(
    setpoint_c: ArrayLike,
    outdoor_c: ArrayLike,
    offset_c: ArrayLike,
    r_c_per_kw: ArrayLike = THERMOSTAT_R_C_PER_KW,
    c_kwh_per_c: ArrayLike = THERMOSTAT_C_KWH_PER_C,
    q_gain_kw: ArrayLike = THERMOSTAT_Q_GAIN_KW,
) -> Array:
    """Hours a cooling unit stays fully off after its setpoint rises by ``offset_c`` from a home
    held at the old setpoint: RC · ln(gap_set / (gap_set − offset)), inf if it never restarts."""
    r = np.asarray(r_c_per_kw, dtype=float)
    gap_set = (
        np.asarray(outdoor_c, dtype=float)
        + r * np.asarray(q_gain_kw, dtype=float)
        - np.asarray(setpoint_c, dtype=float)
    )
    gap_new = gap_set - np.asarray(offset_c, dtype=float)
    rc = r * np.asarray(c_kwh_per_c, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        hours = np.where(
            gap_new > 0,
            rc * np.log(np.maximum(gap_set, 1e-12) / np.maximum(gap_new, 1e-12)),
            np.inf,
        )
    return np.where(gap_set > 0, hours, 0.0)
