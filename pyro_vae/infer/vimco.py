r"""``vimco``: the multi-sample bound with leave-one-out control variates for discrete guide
sites that are sampled, not summed (Mnih and Rezende 2016), see :class:`VIMCO`."""

from __future__ import annotations

import math

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import (
    Objective,
    global_term,
    grouped,
    importance_weighted_bound,
    log_weights,
)
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.util.errors import ConfigError


class VIMCO(ELBOEstimator):
    r"""The importance-weighted bound :math:`\hat L = \log \frac1K \sum_k w_k` with a gradient
    for guide sites that have no reparameterization (discrete ones):

    .. math::

        \nabla \hat L = \sum_k \tilde w_k \nabla \log w_k
        + \sum_k \bigl(\hat L - \hat L_{-k}\bigr)\, \nabla \log q(h_k \mid x), \qquad
        \hat L_{-k} = \log \frac1K \Bigl(\sum_{j \ne k} w_j
        + \exp \tfrac{1}{K-1} \textstyle\sum_{j \ne k} \log w_j\Bigr),

    where h_k are the discrete draws of particle k. The first sum is the reparameterized
    gradient (through continuous latents, and through log q(h_k) inside log w_k); the second is
    the score-function term, whose learning signal :math:`\hat L - \hat L_{-k}` compares the
    bound with the bound in which w_k is replaced by the geometric mean of the other weights:
    a baseline for particle k that does not depend on h_k, so the gradient stays unbiased and
    its variance falls far below the plain score function's (:math:`\hat L\,\nabla \log q`).
    Needs K = ``importance_samples`` ≥ 2. Continuous guide sites must be reparameterizable;
    with no discrete site this is :class:`ImportanceWeightedELBO`. Discrete sites outside the
    data plate (global) are refused.
    """

    name = "vimco"
    parallel_enumeration = False
    scores_discrete = True
    min_importance_samples = 2

    def __init__(
        self,
        num_particles: int = 1,
        importance_samples: int = 2,
        beta: float = 1.0,
        max_plate_nesting: int | None = None,
        data_plate: str | None = None,
    ):
        # the base class's arguments, with the least K it accepts as the default
        super().__init__(num_particles, importance_samples, beta, max_plate_nesting, data_plate)

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        k = self.importance_samples
        log_w = log_weights(particles, self.beta, k)  # [P, K, N]
        bound = importance_weighted_bound(log_w, dim=1)  # [P, N]
        global_ = global_term(particles, self.beta, k)
        discrete = [site for site in particles.guide_latents if not site["fn"].has_rsample]
        if not gradient or not discrete:
            return Objective(bound, global_)
        if any(not particles.is_local(site) for site in discrete):
            raise ConfigError(
                f"vimco: the discrete guide sites "
                f"{[s['name'] for s in discrete if not particles.is_local(s)]} "
                "lie outside the data plate; only local ones get a baseline"
            )
        log_q = grouped(particles.site_total(discrete), k)  # [P, K, N]
        signal = bound.detach().unsqueeze(1) - self._leave_one_out(log_w.detach())
        score = (signal * log_q).sum(1)
        return Objective(bound + score - score.detach(), global_)

    @staticmethod
    def _leave_one_out(log_w: torch.Tensor) -> torch.Tensor:
        """:math:`\\hat L_{-k}` for each k, ``[P, K, N]`` from log-weights ``[P, K, N]``."""
        num = log_w.shape[1]
        geometric = (log_w.sum(1, keepdim=True) - log_w) / (num - 1)  # [P, K, N]
        others = log_w.unsqueeze(1).expand(-1, num, -1, -1)  # [P, k, j, N]
        diagonal = torch.eye(num, dtype=torch.bool, device=log_w.device)[None, :, :, None]
        replaced = torch.where(diagonal, geometric.unsqueeze(2), others)
        return torch.logsumexp(replaced, 2) - math.log(num)
