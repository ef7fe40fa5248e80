"""Settlement, pure: meter-before/after for batteries (with the control group's drift), the
thermostat control group, CAISO 10-in-10 with the ±20 % same-day cap, performance."""

from __future__ import annotations

import numpy as np
import pytest

from dispatch.settlement import (
    METHOD_CONTROL,
    METHOD_TEN_IN_TEN,
    SettlementGrid,
    SettlementInputs,
    TenInTen,
    active_mask,
    fit_battery_drift,
    interval_performance,
    performance,
    resample,
    settle,
    ten_in_ten_baseline,
)

T0 = 1_784_061_000_000
GRID = SettlementGrid(T0, T0 + 3_600_000, 900)  # four 15-minute intervals


def test_performance_caps_each_interval_at_the_commitment() -> None:
    delivered, committed = np.array([1.2, 0.5, -0.1]), np.array([1.0, 1.0, 1.0])
    assert performance(delivered_mw=delivered, committed_mw=committed) == pytest.approx(
        (1.0 + 0.5 + 0.0) / 3
    )
    assert performance(delivered_mw=[1.0], committed_mw=[0.0]) == 0.0
    per = interval_performance(
        delivered_mw=[1.2, 0.5, -0.1, np.nan, 1.0], committed_mw=[1, 1, 1, 1, 0]
    )
    np.testing.assert_allclose(per, [1.0, 0.5, 0.0, 0.0, 0.0])


def test_performance_is_capped_per_interval() -> None:
    # As a request's view shows it: an interval with nothing committed reads as met.
    committed, delivered = np.array([2.0, 2.0, 0.0]), np.array([3.0, 1.0, 1.0])
    per = interval_performance(delivered_mw=delivered, committed_mw=committed, uncommitted=1.0)
    np.testing.assert_allclose(per, [1.0, 0.5, 1.0])
    assert performance(delivered_mw=delivered, committed_mw=committed) == pytest.approx(0.75)


def test_resample_averages_history_slots_into_settlement_intervals() -> None:
    slots = T0 + np.arange(12) * 300_000  # 5-minute history
    vals = np.arange(12, dtype=float)[None, :].repeat(2, axis=0)
    vals[1, 3:6] = np.nan  # device 2 silent for one whole interval
    out = resample(vals, slots, GRID)
    assert out[0].tolist() == [1.0, 4.0, 7.0, 10.0]
    assert np.isnan(out[1, 1]) and out[1, 2] == 7.0


def test_batteries_meter_before_with_control_drift() -> None:
    # Two batteries discharge 5 kW over a 1 kW pre-event level; uncommanded, homes' own output
    # would have drifted up by 0.2 kW (the control group shows it).
    act = np.full((2, 4), 5000.0)
    inp = SettlementInputs(
        grid=GRID,
        target_mw=np.full(4, 0.008),
        battery_actual_w=act,
        battery_before_w=np.array([1000.0, 1000.0]),
        battery_after_w=np.array([np.nan, np.nan]),
        battery_active=np.ones((2, 4), bool),
        battery_control_actual_w=np.full((6, 4), 1200.0),
        battery_control_before_w=np.full(6, 1000.0),
    )
    st = settle(inp)
    assert [ln.delivered_mw for ln in st.lines] == pytest.approx([0.0076] * 4)
    assert st.performance == pytest.approx(0.95)
    assert st.lines[0].inputs["battery"]["control_drift_kw"] == pytest.approx(0.2)
    # A missing reading proves nothing: that interval delivers 0 for that battery.
    act[1, 2] = np.nan
    st = settle(SettlementInputs(**{**inp.__dict__, "battery_actual_w": act}))
    assert st.lines[2].delivered_mw == pytest.approx(0.0038)


def test_thermostats_against_the_control_group() -> None:
    rng = np.random.default_rng(0)
    n_t, n_c = 200, 20
    pre = rng.uniform(1500, 2500, n_t)
    c_pre = rng.uniform(1500, 2500, n_c)
    heat = np.array([1.0, 1.1, 1.2, 1.3])  # the afternoon gets hotter: +10 % an interval
    shed = np.array([0.8, 0.5, 0.3, 0.2])  # share of load shed
    actual = pre[:, None] * heat[None, :] * (1 - shed[None, :])
    control = c_pre[:, None] * heat[None, :]
    st = settle(
        SettlementInputs(
            grid=GRID,
            target_mw=np.full(4, 0.2),
            thermostat_actual_w=actual,
            thermostat_before_w=pre,
            thermostat_active=np.ones((n_t, 4), bool),
            control_actual_w=control,
            control_before_w=c_pre,
        )
    )
    truth = (pre.sum() * heat * shed) / 1e6
    assert [ln.delivered_mw for ln in st.lines] == pytest.approx(truth.tolist(), abs=1e-5)
    assert all(METHOD_CONTROL in ln.method for ln in st.lines)
    assert st.lines[1].inputs["control"]["ratio"] == pytest.approx(1.1)


def test_ten_in_ten_with_same_day_adjustment_capped_at_20_percent() -> None:
    days = np.full((1, 12, 4), 2000.0)
    days[0, 10:] = np.nan  # only the 10 most recent days count; older ones missing anyway
    h = TenInTen(days_w=days, adjust_days_w=np.full((1, 12), 1000.0),
                 adjust_today_w=np.array([1500.0]))  # fmt: skip
    base, factor, n_days = ten_in_ten_baseline(h)
    assert factor[0] == pytest.approx(1.2) and n_days[0] == 10  # +50 % capped at +20 %
    assert base[0].tolist() == pytest.approx([2400.0] * 4)
    few = TenInTen(days_w=days[:, :3], adjust_days_w=np.full((1, 3), 1000.0),
                   adjust_today_w=np.array([900.0]))  # fmt: skip
    assert np.isnan(ten_in_ten_baseline(few)[0]).all()  # too little history: no 10-in-10
    # Used when there is no control group.
    st = settle(
        SettlementInputs(
            grid=GRID,
            target_mw=np.full(4, 0.001),
            thermostat_actual_w=np.full((1, 4), 1400.0),
            thermostat_before_w=np.array([2000.0]),
            thermostat_active=np.ones((1, 4), bool),
            ten_in_ten=h,
        )
    )
    assert st.lines[0].delivered_mw == pytest.approx(0.001)
    assert METHOD_TEN_IN_TEN in st.lines[0].method


def test_only_intervals_under_command_count() -> None:
    m = active_mask(np.array([T0 + 900_000]), np.array([T0 + 1_800_000 + 1]), GRID)
    assert m.tolist() == [[False, True, True, False]]


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="target_mw"):
        settle(SettlementInputs(grid=GRID, target_mw=np.ones(3)))
    with pytest.raises(ValueError, match="interval_s"):
        SettlementGrid(T0, T0 + 1, 0)


def test_battery_drift_read_at_each_batterys_own_pre_event_level() -> None:
    # 60 control batteries: 45 charging from PV before the event (−2 kW) drift up 1.8 kW as the
    # sun fades, 15 serving their home (+0.8 kW) drift up 0.3 kW. Mean drift 1.425 kW.
    rng = np.random.default_rng(3)
    pre = np.r_[np.full(45, -2000.0), np.full(15, 800.0)] + rng.normal(0, 50, 60)
    drift = np.where(pre < 0, 1800.0, 300.0) + rng.normal(0, 50, 60)
    fit = fit_battery_drift((pre + drift)[:, None], pre, 1)
    assert fit.ok[0] and fit.mean_w[0] == pytest.approx(1425.0, abs=40)
    # The optimiser dispatched charging batteries: their counterfactual drift is 1.8 kW, not the
    # mean; a device outside the controls' range is read at the range's edge.
    got = fit.for_devices(np.array([-2000.0, 800.0, -9000.0]))[:, 0]
    assert got[0] == pytest.approx(1800.0, abs=60)
    assert got[1] == pytest.approx(300.0, abs=60)
    assert got[2] == pytest.approx(got[0], abs=80)
    # Too few controls for a line: one mean drift for all; none at all: nothing used.
    few = fit_battery_drift((pre + drift)[:10, None], pre[:10], 1)
    assert few.slope[0] == 0.0 and few.ok[0]
    assert not fit_battery_drift((pre + drift)[:3, None], pre[:3], 1).ok[0]
