"""Particles drawn: the guide traced inside the outer particle plate and the model replayed on
it, its enumerated sites enumerated, and the pair's form checked (:class:`Particles` reads the
two traces)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.core.enumeration import (
    enumerated_guide,
    enumerated_in,
    enumerated_model,
    is_enumerated,
    value_dims,
)
from pyro_vae.core.particle_plate import in_particle_plate, mapped_trace
from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import (
    check_guide_latents_in_model,
    find_data_plate,
    latent_sites,
    plate_dim_and_size,
)
from pyro_vae.util.errors import ConfigError


def draw_particles(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_draws: int,
    max_plate_nesting: int,
    plated: bool = True,
    *,
    view: Callable[[dict], torch.Tensor] | None = None,
    data_plate: str | None = None,
    enumerate_guide: bool = True,
    enumerate_model: bool = True,
    compact: bool = False,
    require_data_plate: bool = True,
    outermost_plate: bool = False,
) -> Particles:
    """Trace the guide and replay the model on it, for ``num_draws`` vectorized draws (M: an
    estimator's P·K).

    A single draw may skip the particle plate (``plated=False``): the same random numbers, the
    same values. Param messages are hidden when no effect handler is active outside (no one
    reads them). ``view`` maps each guide site
    to the value the model is replayed on (the same values: e.g. an alias whose gradient is
    rescaled on the way back); the model then holds the views. The model's sites marked for
    enumeration are enumerated when ``enumerate_model``, the guide's when ``enumerate_guide``
    (otherwise they are sampled: for a caller that sums them one configuration at a time, or
    that checks :func:`~pyro_vae.infer.pair_checks.marked_but_drawn` and draws again). ``compact``
    computes log-densities on :func:`~pyro_vae.core.traces.compact_distribution` (evaluation).
    ``require_data_plate=False`` takes a pair whose observed sites share no plate as one
    datapoint (the data set), ``outermost_plate=True`` the outermost of several plates that
    hold every site (:func:`~pyro_vae.core.traces.find_data_plate`): for a caller that sums every
    datapoint's bound, to whom the choice makes no difference.

    :raises ConfigError: for a pair whose sites fit no data plate, a guide without latents, a
        guide latent that is no latent of the model (auxiliary sites apart), or a guide latent
        that depends on a site enumerated in the model (what the estimators need beyond that:
        :func:`pyro_vae.infer.pair_checks.check_estimable`).
    """
    plated = plated or num_draws > 1
    hide_params = not am_i_wrapped()
    particle_dim = -(max_plate_nesting + 1)
    drawn_guide = in_particle_plate(guide, num_draws, particle_dim, plated, hide_params)
    if enumerate_guide:
        drawn_guide = enumerated_guide(drawn_guide, particle_dim - 1)
    raw_guide_trace = poutine.trace(drawn_guide).get_trace(*args, **kwargs)
    views = None if view is None else mapped_trace(raw_guide_trace, view)
    drawn_model = in_particle_plate(model, num_draws, particle_dim, plated, hide_params)
    if enumerate_model or enumerate_guide:  # after the guide's: it left the allocator's state
        drawn_model = enumerated_model(drawn_model, None if enumerate_guide else particle_dim - 1)
    raw_model_trace = poutine.trace(
        poutine.replay(drawn_model, trace=raw_guide_trace if views is None else views)
    ).get_trace(*args, **kwargs)
    model_trace = prune_subsample_sites(raw_model_trace)
    guide_trace = prune_subsample_sites(raw_guide_trace)
    data_plate = find_data_plate(
        model_trace, guide_trace, data_plate, required=require_data_plate, outermost=outermost_plate
    )
    guide_latents = latent_sites(guide_trace)
    model_latents = {site["name"]: site for site in latent_sites(model_trace)}
    check_guide_latents_in_model(
        guide_trace,
        [site["name"] for site in guide_latents if site["name"] not in model_latents],
        "latent sample sites",
    )
    guided = {site["name"] for site in guide_latents}
    model_enumerated = (
        tuple(enumerated_in(model_trace, skip=guided)) if enumerate_model or enumerate_guide else ()
    )
    redraw = not (enumerate_model or enumerate_guide) and any(  # the caller draws again
        is_enumerated(site) for site in model_latents.values()
    )
    if (
        not guide_latents
        and model_latents
        and not model_enumerated
        and not redraw
        and not any(site["type"] == "sample" for site in guide_trace.nodes.values())
    ):
        raise ConfigError(
            f"the guide has no latent sample sites, but the model has "
            f"{sorted(model_latents)} (and enumerates none)"
        )
    summed_dims = set().union(*(value_dims(model_trace.nodes[name]) for name in model_enumerated))
    for name in guided.intersection(model_latents):
        shape = model_latents[name]["fn"].batch_shape
        if any(-dim <= len(shape) and shape[dim] != 1 for dim in summed_dims):
            raise ConfigError(
                f"model site {name!r}, which the guide samples, depends on the sites enumerated "
                f"in the model {list(model_enumerated)}: a guide latent cannot depend on a "
                "variable that is summed out after it is drawn. Enumerate those sites in the "
                "guide instead, or sample them there"
            )
    data_dim, num_data = plate_dim_and_size(model_trace, guide_trace, data_plate)
    return Particles(
        model_trace=model_trace,
        guide_trace=guide_trace,
        raw_model_trace=raw_model_trace,
        raw_guide_trace=raw_guide_trace,
        num_draws=num_draws,
        max_plate_nesting=max_plate_nesting,
        data_dim=data_dim,
        num_data=num_data,
        plated=plated,
        hide_params=hide_params,
        data_plate=data_plate,
        views=views,
        view=view,
        model_enumerated=model_enumerated,
        guide_enumerated=tuple(enumerated_in(guide_trace)) if enumerate_guide else (),
        compact=compact,
        model=model,
        guide=guide,
        args=args,
        kwargs=kwargs,
    )
