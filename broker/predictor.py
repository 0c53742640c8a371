"""Forecast each user's demand as a predictive distribution over the horizon.

Models, and which one serves a user:

- `gp`: scikit-learn `GaussianProcessRegressor` on the square root of the
  demand (the variance-stabilising transform of a count), over a bounded
  window of equally spaced samples. Inputs are scaled to [0, 1] over the
  window and outputs standardised per user. The kernel is a smooth trend
  (RBF) plus a daily periodic part plus white noise; when the window shows a
  shorter period (a timer firing every few minutes, detected by
  autocorrelation), a periodic part with that period is added too.
  Hyperparameters are shared: they are fitted by maximum likelihood on the
  windows of many users at once (scikit-learn sums the log marginal
  likelihood over the columns of a multi-output y), stored, and reused; a
  later fit with `optimizer=None` is one Cholesky factorisation for all users
  of the same window length and period.
- `sparse`: users with fewer than `min_active` non-zero samples in the window.
  Activity is a Bernoulli event with a Beta(1, 1) prior on its rate; the size
  of a non-zero sample is drawn from the user's own non-zero samples.
- `ewma`: exponentially weighted mean and variance, for users with fewer
  than `min_samples` samples (including a single one).

Every forecast is then recalibrated from its own errors: the standardised
residuals of past forecasts, (sqrt(actual) - mean) / std, form an empirical
distribution, and a quantile q of demand is read at that distribution's
q-quantile instead of the normal one (split-conformal calibration). Users
with few scored forecasts use residuals pooled over all users.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import numpy as np
from scipy.special import ndtr, ndtri
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import (
    RBF,
    ConstantKernel,
    ExpSineSquared,
    Kernel,
    WhiteKernel,
)

log = logging.getLogger(__name__)

DAY = 86400.0

# Smallest predictive standard deviation, in sqrt(demand) units. It keeps a
# constant history from producing a zero-width interval and a division by 0.
STD_FLOOR = 0.05

# Scale, in sqrt(demand) units, given to a window with (almost) no variation,
# so a constant history predicts its constant with a narrow spread.
CONSTANT_SCALE = 0.1


# --------------------------------------------------------------------------
# Forecasts
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Forecast:
    """A predictive distribution of one user's demand at each step of the horizon.

    `mean` and `std` are in sqrt(demand) units; demand itself is
    max(mean + std * Z, 0) ** 2 where Z follows the calibration distribution
    (`residuals`, sorted standardised errors of past forecasts) or, with no
    residuals, the standard normal.
    """

    key: Hashable
    resource: str
    model: str
    step: float  # seconds between horizon steps
    mean: np.ndarray
    std: np.ndarray
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    zero_probability: np.ndarray | None = None  # `sparse` model only
    sizes: np.ndarray | None = None  # `sparse` model: observed non-zero sizes
    period: int | None = None  # detected period in steps, if any

    @property
    def horizon(self) -> int:
        return int(self.mean.size)

    def _z(self, q: float) -> float:
        if self.residuals.size >= 8:
            return float(np.quantile(self.residuals, q, method="inverted_cdf"))
        return float(ndtri(q))

    def quantile(self, q: float) -> np.ndarray:
        """Return the q-quantile of demand at each step (a float, not rounded)."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile {q} must be in (0, 1)")
        if self.model == "sparse":
            return self._sparse_quantile(q)
        level = np.maximum(self.mean + self.std * self._z(q), 0.0)
        return level**2

    def _sparse_quantile(self, q: float) -> np.ndarray:
        assert self.zero_probability is not None and self.sizes is not None
        p0 = self.zero_probability
        inner = np.clip((q - p0) / np.maximum(1.0 - p0, 1e-12), 0.0, 1.0)
        sizes = np.sort(self.sizes) if self.sizes.size else np.ones(1)
        upper = np.quantile(sizes, np.minimum(inner, 1.0), method="inverted_cdf")
        return np.where(q <= p0, 0.0, upper)

    def cdf(self, demand: np.ndarray | float) -> np.ndarray:
        """Return P(demand <= x) at each step."""
        x = np.asarray(demand, dtype=float)
        if self.model == "sparse":
            assert self.zero_probability is not None and self.sizes is not None
            sizes = self.sizes if self.sizes.size else np.ones(1)
            below = np.searchsorted(np.sort(sizes), x, side="right") / sizes.size
            p0 = self.zero_probability
            return np.where(x < 0, 0.0, p0 + (1.0 - p0) * below)
        z = (np.sqrt(np.maximum(x, 0.0)) - self.mean) / self.std
        z = np.where(x < 0, -np.inf, z)
        if self.residuals.size >= 8:
            return np.searchsorted(self.residuals, z, side="right") / self.residuals.size
        return ndtr(z)

    def expected(self) -> np.ndarray:
        """Return the predictive mean of demand (not of its square root)."""
        if self.model == "sparse":
            assert self.zero_probability is not None and self.sizes is not None
            size = float(np.mean(self.sizes)) if self.sizes.size else 1.0
            return (1.0 - self.zero_probability) * size
        return np.maximum(self.mean, 0.0) ** 2 + self.std**2

    def slots(self, q: float) -> np.ndarray:
        """Return the smallest whole number of slots covering demand with probability q."""
        return np.maximum(np.ceil(self.quantile(q) - 1e-9), 0.0)


# --------------------------------------------------------------------------
# Small-history and sparse models
# --------------------------------------------------------------------------


def ewma(values: np.ndarray, alpha: float = 0.3) -> tuple[float, float]:
    """Return the exponentially weighted mean and variance of values (oldest first).

    One value gives that value and variance 0; an empty array gives (0, 0).
    """
    if values.size == 0:
        return 0.0, 0.0
    mean, var = float(values[0]), 0.0
    for value in values[1:].tolist():
        diff = value - mean
        increment = alpha * diff
        mean += increment
        var = (1.0 - alpha) * (var + diff * increment)
    return mean, var


def _ewma_forecast(key, resource, values, horizon, step) -> Forecast:
    root = np.sqrt(np.maximum(values, 0.0))
    mean, var = ewma(root)
    # With few samples the spread is unknown: widen by the prior std of 1.
    std = math.sqrt(var + 1.0 / (1.0 + values.size))
    return Forecast(
        key, resource, "ewma", step, np.full(horizon, mean), np.full(horizon, max(std, STD_FLOOR))
    )


def _sparse_forecast(key, resource, values, horizon, step) -> Forecast:
    active = values[values > 0]
    # Posterior mean of the activity rate under a Beta(1, 1) prior.
    rate = (active.size + 1.0) / (values.size + 2.0)
    return Forecast(
        key,
        resource,
        "sparse",
        step,
        mean=np.zeros(horizon),
        std=np.ones(horizon),
        zero_probability=np.full(horizon, 1.0 - rate),
        sizes=np.sort(active) if active.size else np.ones(1),
    )


# --------------------------------------------------------------------------
# Period detection
# --------------------------------------------------------------------------


def detect_periods(windows: np.ndarray, min_lag: int = 2, threshold: float = 0.5) -> np.ndarray:
    """Return each row's dominant period in steps, or 0 where none is clear.

    A period is the lag, up to a third of the window, with the largest
    autocorrelation of the mean-removed row, kept only when that
    autocorrelation is at least `threshold` (so at least three cycles fit).
    """
    n = windows.shape[1]
    max_lag = n // 3
    out = np.zeros(windows.shape[0], dtype=int)
    if max_lag < min_lag:
        return out
    centred = windows - windows.mean(axis=1, keepdims=True)
    size = 1 << int(math.ceil(math.log2(2 * n)))
    spectrum = np.fft.rfft(centred, size, axis=1)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size, axis=1)[:, : max_lag + 1]
    energy = acf[:, :1]
    valid = energy[:, 0] > 1e-12
    # Unbiased estimate: divide lag k by the n - k overlapping pairs.
    acf = acf / np.maximum(energy, 1e-12) * (n / (n - np.arange(max_lag + 1)))
    # Take the shortest lag close to the best one, so that a multiple of the
    # period does not win on noise.
    peak = acf[:, min_lag:].max(axis=1, keepdims=True)
    lags = np.argmax(acf[:, min_lag:] >= 0.9 * peak, axis=1) + min_lag
    best = acf[np.arange(windows.shape[0]), lags]
    out[valid & (best >= threshold)] = lags[valid & (best >= threshold)]
    return out


# --------------------------------------------------------------------------
# The Gaussian process, batched over users that share a kernel
# --------------------------------------------------------------------------


def base_kernel(window_seconds: float) -> Kernel:
    """Return the prior kernel on inputs scaled to [0, 1] over the window.

    Trend: an RBF whose length scale starts at the window. Daily period: an
    ExpSineSquared with the period of one day in window units, fixed. Noise:
    a WhiteKernel.
    """
    daily = DAY / max(window_seconds, 1.0)
    return (
        ConstantKernel(0.5, (1e-3, 1e2)) * RBF(1.0, (0.05, 1e3))
        + ConstantKernel(0.1, (1e-3, 1e2))
        * ExpSineSquared(1.0, daily, (0.1, 1e2), "fixed")
        + WhiteKernel(0.5, (1e-4, 1e1))
    )


def periodic_kernel(period_steps: int, window_steps: int) -> Kernel:
    """Return a periodic part for a period of `period_steps` samples, period fixed."""
    return ConstantKernel(0.5, (1e-3, 1e2)) * ExpSineSquared(
        0.5, period_steps / window_steps, (0.05, 1e1), "fixed"
    )


@dataclass
class KernelCache:
    """Fitted kernels per (window length, period), shared by all users.

    A kernel is fitted by maximum likelihood once (scikit-learn's optimizer
    over the sum of all users' log marginal likelihoods) and reused with
    `optimizer=None` until `invalidate` is called, e.g. after calibration
    drifted.
    """

    step: float  # seconds between samples
    fitted: dict[tuple[int, int], Kernel] = field(default_factory=dict)
    fit_seconds: float = 0.0
    fits: int = 0
    max_fit_users: int = 64

    def kernel(self, n: int, period: int, standardised: np.ndarray) -> Kernel:
        key = (n, period)
        if key not in self.fitted:
            self.fitted[key] = self._fit(n, period, standardised)
        return self.fitted[key]

    def _fit(self, n: int, period: int, standardised: np.ndarray) -> Kernel:
        kernel = base_kernel(self.step * n)
        if period:
            kernel = kernel + periodic_kernel(period, n)
        # Fit on the users with the most variation: flat rows carry no signal.
        order = np.argsort(-standardised.std(axis=0))[: self.max_fit_users]
        started = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = GaussianProcessRegressor(kernel, normalize_y=False, n_restarts_optimizer=0)
            model.fit(_grid(n), standardised[:, order])
        self.fit_seconds += time.process_time() - started
        self.fits += 1
        log.debug("fitted kernel n=%s period=%s: %s", n, period, model.kernel_)
        return model.kernel_

    def invalidate(self) -> None:
        self.fitted.clear()


def _grid(n: int) -> np.ndarray:
    return (np.arange(n, dtype=float) / max(n - 1, 1))[:, None]


def gp_predict(
    windows: np.ndarray, horizon: int, kernel: Kernel
) -> tuple[np.ndarray, np.ndarray]:
    """Return predictive mean and std in sqrt units for rows of equally spaced windows.

    windows: (users, n) demand, oldest first. Each row is square-rooted and
    standardised; the std of a constant row is taken as 1, so it predicts its
    constant with the kernel's noise as spread.
    """
    root = np.sqrt(np.maximum(windows, 0.0))
    centre = root.mean(axis=1, keepdims=True)
    scale = np.maximum(root.std(axis=1, keepdims=True), CONSTANT_SCALE)
    n = windows.shape[1]
    model = GaussianProcessRegressor(kernel, optimizer=None, normalize_y=False)
    model.fit(_grid(n), ((root - centre) / scale).T)
    future = (n - 1 + np.arange(1, horizon + 1, dtype=float)) / max(n - 1, 1)
    mean, std = model.predict(future[:, None], return_std=True)
    mean = np.asarray(mean).reshape(horizon, -1).T
    std = np.asarray(std).reshape(horizon, -1)
    std = std[:, :1].T if std.shape[1] > 1 else std.T
    return centre + scale * mean, np.maximum(scale * std, STD_FLOOR)


def standardise(windows: np.ndarray) -> np.ndarray:
    """Return the columns the kernel is fitted on: sqrt rows, standardised, as (n, users)."""
    root = np.sqrt(np.maximum(windows, 0.0))
    scale = root.std(axis=1, keepdims=True)
    scale = np.where(scale < 1e-3, 1.0, scale)
    return ((root - root.mean(axis=1, keepdims=True)) / scale).T


# --------------------------------------------------------------------------
# Feedback: scores, calibration, anomalies
# --------------------------------------------------------------------------


def pinball(actual: float, predicted: float, q: float) -> float:
    """Return the pinball (quantile) loss of a q-quantile forecast."""
    diff = actual - predicted
    return q * diff if diff >= 0 else (q - 1.0) * diff


def pit_below(forecast: Forecast, actual: float, q: float) -> float:
    """Return P(PIT <= q) of one count observation, for step 0 of a forecast.

    For a discrete demand the probability integral transform is uniform on
    [F(y - 1), F(y)] (the non-randomised PIT of Czado, Gneiting and Held,
    Biometrics 2009). Its mean over many observations equals q when the
    forecasts are calibrated, so it measures coverage at level q without the
    bias of the atoms of a count.
    """
    upper = float(forecast.cdf(actual)[0])
    lower = float(forecast.cdf(actual - 1.0)[0]) if actual >= 1 else 0.0
    if upper - lower < 1e-12:
        return 1.0 if q >= upper else 0.0
    return float(np.clip((q - lower) / (upper - lower), 0.0, 1.0))


@dataclass
class UserScore:
    """Rolling scores of one user's one-step forecasts at the policy quantile."""

    residuals: deque = field(default_factory=lambda: deque(maxlen=256))
    covered: deque = field(default_factory=lambda: deque(maxlen=256))
    losses: deque = field(default_factory=lambda: deque(maxlen=256))
    pit: deque = field(default_factory=lambda: deque(maxlen=256))
    scored: int = 0
    anomalies: int = 0
    anomaly_run: int = 0
    refits: int = 0
    last_model: str = ""

    def coverage(self) -> float | None:
        return float(np.mean(self.covered)) if self.covered else None

    def pinball_loss(self) -> float | None:
        return float(np.mean(self.losses)) if self.losses else None

    def calibration(self) -> float | None:
        """Return the mean non-randomised PIT coverage at the policy quantile."""
        return float(np.mean(self.pit)) if self.pit else None

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.last_model,
            "scored": self.scored,
            "coverage": self.coverage(),
            "calibrated_coverage": self.calibration(),
            "pinball_loss": self.pinball_loss(),
            "anomalies": self.anomalies,
            "refits": self.refits,
        }


@dataclass(frozen=True)
class PredictorSettings:
    """Settings of the predictor, taken from the forecast policy."""

    quantile: float = 0.9
    window: int = 256
    min_samples: int = 8  # fewer samples: the ewma model
    min_active: int = 4  # fewer non-zero samples and no period: the sparse model
    horizon_min: int = 1  # steps
    horizon_max: int = 1  # steps
    anomaly_sigma: float = 4.0
    anomaly_persist: int = 3  # anomalous steps in a row that make a new level
    min_user_residuals: int = 32
    refit_min_scored: int = 64
    refit_tolerance: float = 0.1
    period_threshold: float = 0.5


class Predictor:
    """Forecasts per user, scored against what happened, with anomaly handling.

    Call `forecast_windows` (or `forecast` for one user's history) from a
    worker thread: it fits models and may take tens of milliseconds per
    hundred users. Call `observe` with each interval's actual demand; it is
    cheap and keeps the scores, the calibration residuals and the anomaly
    state. The two must not run at the same time for the same predictor.
    """

    def __init__(self, settings: PredictorSettings, step: float, resource: str = "open_connections"):
        self.settings = settings
        self.step = step
        self.resource = resource
        self.kernels = KernelCache(step)
        self.scores: dict[Hashable, UserScore] = {}
        self.pooled: dict[str, deque] = {}
        self.replaced: dict[Hashable, dict[float, float]] = {}
        self.anomaly_total = 0
        self.refit_total = 0
        self.fit_seconds = 0.0

    # -- forecasting ------------------------------------------------------

    def forecast_windows(
        self, keys: list[Hashable], windows: np.ndarray, times: np.ndarray | None = None
    ) -> list[Forecast]:
        """Return one forecast per row of `windows` (users, n), oldest sample first.

        `times` labels the columns (any unit); anomalous samples recorded by
        `observe` under the same labels are replaced by what was forecast.
        """
        started = time.process_time()
        windows = np.asarray(windows, dtype=float)[:, -self.settings.window :]
        if times is not None:
            windows = self._clean(keys, windows, np.asarray(times)[-windows.shape[1] :])
        horizons = self.horizons(windows)
        depth = int(horizons.max()) if horizons.size else 1
        out = self._forecast_rows(keys, windows, depth)
        self.fit_seconds += time.process_time() - started
        return [self._finish(f, int(h)) for f, h in zip(out, horizons)]

    def _forecast_rows(self, keys, windows, depth) -> list[Forecast]:
        # Window lengths are cut to a power of two so that few kernels are fitted
        # while users' histories grow.
        n = windows.shape[1]
        if n >= self.settings.min_samples:
            n = 1 << int(math.log2(n))
            windows = windows[:, -n:]
        if n < self.settings.min_samples:
            return [_ewma_forecast(k, self.resource, w, depth, self.step) for k, w in zip(keys, windows)]
        root = np.sqrt(np.maximum(windows, 0.0))
        periods = detect_periods(root, threshold=self.settings.period_threshold)
        active = (windows > 0).sum(axis=1)
        sparse = (active < self.settings.min_active) & (periods == 0)
        out: list[Forecast | None] = [None] * len(keys)
        for row in np.flatnonzero(sparse):
            out[row] = _sparse_forecast(keys[row], self.resource, windows[row], depth, self.step)
        for period in np.unique(periods[~sparse]):
            rows = np.flatnonzero(~sparse & (periods == period))
            kernel = self.kernels.kernel(n, int(period), standardise(windows[rows]))
            mean, std = gp_predict(windows[rows], depth, kernel)
            for i, row in enumerate(rows):
                out[row] = Forecast(
                    keys[row], self.resource, "gp", self.step, mean[i], std[i] if std.shape[0] > 1 else std[0],
                    period=int(period) or None,
                )
        return [f for f in out if f is not None]

    def _finish(self, forecast: Forecast, horizon: int) -> Forecast:
        score = self.scores.get(forecast.key)
        residuals = np.empty(0)
        if forecast.model != "sparse":
            if score is not None and len(score.residuals) >= self.settings.min_user_residuals:
                residuals = np.sort(np.fromiter(score.residuals, float))
            elif len(self.pooled.get(forecast.model, ())) >= 8:
                residuals = np.sort(np.fromiter(self.pooled[forecast.model], float))
        return Forecast(
            forecast.key,
            forecast.resource,
            forecast.model,
            forecast.step,
            forecast.mean[:horizon],
            np.broadcast_to(forecast.std, forecast.mean.shape)[:horizon].copy(),
            residuals,
            None if forecast.zero_probability is None else forecast.zero_probability[:horizon],
            forecast.sizes,
            forecast.period,
        )

    def horizons(self, windows: np.ndarray) -> np.ndarray:
        """Return each row's horizon in steps: short when steady, long when volatile.

        Volatility is the mean absolute step-to-step change of sqrt(demand)
        relative to its level (plus 1, so a near-zero level does not divide
        by zero), mapped linearly from 0 to 1 onto horizon_min..horizon_max.
        """
        low, high = self.settings.horizon_min, self.settings.horizon_max
        if high <= low or windows.shape[1] < 2:
            return np.full(windows.shape[0], low)
        root = np.sqrt(np.maximum(windows, 0.0))
        change = np.abs(np.diff(root, axis=1)).mean(axis=1)
        volatility = np.clip(change / (root.mean(axis=1) + 1.0), 0.0, 1.0)
        return np.rint(low + (high - low) * volatility).astype(int)

    def _clean(self, keys, windows, times) -> np.ndarray:
        out = windows
        for row, key in enumerate(keys):
            replaced = self.replaced.get(key)
            if not replaced:
                continue
            if out is windows:
                out = windows.copy()
            for column, label in enumerate(times.tolist()):
                if label in replaced:
                    out[row, column] = replaced[label]
        return out

    # -- feedback ---------------------------------------------------------

    def observe(self, forecast: Forecast, actual: float, label: float | None = None) -> bool:
        """Score the first step of a forecast against the actual demand.

        Returns True when the actual is anomalous: above the forecast's
        bound of `anomaly_sigma` standard deviations. An anomalous sample is
        replaced by the forecast's median in later training windows, under
        `label`, until `anomaly_persist` anomalies in a row show a new level.
        """
        settings = self.settings
        score = self.scores.setdefault(forecast.key, UserScore())
        score.last_model = forecast.model
        q = settings.quantile
        predicted = float(forecast.quantile(q)[0])
        score.covered.append(actual <= math.ceil(predicted - 1e-9))
        score.losses.append(pinball(actual, predicted, q))
        score.pit.append(pit_below(forecast, actual, q))
        score.scored += 1
        if forecast.model != "sparse":
            residual = (math.sqrt(max(actual, 0.0)) - float(forecast.mean[0])) / float(forecast.std[0])
            score.residuals.append(residual)
            self.pooled.setdefault(forecast.model, deque(maxlen=4096)).append(residual)
        self._check_drift(forecast.key, score)
        return self._check_anomaly(forecast, score, actual, label)

    def _check_anomaly(self, forecast: Forecast, score: UserScore, actual: float, label) -> bool:
        if forecast.model == "sparse":
            assert forecast.sizes is not None
            centre, spread = math.sqrt(float(np.max(forecast.sizes))), 0.5
        else:
            centre, spread = float(forecast.mean[0]), float(forecast.std[0])
        z = (math.sqrt(max(actual, 0.0)) - centre) / spread
        if z <= self.settings.anomaly_sigma:
            score.anomaly_run = 0
            return False
        score.anomalies += 1
        score.anomaly_run += 1
        self.anomaly_total += 1
        bound = (centre + self.settings.anomaly_sigma * spread) ** 2
        log.warning(
            "anomalous demand for %s: %s %.1f above bound %.1f (z=%.1f, model %s)",
            forecast.key, self.resource, actual, bound, z, forecast.model,
        )
        replaced = self.replaced.setdefault(forecast.key, {})
        if score.anomaly_run >= self.settings.anomaly_persist:
            replaced.clear()  # a persisting level is real demand: train on it
        elif label is not None:
            replaced[label] = float(forecast.quantile(0.5)[0])
        return True

    def _check_drift(self, key: Hashable, score: UserScore) -> None:
        settings = self.settings
        if score.scored < settings.refit_min_scored or score.scored % settings.refit_min_scored:
            return
        coverage = score.coverage()
        if coverage is None or abs(coverage - settings.quantile) <= settings.refit_tolerance:
            return
        log.info(
            "coverage of %s is %.2f against %.2f nominal: refitting kernels",
            key, coverage, settings.quantile,
        )
        score.refits += 1
        self.refit_total += 1
        score.residuals.clear()
        self.kernels.invalidate()

    def is_anomalous(self, key: Hashable) -> bool:
        score = self.scores.get(key)
        return bool(score and score.anomaly_run)

    def status(self) -> dict[str, dict[str, object]]:
        """Return per-user scores for `broker status` and the metrics endpoint."""
        return {str(key): score.as_dict() for key, score in self.scores.items()}
