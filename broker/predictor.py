"""Forecast each user's demand as a predictive distribution over the horizon.

Models, and which one serves a user:

- `gp`: scikit-learn `GaussianProcessRegressor` on the square root of the
  demand (the variance-stabilising transform of a count), over a bounded
  window of equally spaced samples. Inputs are scaled to [0, 1] over the
  window and outputs standardised per user. The kernel is a smooth trend
  (RBF) plus a daily periodic part plus white noise. When the window shows a
  shorter period, such as a timer firing every few minutes, autocorrelation
  detects it and the kernel gets a periodic part with that period too.
  Users share hyperparameters. They are fitted by maximum likelihood on the
  windows of many users at once, because scikit-learn sums the log marginal
  likelihood over the columns of a multi-output y. They are then stored and
  reused, and the posterior for all users of one window length and period
  comes from one Cholesky factorisation.
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
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats
from scipy.linalg import cho_factor, cho_solve
from scipy.special import ndtr, ndtri
from sklearn.base import clone
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

POISSON_SQRT_STD = 0.5

# Scale, in sqrt(demand) units, given to a window with (almost) no variation,
# so a constant history predicts its constant with a narrow spread.
CONSTANT_SCALE = 0.1

# Scored forecasts needed before their residuals replace the normal distribution.
MIN_RESIDUALS = 8
# The standard normal's CDF at 1: its 84th percentile is one std above the median.
UPPER_SIGMA = 0.8413447

# Resources whose demand is a count.
DISCRETE = frozenset({"arrivals", "open_connections"})


# --------------------------------------------------------------------------
# Forecasts
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Forecast:
    """A predictive distribution of one user's demand at each step of the horizon.

    `mean` and `std` are in square-root units. For a count (`discrete`), the
    model is of sqrt(y + U), with U uniform on [0, 1), a continuous variable
    whose floor of the square is the count y; so P(y <= c) is
    G((sqrt(c + 1) - mean) / std). For other demand it is of sqrt(y), and
    P(y <= x) is G((sqrt(x) - mean) / std). G is the empirical distribution of
    the standardised errors of past forecasts (`residuals`, sorted) once there
    are enough of them, else the standard normal.
    """

    key: Hashable
    resource: str
    model: str
    step: float  # seconds between horizon steps
    mean: np.ndarray
    std: np.ndarray
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    zero_probability: np.ndarray | None = None  # `sparse` model only
    sizes: np.ndarray | None = None  # `sparse` model: observed non-zero sizes, sorted
    period: int | None = None  # detected period in steps, if any
    discrete: bool = True
    # Variance / mean of the open connections within a step, over the window
    # (1 for Poisson arrivals); it widens Little's-law sizing for bursts.
    dispersion: float = 1.0

    @property
    def horizon(self) -> int:
        return int(self.mean.size)

    def _z(self, levels: np.ndarray) -> np.ndarray:
        if self.residuals.size >= MIN_RESIDUALS:
            return np.quantile(self.residuals, levels, method="inverted_cdf")
        return ndtri(levels)

    def levels(self, qs: np.ndarray) -> np.ndarray:
        """Return the quantiles of demand at levels qs, shape (horizon, len(qs))."""
        qs = np.asarray(qs, dtype=float)
        if np.any((qs <= 0.0) | (qs >= 1.0)):
            raise ValueError(f"quantile levels {qs} must be in (0, 1)")
        if self.model == "sparse":
            return self._sparse_levels(qs)
        root = np.maximum(
            self.mean[:, None] + self.std[:, None] * self._z(qs)[None, :], 0.0
        )
        if self.discrete:
            return np.maximum(np.ceil(root**2 - 1.0 - 1e-9), 0.0)
        return root**2

    def _sparse_levels(self, qs: np.ndarray) -> np.ndarray:
        assert self.zero_probability is not None and self.sizes is not None
        p0 = self.zero_probability[:, None]
        inner = np.clip((qs[None, :] - p0) / np.maximum(1.0 - p0, 1e-12), 0.0, 1.0)
        index = np.clip(
            np.ceil(inner * self.sizes.size - 1e-9).astype(int) - 1, 0, None
        )
        return np.where(qs[None, :] <= p0, 0.0, self.sizes[index])

    def quantile(self, q: float) -> np.ndarray:
        """Return the q-quantile of demand at each step (whole for counts)."""
        return self.levels(np.array([q]))[:, 0]

    def cdf(self, demand: np.ndarray | float) -> np.ndarray:
        """Return P(demand <= x) for the first step, for each x given."""
        x = np.atleast_1d(np.asarray(demand, dtype=float))
        if self.model == "sparse":
            assert self.zero_probability is not None and self.sizes is not None
            below = np.searchsorted(self.sizes, x, side="right") / self.sizes.size
            p0 = float(self.zero_probability[0])
            return np.where(x < 0, 0.0, p0 + (1.0 - p0) * below)
        edge = np.floor(x) + 1.0 if self.discrete else x
        z = (np.sqrt(np.maximum(edge, 0.0)) - self.mean[0]) / self.std[0]
        z = np.where(x < 0, -np.inf, z)
        if self.residuals.size >= MIN_RESIDUALS:
            return (
                np.searchsorted(self.residuals, z, side="right") / self.residuals.size
            )
        return ndtr(z)

    def residual(self, actual: float, jitter: float) -> float:
        """Return the standardised error of the first step for an observed value."""
        value = actual + jitter if self.discrete else actual
        return (math.sqrt(max(value, 0.0)) - float(self.mean[0])) / float(self.std[0])

    def calibrated(self) -> tuple[np.ndarray, np.ndarray]:
        """Return mean and std in square-root units, corrected by past residuals.

        With enough residuals the mean moves by std x their median, and the
        std is scaled by their upper spread (84th percentile - median, 1 for
        normal errors). Sizing cares about demand above the forecast, so
        over-forecasts, such as those when a user's load stops, do not widen
        the moments that Little's law uses.
        """
        if self.residuals.size < MIN_RESIDUALS:
            return self.mean, self.std
        median, upper = np.quantile(self.residuals, [0.5, UPPER_SIGMA])
        shift, scale = float(median), float(upper - median)
        return self.mean + self.std * shift, np.maximum(self.std * scale, STD_FLOOR)

    def expected(self) -> np.ndarray:
        """Return the predictive mean of demand (not of its square root)."""
        if self.model == "sparse":
            assert self.zero_probability is not None and self.sizes is not None
            return (1.0 - self.zero_probability) * float(np.mean(self.sizes))
        mean, std = self.calibrated()
        second = np.maximum(mean, 0.0) ** 2 + std**2
        return np.maximum(second - 0.5, 0.0) if self.discrete else second

    def variance(self) -> np.ndarray:
        """Return the predictive variance of demand at each step (normal approximation)."""
        if self.model == "sparse":
            assert self.zero_probability is not None and self.sizes is not None
            active = 1.0 - self.zero_probability
            first, second = float(np.mean(self.sizes)), float(np.mean(self.sizes**2))
            return active * second - (active * first) ** 2
        mean, std = self.calibrated()
        root = np.maximum(mean, 0.0)
        # Var(S^2) for S ~ N(root, std^2); counts lose the 1/12 of U.
        variance = 4.0 * root**2 * std**2 + 2.0 * std**4
        return np.maximum(variance - 1.0 / 12.0, 0.0) if self.discrete else variance

    def slots(self, q: float) -> np.ndarray:
        """Return the smallest whole number of slots covering demand with probability q."""
        return np.maximum(np.ceil(self.quantile(q) - 1e-9), 0.0)


def little_slots(busy: Forecast, levels: np.ndarray) -> np.ndarray:
    """Return the slots that give a share q of arrivals a free slot, per step and level.

    By Little's law the mean number of open connections L is the arrival rate
    times the service time; `busy` forecasts L. For Poisson arrivals the
    number of connections an arrival finds open is Poisson with mean L (PASTA,
    and the M/G/infinity queue), so q of arrivals find a free slot when the
    pool is one more than its q-quantile. The forecast's uncertainty about L
    makes the count mixed Poisson, taken here as the negative binomial with
    the same mean and variance.

    Arrivals in bursts find more connections open than a Poisson count with
    the same mean. The forecast's `dispersion`, the measured variance / mean
    of open connections within a step, scales the Poisson part of the
    variance to cover them.
    """
    mean, std = busy.calibrated()
    return little_slots_arrays(mean, std, levels, busy.dispersion)


def little_slots_arrays(
    mean: np.ndarray,
    std: np.ndarray,
    levels: np.ndarray,
    dispersion: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Return `little_slots` for arrays of sqrt-unit means and stds (any shape),
    with the levels as a new last axis; dispersion broadcasts against mean."""
    root = np.maximum(mean, 0.0)
    spread = np.asarray(std, dtype=float)
    moment = root**2 + spread**2
    variance = 4.0 * root**2 * spread**2 + 2.0 * spread**4
    variance = variance + moment * (np.maximum(dispersion, 1.0) - 1.0)
    return little_slots_moments(moment, variance, levels)


def dispersion_index(means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Return per row the sum of within-step variances over the sum of means.

    Rows are users, columns steps. A row without open connections gives 1,
    the value for Poisson arrivals, and so does under-dispersion.
    """
    total = np.nansum(np.maximum(means, 0.0), axis=-1)
    spread = np.nansum(np.maximum(variances, 0.0), axis=-1)
    ratio = np.divide(spread, total, out=np.ones_like(total), where=total > 1e-9)
    return np.maximum(ratio, 1.0)


def little_slots_moments(
    mean: np.ndarray, variance: np.ndarray, levels: np.ndarray
) -> np.ndarray:
    """Return 1 + the level-quantiles of the mixed Poisson count whose mean
    concurrency L has the given mean and variance, levels as a new last axis."""
    rate = np.maximum(np.asarray(mean, dtype=float), 1e-12)[..., None]
    spread = np.maximum(np.asarray(variance, dtype=float), 0.0)[..., None]
    qs = np.asarray(levels, dtype=float)
    poisson_like = spread < 1e-9 * rate
    safe = np.where(poisson_like, 1.0, spread)
    found = np.where(
        poisson_like,
        stats.poisson.ppf(qs, rate),
        stats.nbinom.ppf(qs, rate**2 / safe, rate / (rate + safe)),
    )
    return 1.0 + np.nan_to_num(found, nan=0.0)


def mixed_poisson_cdf(
    mean: np.ndarray, variance: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Return P(D <= j) per row and j in sizes, for the negative binomial D with the
    row's mean and extra variance (Poisson where the variance is negligible)."""
    rate = np.maximum(np.asarray(mean, dtype=float), 1e-12)[:, None]
    spread = np.maximum(np.asarray(variance, dtype=float), 0.0)[:, None]
    poisson_like = spread < 1e-9 * rate
    safe = np.where(poisson_like, 1.0, spread)
    return np.where(
        poisson_like,
        stats.poisson.cdf(sizes[None, :], rate),
        stats.nbinom.cdf(sizes[None, :], rate**2 / safe, rate / (rate + safe)),
    )


def value_curves(
    arrivals: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    sizes: np.ndarray,
    step: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return expected hits and idle slot-seconds per row for each pool size.

    arrivals: expected arrivals in the step; mean, variance: of the mean
    number of open connections L. An arrival finds D open, mixed Poisson with
    mean L (Little's law, PASTA), so P slots give arrivals * P(D <= P - 1)
    hits, and P - E[min(D, P)] slots stand idle on average, where
    E[min(D, P)] is the sum over j < P of P(D > j).
    """
    below = mixed_poisson_cdf(mean, variance, sizes)
    zero = np.zeros((below.shape[0], 1))
    found = np.concatenate([zero, below[:, :-1]], axis=1)
    used = np.concatenate([zero, np.cumsum(1.0 - below, axis=1)[:, :-1]], axis=1)
    hits = np.asarray(arrivals, dtype=float)[:, None] * found
    return hits, (sizes[None, :] - used) * step


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
    discrete = resource in DISCRETE
    root = _root(values, discrete)
    mean, var = ewma(root)
    # With few samples the spread is unknown: widen by the prior std of 1.
    std = math.sqrt(var + 1.0 / (1.0 + values.size))
    return Forecast(
        key,
        resource,
        "ewma",
        step,
        np.full(horizon, mean),
        np.full(horizon, max(std, STD_FLOOR)),
        discrete=discrete,
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


def detect_periods(
    windows: np.ndarray, min_lag: int = 2, threshold: float = 0.5
) -> np.ndarray:
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
    size = 1 << math.ceil(math.log2(2 * n))
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


def base_kernel(span_seconds: float) -> Kernel:
    """Return the prior kernel on inputs scaled to [0, 1] from the first to the last
    sample of the window, which lie `span_seconds` apart.

    Trend: an RBF whose length scale starts at the window. Daily period: an
    ExpSineSquared with the period of one day in window units, fixed. Noise:
    a WhiteKernel.
    """
    daily = DAY / max(span_seconds, 1.0)
    return (
        ConstantKernel(0.5, (1e-3, 1e2)) * RBF(1.0, (0.05, 1e3))
        + ConstantKernel(0.1, (1e-3, 1e2))
        * ExpSineSquared(1.0, daily, (0.1, 1e2), "fixed")
        + WhiteKernel(0.5, (1e-4, 1e1))
    )


def periodic_kernel(period_steps: int, n: int) -> Kernel:
    """Return a periodic part for a period of `period_steps` samples, period fixed.

    On the scaled inputs one step is 1 / (n - 1).
    """
    return ConstantKernel(0.5, (1e-3, 1e2)) * ExpSineSquared(
        0.5, period_steps / max(n - 1, 1), (0.05, 1e1), "fixed"
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
    projections: dict[tuple[int, int, int], Projection] = field(default_factory=dict)
    fit_seconds: float = 0.0
    fits: int = 0
    max_fit_users: int = 64

    def kernel(self, n: int, period: int, standardised: np.ndarray) -> Kernel:
        """Return the kernel for windows of n samples with a period (0: none).

        One kernel without and one with a periodic part are fitted per window
        length. Other periods reuse the fitted periodic kernel with only its
        period changed, so a user whose period changes costs no new fit.
        """
        key = (n, 1 if period else 0)
        if key not in self.fitted:
            self.fitted[key] = self._fit(n, period, standardised)
        kernel = self.fitted[key]
        if period:
            kernel = clone(kernel).set_params(
                k2__k2__periodicity=period / max(n - 1, 1)
            )
        return kernel

    def _fit(self, n: int, period: int, standardised: np.ndarray) -> Kernel:
        kernel = base_kernel(self.step * max(n - 1, 1))
        if period:
            kernel = kernel + periodic_kernel(period, n)
        # Fit on the users with the most variation: flat rows carry no signal.
        order = np.argsort(-standardised.std(axis=0))[: self.max_fit_users]
        started = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = GaussianProcessRegressor(
                kernel, normalize_y=False, n_restarts_optimizer=0
            )
            model.fit(_grid(n), standardised[:, order])
        self.fit_seconds += time.process_time() - started
        self.fits += 1
        log.debug("fitted kernel n=%s period=%s: %s", n, period, model.kernel_)
        return model.kernel_

    def projection(
        self, n: int, period: int, horizon: int, standardised: np.ndarray
    ) -> Projection:
        """Return the cached projection for a window length, period and horizon."""
        key = (n, period, horizon)
        if key not in self.projections:
            self.projections[key] = projection(
                self.kernel(n, period, standardised), n, horizon
            )
        return self.projections[key]

    def invalidate(self) -> None:
        self.fitted.clear()
        self.projections.clear()


def _grid(n: int) -> np.ndarray:
    return (np.arange(n, dtype=float) / max(n - 1, 1))[:, None]


@dataclass(frozen=True)
class Projection:
    """The linear map from a standardised window to its GP predictive distribution.

    With fixed hyperparameters the posterior mean at the horizon is
    `weights @ y` for every user's window y, and the posterior variance is
    the same for all of them, so one Cholesky factorisation serves them all.
    """

    weights: np.ndarray  # (horizon, n)
    std: np.ndarray  # (horizon,)


def projection(kernel: Kernel, n: int, horizon: int) -> Projection:
    """Factorise the kernel on the window grid and project onto the horizon."""
    grid = _grid(n)
    future = ((n - 1 + np.arange(1, horizon + 1, dtype=float)) / max(n - 1, 1))[:, None]
    covariance = kernel(grid) + 1e-8 * np.eye(n)
    factor = cho_factor(covariance, lower=True)
    cross = kernel(future, grid)
    weights = cho_solve(factor, cross.T).T
    variance = kernel.diag(future) - np.einsum("ij,ij->i", cross, weights)
    return Projection(weights, np.sqrt(np.maximum(variance, 0.0)))


def _root(values: np.ndarray, discrete: bool) -> np.ndarray:
    """Return the square root the models work on; counts get +1/2, the middle of U."""
    return np.sqrt(np.maximum(values, 0.0) + (0.5 if discrete else 0.0))


def gp_predict(
    windows: np.ndarray, projected: Projection, discrete: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return predictive mean and std in sqrt units for rows of equally spaced windows.

    windows: (users, n) demand, oldest first. Each row is square-rooted and
    standardised; a row with (almost) no variation gets the scale
    CONSTANT_SCALE, so it predicts its constant with a narrow spread.
    """
    root = _root(windows, discrete)
    centre = root.mean(axis=1, keepdims=True)
    scale = np.maximum(root.std(axis=1, keepdims=True), CONSTANT_SCALE)
    mean = ((root - centre) / scale) @ projected.weights.T
    return centre + scale * mean, np.maximum(scale * projected.std[None, :], STD_FLOOR)


def standardise(windows: np.ndarray, discrete: bool = True) -> np.ndarray:
    """Return the columns the kernel is fitted on: sqrt rows, standardised, as (n, users)."""
    root = _root(windows, discrete)
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


def pit_below(forecast: Forecast, actual: float, q: float | np.ndarray) -> np.ndarray:
    """Return P(PIT <= q) of one observation, for step 0 of a forecast, per level q.

    For a count the probability integral transform is uniform on
    [F(y - 1), F(y)] (the non-randomised PIT of Czado, Gneiting and Held,
    Biometrics 2009). Its mean over many observations equals q when the
    forecasts are calibrated, so it measures coverage at level q without the
    bias of the atoms of a count. For continuous demand it is 1 when
    F(y) <= q, else 0.
    """
    levels = np.atleast_1d(np.asarray(q, dtype=float))
    if not forecast.discrete:
        return (forecast.cdf(actual)[0] <= levels).astype(float)
    lower, upper = forecast.cdf(np.array([actual - 1.0, actual]))
    lower = lower if actual >= 1 else 0.0
    if upper - lower < 1e-12:
        return (levels >= upper).astype(float)
    return np.clip((levels - lower) / (upper - lower), 0.0, 1.0)


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

    def __init__(
        self,
        settings: PredictorSettings,
        step: float,
        resource: str = "open_connections",
    ):
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
        self.rng = np.random.default_rng(0)  # the U of count residuals

    # -- forecasting ------------------------------------------------------

    def forecast_windows(
        self,
        keys: Sequence[Hashable],
        windows: np.ndarray,
        times: np.ndarray | None = None,
    ) -> list[Forecast]:
        """Return one forecast per row of `windows` (users, n), oldest sample first.

        `times` labels the columns (any unit), shared (n,) or per row
        (users, n). Anomalous samples recorded by `observe` under the same
        labels are replaced by what was forecast.
        """
        started = time.process_time()
        windows = np.asarray(windows, dtype=float)[:, -self.settings.window :]
        if times is not None:
            labels = np.asarray(times)[..., -windows.shape[1] :]
            windows = self._clean(keys, windows, labels)
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
            return [
                _ewma_forecast(k, self.resource, w, depth, self.step)
                for k, w in zip(keys, windows)
            ]
        root = np.sqrt(np.maximum(windows, 0.0))
        periods = detect_periods(root, threshold=self.settings.period_threshold)
        active = (windows > 0).sum(axis=1)
        sparse = (active < self.settings.min_active) & (periods == 0)
        out: list[Forecast | None] = [None] * len(keys)
        for row in np.flatnonzero(sparse):
            out[row] = _sparse_forecast(
                keys[row], self.resource, windows[row], depth, self.step
            )
        for period in np.unique(periods[~sparse]):
            rows = np.flatnonzero(~sparse & (periods == period))
            discrete = self.resource in DISCRETE
            fit_rows = standardise(windows[rows], discrete)
            projected = self.kernels.projection(n, int(period), depth, fit_rows)
            mean, std = gp_predict(windows[rows], projected, discrete)
            for i, row in enumerate(rows):
                out[row] = Forecast(
                    keys[row],
                    self.resource,
                    "gp",
                    self.step,
                    mean[i],
                    std[i],
                    period=int(period) or None,
                    discrete=discrete,
                )
        return [f for f in out if f is not None]

    def _finish(self, forecast: Forecast, horizon: int) -> Forecast:
        score = self.scores.get(forecast.key)
        residuals = np.empty(0)
        if forecast.model != "sparse":
            if (
                score is not None
                and len(score.residuals) >= self.settings.min_user_residuals
            ):
                residuals = np.sort(np.fromiter(score.residuals, float))
            elif len(self.pooled.get(forecast.model, ())) >= MIN_RESIDUALS:
                residuals = np.sort(np.fromiter(self.pooled[forecast.model], float))
        return Forecast(
            forecast.key,
            forecast.resource,
            forecast.model,
            forecast.step,
            forecast.mean[:horizon],
            np.broadcast_to(forecast.std, forecast.mean.shape)[:horizon].copy(),
            residuals,
            None
            if forecast.zero_probability is None
            else forecast.zero_probability[:horizon],
            forecast.sizes,
            forecast.period,
            forecast.discrete,
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
        """Return windows with recorded anomalous samples replaced.

        times: labels of the columns, shared (n,) or per row (users, n).
        """
        out = windows
        for row, key in enumerate(keys):
            replaced = self.replaced.get(key)
            if not replaced:
                continue
            if out is windows:
                out = windows.copy()
            labels = times[row] if times.ndim == 2 else times
            for column, label in enumerate(labels.tolist()):
                if label in replaced:
                    out[row, column] = replaced[label]
        return out

    # -- feedback ---------------------------------------------------------

    def observe(
        self, forecast: Forecast, actual: float, label: float | None = None
    ) -> bool:
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
        score.pit.append(float(pit_below(forecast, actual, q)[0]))
        score.scored += 1
        if forecast.model != "sparse":
            residual = forecast.residual(actual, float(self.rng.random()))
            score.residuals.append(residual)
            self.pooled.setdefault(forecast.model, deque(maxlen=4096)).append(residual)
        self._check_drift(forecast.key, score)
        return self._check_anomaly(forecast, score, actual, label)

    def _check_anomaly(
        self, forecast: Forecast, score: UserScore, actual: float, label
    ) -> bool:
        # The square root of a Poisson count has a standard deviation of about
        # 1/2 whatever its mean (Anscombe, Biometrika 1948): that noise is part
        # of the bound, so a single connection after a quiet spell is no anomaly.
        if forecast.model == "sparse":
            assert forecast.sizes is not None
            centre, spread = math.sqrt(float(np.max(forecast.sizes))), POISSON_SQRT_STD
        else:
            centre = float(forecast.mean[0])
            spread = math.hypot(float(forecast.std[0]), POISSON_SQRT_STD)
        offset = 0.5 if forecast.discrete else 0.0
        z = (math.sqrt(max(actual, 0.0) + offset) - centre) / spread
        if z <= self.settings.anomaly_sigma:
            score.anomaly_run = 0
            return False
        score.anomalies += 1
        score.anomaly_run += 1
        self.anomaly_total += 1
        bound = (centre + self.settings.anomaly_sigma * spread) ** 2 - offset
        log.warning(
            "anomalous demand for user %s: %s %.1f above bound %.1f (z=%.1f, model %s)",
            forecast.key,
            self.resource,
            actual,
            bound,
            z,
            forecast.model,
        )
        replaced = self.replaced.setdefault(forecast.key, {})
        if score.anomaly_run >= self.settings.anomaly_persist:
            replaced.clear()  # a persisting level is real demand: train on it
        elif label is not None:
            replaced[label] = float(forecast.quantile(0.5)[0])
        return True

    def _check_drift(self, key: Hashable, score: UserScore) -> None:
        settings = self.settings
        if (
            score.scored < settings.refit_min_scored
            or score.scored % settings.refit_min_scored
        ):
            return
        coverage = score.coverage()
        if (
            coverage is None
            or abs(coverage - settings.quantile) <= settings.refit_tolerance
        ):
            return
        log.info(
            "coverage of %s is %.2f against %.2f nominal: refitting kernels",
            key,
            coverage,
            settings.quantile,
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


# --------------------------------------------------------------------------
# The daemon's entry point: history in, forecasts per user and resource out
# --------------------------------------------------------------------------

# Aggregation of the samples of one planning step into one value, per resource.
_AGGREGATE = {
    "arrivals": "sum",
    "open_connections": "max",
    "cpu": "mean",
    "memory": "max",
}


def settings_from_policy(forecast_policy) -> PredictorSettings:
    """Return PredictorSettings from a broker.policy.ForecastPolicy."""
    step = forecast_policy.plan_interval
    return PredictorSettings(
        quantile=forecast_policy.quantile,
        window=forecast_policy.window,
        horizon_min=max(1, math.ceil(forecast_policy.horizon_min / step)),
        horizon_max=max(1, math.ceil(forecast_policy.horizon_max / step)),
        anomaly_sigma=forecast_policy.anomaly_sigma,
    )


def bin_samples(
    times: np.ndarray, values: np.ndarray, step: float, how: str, now: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return (bin start times, one value per complete step) from raw samples.

    The step containing `now` is not complete and is left out. Steps without
    samples count as 0 for sums and maxima (no connection was seen) and repeat
    the previous value for means; NaN samples (no data from the kernel) are
    skipped.
    """
    keep = np.isfinite(values) & (times < math.floor(now / step) * step)
    times, values = times[keep], values[keep]
    if times.size == 0:
        return np.empty(0), np.empty(0)
    index = np.floor(times / step).astype(np.int64)
    first = int(index.min())
    count = int(index.max()) - first + 1
    slot = index - first
    out: np.ndarray
    if how == "sum":
        out = np.bincount(slot, weights=values, minlength=count)
    elif how == "max":
        out = np.zeros(count)
        np.maximum.at(out, slot, values)
    else:
        sums = np.bincount(slot, weights=values, minlength=count)
        seen = np.bincount(slot, minlength=count)
        out = np.where(seen > 0, sums / np.maximum(seen, 1), np.nan)
        for i in range(1, count):
            if np.isnan(out[i]):
                out[i] = out[i - 1]
    return (first + np.arange(count)) * step, out


def step_dispersion(
    times: np.ndarray, values: np.ndarray, step: float, now: float, window: int
) -> float:
    """Return the dispersion index of raw samples within their steps, over the
    last `window` complete steps (1 when there are none)."""
    keep = np.isfinite(values) & (times < math.floor(now / step) * step)
    times, values = times[keep], values[keep]
    if times.size == 0:
        return 1.0
    index = np.floor(times / step).astype(np.int64)
    index = index - index.min()
    count = int(index.max()) + 1
    seen = np.maximum(np.bincount(index, minlength=count), 1)
    mean = np.bincount(index, weights=values, minlength=count) / seen
    square = np.bincount(index, weights=values**2, minlength=count) / seen
    variance = np.maximum(square - mean**2, 0.0)
    return float(dispersion_index(mean[-window:], variance[-window:]))


class Forecaster:
    """One Predictor per resource, fed from a DemandHistory.

    `forecast_users` is the call the daemon runs in an executor each planning
    tick. It first scores the previous tick's forecasts against the steps
    completed since, then forecasts the next horizon for every user.
    """

    def __init__(
        self,
        forecast_policy,
        resources: tuple[str, ...] = ("open_connections", "arrivals"),
    ):
        self.policy = forecast_policy
        self.step = forecast_policy.plan_interval
        settings = settings_from_policy(forecast_policy)
        self.predictors = {r: Predictor(settings, self.step, r) for r in resources}
        self.last: dict[tuple[Hashable, str], tuple[float, Forecast]] = {}

    def forecast(self, uid: Hashable, history, now: float) -> dict[str, Forecast]:
        """Return one user's forecasts per resource (empty without history).

        Prefer `forecast_users` for many users: it batches their algebra.
        """
        return self.forecast_users(history, [uid], now).get(uid, {})

    def forecast_users(
        self, history, uids: Iterable[Hashable], now: float
    ) -> dict[Hashable, dict[str, Forecast]]:
        """Score the last forecasts, then return forecasts per user and resource."""
        out: dict[Hashable, dict[str, Forecast]] = {}
        for resource, predictor in self.predictors.items():
            groups: dict[int, list[tuple[Hashable, np.ndarray, np.ndarray]]] = {}
            for uid in uids:
                times, values = history.series(uid, resource)
                starts, binned = bin_samples(
                    times, values, self.step, _AGGREGATE.get(resource, "mean"), now
                )
                binned = binned[-predictor.settings.window :]
                starts = starts[-predictor.settings.window :]
                self._score(uid, resource, starts, binned)
                groups.setdefault(binned.size, []).append((uid, starts, binned))
            for size, members in groups.items():
                if size == 0:
                    continue
                keys = [m[0] for m in members]
                windows = np.stack([m[2] for m in members])
                forecasts = predictor.forecast_windows(
                    keys, windows, np.stack([m[1] for m in members])
                )
                for (uid, starts, _), forecast in zip(members, forecasts):
                    forecast = replace(
                        forecast, dispersion=self._dispersion(history, uid, now)
                    )
                    out.setdefault(uid, {})[resource] = forecast
                    self.last[(uid, resource)] = (
                        float(starts[-1]) + self.step,
                        forecast,
                    )
        return out

    def _dispersion(self, history, uid: Hashable, now: float) -> float:
        """Return the dispersion of uid's open connections sampled within steps."""
        times, values = history.series(uid, "open_connections")
        window = next(iter(self.predictors.values())).settings.window
        return step_dispersion(times, values, self.step, now, window)

    def _score(self, uid, resource, starts: np.ndarray, binned: np.ndarray) -> None:
        """Score the last forecast of uid against the step it forecast, once."""
        previous = self.last.pop((uid, resource), None)
        if previous is None:
            return
        target, forecast = previous
        match = np.flatnonzero(np.isclose(starts, target))
        if match.size:
            self.predictors[resource].observe(
                forecast, float(binned[match[0]]), label=target
            )

    def anomalies(self) -> set[Hashable]:
        """Return the users whose last observed demand was anomalous."""
        flagged: set[Hashable] = set()
        for predictor in self.predictors.values():
            flagged.update(k for k, s in predictor.scores.items() if s.anomaly_run)
        return flagged

    def status(self) -> dict[str, dict[str, dict[str, object]]]:
        """Return scores per resource and user, for `broker status` and metrics."""
        return {resource: p.status() for resource, p in self.predictors.items()}
