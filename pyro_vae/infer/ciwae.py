r"""``ciwae``: the ELBO and the IWAE bound of the same K draws, combined (Rainforth, Kosiorek,
Le, Maddison, Igl, Wood and Teh 2018), see :class:`CombinedImportanceWeightedELBO`."""

from __future__ import annotations

import numbers
from typing import Any

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import Objective, global_term, importance_weighted_bound, log_weights
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.util.errors import ConfigError


def check_elbo_weight(elbo_weight: object) -> float:
    """``elbo_weight`` (λ) as a float in [0, 1]; refused in one line otherwise."""
    if (
        isinstance(elbo_weight, bool)
        or not isinstance(elbo_weight, numbers.Real)
        or not 0 <= elbo_weight <= 1
    ):
        raise ConfigError(
            f"ciwae's elbo_weight must be a number in [0, 1], got {elbo_weight!r} (its "
            "option: elbo_weight, the weight λ of the ELBO)"
        )
    return float(elbo_weight)


class CombinedImportanceWeightedELBO(ELBOEstimator):
    r"""The combination of the ELBO and the IWAE bound on the same K draws per datapoint
    (CIWAE; Rainforth, Kosiorek, Le, Maddison, Igl, Wood and Teh 2018):

    .. math::

        \mathcal C_\lambda = \mathbb E\Bigl[\lambda\,\frac1K \sum_{k=1}^K \log w_k
        + (1-\lambda) \log \frac1K \sum_{k=1}^K w_k\Bigr], \qquad
        \log w_k = \log p(x|z_k) + \beta(\log p(z_k) - \log q(z_k|x)),
        \quad z_{1:K} \sim q(z|x),

    λ ∈ [0, 1] the weight of the ELBO (``elbo_weight``, default 0.5; not the rate weight β):
    λ = 1 is the ELBO of K draws averaged outside the log, λ = 0 the IWAE bound
    (:class:`ImportanceWeightedELBO`). It is a lower bound of log p(x) at β = 1 for every λ,
    between the two. Rainforth et al. show that the IWAE bound's guide gradient loses its
    signal-to-noise ratio as K grows while the model's gains; the ELBO's part keeps the guide's
    signal, the IWAE part the tighter bound for the model. The gradient is the
    reparameterization gradient of the combination,
    Σ_k [λ/K + (1 − λ) w̃_k] ∇ log w_k with w̃_k = w_k / Σ_j w_j. K = 1 is the ELBO.

    Guide sites c marked for enumeration are summed inside each weight (w_k = Σ_c w_kc, in
    parallel, as ``iwae`` does), in both terms; the global latents' term
    β [log p(θ) − log q(θ)] is averaged over the K draws of each particle.

    :param elbo_weight: λ, the weight of the ELBO, in [0, 1].
    """

    name = "ciwae"
    sums_enumerated = True

    def __init__(self, *args: Any, elbo_weight: float = 0.5, **kwargs: Any):
        # the base class's arguments (P, K, β, ...), then this estimator's own options
        super().__init__(*args, **kwargs)
        self.elbo_weight = check_elbo_weight(elbo_weight)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, elbo_weight={self.elbo_weight})"

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        # the gradient is the combination's own: surrogate and value are one tensor
        beta, k, weight = self.beta, self.importance_samples, self.elbo_weight
        draws = log_weights(particles, beta, k)  # [P, K, N]
        if k == 1:
            combined = draws.squeeze(1)
        else:
            combined = weight * draws.mean(1) + (1 - weight) * importance_weighted_bound(draws, 1)
        return Objective(combined, global_term(particles, beta, k))
