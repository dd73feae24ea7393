"""``meanfield``: the ELBO with each latent site's KL in closed form where torch registers one
(Pyro's ``TraceMeanField_ELBO``), see :class:`MeanFieldELBO`."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributions import kl_divergence

from ..traces import site_log_prob
from .elbo import ELBOEstimator, _weighted
from .particles import _masked, _Particles, _sum


def _closed_form_kl(q: Any, p: Any) -> torch.Tensor | None:
    """KL(q ‖ p) from torch's registry, or ``None`` where it has no closed form (torch's
    ``kl_divergence`` signals that with NotImplementedError, as Pyro's TraceMeanField_ELBO
    expects)."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


class MeanFieldELBO(ELBOEstimator):
    r"""The ELBO with the KL of each latent site in closed form where one is registered
    (Pyro's ``TraceMeanField_ELBO``), the Monte Carlo term log q − log p for the others:

    .. math::

        \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \bigl[\log p(x|z_p)
        - \beta\, \mathrm{KL}(q(z|x) \,\|\, p(z))\bigr],

    the KL over the guided latents only (an unguided latent, drawn from its prior, has none).

    For a diagonal Gaussian guide and a N(0, I) prior the KL is
    ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1). As in Pyro, each site's KL is computed between the
    guide's and the model's distribution of that site at the draws of earlier sites, which
    estimates the ELBO when every guide site's model parents come before it in the guide
    (e.g. identical dependency structures). A site that the model samples after a guide latent
    which the guide samples after it (the two-layer VAE's z1: z2 → z1 in the model, z1 → z2 in
    the guide) gets the Monte Carlo term instead: its model distribution depends on a later
    guide draw, so the closed-form KL at that draw would not estimate the ELBO.
    """

    name = "meanfield"
    importance_hint = "use --elbo iwae for importance samples inside it"

    def _rate(self, particles: _Particles) -> torch.Tensor:
        """KL(q ‖ p(z_g)) of the guided latents (analytic where available) per draw and
        datapoint, ``[P·K, N]``."""
        terms = [particles.reduce(kl, name) for name, kl in self._kls(particles, local=True)]
        return _sum(terms) if terms else particles.site_total([])

    def _kls(self, particles: _Particles, local: bool) -> list[tuple[str, torch.Tensor]]:
        """(name, KL per draw) of the local (or global) guided latents, in closed form where
        one is registered and the draws allow it, else log q − log p."""
        model_sites = particles.model_trace.nodes
        guided = [site["name"] for site in particles.guide_latents]
        model_order = [name for name in model_sites if name in guided]
        terms = []
        for position, site in enumerate(particles.guide_latents):
            if particles.is_local(site) != local:
                continue
            prior = model_sites[site["name"]]
            earlier_in_model = model_order[:model_order.index(site["name"])]
            closed = None
            if not set(guided[position + 1:]).intersection(earlier_in_model):
                closed = _closed_form_kl(site["fn"], prior["fn"])
            kl = (_masked(closed, site) if closed is not None
                  else site_log_prob(site) - site_log_prob(prior))
            terms.append((site["name"], kl))
        return terms

    def _global_term(self, particles: _Particles, guide: Callable, args: tuple, kwargs: dict,
                     score_free: bool) -> torch.Tensor | None:
        """−β KL(q(θ) ‖ p(θ)) of the global latents per particle, ``[P]``."""
        if not particles.global_latents:
            return None
        kls = self._kls(particles, local=False)
        sites = [particles.guide_trace.nodes[name] for name, _ in kls]
        kl = particles.global_total(sites, [value for _, value in kls])
        return -_weighted(self.beta, kl).reshape(self.num_particles, -1).mean(1)

    def _bound(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> torch.Tensor:
        return particles.log_lik - _weighted(self.beta, self._rate(particles))
