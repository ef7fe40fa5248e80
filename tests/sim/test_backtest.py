"""The forecast back-test on a small synthetic fleet: it runs, calibrates after the history days
and scores the forecast."""

from __future__ import annotations

from sim.backtest import BacktestConfig, run_backtest


def test_small_backtest_runs_and_scores() -> None:
    rep = run_backtest(BacktestConfig(n_devices=1500, history_days=6, test_days=6, n_scenarios=300))
    assert rep.realised.shape == (13, 2, 12)
    assert 0.5 <= rep.coverage() <= 1.0
    assert rep.pinball("model", 0.5) > 0.0
    assert rep.calibrated[-1].all() and not rep.calibrated[1].any()
