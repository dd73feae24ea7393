"""``meanfield``: the ELBO with each latent site's KL in closed form where torch registers one
(Pyro's ``TraceMeanField_ELBO``), see :class:`MeanFieldELBO`."""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import Delta
from torch.distributions import kl_divergence

from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import masked, sum_terms
from pyro_vae.infer.bounds import Objective, weighted
from pyro_vae.infer.elbo import ELBOEstimator


def _fixed_log_prob(site: dict, value: torch.Tensor) -> torch.Tensor:
    """log q(c) of a guide site's distribution at the value c, broadcast to its batch shape."""
    fn = site["fn"]
    return fn.log_prob(value.to(site["value"].device).expand(*fn.batch_shape, *fn.event_shape))


def _closed_form_kl(q: Any, p: Any) -> torch.Tensor | None:
    """KL(q ‖ p) from torch's registry, or ``None`` where it has no closed form (torch's
    ``kl_divergence`` signals that with NotImplementedError, as Pyro's TraceMeanField_ELBO
    expects). A point mass (``Delta``) gets none: the registered KL ignores its
    ``log_density`` (the Jacobian term of an AutoGuide's constrained site), and log q − log p
    is exact for it anyway."""
    base = q
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, Delta):
        return None
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
    parallel_enumeration = False
    importance_hint = "use iwae for importance samples inside it"
    sums_enumerated = True

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        # reparameterized throughout: surrogate and value are one tensor
        if particles.configurations:
            return Objective(self._summed(particles))
        return Objective(self._bound(particles), self._global_kl_term(particles))

    def _summed(self, first: Particles) -> torch.Tensor:
        r"""With guide sites c marked for enumeration, the ELBO with c's expectation taken
        exactly (Kingma et al. 2014, the M2 objective for unlabelled data):

        .. math::

            \mathcal L = \sum_c q(c \mid x)\,\bigl[\mathcal L_c - \log q(c \mid x)\bigr],
            \qquad \mathcal L_c = \mathbb E_{q(z \mid x, c)}[\log p(x \mid z, c)]
            + \log p(c) - \beta\,\mathrm{KL}(q(z \mid x, c) \,\|\, p(z \mid c)),

        the closed-form KL where registered inside each L_c, and q(c | x) from the guide (it
        gets gradients: its expectation is exact). This is the ELBO (``trace``'s, with the
        KLs in closed form), below the summed importance bound of ``iwae`` (log Σ_c w_c).
        ``first`` is the draw that showed the sites (its guide trace holds q(c | x)); each
        configuration's draws are in ``first.configurations``; ``[P, N]``."""
        per_configuration = []
        for values, particles in first.configurations:
            log_q = sum(
                first.reduce(_fixed_log_prob(first.guide_trace.nodes[name], value), name)
                for name, value in values.items()
            )
            bound = self._bound(particles)
            per_configuration.append(log_q.exp() * (bound - log_q))
        return torch.stack(per_configuration).sum(0)

    def _rate(self, particles: Particles) -> torch.Tensor:
        """KL(q ‖ p(z_g)) of the guided latents (analytic where available) per draw and
        datapoint, ``[P·K, N]``."""
        terms = [particles.reduce(kl, name) for name, kl in self._kls(particles, local=True)]
        return sum_terms(terms) if terms else particles.site_total([])

    def _kls(self, particles: Particles, local: bool) -> list[tuple[str, torch.Tensor]]:
        """(name, KL per draw) of the local (or global) guided latents, in closed form where
        one is registered and the draws allow it, else log q − log p."""
        model_sites = particles.model_trace.nodes
        guided = [site["name"] for site in particles.guide_latents]
        model_order = [name for name in model_sites if name in guided]
        terms = []
        for position, site in enumerate(particles.guide_latents):
            if particles.is_local(site) != local:
                continue
            if site["name"] not in model_sites:  # auxiliary: its log q, no prior
                terms.append((site["name"], particles.log_prob(site)))
                continue
            prior = model_sites[site["name"]]
            earlier_in_model = model_order[: model_order.index(site["name"])]
            closed = None
            if not set(guided[position + 1 :]).intersection(earlier_in_model):
                closed = _closed_form_kl(site["fn"], prior["fn"])
            kl = (
                particles.scaled(masked(closed, site), site)
                if closed is not None
                else particles.log_prob(site) - particles.log_prob(prior)
            )
            terms.append((site["name"], kl))
        return terms

    def _global_kl_term(self, particles: Particles) -> torch.Tensor | None:
        """−β KL(q(θ) ‖ p(θ)) of the global latents per particle, ``[P]``."""
        if not particles.global_latents:
            return None
        kls = self._kls(particles, local=False)
        sites = [particles.guide_trace.nodes[name] for name, _ in kls]
        kl = particles.global_total(sites, [value for _, value in kls])
        return -weighted(self.beta, kl).reshape(self.num_particles, -1).mean(1)

    def _bound(self, particles: Particles) -> torch.Tensor:
        """log p(x|z) − β KL per particle and datapoint, ``[P, N]``."""
        return particles.log_lik - weighted(self.beta, self._rate(particles))
