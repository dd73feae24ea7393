r"""Discrete latent variables summed out exactly, by Pyro's parallel enumeration.

A sample site marked ``infer={"enumerate": "parallel"}`` (or ``"sequential"``, or by
:func:`pyro.infer.config_enumerate`) whose distribution has a finite support is not sampled but
enumerated: :func:`enumerated_guide` runs the guide under :func:`pyro.poutine.enum` (its
enumerated sites take their whole support along a dimension of their own, left of the particle
plate) and the model after it under another, which enumerates the model's own marked sites the
same way (the assignments of a mixture, the states of an HMM; ``pyro.markov`` reuses
dimensions as Pyro does). Every continuous site drawn downstream of an enumerated value is drawn
once per value. :func:`contract_log_weights` then sums the enumerated dimensions out of the
per-site log-densities with Pyro's plated tensor contraction
(:func:`pyro.ops.contract.contract_to_tensor`), keeping the particle plate and the data plate:
per particle and datapoint,

.. math::

    \log w = \log \sum_c \sum_d \frac{p(x, c, d, z_c)}{q(z_c \mid x, c)}, \qquad
    \mathbb{E}\,[w] = p(x),

with c the guide's enumerated sites, d the model's, z_c the continuous latents drawn given c.
w is an unbiased estimate of p(x) in which the discrete variables are summed, not sampled: its
variance is that of the continuous latents alone (Rao-Blackwellization), and a model whose only
latents are discrete gets w = p(x) exactly. The guide's own q(c | x) enters no weight (it is
summed over, not proposed from). Plates nested in the data plate are product-contracted inside
the sum (Π_j Σ_c, not Σ_c Π_j), and one run sees one subsample of a subsampled plate.

The ELBO that Pyro's ``TraceEnum_ELBO`` computes, the exact expectation over c under
q(c | x) of log w_c − log q(c | x), is :func:`expected_log_weights` (the ``trace`` estimator's
bound, and the evaluator's ``trace_enum_elbo``).

Enumerated sites, and sites whose density depends on one, must lie in the data plate: a global
site outside it would be summed once per datapoint. ``"sequential"`` marks are summed the same
way, in parallel (the same numbers).

The estimators that give guide-enumerated sites their own treatment (``meanfield``'s exact
expectation, ``stl`` and ``dreg``'s gradients) still run the pair once per configuration, with
the sites fixed by :class:`FixSites` (:func:`configurations`, :func:`fixed`) and the subsample
of the first run replayed into every configuration.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.ops.contract import contract_tensor_tree, contract_to_tensor
from pyro.ops.packed import broadcast_all, neg, scale_and_mask
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger

from pyro_vae.util.errors import ConfigError
from pyro_vae.util.rng import forked_rng

ENUMERATE_MODES = ("parallel", "sequential")
#: The most combinations of enumerated values a pair may have (a product of supports).
MAX_CONFIGURATIONS = 4096


class FixSites(Messenger):
    """Fix sample sites to given values, broadcast to each site's batch shape, and mark them
    observed: in a guide that removes them from log q, in a model it counts their log p."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: dict) -> None:
        value = self.values.get(msg["name"])
        if value is None:
            return
        fn = msg["fn"]
        msg["value"] = value.to(device=_device(msg)).expand(*fn.batch_shape, *fn.event_shape)
        msg["is_observed"] = True


def _device(msg: dict) -> torch.device | None:
    for key in ("loc", "logits", "probs"):
        tensor = getattr(msg["fn"], key, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return None


def is_enumerated(site: dict) -> bool:
    """Whether a trace's sample site is marked for enumeration and has a finite support."""
    return (
        site.get("infer", {}).get("enumerate") in ENUMERATE_MODES
        and site["fn"].has_enumerate_support
    )


def enumerated_sites(guide: Callable, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The guide's sites marked for enumeration, each with its support ``[C, *event_shape]``,
    found by one trace of the guide (random state forked, gradients off)."""
    with forked_rng(), torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return enumerated_sites_of(trace)


def enumerated_sites_of(trace: Any) -> dict[str, torch.Tensor]:
    """The sites of a guide trace marked for enumeration, with their supports."""
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site.get("infer", {}).get("enumerate") not in ENUMERATE_MODES:
            continue
        fn = site["fn"]
        if not fn.has_enumerate_support:
            raise ConfigError(
                f"guide site {name!r} is marked for enumeration but "
                f"{type(fn).__name__} has no finite support to sum over"
            )
        support = fn.enumerate_support(expand=False)
        sites[name] = support.reshape(support.shape[0], *fn.event_shape).detach()
    total = 1
    for support in sites.values():
        total *= support.shape[0]
    if total > MAX_CONFIGURATIONS:
        raise ConfigError(
            f"the enumerated sites {list(sites)} have {total} combinations of "
            f"values, more than {MAX_CONFIGURATIONS}: sum over fewer, or sample "
            "them with a score-function estimator"
        )
    return sites


def configurations(sites: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Every combination of the sites' values, as ``{name: value}``."""
    names = list(sites)
    for index in itertools.product(*(range(sites[n].shape[0]) for n in names)):
        yield {name: sites[name][i] for name, i in zip(names, index)}


def num_configurations(sites: dict[str, torch.Tensor]) -> int:
    """How many combinations :func:`configurations` yields (1 for no sites)."""
    return math.prod(support.shape[0] for support in sites.values())


def fixed(fn: Callable, values: dict[str, torch.Tensor]) -> Callable:
    """``fn`` with the sites in ``values`` fixed (see :class:`FixSites`)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with FixSites(values):
            return fn(*args, **kwargs)

    run.__self__ = getattr(fn, "__self__", fn)  # the pair's identity, for per-pair caches
    return run


class _ExactLogRing(LogRing):
    """Pyro's log-space ring with a sum-product that adds the aligned log-terms and applies
    :func:`torch.logsumexp`. Pyro's own (an einsum of ``exp(term − max)``, each term shifted
    by its own maximum) is exact in value, but its logarithm's gradient is clamped where that
    sum falls below the float epsilon, which terms peaked at different values reach easily:
    the estimators differentiate these sums, so they need the exact gradient."""

    def sumproduct(self, terms: list[torch.Tensor], dims: Any) -> torch.Tensor:
        names = "".join(sorted(set("".join(term._pyro_dims for term in terms))))
        total = None
        for term in terms:
            own = [name for name in names if name in term._pyro_dims]
            aligned = term.permute([term._pyro_dims.index(name) for name in own]) if own else term
            aligned = aligned.reshape(
                [aligned.shape[own.index(name)] if name in own else 1 for name in names]
            )
            total = aligned if total is None else total + aligned
        axes = [axis for axis, name in enumerate(names) if name in dims]
        result = torch.logsumexp(total, axes) if axes else total
        result._pyro_dims = "".join(name for name in names if name not in dims)
        return result


class _ParallelMarks(Messenger):
    """Read a ``"sequential"`` enumeration mark as ``"parallel"`` (the same sum)."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["infer"].get("enumerate") == "sequential" and not msg["is_observed"]:
            msg["infer"] = dict(msg["infer"], enumerate="parallel")


def _marks_parallel(fn: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        with _ParallelMarks():
            return fn(*args, **kwargs)

    return run


def enumerated_model(model: Callable, first_available_dim: int | None) -> Callable:
    """``model`` with its marked sites enumerated from ``first_available_dim`` leftwards, or
    (``None``) from the first dimension the guide's enumeration left free (run it after the
    guide of :func:`enumerated_guide`)."""
    return poutine.enum(_marks_parallel(model), first_available_dim=first_available_dim)


def enumerated_guide(guide: Callable, first_available_dim: int) -> Callable:
    """``guide`` with its marked sites enumerated from ``first_available_dim`` leftwards."""
    return poutine.enum(_marks_parallel(guide), first_available_dim=first_available_dim)


def enumerated_in(trace: Any, skip: Any = ()) -> list[str]:
    """The sample sites of ``trace`` that were enumerated (marked, finite support, neither
    observed nor named in ``skip``)."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and name not in skip
        and is_enumerated(site)
    ]


def _packed_terms(
    model_trace: Any,
    guide_trace: Any,
    model_sites: list[str],
    guide_sites: list[str],
    target_plates: tuple[str, ...],
    weights: dict[str, float],
) -> tuple[list, list, dict[str, str]]:
    """The packed log-densities of ``model_sites`` and ``guide_sites`` (unscaled, masked,
    times ``weights.get(name, 1)``), each as ``(ordinal, term)``, and the plates' symbols."""
    for trace, names in ((guide_trace, guide_sites), (model_trace, model_sites)):
        wanted = set(names)
        trace.compute_log_prob(lambda name, site, wanted=wanted: name in wanted)
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    plate_to_symbol = model_trace.plate_to_symbol
    packed: tuple[list, list] = ([], [])
    for trace, names, out in (
        (model_trace, model_sites, packed[0]),
        (guide_trace, guide_sites, packed[1]),
    ):
        for name in names:
            site = trace.nodes[name]
            frames = [frame.name for frame in site["cond_indep_stack"] if frame.vectorized]
            missing = [plate for plate in target_plates if plate not in frames]
            if missing:
                raise ConfigError(
                    f"site {name!r} lies outside the plate {missing[0]!r} but its density "
                    "depends on an enumerated site, or is summed with them: enumerated sites "
                    f"and the sites that depend on them must lie inside pyro.plate"
                    f"({missing[0]!r}, N)"
                )
            term = scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
            weight = weights.get(name, 1.0)
            if weight != 1.0:
                dims, term = term._pyro_dims, term * weight
                term._pyro_dims = dims
            out.append((frozenset(plate_to_symbol[frame] for frame in frames), term))
    return packed[0], packed[1], plate_to_symbol


def _unpacked(
    total: torch.Tensor, targets: tuple[str, ...], sizes: tuple[int, ...]
) -> torch.Tensor:
    """A packed tensor over (some of) the ``targets`` symbols as a tensor of shape ``sizes``."""
    present = [symbol for symbol in targets if symbol in total._pyro_dims]
    order = [total._pyro_dims.index(symbol) for symbol in present]
    total = total.permute(order) if order else total.reshape(())
    shape = [size if symbol in present else 1 for symbol, size in zip(targets, sizes)]
    return total.reshape(shape).expand(sizes)


def contract_log_weights(
    model_trace: Any,
    guide_trace: Any,
    model_sites: list[str],
    guide_sites: list[str],
    target_plates: tuple[str, ...],
    sizes: tuple[int, ...],
    weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """Σ of the log-densities of ``model_sites`` minus those of ``guide_sites`` (each unscaled,
    masked, times ``weights.get(name, 1)``), with every enumerated dimension summed out in log
    space and every plate but ``target_plates`` product-contracted (summed in log space).

    The sites must all lie in every plate of ``target_plates`` (a particle plate, the data
    plate); the result has shape ``sizes``, one axis per target plate in that order.

    :raises ConfigError: for sites outside a target plate, or dependences between enumerated
        sites that the plates cannot hold (a plate's site on which a site outside it depends).
    """
    model_terms, guide_terms, plate_to_symbol = _packed_terms(
        model_trace, guide_trace, model_sites, guide_sites, target_plates, weights or {}
    )
    plate_symbols = set(plate_to_symbol.values())
    tree: OrderedDict = OrderedDict()
    sum_dims: set[str] = set()
    for ordinal, term in model_terms + [(ordinal, neg(term)) for ordinal, term in guide_terms]:
        sum_dims.update(set(term._pyro_dims) - plate_symbols)
        tree.setdefault(ordinal, []).append(term)
    targets = tuple(plate_to_symbol[plate] for plate in target_plates)
    ring = _ExactLogRing(dim_to_size=dict(zip(targets, sizes)))
    try:
        total = contract_to_tensor(tree, sum_dims, target_ordinal=frozenset(targets), ring=ring)
    except ValueError as exc:
        raise ConfigError(
            f"the enumerated sites cannot be summed out plate by plate: {exc}"
        ) from None
    return _unpacked(total, targets, sizes)


def value_dims(site: dict) -> set[int]:
    """The dimensions along which an enumerated site's value varies (its own enumeration
    dimension), as negative batch indices."""
    value = site["value"]
    batch = value.shape[: value.dim() - site["fn"].event_dim]
    return {dim - len(batch) for dim, size in enumerate(batch) if size != 1}


def expected_log_weights(
    model_trace: Any,
    guide_trace: Any,
    model_sites: list[str],
    guide_sites: list[str],
    enumerated: list[str],
    target_plates: tuple[str, ...],
    sizes: tuple[int, ...],
    weights: dict[str, float] | None = None,
) -> torch.Tensor:
    r"""The ELBO that Pyro's ``TraceEnum_ELBO`` computes when the guide enumerates the sites
    ``enumerated`` (c): the expectation over c under q(c | x), exact, of the log-weight,

    .. math::

        \sum_c q(c \mid x)\,\bigl[\log \textstyle\sum_d p(x, c, d, z_c)
        - \log q(z_c \mid x, c) - \log q(c \mid x)\bigr],

    per target plate entry (shape ``sizes``), with the model's own enumerated sites d summed
    in log space first (as :func:`contract_log_weights` does), ``guide_sites`` the guide's
    other local sites (weighted by ``weights``, as the model's sites are) and each term's
    expectation taken under the guide's enumerated sites at or above its plates (plates are
    never product-contracted here: a term inside a plate nested in the data plate is summed
    over that plate's entries). Its gradient reaches q(c | x) through the weights, as in
    ``TraceEnum_ELBO``. Guides that reuse an enumeration dimension (``pyro.markov``) are
    refused: their q(c | x) is not a product of the sites' factors.
    """
    model_terms, guide_terms, plate_to_symbol = _packed_terms(
        model_trace,
        guide_trace,
        model_sites,
        guide_sites + enumerated,
        target_plates,
        weights or {},
    )
    plate_symbols = set(plate_to_symbol.values())
    factors = guide_terms[len(guide_sites) :]
    own_dims = [value_dims(guide_trace.nodes[name]) for name in enumerated]
    if sum(len(dims) for dims in own_dims) != len(set().union(*own_dims)):
        raise ConfigError(
            "the guide reuses an enumeration dimension (pyro.markov): the ELBO "
            "of its enumerated sites is not computed, only the summed bound"
        )
    guide_dims = set().union(*(set(term._pyro_dims) for _, term in factors)) - plate_symbols
    targets = tuple(plate_to_symbol[plate] for plate in target_plates)
    ring = _ExactLogRing(dim_to_size=dict(zip(targets, sizes)))
    model_dims = (
        set().union(*(set(term._pyro_dims) for _, term in model_terms)) - plate_symbols - guide_dims
    )
    costs = list(model_terms)
    if model_dims:
        tree: OrderedDict = OrderedDict()
        for ordinal, term in model_terms:
            tree.setdefault(ordinal, []).append(term)
        contracted = contract_tensor_tree(tree, model_dims, ring=ring)
        costs = [(ordinal, term) for ordinal, terms in contracted.items() for term in terms]
    costs += [(ordinal, neg(term)) for ordinal, term in guide_terms]
    total = None
    for ordinal, cost in costs:
        upstream = [term for place, term in factors if place <= ordinal]
        aligned = broadcast_all(cost, *upstream)
        value = aligned[0]
        if upstream:
            prob = sum(aligned[1:]).exp()
            value = torch.where(prob > 0, prob * value, value.new_zeros(()))
        keep = [dim for dim, name in enumerate(aligned[0]._pyro_dims) if name in targets]
        drop = [dim for dim in range(value.dim()) if dim not in keep]
        value = value.sum(drop) if drop else value
        value._pyro_dims = "".join(aligned[0]._pyro_dims[dim] for dim in keep)
        value = _unpacked(value, targets, sizes)
        total = value if total is None else total + value
    return total
