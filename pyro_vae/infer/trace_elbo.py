"""``trace``: the reparameterized Monte Carlo ELBO (Pyro's ``Trace_ELBO`` on a reparameterized
guide), with score-function terms for sampled discrete sites, see :class:`TraceELBO`."""

from __future__ import annotations

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import Objective, beta_log_weight, global_term
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.util.errors import ConfigError

#: Decay of the running baseline of the single-particle score-function term.
BASELINE_DECAY = 0.9


class TraceELBO(ELBOEstimator):
    r"""The reparameterized Monte Carlo ELBO:

    .. math::

        \mathcal L_\beta = \mathbb E_{q}\bigl[\log p(x|z) + \beta(\log p(z) - \log q(z|x))\bigr],
        \qquad \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \log w_\beta(z_p).

    Its gradient is the full reparameterization gradient (path and score terms). At β = 1,
    with no model latent left out of the guide, this is the quantity of Pyro's ``Trace_ELBO``
    on a reparameterized guide (the tests compare values and gradients on the same draws).

    Discrete guide sites that are sampled (not marked for enumeration) get the score-function
    term :math:`(\log w_p - b_p)\,\nabla \log q(h_p \mid x)` with a baseline b_p that does not
    depend on h_p, so the gradient stays unbiased: with P ≥ 2 particles the mean log-weight of
    the other particles (per datapoint), with one particle a running mean of earlier batches'
    mean log-weight (decay :data:`BASELINE_DECAY`; 0 on the first), as in Mnih and Gregor's
    NVIL without its learned part. A compiled step keeps the baseline it was captured with.
    For several importance samples use ``vimco``.

    Guide sites c marked for enumeration are summed exactly, as ``TraceEnum_ELBO`` sums them:
    the bound is Σ_c q(c | x)[log w_β(z_c, c) − log q(c | x)] with z_c ~ q(z | x, c) drawn
    once per value (:meth:`~pyro_vae.core.particles.Particles.expected_log_weights`), and its
    gradient reaches q(c | x) through the weights. ``iwae`` (at K = 1 too) takes the log of
    the sum over c instead, a tighter bound in which q(c | x) does not appear.
    """

    name = "trace"
    sums_enumerated = True
    scores_discrete = True
    importance_hint = "use iwae (or dreg) for importance samples inside it"

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        if particles.guide_enumerated:  # TraceEnum_ELBO's expectation over c, [P, N]
            log_w = particles.expected_log_weights(self.beta).reshape(self.num_particles, -1)
        else:
            log_w = beta_log_weight(
                particles.log_lik, particles.log_prior, particles.log_q, self.beta
            )
        global_ = global_term(particles, self.beta, 1)
        discrete = [
            site
            for site in particles.guide_latents
            if not site["fn"].has_rsample and site["name"] not in particles.guide_enumerated
        ]
        if not gradient or not discrete:
            return Objective(log_w, global_)
        if any(not particles.is_local(site) for site in discrete):
            raise ConfigError(
                "trace: discrete guide sites outside the data plate get no "
                "baseline; sum them out (enumeration) or keep them local"
            )
        log_q = particles.site_total(discrete).reshape(log_w.shape)  # [P, N]
        signal = log_w.detach()
        if signal.shape[0] > 1:  # leave-one-out over the particles
            baseline = (signal.sum(0, keepdim=True) - signal) / (signal.shape[0] - 1)
        else:  # from earlier batches only: never from this draw
            previous = self.__dict__.get("_baseline")
            current = signal.mean().item()
            baseline = torch.full_like(signal, 0.0 if previous is None else previous)
            self._baseline = (
                current
                if previous is None
                else BASELINE_DECAY * previous + (1 - BASELINE_DECAY) * current
            )
        score = (signal - baseline) * log_q
        return Objective(log_w + score - score.detach(), global_)
