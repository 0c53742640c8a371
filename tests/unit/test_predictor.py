"""Predictor: models on short, sparse, constant and periodic histories, and feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker import predictor
from broker.demand import DemandHistory, DemandSample
from broker.policy import ForecastPolicy
from broker.predictor import Forecast, Predictor, PredictorSettings


def make(
    settings: PredictorSettings | None = None, resource="open_connections"
) -> Predictor:
    return Predictor(settings or PredictorSettings(), 60.0, resource)


def finite(forecast: Forecast) -> bool:
    values = [forecast.mean, forecast.std, forecast.levels(np.array([0.05, 0.5, 0.95]))]
    return all(np.isfinite(v).all() for v in values)


def test_ewma_single_value():
    assert predictor.ewma(np.array([4.0])) == (4.0, 0.0)


def test_ewma_arithmetic():
    # alpha 0.5 on [0, 2]: mean 0 + 0.5 x 2 = 1; var 0.5 x (0 + 2 x 1) = 1.
    mean, var = predictor.ewma(np.array([0.0, 2.0]), alpha=0.5)
    assert mean == pytest.approx(1.0)
    assert var == pytest.approx(1.0)


def test_single_sample_no_nan():
    forecast = make().forecast_windows(["u"], np.array([[3.0]]))[0]
    assert forecast.model == "ewma"
    assert finite(forecast)


def test_empty_history_no_nan():
    forecast = make().forecast_windows(["u"], np.zeros((1, 0)))[0]
    assert forecast.model == "ewma"
    assert finite(forecast)


def test_short_history_ewma():
    forecast = make().forecast_windows(["u"], np.array([[1.0, 2.0, 1.0]]))[0]
    assert forecast.model == "ewma"


def test_constant_history():
    forecast = make().forecast_windows(["u"], np.full((1, 64), 3.0))[0]
    assert forecast.model == "gp"
    assert finite(forecast)
    # A constant 3 predicts 3 with a narrow spread.
    assert forecast.quantile(0.5)[0] == 3
    assert forecast.quantile(0.95)[0] <= 4


def test_all_zero_history_sparse():
    forecast = make().forecast_windows(["u"], np.zeros((1, 64)))[0]
    assert forecast.model == "sparse"
    assert finite(forecast)
    # Beta(1, 1) prior, 0 active of 64: P(active) = 1 / 66.
    assert forecast.zero_probability[0] == pytest.approx(65 / 66)
    assert forecast.quantile(0.9)[0] == 0
    assert forecast.quantile(0.99)[0] == 1


def test_sparse_arithmetic():
    window = np.zeros((1, 64))
    window[0, [10, 40]] = [1.0, 3.0]
    forecast = make().forecast_windows(["u"], window)[0]
    assert forecast.model == "sparse"
    # P(active) = (2 + 1) / (64 + 2) = 3/66; sizes {1, 3}.
    p0 = 63 / 66
    assert forecast.cdf(0.0)[0] == pytest.approx(p0)
    assert forecast.cdf(1.0)[0] == pytest.approx(p0 + (1 - p0) / 2)
    assert forecast.quantile(0.999)[0] == 3


def test_period_detected():
    windows = np.zeros((2, 64))
    windows[0, ::8] = 2.0
    windows[1] = np.random.default_rng(1).poisson(3.0, 64)
    periods = predictor.detect_periods(np.sqrt(windows))
    assert periods[0] == 8
    assert periods[1] == 0


def test_periodic_forecast_follows_phase():
    # A timer firing every 5 steps, last fired at step 60 of 0..63: the next
    # firing is step 65, two steps past the window.
    window = np.zeros((1, 64))
    window[0, ::5] = 2.0
    settings = PredictorSettings(horizon_min=3, horizon_max=3)
    forecast = make(settings).forecast_windows(["timer"], window)[0]
    assert forecast.period == 5
    median = forecast.expected()
    assert median[1] > median[0]
    assert median[1] > median[2]


def test_quantiles_monotone():
    window = np.random.default_rng(2).poisson(4.0, (1, 64)).astype(float)
    forecast = make().forecast_windows(["u"], window)[0]
    levels = forecast.levels(np.array([0.1, 0.5, 0.9, 0.99]))[0]
    assert (np.diff(levels) >= 0).all()


def test_count_quantile_arithmetic():
    # sqrt(y + U) ~ N(mean, std) with mean sqrt(4.5), std tiny: y + U is 4.5,
    # so y = 4 and its median is 4; P(y <= 4) = P(Z < (sqrt 5 - sqrt 4.5)/std) ~ 1.
    forecast = Forecast(
        "u",
        "open_connections",
        "gp",
        60.0,
        np.array([math.sqrt(4.5)]),
        np.array([0.01]),
    )
    assert forecast.quantile(0.5)[0] == 4
    assert forecast.cdf(4.0)[0] == pytest.approx(1.0)
    assert forecast.cdf(3.0)[0] == pytest.approx(0.0)


def test_invalid_level():
    forecast = Forecast("u", "arrivals", "gp", 60.0, np.array([1.0]), np.array([0.1]))
    with pytest.raises(ValueError):
        forecast.quantile(1.0)


def test_pit_below_arithmetic():
    forecast = Forecast(
        "u",
        "open_connections",
        "sparse",
        60.0,
        np.zeros(1),
        np.ones(1),
        zero_probability=np.array([0.5]),
        sizes=np.array([1.0]),
    )
    # F(0) = 0.5, F(1) = 1. For y = 0 the PIT is uniform on [0, 0.5]:
    # P(PIT <= 0.25) = 0.5. For y = 1 it is uniform on [0.5, 1]: P(<= 0.75) = 0.5.
    assert predictor.pit_below(forecast, 0.0, 0.25)[0] == pytest.approx(0.5)
    assert predictor.pit_below(forecast, 1.0, 0.75)[0] == pytest.approx(0.5)
    assert predictor.pit_below(forecast, 1.0, 0.4)[0] == 0.0


def test_pinball():
    # q = 0.9: actual 5 above a forecast of 3 costs 0.9 x 2; below costs 0.1 x 2.
    assert predictor.pinball(5.0, 3.0, 0.9) == pytest.approx(1.8)
    assert predictor.pinball(1.0, 3.0, 0.9) == pytest.approx(0.2)


def test_calibration_uses_residuals():
    p = make()
    window = np.random.default_rng(3).poisson(4.0, (1, 64)).astype(float)
    first = p.forecast_windows(["u"], window)[0]
    for _ in range(40):
        p.observe(first, 30.0)  # far above: the residuals grow
    later = p.forecast_windows(["u"], window)[0]
    assert later.residuals.size == 40
    assert later.quantile(0.5)[0] > first.quantile(0.5)[0]


def test_scores_recorded():
    p = make()
    forecast = p.forecast_windows(["u"], np.full((1, 64), 2.0))[0]
    p.observe(forecast, 2.0)
    p.observe(forecast, 9.0)
    status = p.status()["u"]
    assert status["scored"] == 2
    # 2 is inside the 0.9 quantile, 9 is not.
    assert status["coverage"] == 0.5
    assert status["model"] == "gp"


def test_anomaly_flagged_and_replaced(caplog):
    p = make()
    window = np.full((1, 64), 4.0)
    forecast = p.forecast_windows(["u"], window, np.arange(64))[0]
    assert p.observe(forecast, 400.0, label=64)
    assert p.anomaly_total == 1
    assert "anomalous demand for u" in caplog.text
    # The anomalous sample is replaced by the forecast median in training.
    shifted = np.concatenate([window[:, 1:], [[400.0]]], axis=1)
    cleaned = p._clean(["u"], shifted, np.arange(1, 65))
    assert cleaned[0, -1] == forecast.quantile(0.5)[0]
    assert p.is_anomalous("u")


def test_anomaly_persisting_level_kept():
    p = make(PredictorSettings(anomaly_persist=2))
    forecast = p.forecast_windows(["u"], np.full((1, 64), 4.0), np.arange(64))[0]
    p.observe(forecast, 400.0, label=64)
    p.observe(forecast, 400.0, label=65)
    # Two in a row: a new level; nothing is replaced any more.
    assert p.replaced["u"] == {}


def test_no_anomaly_single_connection():
    p = make()
    forecast = p.forecast_windows(["u"], np.zeros((1, 64)))[0]
    assert not p.observe(forecast, 1.0)


def test_horizon_adaptive():
    p = make(PredictorSettings(horizon_min=1, horizon_max=10))
    steady = np.full(64, 9.0)
    volatile = np.tile([0.0, 25.0], 32)
    horizons = p.horizons(np.stack([steady, volatile]))
    assert horizons[0] == 1
    assert horizons[1] > horizons[0]


def test_drift_refits():
    p = make(PredictorSettings(refit_min_scored=16))
    forecast = p.forecast_windows(["u"], np.full((1, 64), 1.0))[0]
    for _ in range(16):
        p.observe(forecast, 50.0)
    assert p.refit_total == 1
    assert p.kernels.fitted == {}


def test_little_slots_poisson():
    # No uncertainty about L = 2: Poisson(2) has P(<= 2) = 0.677 >= 0.6 and
    # P(<= 1) = 0.406 < 0.6, so the 0.6-quantile is 2 and the pool 2 + 1 = 3.
    slots = predictor.little_slots_arrays(
        np.array([math.sqrt(2.0)]), np.array([0.0]), np.array([0.6])
    )
    assert slots[0, 0] == 3


def test_bin_samples():
    times = np.array([0.5, 1.5, 2.5, 10.5, 11.0])
    values = np.array([1.0, 3.0, 2.0, 5.0, 7.0])
    starts, binned = predictor.bin_samples(times, values, 10.0, "max", now=12.0)
    # Only the step [0, 10) is complete at 12 s.
    assert starts.tolist() == [0.0]
    assert binned.tolist() == [3.0]


def test_forecaster_from_history():
    policy = ForecastPolicy(plan_interval=10.0, window=32)
    history = DemandHistory()
    for second in range(400):
        history.record(
            7, DemandSample(time=float(second), arrivals=1.0, open_connections=2.0)
        )
    forecaster = predictor.Forecaster(policy)
    first = forecaster.forecast_users(history, [7], now=400.0)
    assert set(first[7]) == {"open_connections", "arrivals"}
    # 10 arrivals per 10 s step, every step.
    assert first[7]["arrivals"].quantile(0.5)[0] == 10
    for second in range(400, 411):
        history.record(
            7, DemandSample(time=float(second), arrivals=1.0, open_connections=2.0)
        )
    forecaster.forecast_users(history, [7], now=411.0)
    assert forecaster.status()["arrivals"]["7"]["scored"] == 1


def test_clean_per_row_labels():
    p = make()
    p.replaced["a"] = {5.0: 1.0}
    windows = np.full((2, 8), 9.0)
    labels = np.stack([np.arange(8.0), np.arange(5.0, 13.0)])
    cleaned = p._clean(["a", "b"], windows, labels)
    # User a's column labelled 5 is the sixth; user b has no replacements.
    assert cleaned[0].tolist() == [9, 9, 9, 9, 9, 1, 9, 9]
    assert cleaned[1].tolist() == [9.0] * 8


def test_dispersion_index():
    # Variances 4 and 2 over means 1 and 2: 6 / 3 = 2. No load gives 1, and
    # under-dispersion is raised to 1.
    ratio = predictor.dispersion_index(
        np.array([[1.0, 2.0], [0.0, 0.0], [2.0, 2.0]]),
        np.array([[4.0, 2.0], [0.0, 0.0], [1.0, 1.0]]),
    )
    assert ratio.tolist() == [2.0, 1.0, 1.0]


def test_little_slots_dispersion_widens():
    # L = 2 exactly: Poisson(2) gives 3 slots at 0.6 (see above). With
    # dispersion 3 the count has variance 6, so the 0.6-quantile is higher.
    root, std, level = np.array([math.sqrt(2.0)]), np.array([0.0]), np.array([0.6])
    plain = predictor.little_slots_arrays(root, std, level)
    bursty = predictor.little_slots_arrays(root, std, np.array([0.99]), 3.0)
    assert plain[0, 0] == 3
    assert (
        bursty[0, 0] > predictor.little_slots_arrays(root, std, np.array([0.99]))[0, 0]
    )


def test_step_dispersion():
    # Step [0, 10): samples 0 and 4, mean 2, variance 4. Step [10, 20):
    # samples 2 and 2, mean 2, variance 0. Index (4 + 0) / (2 + 2) = 1.
    # Step [20, 30) is not complete at 25 s and is left out.
    times = np.array([1.0, 2.0, 11.0, 12.0, 21.0])
    values = np.array([0.0, 4.0, 2.0, 2.0, 100.0])
    assert predictor.step_dispersion(times, values, 10.0, 25.0, 8) == pytest.approx(1.0)
    # With only the first step: 4 / 2 = 2.
    assert predictor.step_dispersion(times, values, 10.0, 15.0, 8) == pytest.approx(2.0)


def test_calibrated_moments():
    residuals = np.sort(np.array([-2.0, 2.0] * 8))
    forecast = Forecast(
        "u",
        "busy",
        "gp",
        5.0,
        np.array([3.0]),
        np.array([0.5]),
        residuals=residuals,
        discrete=False,
    )
    mean, std = forecast.calibrated()
    # Residuals have mean 0 and standard deviation 2: the std doubles.
    assert mean[0] == pytest.approx(3.0)
    assert std[0] == pytest.approx(1.0)
    # E[S^2] = 3^2 + 1^2 with the calibrated std.
    assert forecast.expected()[0] == pytest.approx(10.0)


def test_calibrated_ignores_over_forecasts():
    # Twelve errors spread like a standard normal at its quantiles, plus four
    # large over-forecasts (demand far below the forecast, as when load stops).
    normal = predictor.ndtri((np.arange(12) + 0.5) / 12)
    residuals = np.sort(np.concatenate([normal, [-6.0] * 4]))
    forecast = Forecast(
        "u",
        "busy",
        "gp",
        5.0,
        np.array([3.0]),
        np.array([0.5]),
        residuals=residuals,
        discrete=False,
    )
    mean, std = forecast.calibrated()
    # The median of the 16 errors lies between the 4th and 5th normal ones.
    # The upper spread (84th percentile - median) stays about 1.
    median = float(np.quantile(residuals, 0.5))
    upper = float(np.quantile(residuals, predictor.UPPER_SIGMA))
    assert mean[0] == pytest.approx(3.0 + 0.5 * median)
    assert std[0] == pytest.approx(0.5 * (upper - median))
    # Their standard deviation (about 2.7) would have widened the std 2.7 times.
    assert std[0] < 0.5 * 1.5


def test_calibrated_needs_residuals():
    forecast = Forecast(
        "u", "busy", "gp", 5.0, np.array([3.0]), np.array([0.5]), discrete=False
    )
    assert forecast.calibrated()[1][0] == 0.5
