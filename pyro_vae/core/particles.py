r"""The one trace recipe of the package: vectorized particles of a model/guide pair and their
per-draw, per-datapoint log-densities, for every estimator, the evaluator, AIS and the particle
probe.

:func:`~pyro_vae.core.drawing.draw_particles` traces the guide inside an outer particle plate
(left of the pair's plates) and replays the model on it, enumerating the sites marked for it
(:mod:`pyro_vae.core.enumeration`); :class:`Particles` reads log p(x|z), log p(z) and log q(z|x)
from the two traces, each summed to ``[M, N]`` (M draws, N datapoints: the data plate is
kept), the enumerated sites summed out by Pyro's plated contraction, and replays further runs
the same way. The estimators (:mod:`pyro_vae.infer`) read it, as does
:func:`pyro_vae.core.log_probs.vectorized_log_probs`, the evaluator's view of the same draws.

Which latents count. Every guide latent must be a latent site of the model. A model latent that
the guide does not sample ("unguided") is drawn from its prior, given the draws before it, when
the model is replayed: the proposal of one draw is q(z_g|x) p(z_u|z_g), whose second factor
cancels against the model's, so log p(z_u|·) enters no log-weight, for any β. The rate that β
weights is that of the guided latents only,

.. math::

    \log w_\beta = \log p_\theta(x \mid z_g, z_u)
    + \beta\,[\log p_\theta(z_g) - \log q_\phi(z_g \mid x)].

Unguided latents must be reparameterizable too, so that gradients follow their draws.
(Pyro's ``Trace_ELBO`` instead adds log p(z_u) to the model's log-density and warns "Found vars
in model but not guide"; the two agree whenever the guide samples every model latent.)

Scale factors (``poutine.scale``, a subsampled ``pyro.plate``) are honoured when every sample
site has the same scalar scale s (a subsampled data plate, s = N/B): the loss is s times the
batch's. Scales that differ between sites (or per-datapoint tensors) weight each site's term by
its own factor when there is one draw inside the log, as Pyro's ``Trace_ELBO`` weights them;
inside the log of an importance-weighted bound (K > 1) they raise
:class:`~pyro_vae.util.errors.ConfigError` naming the site. β is applied by the estimators (β = 0
is allowed, which ``poutine.scale`` refuses). The evaluator reads true densities and ignores
scale factors. Masks are applied everywhere. Auxiliary guide sites
(``infer={"is_auxiliary": True}``) have no twin in the model and count in log q.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.core.enumeration import (
    contract_log_weights,
    enumerated_model,
    expected_log_weights,
)
from pyro_vae.core.particle_plate import detached_trace, in_particle_plate
from pyro_vae.core.traces import (
    PARTICLE_PLATE,
    common_scale,
    latent_sites,
    observed_sites,
    reduce_to_particles,
    reduce_to_particles_and_data,
    site_log_prob,
    sum_terms,
)
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.module_state import running_statistics_kept


@dataclass
class Particles:
    """The model and guide traces of M = P·K vectorized draws, and what it takes to read
    per-draw, per-datapoint (``[M, N]``) log-densities from them or to replay further runs the
    same way. log p(x|z), log p(z) and log q(z|x) are computed on first use only (the
    ``meanfield`` estimator needs neither log q nor log p(z)).

    ``plated`` is ``False`` for a single draw run without the particle plate: its sites have
    no particle dimension, which :meth:`reduce` adds as a leading dimension of size 1.
    ``model_trace`` and ``guide_trace`` have their subsample sites pruned; the ``raw_`` traces
    keep them, so that replays draw the same subsample. ``views``: the guide's draws
    as the model was replayed on them, when they were handed to it through a ``view`` (see
    :func:`~pyro_vae.core.drawing.draw_particles`). ``model_enumerated`` and
    ``guide_enumerated`` name the sites enumerated in parallel; ``compact``: log-densities on
    compact distributions (evaluation).
    ``model``, ``guide``, ``args``, ``kwargs``: the pair and call that drew them (for
    :meth:`replay`). ``configurations``: where an estimator sums the guide's enumerated sites
    one configuration at a time, each configuration c (site name → value) with the draws of
    the pair with c fixed; this draw then only showed which sites to sum (its guide trace
    holds q(c | x)).
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    raw_model_trace: poutine.Trace
    raw_guide_trace: poutine.Trace
    num_draws: int
    max_plate_nesting: int
    data_dim: int
    num_data: int
    plated: bool
    hide_params: bool
    data_plate: str | None = ""
    views: poutine.Trace | None = None
    view: Callable[[dict], torch.Tensor] | None = None
    model_enumerated: tuple[str, ...] = ()
    guide_enumerated: tuple[str, ...] = ()
    compact: bool = False
    #: each site's log-density is weighted by its own scale factor (the estimators with one
    #: draw inside the log set it when the factors differ)
    site_scales: bool = False
    model: Callable | None = None
    guide: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    configurations: tuple[tuple[dict, Particles], ...] = ()

    @property
    def scale(self) -> float:
        """The one scale factor of every sample site (1 without ``poutine.scale`` or
        subsampling, or when each site is weighted by its own, :attr:`site_scales`);
        differing factors are refused (see the module docstring)."""
        return 1.0 if self.site_scales else self.common_scale

    @cached_property
    def common_scale(self) -> float:
        """The scale factor that every sample site of the two traces shares
        (:func:`~pyro_vae.core.traces.common_scale`), read once per draw: the checks and the
        loss both ask for it. Differing factors raise each time it is asked for."""
        return common_scale(self.model_trace, self.guide_trace)

    def log_prob(
        self, site: dict, detach: bool = False, value: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The site's masked log-density (at ``value``, if given), times its scale factor
        when each site is weighted by its own (:attr:`site_scales`)."""
        if value is not None:
            site = dict(site, value=value)
        log_prob = site_log_prob(site, detach, self.compact)
        return self.scaled(log_prob, site)

    def scaled(self, term: torch.Tensor, site: dict) -> torch.Tensor:
        """``term`` (a site's log-density or KL) times the site's scale factor when each site
        is weighted by its own, else ``term``."""
        scale = site["scale"]
        if not self.site_scales or (not isinstance(scale, torch.Tensor) and scale == 1.0):
            return term
        return term * scale

    @property
    def particle_dim(self) -> int:
        """The particle plate's dimension, left of the pair's plates."""
        return -(self.max_plate_nesting + 1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: draws and datapoints."""
        return self.num_draws, self.num_data

    def reduce(self, log_prob: torch.Tensor, name: str = "") -> torch.Tensor:
        """A site's log-density (or KL), summed to ``[M, N]``."""
        if self.max_plate_nesting == 1 and self.data_dim == -1:
            if self.plated and log_prob.shape == self.shape:
                return log_prob
            if not self.plated and log_prob.shape == self.shape[1:]:
                return log_prob.unsqueeze(0)
        if not self.plated and log_prob.dim() > self.max_plate_nesting:
            raise ConfigError(
                f"site {name!r} has batch shape {list(log_prob.shape)}, more dimensions than the "
                f"{self.max_plate_nesting} declared plate(s): put every batch dimension in a "
                "pyro.plate or move it into the event with .to_event()"
            )
        return reduce_to_particles_and_data(
            log_prob, self.max_plate_nesting + 1, self.data_dim, self.shape, name
        )

    def is_local(self, site: dict) -> bool:
        """Whether ``site`` lies in the data plate (a global latent does not; without a data
        plate every site belongs to the one datapoint, the data set)."""
        return self.data_plate is None or any(
            frame.name == self.data_plate for frame in site["cond_indep_stack"]
        )

    def site_total(self, sites: list[dict], detach: bool = False) -> torch.Tensor:
        """Σ of the local sites' log-densities, ``[M, N]`` (zeros for none); global sites are
        left to :meth:`global_total`. ``detach``: with the distributions' parameters
        detached."""
        terms = [
            self.reduce(self.log_prob(site, detach), site["name"])
            for site in sites
            if self.is_local(site)
        ]
        if not terms:  # any sample site's value gives the dtype and device
            value = next(
                site["value"]
                for site in self.model_trace.nodes.values()
                if site["type"] == "sample"
            )
            return torch.zeros(
                self.shape,
                dtype=torch.get_default_dtype() if not value.is_floating_point() else value.dtype,
                device=value.device,
            )
        return sum_terms(terms)

    def global_total(
        self, sites: list[dict], log_probs: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Σ of the global sites' log-densities (or of ``log_probs``, one per site, e.g. KLs)
        per draw, ``[M]`` (zeros for none)."""
        values = log_probs if log_probs is not None else [self.log_prob(s) for s in sites]
        terms = [
            reduce_to_particles(value, self.max_plate_nesting + 1, self.num_draws, site["name"])
            if self.plated
            else value.sum().reshape(1)
            for site, value in zip(sites, values)
            if not self.is_local(site)
        ]
        if not terms:
            return self.site_total([]).new_zeros(self.num_draws)
        return sum_terms(terms)

    @cached_property
    def global_latents(self) -> list[dict]:
        """The guide's latents outside the data plate, drawn once per draw for all datapoints."""
        return [site for site in self.guide_latents if not self.is_local(site)]

    @cached_property
    def global_log_prior(self) -> torch.Tensor:
        """log p(θ) of the guided global latents per draw, ``[M]``."""
        return self.global_total(self.guided_latents)

    @cached_property
    def global_log_q(self) -> torch.Tensor:
        """log q(θ) per draw, ``[M]``."""
        return self.global_total(self.guide_latents)

    @cached_property
    def guide_latents(self) -> list[dict]:
        """The guide's latent sample sites, in its order."""
        return latent_sites(self.guide_trace)

    @cached_property
    def guided_latents(self) -> list[dict]:
        """The model's latent sites that the guide samples, in the model's order."""
        names = {site["name"] for site in self.guide_latents}
        return [site for site in latent_sites(self.model_trace) if site["name"] in names]

    @cached_property
    def unguided_latents(self) -> list[dict]:
        """Model latents the guide does not sample (drawn from their prior on replay) and the
        model does not enumerate."""
        names = {site["name"] for site in self.guide_latents} | set(self.model_enumerated)
        return [site for site in latent_sites(self.model_trace) if site["name"] not in names]

    @cached_property
    def log_lik(self) -> torch.Tensor:
        """log p(x|z) of the observed sites (z: guided and unguided latents), with the sites
        enumerated in the model summed out: log Σ_d p(x, d | z)."""
        return self.log_lik_of(self.model_trace)

    def _targets(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The plates a contraction keeps (particles, the data plate: those that exist) and
        their sizes."""
        plates, sizes = [], []
        if self.plated:
            plates.append(PARTICLE_PLATE)
            sizes.append(self.num_draws)
        if self.data_plate is not None:
            plates.append(self.data_plate)
            sizes.append(self.num_data)
        return tuple(plates), tuple(sizes)

    def _weighted_sites(self, beta: float) -> tuple[list[str], list[str], dict | None]:
        """The local model sites (observed, guided, enumerated), the guide's local sites but
        its enumerated ones, and the weight β of the continuous latents' densities."""
        guided = {site["name"] for site in self.guided_latents}
        weighted = {name for name in guided if name not in self.guide_enumerated}
        model_sites = [
            site["name"]
            for site in observed_sites(self.model_trace) + self.guided_latents
            if self.is_local(site)
        ]
        model_sites += list(self.model_enumerated)
        guide_sites = [
            site["name"]
            for site in self.guide_latents
            if self.is_local(site) and site["name"] not in self.guide_enumerated
        ]
        weights = {name: beta for name in weighted | set(guide_sites)} if beta != 1 else None
        return model_sites, guide_sites, weights

    def summed_log_weights(self, beta: float) -> torch.Tensor:
        r"""The β-weighted log-weights with every enumerated site summed out, ``[M, N]``:
        log Σ_{c,d} exp(log p(x, c, d | z_c) + β[log p(z_c | c) − log q(z_c | x, c)]) over the
        guide's enumerated sites c (their draws z_c one per value) and the model's d; local
        sites only (global latents: :meth:`global_total`)."""
        model_sites, guide_sites, weights = self._weighted_sites(beta)
        return contract_log_weights(
            self.model_trace,
            self.guide_trace,
            model_sites,
            guide_sites,
            *self._targets(),
            weights=weights,
        ).reshape(self.shape)

    def expected_log_weights(self, beta: float) -> torch.Tensor:
        r"""The ELBO of ``TraceEnum_ELBO`` per draw and datapoint, ``[M, N]``: the exact
        expectation over the guide's enumerated sites c of the β-weighted log-weight,
        Σ_c q(c | x)[log p(x, c | z_c) + β(log p(z_c | c) − log q(z_c | x, c)) − log q(c | x)]
        (the model's enumerated sites summed inside log p, as in :meth:`summed_log_weights`;
        local sites only; :func:`~pyro_vae.core.enumeration.expected_log_weights`)."""
        model_sites, guide_sites, weights = self._weighted_sites(beta)
        return expected_log_weights(
            self.model_trace,
            self.guide_trace,
            model_sites,
            guide_sites,
            list(self.guide_enumerated),
            *self._targets(),
            weights=weights,
        ).reshape(self.shape)

    def log_lik_of(self, model_trace: poutine.Trace) -> torch.Tensor:
        """:attr:`log_lik` read from ``model_trace`` (this draw's, or a replay of it)."""
        observed = observed_sites(model_trace)
        if not self.model_enumerated:
            return self.site_total(observed)
        names = [site["name"] for site in observed if self.is_local(site)]
        targets = self._targets()
        return contract_log_weights(
            model_trace, poutine.Trace(), names + list(self.model_enumerated), [], *targets
        ).reshape(self.shape)

    @cached_property
    def log_prior(self) -> torch.Tensor:
        """log p(z_g) of the guided latents: an unguided latent's prior is its own proposal,
        so its density cancels from the weight and is left out of it."""
        return self.site_total(self.guided_latents)

    @cached_property
    def log_q(self) -> torch.Tensor:
        """log q(z|x) of the guide's local latents."""
        return self.site_total(self.guide_latents)

    def replay(self, model: bool = False, on_views: bool = False) -> poutine.Trace:
        """Trace this draw's guide (``model=False``) or model the same way, replayed on detached
        draws: the guide's, or every latent of the model's, the unguided ones included; the
        same subsample in either case. ``on_views``: the guide on its draws as the model saw
        them (:attr:`views`), not detached. Running statistics (BatchNorm) are left as the
        first run left them (:func:`running_statistics_kept`)."""
        if on_views:
            assert self.views is not None, "these draws were not handed out through a view"
            source = self.views
        else:
            source = (
                detached_trace(self.raw_model_trace, skip=self.model_enumerated)
                if model
                else detached_trace(self.raw_guide_trace)
            )
        fn = self.model if model else self.guide
        wrapped = in_particle_plate(
            fn, self.num_draws, self.particle_dim, self.plated, self.hide_params
        )
        if model and self.model_enumerated:  # enumerated again, to the same values
            wrapped = enumerated_model(wrapped, self.particle_dim - 1)
        replayed = poutine.replay(wrapped, trace=source)
        with running_statistics_kept(fn):
            return prune_subsample_sites(
                poutine.trace(replayed).get_trace(*self.args, **self.kwargs)
            )
