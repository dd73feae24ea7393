"""What the estimators need of a pair beyond what any draw needs: latents they can
differentiate through, one scale factor inside the log of a sum, networks that give the same
output twice where the guide is replayed; and the pair's identity and subsample for the runs
that one step makes of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match
from torch import nn

from pyro_vae.core.enumeration import is_enumerated
from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import latent_sites
from pyro_vae.util.errors import ConfigError

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def check_no_active_dropout(name: str, *functions: Callable) -> None:
    """Refuse bound methods of a module whose dropout is active (train mode, p > 0)."""
    for fn in functions:
        module = getattr(fn, "__self__", None)
        if not isinstance(module, nn.Module):
            continue
        active = [
            sub
            for sub in module.modules()
            if isinstance(sub, _DROPOUT) and sub.training and sub.p > 0
        ]
        if active:
            raise ConfigError(
                f"{name} replays the guide on its own draws, which needs the networks to give "
                f"the same output twice, but {type(module).__name__} has dropout active (train "
                "mode): call .eval() on it, set the dropout to p=0, or use trace, meanfield or "
                "iwae"
            )


def pair_key(model: Callable, guide: Callable) -> tuple[int, int]:
    """The identity of a pair (its module, for bound methods), for per-pair memos."""
    return id(getattr(model, "__self__", model)), id(getattr(guide, "__self__", guide))


def _replaying(fn: Callable, trace: poutine.Trace) -> Callable:
    """``fn`` replayed on ``trace`` (unchanged for an empty one), keeping the pair's identity
    (``__self__``) for the per-pair checks."""
    if not trace.nodes:
        return fn
    replayed = poutine.replay(fn, trace=trace)

    def run(*args: Any, **kwargs: Any) -> Any:
        return replayed(*args, **kwargs)

    run.__self__ = getattr(fn, "__self__", fn)
    return run


def same_subsample(
    model: Callable, guide: Callable, particles: Particles
) -> tuple[Callable, Callable]:
    """``model`` and ``guide`` replaying the subsample sites of ``particles``' draw, so that
    every configuration of the enumerated sites is run on the same datapoints (a subsampled
    ``pyro.plate`` draws its subsample anew on every run)."""

    def subsamples(raw: poutine.Trace) -> poutine.Trace:
        kept = prune_subsample_sites(raw).nodes
        out = poutine.Trace()
        for name, site in raw.nodes.items():
            if site["type"] == "sample" and name not in kept:
                out.add_node(name, **site)
        return out

    return (
        _replaying(model, subsamples(particles.raw_model_trace)),
        _replaying(guide, subsamples(particles.raw_guide_trace)),
    )


def marked_but_drawn(particles: Particles, guide: bool) -> bool:
    """Whether a site marked for enumeration was drawn instead (the model's, or with ``guide``
    the guide's too): draws that skipped enumeration to save its cost must be drawn again."""
    guided = {site["name"] for site in particles.guide_latents}
    sites = [site for site in latent_sites(particles.model_trace) if site["name"] not in guided]
    if guide:
        sites += particles.guide_latents
    return any(is_enumerated(site) for site in sites) and not (
        particles.model_enumerated or particles.guide_enumerated
    )


def check_estimable(
    particles: Particles, allow_discrete: bool = False, site_scales: bool = False
) -> None:
    """Refuse draws whose gradient the estimators cannot take: a guide latent that is neither
    reparameterizable nor enumerated (``allow_discrete``: a discrete one is sampled with a
    score term), a model latent left to its prior that is not reparameterizable, or scale
    factors that differ between sites (:attr:`Particles.scale`) unless ``site_scales`` (one
    draw inside the log): then each site's term is weighted by its own factor, as Pyro's
    ``Trace_ELBO`` weights it. With Pyro's validation on, the model and guide are also checked
    against each other as Pyro's ELBOs check them."""
    for site in particles.guide_latents:
        if site["fn"].has_rsample or is_enumerated(site):  # enumerated: summed
            continue
        if not (allow_discrete and site["fn"].has_enumerate_support):
            raise ConfigError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                "reparameterizable; this estimator needs rsample. For a discrete site, mark it "
                "for enumeration (infer={'enumerate': 'parallel'}) to sum it out (every "
                "estimator but vimco), or sample it with the vimco (or trace) estimator"
            )
    for site in particles.unguided_latents:
        if not site["fn"].has_rsample:
            raise ConfigError(
                f"model site {site['name']!r} ({type(site['fn']).__name__}) is not sampled by "
                "the guide and not reparameterizable: it is drawn from its prior on replay, and "
                "its gradient would need a score term these estimators do not have. Sample it "
                "in the guide, mark it for enumeration in the model, or use "
                "pyro.infer.TraceGraph_ELBO"
            )
    try:
        particles.scale  # noqa: B018 (refuses differing scale factors)
    except ConfigError:
        if not site_scales:
            raise
        if particles.model_enumerated or particles.guide_enumerated:
            raise ConfigError(
                "scale factors that differ between sites cannot be combined with "
                "enumerated sites: scale every site alike"
            ) from None
        particles.site_scales = True
    fixed = any(
        site["type"] == "sample" and site["is_observed"]
        for site in particles.guide_trace.nodes.values()
    )  # sites being summed out
    if is_validation_enabled() and not fixed:
        check_model_guide_match(
            particles.model_trace,
            particles.guide_trace,
            particles.max_plate_nesting + particles.plated,
        )


def check_guided_and_local(name: str, particles: Particles) -> None:
    """Refuse a model latent that the guide does not sample, or a latent outside the data
    plate, for an estimator that gives the model's and the guide's parameters different
    gradients of per-datapoint bounds (``piwae``, ``rws``): such a latent's draws are part of
    no datapoint's weights alone, or are drawn by the model's parameters."""
    unguided = [site["name"] for site in particles.unguided_latents]
    if unguided:
        raise ConfigError(
            f"{name} needs every model latent sampled by the guide, but the guide leaves "
            f"{unguided} to the model's prior: sample them in the guide, or use iwae or dreg"
        )
    if particles.global_latents:
        raise ConfigError(
            f"{name} weighs each datapoint's draws, but the guide's latents "
            f"{[site['name'] for site in particles.global_latents]} lie outside the data "
            "plate: use iwae or dreg for global latents"
        )
