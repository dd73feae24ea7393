r"""``tvo``: the thermodynamic variational objective (Masrani, Le and Wood 2019), a left Riemann
sum of the thermodynamic integral of log p(x), see :class:`ThermodynamicVariationalObjective`."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import Objective, global_term, log_weights
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.util.errors import ConfigError

OPTIONS = "its options: partitions, first_point"


def integration_points(partitions: object, first_point: object) -> tuple[float, ...]:
    """The S + 1 points 0 = λ_0 < λ_1 < … < λ_S = 1 of ``partitions`` S intervals, λ_1 =
    ``first_point`` and λ_1 … λ_S evenly spaced in log (Masrani et al.'s log-uniform
    schedule); S = 1 is (0, 1), whatever ``first_point``. Refused in one line otherwise."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ConfigError(
            f"tvo's partitions must be a whole number >= 1, got {partitions!r} ({OPTIONS})"
        )
    if (
        isinstance(first_point, bool)
        or not isinstance(first_point, numbers.Real)
        or not 0 < first_point < 1
    ):
        raise ConfigError(
            f"tvo's first_point must be a number in (0, 1), got {first_point!r} ({OPTIONS})"
        )
    if partitions == 1:
        return (0.0, 1.0)
    log_first = math.log(first_point)
    inner = [
        math.exp(log_first * (partitions - j) / (partitions - 1)) for j in range(1, partitions)
    ]
    return (0.0, *inner, 1.0)


def tvo_bound(log_weights: torch.Tensor, points: tuple[float, ...]) -> torch.Tensor:
    r"""The left Riemann sum :math:`\sum_{j<S} (\lambda_{j+1} - \lambda_j)\,
    \hat E_{\lambda_j}[\log w]` of the K log-weights along dim 1 of ``log_weights``
    (``[P, K, N]`` -> ``[P, N]``), each expectation under π_λ ∝ q w^λ estimated by
    self-normalized importance sampling from the K draws of q:
    :math:`\hat E_\lambda[\log w] = \sum_k \operatorname{softmax}_k(\lambda \log w)\,\log w_k`."""
    if log_weights.shape[1] == 1:
        return log_weights.squeeze(1)
    starts = log_weights.new_tensor(points[:-1]).reshape(-1, 1, 1, 1)  # [S, 1, 1, 1]
    widths = log_weights.new_tensor(points).diff().reshape(-1, 1, 1)  # [S, 1, 1]
    normalized = torch.softmax(starts * log_weights, dim=2)  # [S, P, K, N]
    expectations = (normalized * log_weights).sum(2)  # [S, P, N]
    return (widths * expectations).sum(0)


class ThermodynamicVariationalObjective(ELBOEstimator):
    r"""The thermodynamic variational objective (TVO; Masrani, Le and Wood 2019) of K draws
    per datapoint. Along the geometric path π_λ(z) ∝ q(z|x)^{1−λ} p(x, z)^λ = q(z|x) w(z)^λ
    from the guide (λ = 0) to the posterior (λ = 1), the thermodynamic identity is
    log p(x) = ∫₀¹ E_{π_λ}[log w] dλ; the integrand rises with λ, so its left Riemann sum over
    0 = λ_0 < … < λ_S = 1 is a lower bound:

    .. math::

        \mathrm{TVO}_S = \sum_{j=0}^{S-1} (\lambda_{j+1} - \lambda_j)\,
        \mathbb E_{\pi_{\lambda_j}}[\log w] \le \log p(x), \qquad
        \log w = \log p(x|z) + \beta(\log p(z) - \log q(z|x)).

    S = 1 is the ELBO; finer partitions are tighter. Each expectation is estimated by
    self-normalized importance sampling from the same K draws z_{1:K} ~ q(z|x),
    Σ_k softmax_k(λ_j log w) log w_k (:func:`tvo_bound`): consistent as K grows, biased at a
    finite K, and on every set of draws at least the mean log-weight (the ELBO's estimate), which
    is the λ_0 = 0 term. The points are log-uniform from λ_1 = ``first_point`` to 1
    (:func:`integration_points`), Masrani et al.'s schedule.

    The gradient is that of the estimate itself through the reparameterized draws, the
    self-normalized weights' derivatives included (for a guide with a reparameterized
    sampler, as ``iwae``'s; Masrani et al. derive a covariance, score-function form for guides
    without one, which this estimator does not need). Guide sites marked for enumeration are
    summed inside each weight (w_k = Σ_c w_kc, as ``iwae`` does); the global latents' term
    β [log p(θ) − log q(θ)] is averaged over the K draws of each particle.

    :param partitions: S, the number of intervals (default 5).
    :param first_point: λ_1, the first point after 0, in (0, 1) (default 0.1).
    """

    name = "tvo"
    sums_enumerated = True

    def __init__(
        self, *args: Any, partitions: int = 5, first_point: float = 0.1, **kwargs: Any
    ) -> None:
        # the base class's arguments (P, K, β, ...), then this estimator's own options
        super().__init__(*args, **kwargs)
        self.points = integration_points(partitions, first_point)
        self.partitions, self.first_point = partitions, float(first_point)

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, partitions={self.partitions}, "
            f"first_point={self.first_point})"
        )

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        # the gradient is the estimate's own: surrogate and value are one tensor
        beta, k = self.beta, self.importance_samples
        bound = tvo_bound(log_weights(particles, beta, k), self.points)
        return Objective(bound, global_term(particles, beta, k))
