"""What the trace recipe (:mod:`pyro_vae.core.particles`) reads from Pyro's traces: the data plate
and its size, global latents, the plate nesting, a site's masked log-density, and the reductions of
log-densities to ``[K, N]`` (particle dimension, data plate) or ``[K]``.

Densities are the true ones: ``poutine.scale`` factors (subsampling, β weights) are ignored here
and masks are applied. Estimators that weight terms do so themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.util.errors import ConfigError
from pyro_vae.util.module_state import running_statistics_kept
from pyro_vae.util.rng import forked_rng

PARTICLE_PLATE = "_pyro_vae_particles"
#: the data plate's name in the package's own models and in its hints to users
DATA_PLATE = "data"
# Exact types whose log_prob is elementwise in (value, loc, scale): see compact_distribution.
_NORMAL_TYPES = (torch.distributions.Normal, pyro.distributions.Normal)
_INDEPENDENT_TYPES = (torch.distributions.Independent, pyro.distributions.Independent)


def _plates_of(site: dict) -> dict[str, int]:
    return {
        frame.name: frame.dim
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE
    }


def detach_distribution(fn: Distribution) -> Distribution:
    """A shallow copy of ``fn`` whose tensor parameters (and those of nested distributions) are
    detached, so ``log_prob`` passes gradients to the value but not to the parameters.

    This is the "stop gradient on the guide's parameters" used by the STL and DReG estimators.
    """
    out = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, torch.Tensor):
            setattr(out, key, value.detach())
        elif isinstance(value, torch.distributions.Distribution):
            setattr(out, key, detach_distribution(value))
    return out


def trace_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """Trace ``guide`` and replay ``model`` on it; subsample sites are pruned."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Run the pair once (outside any particle plate) and count the deepest plate nesting.

    The global random state and the modules' running statistics are restored afterwards, so
    guessing does not shift later draws or move BatchNorm's statistics.
    """
    with poutine.block(), forked_rng(), running_statistics_kept(model, guide):
        return plate_nesting(*trace_pair(model, guide, args, kwargs))


def plate_nesting(*traces: Any) -> int:
    """The deepest nesting of vectorized plates over the sample sites of ``traces``."""
    depth = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "sample":
                dims = [-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized]
                depth = max([depth, *dims])
    return depth


def find_data_plate(
    model_trace,
    guide_trace,
    data_plate: str | None = None,
    *,
    required: bool = True,
    outermost: bool = False,
) -> str | None:
    """The name of the plate that indexes datapoints.

    With ``data_plate=None`` the plate is found automatically: the one vectorized plate that every
    sample site of model and guide lies in or, when some latent sites lie outside every plate
    (global latents), the one plate that every observed site lies in. Otherwise the named plate
    must hold every observed site. Latent sites outside the data plate are global
    (:func:`global_latents`); a latent must lie on the same side of the data plate in the model
    and in the guide. Where no plate qualifies, ``required=False`` gives ``None``: the whole
    data set is one datapoint. Where several do, ``outermost=True`` takes the outermost (for a
    sum over every datapoint, which plate is the data plate does not matter).
    """
    name = _find_data_plate(model_trace, guide_trace, data_plate, required, outermost)
    if name is not None:
        _check_same_side(model_trace, guide_trace, name)
    return name


def _check_same_side(model_trace, guide_trace, data_plate: str) -> None:
    """Refuse a latent that is local (in the data plate) in one trace and global in the other:
    its density would be counted per datapoint on one side and once on the other."""
    for name, site in guide_trace.nodes.items():
        other = model_trace.nodes.get(name)
        if site["type"] != "sample" or other is None or other.get("type") != "sample":
            continue
        in_guide, in_model = (data_plate in _plates_of(s) for s in (site, other))
        if in_guide != in_model:
            inside, outside = ("model", "guide") if in_model else ("guide", "model")
            raise ConfigError(
                f"site {name!r} is inside the data plate {data_plate!r} in the {inside} but "
                f"outside it in the {outside}: sample it inside pyro.plate({data_plate!r}, N) "
                "in both (a local latent) or outside in both (a global latent)"
            )


def _find_data_plate(
    model_trace, guide_trace, data_plate: str | None, required: bool, outermost: bool
) -> str | None:
    sites = [
        site
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    if not sites:
        raise ConfigError("the model/guide pair has no sample sites")
    observed = [site for site in sites if site["is_observed"]] or sites
    if data_plate is not None:
        outside = list(
            dict.fromkeys(site["name"] for site in observed if data_plate not in _plates_of(site))
        )
        if outside:
            common = _common_plates(observed)
            fix = (
                f"the sites are all in plate {next(iter(common))!r}: set data_plate = "
                f"{next(iter(common))!r} on the module (or pass data_plate=) if that plate "
                "indexes the datapoints"
                if len(common) == 1
                else "per-datapoint weights need every observed site inside pyro.plate"
                f"({data_plate!r}, N)"
            )
            raise ConfigError(
                f"sample sites {outside} are outside the data plate {data_plate!r}: {fix}"
            )
        return data_plate
    common = _common_plates(sites) or _common_plates(observed)
    if len(common) == 1:
        return common.pop()
    if common and outermost:
        dims = {
            frame.name: frame.dim
            for site in sites
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        }
        return min(common, key=lambda plate: (dims[plate], plate))
    if not common:
        if not required:
            return None
        raise ConfigError(
            "could not find a data plate: no pyro.plate contains every observed site of the "
            "model. Put the observed and local latent sites inside one pyro.plate('data', N), "
            "or pass data_plate=NAME (pyro_vae.evaluate.evaluate scores a pair without one as "
            "a single datapoint, the data set)"
        )
    raise ConfigError(
        f"several plates {sorted(common)} contain every sample site; "
        "pass data_plate=NAME to say which one indexes datapoints"
    )


def _common_plates(sites: list[dict]) -> set[str]:
    common = set(_plates_of(sites[0]))
    for site in sites[1:]:
        common &= set(_plates_of(site))
    return common


def plate_dim_and_size(model_trace, guide_trace, name: str | None) -> tuple[int | None, int]:
    """The dimension and size of the plate ``name``; a plate declared without a size
    (``pyro.plate(name)``) takes the size its sites' values and distributions broadcast to.
    No plate (``None``: the whole data set as one datapoint) has no dimension and size 1."""
    if name is None:
        return None, 1
    dim, sizes = None, []
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.name != name:
                    continue
                if frame.size is not None and frame.size >= 0:
                    return frame.dim, frame.size
                dim, value, fn = frame.dim, site["value"], site["fn"]
                shape = torch.broadcast_shapes(
                    fn.batch_shape, value.shape[: value.dim() - fn.event_dim]
                )
                if len(shape) >= -dim:
                    sizes.append(shape[dim])
    if dim is None:
        raise ConfigError(f"no sample site lies in the plate {name!r}")
    return dim, max(sizes, default=1)


def global_latents(trace, data_plate: str | None) -> list[str]:
    """The latent sample sites of ``trace`` outside the data plate: global latents, drawn once
    per particle and shared by the datapoints (none without a data plate)."""
    if data_plate is None:
        return []
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and data_plate not in _plates_of(site)
    ]


def reduce_to_particles(
    log_prob: torch.Tensor, num_dims: int, num_particles: int, name: str = ""
) -> torch.Tensor:
    """Sum ``log_prob`` (batch shape right-aligned to ``num_dims`` plate dims) over every dim but
    the particle dim (leftmost): a global site's log-density per particle, ``[K]``."""
    log_prob = _aligned(log_prob, num_dims, name)
    return log_prob.reshape(log_prob.shape[0], -1).sum(1).expand(num_particles)


def _aligned(log_prob: torch.Tensor, num_dims: int, name: str) -> torch.Tensor:
    """``log_prob`` with leading size-1 dimensions up to ``num_dims`` (the plates, particles
    included); a batch dimension beyond them is refused."""
    if log_prob.dim() > num_dims:
        raise ConfigError(
            f"site {name!r} has batch shape {list(log_prob.shape)}, more dimensions than the "
            f"{num_dims - 1} declared plate(s): put every batch dimension in a pyro.plate or "
            "move it into the event with .to_event()"
        )
    return log_prob.reshape((1,) * (num_dims - log_prob.dim()) + log_prob.shape)


def _drop_broadcast_dims(value: torch.Tensor) -> torch.Tensor:
    """``value`` with every dimension that ``expand`` broadcast (size > 1, stride 0) narrowed to
    size 1: a view of the same numbers that broadcasts back to ``value``'s shape."""
    for dim, (size, stride) in enumerate(zip(value.shape, value.stride())):
        if size > 1 and stride == 0:
            value = value.narrow(dim, 0, 1)
    return value


def compact_distribution(fn: Distribution) -> Distribution:
    """``fn`` with the broadcast dimensions of its parameters dropped, where that is known to be
    safe: a ``Normal``, or an ``Independent`` of one (exact types, so subclasses with their own
    ``log_prob`` are left alone); any other distribution is returned as it is.

    Inside the particle plate a site's parameters are expanded to ``[K, N, ...]``; a ``Normal``
    computes log σ and σ² elementwise over that whole shape, once per particle. On the compact
    copy they are computed once per distinct parameter and broadcast against the value, the same
    arithmetic on the same numbers. ``log_prob`` of the copy can have size 1 along the dropped
    dimensions; :func:`site_log_prob` expands it back to the batch shape.
    """
    if type(fn) in _INDEPENDENT_TYPES:
        base = compact_distribution(fn.base_dist)
        if base is fn.base_dist:
            return fn
        out = copy.copy(fn)
        out.base_dist = base
        return out
    if type(fn) not in _NORMAL_TYPES:
        return fn
    loc, scale = _drop_broadcast_dims(fn.loc), _drop_broadcast_dims(fn.scale)
    if loc is fn.loc and scale is fn.scale:
        return fn
    out = copy.copy(fn)
    out.loc, out.scale = loc, scale
    return out


def is_auxiliary(site: dict) -> bool:
    """Whether a guide site is auxiliary (``infer={"is_auxiliary": True}``, as AutoGuides mark
    the unconstrained draws behind their ``Delta`` sites): it has no twin in the model, and its
    log-density belongs to log q (with the ``Delta``'s Jacobian term it makes q of the model's
    site)."""
    return bool((site.get("infer") or {}).get("is_auxiliary"))


def check_guide_latents_in_model(guide_trace, unmatched: list[str], what: str) -> None:
    """Refuse guide latents that the model lacks (``unmatched``, not ``what`` of the model),
    auxiliary sites apart: their log q would enter every weight with no log p to balance it."""
    unmatched = [name for name in unmatched if not is_auxiliary(guide_trace.nodes[name])]
    if unmatched:
        raise ConfigError(
            f"guide sample sites {unmatched} are not {what} of the model: log q would count "
            "them and log p would not, which biases every weight. Sample each guide latent in "
            "the model under the same name (or mark it infer={'is_auxiliary': True} if it is "
            "an auxiliary variable of the guide)"
        )


def site_log_prob(site: dict, detach: bool = False, compact: bool = False) -> torch.Tensor:
    """The site's unscaled log-density at its value, batch-shaped, with its mask applied
    (``detach=True``: with the distribution's parameters detached; ``compact=True``: computed
    on :func:`compact_distribution`, the same values with fewer operations, for evaluation)."""
    fn = detach_distribution(site["fn"]) if detach else site["fn"]
    if compact:
        log_prob = compact_distribution(fn).log_prob(site["value"])
        if log_prob.shape != fn.batch_shape:
            log_prob = log_prob.expand(torch.broadcast_shapes(log_prob.shape, fn.batch_shape))
    else:
        log_prob = fn.log_prob(site["value"])
    return masked(log_prob, site)


def reduce_to_particles_and_data(
    log_prob: torch.Tensor,
    num_dims: int,
    data_dim: int | None,
    shape: tuple[int, int],
    name: str = "",
) -> torch.Tensor:
    """Sum ``log_prob`` (batch shape right-aligned to ``num_dims`` plate dims) over every dim but
    the particle dim (leftmost) and ``data_dim``; the result has shape ``shape`` = ``[K, N]``
    (``data_dim=None``: no data plate, N = 1)."""
    log_prob = _aligned(log_prob, num_dims, name)
    if data_dim is None:
        return log_prob.reshape(log_prob.shape[0], -1).sum(1, keepdim=True).expand(shape)
    keep = {0, num_dims + data_dim}
    others = [d for d in range(num_dims) if d not in keep]
    if others:
        log_prob = log_prob.sum(others, keepdim=True)
    return log_prob.reshape(log_prob.shape[0], log_prob.shape[num_dims + data_dim]).expand(shape)


def _scale_value(site: dict, where: str) -> float:
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ConfigError(
                f"{where} site {site['name']!r} has a scale tensor of shape "
                f"{list(scale.shape)}: these estimators take one scale factor for every sample "
                "site (as a subsampled pyro.plate gives); use pyro.poutine.mask to leave "
                "datapoints out, and beta to weight the rate"
            )
        return scale.item()
    return float(scale)


def common_scale(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> float:
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
                    "meaning inside the log of an importance-weighted bound; with one draw inside "
                    "the log (importance_samples=1: trace, meanfield, stl, iwae and dreg) each "
                    "site's term is weighted by its own scale. To weight the rate (KL) term, "
                    "beta=B (and warmup=STEPS to raise it gradually) does it for any "
                    "estimator"
                )
    return 1.0 if first is None else first[2]


def latent_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"]
    ]


def observed_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site for site in trace.nodes.values() if site["type"] == "sample" and site["is_observed"]
    ]


def masked(value: torch.Tensor, site: dict) -> torch.Tensor:
    """``value`` (a site's log-density or KL) with the site's mask applied: 0 where masked."""
    mask = site["mask"]
    if mask is None or mask is True:
        return value
    if mask is False:
        return torch.zeros_like(value)
    return torch.where(mask, value, value.new_zeros(()))


def sum_terms(terms: list[torch.Tensor]) -> torch.Tensor:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
