r"""The draws behind every estimator: P·K vectorized particles of a model/guide pair, and their
per-draw, per-datapoint log-densities.

:func:`_draw_particles` traces the guide and replays the model on it; :class:`_Particles` reads
log p(x|z), log p(z) and log q(z|x) from the two traces, each summed to ``[P·K, N]`` with the
data plate kept (see :func:`pyro_vae.traces.vectorized_log_probs`), and replays further runs
the same way.

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
site of the model and guide has the same scalar scale s, the case of a subsampled data plate
(s = N/B): the loss is s times the loss of the batch. Any other scales raise
:class:`~pyro_vae.errors.ConfigError` naming the site, since a per-site weight has no meaning
inside the log of an importance-weighted bound; weight the rate with β instead (β is applied
by the estimators, so β = 0 is allowed, which ``poutine.scale`` refuses). All guide latent
sites must be reparameterizable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match

from ..enumeration import is_enumerated
from ..errors import ConfigError
from ..module_state import running_statistics_kept
from ..traces import (PARTICLE_PLATE, check_guide_latents_in_model, find_data_plate,
                      reduce_to_particles, reduce_to_particles_and_data, site_log_prob)


def _mapped(trace: poutine.Trace, view: Callable[[dict], torch.Tensor]) -> poutine.Trace:
    """The unobserved sample sites of ``trace`` (subsample sites included), each with the value
    ``view(site)``, for ``poutine.replay``."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            out.add_node(name, **dict(site, value=view(site)))
    return out


def _detached(trace: poutine.Trace) -> poutine.Trace:
    """The unobserved sample sites of ``trace`` with detached values."""
    return _mapped(trace, lambda site: site["value"].detach())


def _scale_value(site: dict, where: str) -> float:
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ConfigError(
                f"{where} site {site['name']!r} has a scale tensor of shape "
                f"{list(scale.shape)}: these estimators take one scale factor for every sample "
                "site (as a subsampled pyro.plate gives); use pyro.poutine.mask to leave "
                "datapoints out, and beta to weight the rate")
        return scale.item()
    return float(scale)


def _common_scale(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> float:
    """The scale factor that every sample site of both traces shares, or ConfigError naming
    the first site whose scale differs from the first site's."""
    first: tuple[str, str, float] | None = None
    for where, trace in (("model", model_trace), ("guide", guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            scale = _scale_value(site, where)
            if first is None:
                first = (where, site["name"], scale)
            elif scale != first[2]:
                raise ConfigError(
                    f"{where} site {site['name']!r} has scale {scale:g} but {first[0]} site "
                    f"{first[1]!r} has scale {first[2]:g}: these estimators honour a scale "
                    "factor (poutine.scale, a subsampled pyro.plate) only when every sample site "
                    "of the model and guide has the same one, since a per-site weight has no "
                    "meaning inside the log of an importance-weighted bound. To weight the rate "
                    "(KL) term, use beta (--beta, LinearWarmup) instead of poutine.scale")
    return 1.0 if first is None else first[2]


def _latent_sites(trace: poutine.Trace) -> list[dict]:
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and not site["is_observed"]]


def _observed_sites(trace: poutine.Trace) -> list[dict]:
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]]


def _masked(value: torch.Tensor, site: dict) -> torch.Tensor:
    mask = site["mask"]
    if mask is None or mask is True:
        return value
    if mask is False:
        return torch.zeros_like(value)
    return torch.where(mask, value, value.new_zeros(()))


def _sum(terms: list[torch.Tensor]) -> torch.Tensor:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _as_drawn(fn: Callable, num_particles: int, particle_dim: int, plated: bool,
              hide_params: bool) -> Callable:
    if hide_params:
        fn = poutine.block(fn, hide_types=["param"])
    if not plated:
        return fn

    def in_particle_plate(*a: Any, **k: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
            return fn(*a, **k)

    return in_particle_plate


@dataclass
class _Particles:
    """The model and guide traces of M = P·K vectorized draws, and what it takes to read
    per-draw, per-datapoint (``[M, N]``) log-densities from them or to replay further runs the
    same way. log p(x|z), log p(z) and log q(z|x) are computed on first use only (the
    ``meanfield`` estimator needs neither log q nor log p(z)).

    ``plated`` is ``False`` for a single draw run without the particle plate: its sites have
    no particle dimension, which :meth:`reduce` adds as a leading dimension of size 1.
    ``model_trace`` and ``guide_trace`` have their subsample sites pruned; the ``raw_`` traces
    keep them, so that replays draw the same subsample. ``scale`` is the one scale factor of
    every sample site (1 without ``poutine.scale`` or subsampling). ``views``: the guide's draws
    as the model was replayed on them, when they were handed to it through a ``view`` (see
    :func:`_draw_particles`).
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    raw_model_trace: poutine.Trace
    raw_guide_trace: poutine.Trace
    num_particles: int
    max_plate_nesting: int
    data_dim: int
    num_data: int
    plated: bool
    hide_params: bool
    scale: float
    data_plate: str = ""
    views: poutine.Trace | None = None
    view: Callable[[dict], torch.Tensor] | None = None

    @property
    def particle_dim(self) -> int:
        return -(self.max_plate_nesting + 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_particles, self.num_data

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
                "pyro.plate or move it into the event with .to_event()")
        return reduce_to_particles_and_data(log_prob, self.max_plate_nesting + 1, self.data_dim,
                                            self.shape, name)

    def is_local(self, site: dict) -> bool:
        """Whether ``site`` lies in the data plate (a global latent does not)."""
        return any(frame.name == self.data_plate for frame in site["cond_indep_stack"])

    def site_total(self, sites: list[dict]) -> torch.Tensor:
        """Σ of the local sites' log-densities, ``[M, N]`` (zeros for none); global sites are
        left to :meth:`global_total`."""
        terms = [self.reduce(site_log_prob(site), site["name"]) for site in sites
                 if self.is_local(site)]
        if not terms:  # any sample site's value gives the dtype and device
            value = next(site["value"] for site in self.model_trace.nodes.values()
                         if site["type"] == "sample")
            return torch.zeros(self.shape, dtype=torch.get_default_dtype()
                               if not value.is_floating_point() else value.dtype,
                               device=value.device)
        return _sum(terms)

    def global_total(self, sites: list[dict], log_probs: list[torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """Σ of the global sites' log-densities (or of ``log_probs``, one per site, e.g. KLs)
        per draw, ``[M]`` (zeros for none)."""
        values = log_probs if log_probs is not None else [site_log_prob(s) for s in sites]
        terms = [reduce_to_particles(value, self.max_plate_nesting + 1, self.num_particles,
                                     site["name"]) if self.plated else value.sum().reshape(1)
                 for site, value in zip(sites, values) if not self.is_local(site)]
        if not terms:
            return self.guide_latents[0]["value"].new_zeros(self.num_particles)
        return _sum(terms)

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
        return _latent_sites(self.guide_trace)

    @cached_property
    def guided_latents(self) -> list[dict]:
        """The model's latent sites that the guide samples, in the model's order."""
        names = {site["name"] for site in self.guide_latents}
        return [site for site in _latent_sites(self.model_trace) if site["name"] in names]

    @cached_property
    def unguided_latents(self) -> list[dict]:
        """Model latents the guide does not sample (drawn from their prior on replay)."""
        names = {site["name"] for site in self.guide_latents}
        return [site for site in _latent_sites(self.model_trace) if site["name"] not in names]

    @cached_property
    def log_lik(self) -> torch.Tensor:
        """log p(x|z) of the observed sites (z: guided and unguided latents)."""
        return self.site_total(_observed_sites(self.model_trace))

    @cached_property
    def log_prior(self) -> torch.Tensor:
        """log p(z_g) of the guided latents: an unguided latent's prior is its own proposal,
        so its density cancels from the weight and is left out of it."""
        return self.site_total(self.guided_latents)

    @cached_property
    def log_q(self) -> torch.Tensor:
        return self.site_total(self.guide_latents)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` run the way the draws were: in the particle plate (if any), with its param
        messages hidden (if they were)."""
        return _as_drawn(fn, self.num_particles, self.particle_dim, self.plated,
                         self.hide_params)

    def replay(self, fn: Callable, args: tuple, kwargs: dict, model: bool = False,
               on_views: bool = False) -> poutine.Trace:
        """Trace ``fn`` the same way, replayed on detached draws: the guide's (``model=False``)
        or every latent of the model's, the unguided ones included (``model=True``); the same
        subsample in either case. ``on_views``: on the guide's draws as the model saw them
        (:attr:`views`), not detached. Running statistics (BatchNorm) are left as the first
        run left them (:func:`running_statistics_kept`)."""
        if on_views:
            assert self.views is not None, "these draws were not handed out through a view"
            source = self.views
        else:
            source = _detached(self.raw_model_trace if model else self.raw_guide_trace)
        replayed = poutine.replay(self.wrap(fn), trace=source)
        with running_statistics_kept(fn):
            return prune_subsample_sites(poutine.trace(replayed).get_trace(*args, **kwargs))


def _draw_particles(model: Callable, guide: Callable, args: tuple, kwargs: dict,
                    num_particles: int, max_plate_nesting: int, plated: bool = True,
                    allow_discrete: bool = False,
                    view: Callable[[dict], torch.Tensor] | None = None) -> _Particles:
    """Trace the guide and replay the model on it, for ``num_particles`` vectorized draws.

    A single draw may skip the particle plate (``plated=False``): the same random numbers, the
    same values. Param messages are hidden when no effect handler is active outside (they
    reach no one: the traces' param sites are never read here). ``view`` maps each guide site
    to the value the model is replayed on (the same values: e.g. an alias whose gradient is
    rescaled on the way back); the model then holds the views.

    :raises ConfigError: for a guide without latents, a latent (guide, or model-only) that is
        not reparameterizable, a guide latent that is no latent of the model, or scale factors
        that differ between sites (see the module docstring).
    """
    plated = plated or num_particles > 1
    hide_params = not am_i_wrapped()
    particle_dim = -(max_plate_nesting + 1)
    raw_guide_trace = poutine.trace(
        _as_drawn(guide, num_particles, particle_dim, plated, hide_params)
    ).get_trace(*args, **kwargs)
    views = None if view is None else _mapped(raw_guide_trace, view)
    raw_model_trace = poutine.trace(poutine.replay(
        _as_drawn(model, num_particles, particle_dim, plated, hide_params),
        trace=raw_guide_trace if views is None else views)).get_trace(*args, **kwargs)
    model_trace = prune_subsample_sites(raw_model_trace)
    guide_trace = prune_subsample_sites(raw_guide_trace)
    data_plate = find_data_plate(model_trace, guide_trace)
    guide_latents = _latent_sites(guide_trace)
    if not guide_latents and not any(site["type"] == "sample"
                                     for site in guide_trace.nodes.values()):
        raise ConfigError("the guide has no latent sample sites")
    model_latents = {site["name"]: site for site in _latent_sites(model_trace)}
    check_guide_latents_in_model(
        [site["name"] for site in guide_latents if site["name"] not in model_latents],
        "latent sample sites")
    for site in guide_latents:
        if site["fn"].has_rsample or is_enumerated(site):  # enumerated: summed by the caller
            continue
        if not (allow_discrete and site["fn"].has_enumerate_support):
            raise ConfigError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                "reparameterizable; this estimator needs rsample. For a discrete site, mark it "
                "for enumeration (infer={'enumerate': 'parallel'}) to sum it out (every "
                "estimator but vimco), or sample it with --elbo vimco (or trace)")
    guided = {site["name"] for site in guide_latents}
    for name, site in model_latents.items():
        if name not in guided and not site["fn"].has_rsample:
            raise ConfigError(
                f"model site {name!r} ({type(site['fn']).__name__}) is not sampled by the guide "
                "and not reparameterizable: it is drawn from its prior on replay, and its "
                "gradient would need a score term these estimators do not have. Sample it in the "
                "guide, or use pyro.infer.TraceGraph_ELBO or TraceEnum_ELBO")
    scale = _common_scale(model_trace, guide_trace)
    fixed = any(site["type"] == "sample" and site["is_observed"]
                for site in guide_trace.nodes.values())  # sites being summed out
    if is_validation_enabled() and not fixed:
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + plated)
    frame = next(frame for trace in (guide_trace, model_trace) for site in trace.nodes.values()
                 if site["type"] == "sample" for frame in site["cond_indep_stack"]
                 if frame.name == data_plate)
    return _Particles(model_trace=model_trace, guide_trace=guide_trace,
                      raw_model_trace=raw_model_trace, raw_guide_trace=raw_guide_trace,
                      num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                      data_dim=frame.dim, num_data=frame.size, plated=plated,
                      hide_params=hide_params, scale=scale, data_plate=data_plate, views=views,
                      view=view)
