r"""``renyi``: the variational Rényi bound of K draws (Li and Turner 2016; the VR-IWAE bound of
Daudel, Benton, Shi and Doucet 2023), see :class:`VariationalRenyiBound`."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import Objective, global_term, importance_weighted_bound, log_weights
from pyro_vae.infer.dreg import surrogate_parts
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.util.errors import ConfigError

#: the gradients ``renyi`` computes: of the bound itself, or doubly reparameterized
GRADIENTS = ("reparameterized", "dreg")
OPTIONS = "its options: alpha, gradient"


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float: any real number, or minus infinity (``float("-inf")`` or the
    string ``"-inf"``, which JSON can hold); refused in one line otherwise."""
    if alpha == "-inf":
        return -math.inf
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or math.isnan(alpha)
        or alpha == math.inf
    ):
        raise ConfigError(
            f"renyi's alpha must be a real number or '-inf', got {alpha!r} ({OPTIONS})"
        )
    return float(alpha)


def renyi_bound(log_weights: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""The VR bound of the K log-weights along dim 1 of ``log_weights`` (``[P, K, N]`` ->
    ``[P, N]``): :math:`\frac1{1-\alpha} \log \frac1K \sum_k w_k^{1-\alpha}`, the mean
    log-weight at α = 1, the largest at α = −∞, :func:`importance_weighted_bound` at α = 0.

    Written as :math:`s^* + \operatorname{log1p}(\frac1K \sum_k \operatorname{expm1}(s_k - s^*))`
    over :math:`s = (1-\alpha)\log w` with :math:`s^* = \max_k s_k`, divided by 1 − α, so that
    no term overflows and the value keeps its precision as α approaches 1."""
    k = log_weights.shape[1]
    if k == 1:
        return log_weights.squeeze(1)
    if alpha == 0:
        return importance_weighted_bound(log_weights, dim=1)
    if alpha == 1:
        return log_weights.mean(1)
    if alpha == -math.inf:
        return log_weights.amax(1)
    power = 1 - alpha
    scaled = power * log_weights
    shift = scaled.detach().amax(1, keepdim=True)
    mean = torch.expm1(scaled - shift).mean(1)
    return (shift.squeeze(1) + torch.log1p(mean)) / power


class VariationalRenyiBound(ELBOEstimator):
    r"""The variational Rényi bound (VR-α; Li and Turner 2016) of K draws per datapoint, the
    VR-IWAE bound of Daudel, Benton, Shi and Doucet (2023):

    .. math::

        \mathcal L_\alpha = \mathbb E\Bigl[\frac1{1-\alpha}
        \log \frac1K \sum_{k=1}^K w_k^{1-\alpha}\Bigr], \qquad
        \log w_k = \log p(x|z_k) + \beta(\log p(z_k) - \log q(z_k|x)),
        \quad z_{1:K} \sim q(z|x).

    The inner term is the log of the power mean of order 1 − α of the K weights, which falls
    as α rises: on the same draws, α = 0 gives the IWAE bound
    (:class:`ImportanceWeightedELBO`, the same numbers), α = 1 (allowed, as the limit) the
    mean log-weight (the ELBO's estimate from K draws), and α = −∞ (``alpha="-inf"``) the
    largest log-weight, max_k log w_k ("VR-max", which Li and Turner train with). For
    0 ≤ α ≤ 1 (at β = 1) its expectation lies between the ELBO and the IWAE bound, so below
    log p(x); for α < 0 it lies above the IWAE bound and need not be a lower bound of
    log p(x); for α > 1, below the ELBO. K = 1 is the ELBO for every α.

    ``gradient="reparameterized"`` (the default) is the bound's own reparameterization
    gradient, Σ_k w̃_k ∇ log w_k with w̃_k = w_k^{1−α} / Σ_j w_j^{1−α}.
    ``gradient="dreg"`` rewrites the score terms of the guide's gradient by Tucker et al.'s
    second reparameterization, as :class:`DoublyReparameterizedELBO` does for α = 0
    (Daudel et al. derive the same estimator); the draws' path derivatives get the
    coefficients

    .. math::

        c_k = \bigl(1 - \beta(1-\alpha)\bigr)\,\tilde w_k + \beta(1-\alpha)\,\tilde w_k^2,

    (α w̃_k + (1 − α) w̃_k² at β = 1), the model's parameters the weights w̃_k. Its value is the
    bound's; it replays the guide and runs the model a second time on the detached draws
    (:func:`~pyro_vae.infer.dreg.surrogate_parts`), needs a finite α (the
    maximum is not differentiable in the weights) and sums no enumerated guide sites.

    Guide sites marked for enumeration are summed inside each weight (w_k = Σ_c w_kc, in
    parallel, as ``iwae`` does) with the reparameterized gradient; the global latents' term
    β [log p(θ) − log q(θ)] is averaged over the K draws of each particle, as in every
    estimator.

    :param alpha: α, a real number or ``"-inf"`` (default 0.5).
    :param gradient: ``"reparameterized"`` or ``"dreg"``.
    """

    name = "renyi"
    sums_enumerated = True

    def __init__(
        self, *args: Any, alpha: float | str = 0.5, gradient: str = "reparameterized", **kwargs: Any
    ):
        # the base class's arguments (P, K, β, ...), then this estimator's own options
        super().__init__(*args, **kwargs)
        self.alpha = check_alpha(alpha)
        if gradient not in GRADIENTS:
            raise ConfigError(
                f"renyi's gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r} "
                f"({OPTIONS})"
            )
        if gradient == "dreg" and self.alpha == -math.inf:
            raise ConfigError(
                "renyi's gradient='dreg' needs a finite alpha: the largest weight of "
                "alpha='-inf' is not differentiable in the weights (use "
                "gradient='reparameterized')"
            )
        self.gradient = gradient
        #: the doubly reparameterized gradient replays the guide on its draws
        self.needs_deterministic_guide = gradient == "dreg"

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, alpha={self.alpha}, gradient={self.gradient!r})"

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        beta, k = self.beta, self.importance_samples
        if self.gradient == "dreg" and particles.guide_enumerated:
            raise ConfigError(
                "renyi's gradient='dreg' cannot sum out the guide sites marked for "
                "enumeration: use gradient='reparameterized' (summed inside each weight)"
            )
        if not gradient or self.gradient == "reparameterized":
            return Objective(
                renyi_bound(log_weights(particles, beta, k), self.alpha),
                global_term(particles, beta, k),
            )
        return Objective(
            self._doubly_reparameterized(particles),
            global_term(particles, beta, k, score_free=True),
        )

    def _doubly_reparameterized(self, particles: Particles) -> torch.Tensor:
        r"""The surrogate VR_α(lw(sg z)) + Σ_k sg(c_k) [lw^stl_k(z) − lw^stl_k(sg z)], ``[P, N]``:
        value the bound, gradient the one above (see
        :class:`~pyro_vae.infer.dreg.DoublyReparameterizedELBO` for the parts)."""
        beta, power = self.beta, 1 - self.alpha
        stl, stl_fixed, fixed, plain = surrogate_parts(particles, beta, self.importance_samples)
        normalized = torch.softmax(power * plain.detach(), dim=1)
        coefficient = normalized * ((1 - beta * power) + beta * power * normalized)
        return renyi_bound(fixed, self.alpha) + (coefficient * (stl - stl_fixed)).sum(1)
