"""PSIS Pareto k-hat of importance weights: how far an importance-weighted estimate can be trusted
(Vehtari et al., 2024, "Pareto smoothed importance sampling", JMLR 25(72)), fitted by
:func:`arviz.psislw`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

KHAT_GOOD = 0.5
KHAT_OK = 0.7
MIN_KHAT_PARTICLES = 21
CONSTANT_WEIGHTS_ULPS = 64


def _arviz() -> Any:
    """Import ArviZ without its once-a-day FutureWarning about a coming refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS Pareto shape estimate k-hat of each datapoint's importance weights.

    :param log_weights: ``[K, N]`` log-weights, K ≥ ``MIN_KHAT_PARTICLES`` (ArviZ fits the
        ceil(min(K/5, 3√K)) largest weights and needs at least 5 of them).
    :returns: ``[N]`` float64 tensor on the CPU. Reading: k ≤ 0.5 good, 0.5 < k ≤ 0.7 ok (slow
        convergence), k > 0.7 bad (the estimate of p(x) is unreliable). Log-weights that are
        constant to working precision (the guide is the exact posterior) get k = −∞; ArviZ's own
        failures give +∞ and read as bad.
    """
    if log_weights.dim() != 2:
        raise ConfigError(f"log_weights must have shape [K, N], got {list(log_weights.shape)}")
    num_particles, num_data = log_weights.shape
    if num_particles < MIN_KHAT_PARTICLES:
        raise ConfigError(f"k-hat needs at least {MIN_KHAT_PARTICLES} particles, got "
                          f"{num_particles}; use more particles or khat=False")
    eps = torch.finfo(log_weights.dtype).eps if log_weights.is_floating_point() else 0.0
    lw = log_weights.detach().to("cpu", torch.float64)
    spread = lw.amax(0) - lw.amin(0)
    constant = spread <= CONSTANT_WEIGHTS_ULPS * eps * lw.abs().amax(0).clamp(min=1.0)
    khat = torch.full((num_data,), -math.inf, dtype=torch.float64)
    if not constant.all():
        arviz = _arviz()
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            _, k = arviz.psislw(lw[:, ~constant].T.contiguous().numpy())
        khat[~constant] = torch.as_tensor(np.asarray(k, dtype=np.float64)).reshape(-1)
    return khat


def khat_reading(khat: float) -> str:
    """``"good"`` (k ≤ 0.5), ``"ok"`` (0.5 < k ≤ 0.7) or ``"bad"`` (k > 0.7, or NaN)."""
    if khat <= KHAT_GOOD:
        return "good"
    return "ok" if khat <= KHAT_OK else "bad"
