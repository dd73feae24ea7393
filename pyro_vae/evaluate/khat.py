"""PSIS Pareto k-hat of importance weights: how far an importance-weighted estimate can be trusted
(Vehtari et al., 2024, "Pareto smoothed importance sampling", JMLR 25(72)): the same estimate
as :func:`arviz.psislw`, computed from a running top-M of the weights so that its memory does
not grow with the number of particles."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from pyro_vae.util.errors import ConfigError

KHAT_GOOD = 0.5
KHAT_OK = 0.7
MIN_KHAT_PARTICLES = 21
CONSTANT_WEIGHTS_ULPS = 64


def arviz_module() -> Any:
    """Import ArviZ without its once-a-day FutureWarning about a coming refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def tail_size(num_particles: int) -> int:
    """M = ceil(min(K/5, 3√K)): how many of the largest weights PSIS fits a Pareto tail to."""
    return math.ceil(min(num_particles / 5.0, 3.0 * math.sqrt(num_particles)))


class ParetoTail:
    """Streaming k-hat: the M + 1 largest log-weights of each datapoint, kept as particle chunks
    arrive, so memory is O(M · N) whatever K is (PSIS looks at nothing else: the tail is the M
    weights above the (M + 1)-th largest). Also keeps each datapoint's smallest log-weight, to
    recognise weights that are all equal.

    :param num_particles: K, the total number of particles that will be fed.
    """

    def __init__(self, num_particles: int):
        if num_particles < MIN_KHAT_PARTICLES:
            raise ConfigError(
                f"k-hat needs at least {MIN_KHAT_PARTICLES} particles, got "
                f"{num_particles}; use more particles or khat=False"
            )
        self.num_particles = num_particles
        self.keep = tail_size(num_particles) + 1
        self.top: torch.Tensor | None = None
        self.low: torch.Tensor | None = None
        self.seen = 0
        self.eps = 0.0  # the working precision of the weights fed (for equal weights)

    def update(self, log_weights: torch.Tensor) -> None:
        """Feed a ``[k, N]`` chunk of log-weights."""
        if log_weights.is_floating_point():
            self.eps = max(self.eps, torch.finfo(log_weights.dtype).eps)
        lw = log_weights.detach().to(torch.float64)
        self.seen += lw.shape[0]
        if self.seen > self.num_particles:
            raise ConfigError(
                f"ParetoTail fed {self.seen} particles, more than the "
                f"{self.num_particles} it was made for"
            )
        low = lw.amin(0)
        if self.top is not None:
            lw = torch.cat([self.top, lw])
            low = torch.minimum(self.low, low)
        self.low = low
        self.top = lw.topk(min(self.keep, lw.shape[0]), dim=0).values  # descending

    def khat(self) -> torch.Tensor:
        """``[N]`` float64 k-hat on the CPU (see :func:`pareto_khat`)."""
        if self.top is None or self.seen != self.num_particles:
            raise ConfigError(f"ParetoTail fed {self.seen} of its {self.num_particles} particles")
        top, low = self.top.cpu(), self.low.cpu()
        high = top[0]
        eps = self.eps
        scale = torch.maximum(high.abs(), low.abs()).clamp(min=1.0)
        constant = high - low <= CONSTANT_WEIGHTS_ULPS * eps * scale
        khat = torch.full((top.shape[1],), -math.inf, dtype=torch.float64)
        shifted = (top - high).numpy()  # ≤ 0, descending per column
        cutoff_floor = math.log(np.finfo(np.float64).tiny)
        with np.errstate(all="ignore"):
            for n in np.flatnonzero(~constant.numpy()):
                column = shifted[:, n]
                cutoff = max(column[-1], cutoff_floor)
                tail = column[column > cutoff][::-1]  # ascending
                khat[n] = (
                    math.inf
                    if tail.size <= 4
                    else _generalized_pareto_shape(np.exp(tail) - math.exp(cutoff))
                )
        return khat


def _generalized_pareto_shape(exceedances: np.ndarray) -> float:
    """Shape k of a generalized Pareto distribution fitted to ``exceedances`` (ascending, > 0)
    by Zhang & Stephens' (2009) empirical-Bayes estimate, with the weakly informative prior of
    Vehtari et al. (2024, appendix C) pulling k towards 0.5 (10 pseudo-observations)."""
    n = exceedances.size
    grid = 30 + int(math.sqrt(n))
    quartile = exceedances[int(n / 4 + 0.5) - 1]
    # candidate values of θ = −k/σ around 1/max(x), as in Zhang & Stephens' algorithm
    theta = 1.0 / exceedances[-1] + (1.0 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))) / (
        3.0 * quartile
    )
    k = np.log1p(-theta[:, None] * exceedances).mean(axis=1)
    profile = n * (np.log(-theta / k) - k - 1.0)  # profile log-likelihood of each θ
    weights = 1.0 / np.exp(profile[None, :] - profile[:, None]).sum(axis=1)
    useful = weights >= 10 * np.finfo(np.float64).eps
    weights, theta = weights[useful], theta[useful]
    theta_mean = np.sum(theta * weights / weights.sum())
    shape = np.log1p(-theta_mean * exceedances).mean()
    return float((n * shape + 10 * 0.5) / (n + 10))


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS Pareto shape estimate k-hat of each datapoint's importance weights.

    :param log_weights: ``[K, N]`` log-weights, K ≥ ``MIN_KHAT_PARTICLES`` (PSIS fits the
        ceil(min(K/5, 3√K)) largest weights and needs at least 5 of them).
    :returns: ``[N]`` float64 tensor on the CPU, equal to :func:`arviz.psislw`'s k. Reading:
        k ≤ 0.5 good, 0.5 < k ≤ 0.7 ok (slow convergence), k > 0.7 bad (the estimate of p(x) is
        unreliable). Log-weights that are constant to working precision (the guide is the exact
        posterior) get k = −∞; a tail of fewer than 5 distinct weights gets +∞ (bad).

    Chunk by chunk, with memory independent of K: :class:`ParetoTail`.
    """
    if log_weights.dim() != 2:
        raise ConfigError(f"log_weights must have shape [K, N], got {list(log_weights.shape)}")
    tail = ParetoTail(log_weights.shape[0])
    tail.update(log_weights)
    return tail.khat()


def khat_reading(khat: float) -> str:
    """``"good"`` (k ≤ 0.5), ``"ok"`` (0.5 < k ≤ 0.7) or ``"bad"`` (k > 0.7, or NaN)."""
    if khat <= KHAT_GOOD:
        return "good"
    return "ok" if khat <= KHAT_OK else "bad"
