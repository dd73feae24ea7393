r"""The rate of one draw of a pair, site by site: KL(q(z|x) ‖ p(z)) per particle and datapoint,
in closed form where torch registers one for the guide's and the model's distributions of the
site, log q − log p (Monte Carlo) otherwise; per latent dimension where the closed form
factorizes over a vector site; and the guide's mean E_q[z | x] of each vector site.

The closed form of a site is its KL between the guide's and the model's distribution at the
draws of the sites before it. Averaged over the particles that estimates the rate,
E_q[log q(z|x) − log p(z)], when every guide site's model parents come before it in the guide;
a site whose model distribution depends on a guide latent that the guide samples after it
(a two-layer VAE's z1, drawn after z2 in the model and before it in the guide) gets the
Monte Carlo term instead. Auxiliary guide sites, with no twin in the model, count with their
log q, as in the ELBO; a model latent that the guide does not sample is drawn from its prior
and enters no rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.distributions import Delta
from pyro.infer.util import is_validation_enabled
from torch.distributions import Independent, kl_divergence

from pyro_vae.core.drawing import draw_particles
from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import guess_max_plate_nesting, is_auxiliary, masked
from pyro_vae.evaluate.chunks import vectorizable
from pyro_vae.util import budget
from pyro_vae.util.rng import forked_rng

CLOSED_FORM = "closed form"
MONTE_CARLO = "Monte Carlo"


@dataclass
class SiteRate:
    """One guide latent's rate in one draw: ``kl`` per particle and datapoint (``[k, N]``),
    how it was computed (``method``: :data:`CLOSED_FORM` or :data:`MONTE_CARLO`), its closed
    form per latent dimension (``[k, N, d]``, for a vector site whose KL factorizes; else
    ``None``) and the guide's mean E_q[z | x] (``[k, N, d]``: its distribution's mean at the
    earlier draws, or the draw itself where the distribution has no mean; ``None`` for a
    site that is not one vector per datapoint). ``local``: in the data plate."""

    name: str
    kl: torch.Tensor
    method: str
    local: bool
    per_dim: torch.Tensor | None = None
    mean: torch.Tensor | None = None


def _registered_kl(q: Any, p: Any) -> torch.Tensor | None:
    """torch's closed-form KL(q ‖ p) when the two distributions have the same event shape and
    broadcastable batch shapes and the registry knows the pair (``NotImplementedError`` is
    its "no closed form"); never for a point mass, whose log q − log p is exact and whose
    registered KL would ignore the Jacobian term an AutoGuide puts in its ``log_density``."""
    inner = q.base_dist if isinstance(q, Independent) else q
    if isinstance(inner, Delta) or q.event_shape != p.event_shape:
        return None
    try:
        torch.broadcast_shapes(q.batch_shape, p.batch_shape)
        return kl_divergence(q, p)
    except (NotImplementedError, RuntimeError):
        return None


def _factorized_kl(q: Any, p: Any) -> torch.Tensor | None:
    """KL(q ‖ p) per component of a vector event: both distributions ``Independent`` over
    one dimension of base distributions with a registered elementwise KL; ``[..., d]``."""
    if not (isinstance(q, Independent) and isinstance(p, Independent)):
        return None
    if q.reinterpreted_batch_ndims != 1 or p.reinterpreted_batch_ndims != 1:
        return None
    return _registered_kl(q.base_dist, p.base_dist)


def _is_vector(site: dict) -> bool:
    return len(site["fn"].event_shape) == 1


def per_datapoint_vectors(particles: Particles, value: torch.Tensor, name: str) -> torch.Tensor:
    """A ``[..., d]`` tensor of a vector site (batch dims: the particle plate, the data plate
    and plates of size 1) as ``[k, N, d]``."""
    columns = [particles.reduce(value[..., j], name) for j in range(value.shape[-1])]
    return torch.stack(columns, -1)


def _one_vector_per_datapoint(particles: Particles, site: dict) -> bool:
    k, n = particles.shape
    return _is_vector(site) and site["value"].shape[:-1].numel() == k * n


def _guide_mean(particles: Particles, site: dict) -> torch.Tensor | None:
    if not _one_vector_per_datapoint(particles, site):
        return None
    try:
        mean = site["fn"].mean
    except NotImplementedError:
        mean = site["value"]
    mean = mean.expand(site["value"].shape)
    return per_datapoint_vectors(particles, mean, site["name"]).double()


def site_rates(particles: Particles) -> list[SiteRate]:
    """The rate of each of the guide's latents in these draws, in the guide's order: local
    sites ``[k, N]`` (:meth:`Particles.reduce`), global ones ``[k]``
    (:meth:`Particles.global_total`); see the module docstring for the closed form."""
    guide_sites = particles.guide_latents
    model_nodes = particles.model_trace.nodes
    guided = [site["name"] for site in guide_sites]
    model_rank = {name: rank for rank, name in enumerate(n for n in model_nodes if n in guided)}
    rates = []
    for position, site in enumerate(guide_sites):
        name, local = site["name"], particles.is_local(site)
        prior = None if is_auxiliary(site) else model_nodes.get(name)
        later_first = prior is not None and any(
            model_rank[later] < model_rank[name] for later in guided[position + 1 :]
        )
        closed = None if prior is None or later_first else _registered_kl(site["fn"], prior["fn"])
        if closed is None:
            kl = particles.log_prob(site) - (0 if prior is None else particles.log_prob(prior))
        else:
            kl = masked(closed, site)
        per_dim = None
        if closed is not None and local and _one_vector_per_datapoint(particles, site):
            factors = _factorized_kl(site["fn"], prior["fn"])
            if factors is not None:
                factors = masked(factors.movedim(-1, 0), site).movedim(0, -1)
                factors = factors.expand(*site["value"].shape[:-1], factors.shape[-1])
                per_dim = per_datapoint_vectors(particles, factors, name).double()
        if local:
            total = particles.reduce(kl, name)
        else:
            total = particles.global_total([site], [kl])
        rates.append(
            SiteRate(
                name,
                total.double(),
                MONTE_CARLO if closed is None else CLOSED_FORM,
                local,
                per_dim,
                _guide_mean(particles, site) if local else None,
            )
        )
    return rates


class RateSums:
    """Per-datapoint sums over the particles of one batch (``[N]`` and ``[N, d]``): the
    distortion −log p(x|z), each local site's rate, KL per dimension and guide mean; the
    global latents' rate summed over the particles."""

    def __init__(self) -> None:
        self.distortion, self.site, self.per_dim, self.mean = None, {}, {}, {}
        self.methods: dict[str, str] = {}
        self.global_sum, self.global_names = 0.0, {}

    def add(self, particles: Any) -> None:
        def acc(store: dict, key: str, value: torch.Tensor) -> None:
            store[key] = value if key not in store else store[key] + value

        loss = -particles.log_lik.double().sum(0)
        self.distortion = loss if self.distortion is None else self.distortion + loss
        for term in site_rates(particles):
            self.methods[term.name] = term.method
            if not term.local:
                self.global_sum += term.kl.sum().item()
                self.global_names[term.name] = None
                continue
            acc(self.site, term.name, term.kl.sum(0))
            if term.per_dim is not None:
                acc(self.per_dim, term.name, term.per_dim.sum(0))
            if term.mean is not None:
                acc(self.mean, term.name, term.mean.sum(0))


@dataclass(frozen=True)
class Drawer:
    """How a pair's particles are drawn: its plate nesting and whether in one vectorized call."""

    model: Callable
    guide: Callable
    nesting: int
    data_plate: str | None
    vectorize: bool

    @classmethod
    def probed(cls, model, guide, args, kwargs, nesting, data_plate) -> Drawer:
        if nesting is None:
            nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        vectorize = vectorizable(model, guide, args, kwargs, nesting, data_plate)
        return cls(model, guide, nesting, data_plate, vectorize)

    def draw(self, args: tuple, kwargs: dict, size: int, plated: bool) -> Any:
        return draw_particles(
            self.model,
            self.guide,
            args,
            kwargs,
            size,
            self.nesting,
            plated,
            data_plate=self.data_plate,
            enumerate_guide=False,
            compact=True,
        )

    def batch_sums(self, args: tuple, kwargs: dict, num_particles: int, chunk: int) -> RateSums:
        """One batch's sums over ``num_particles`` draws in chunks of ``chunk``; with Pyro's
        validation on, a one-particle call on a fork of the random state checks the data
        first, and the chunks run unvalidated (as the evaluator does)."""
        if is_validation_enabled():
            with forked_rng():
                self.draw(args, kwargs, 1, True)
        sums = RateSums()
        with pyro.validation_enabled(False):
            for start in range(0, num_particles, chunk):
                size = min(chunk, num_particles - start)
                if self.vectorize:
                    sums.add(self.draw(args, kwargs, size, True))
                else:
                    for _ in range(size):
                        sums.add(self.draw(args, kwargs, 1, False))
                budget.piece_done()
        return sums
