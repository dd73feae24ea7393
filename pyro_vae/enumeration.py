r"""Discrete latent variables summed out exactly: guide sites marked for enumeration.

A guide site marked ``infer={"enumerate": "parallel"}`` (or ``"sequential"``, or by
:func:`pyro.infer.config_enumerate`) whose distribution has a finite support is not sampled: the
pair is run once per value c of its support (per combination of values when there are several
such sites), with the site fixed to c in the guide and in the model, and each run draws its own
continuous latents z_c ~ q(z | x, c). Then, per particle and datapoint,

.. math::

    \log w = \log \sum_c \frac{p(x, c, z_c)}{q(z_c \mid x, c)}, \qquad
    \mathbb{E}\,[w] = \sum_c p(x, c) = p(x),

so w is an unbiased estimate of p(x) in which the discrete variable is summed, not sampled: its
variance is that of the continuous latents alone (Rao-Blackwellization), and a model whose only
latent is discrete gets w = p(x) exactly. The guide's own q(c | x) enters no weight (it is
summed over, not proposed from). log p(c) is counted with the model's observed sites.

The enumerated sites must lie in the data plate (one value per datapoint, the same for all in a
run); global latents with enumeration are refused, since each run would draw its own.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from .errors import ConfigError

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
        msg["value"] = value.to(device=_device(msg)).expand(
            *fn.batch_shape, *fn.event_shape)
        msg["is_observed"] = True


def _device(msg: dict) -> torch.device | None:
    for key in ("loc", "logits", "probs"):
        tensor = getattr(msg["fn"], key, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return None


def is_enumerated(site: dict) -> bool:
    """Whether a trace's sample site is marked for enumeration and has a finite support."""
    return (site.get("infer", {}).get("enumerate") in ENUMERATE_MODES
            and site["fn"].has_enumerate_support)


def enumerated_sites(guide: Callable, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The guide's sites marked for enumeration, each with its support ``[C, *event_shape]``,
    found by one trace of the guide (random state forked, gradients off)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block(), \
            pyro.validation_enabled(False):
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
            raise ConfigError(f"guide site {name!r} is marked for enumeration but "
                              f"{type(fn).__name__} has no finite support to sum over")
        support = fn.enumerate_support(expand=False)
        sites[name] = support.reshape(support.shape[0], *fn.event_shape).detach()
    total = 1
    for support in sites.values():
        total *= support.shape[0]
    if total > MAX_CONFIGURATIONS:
        raise ConfigError(f"the enumerated sites {list(sites)} have {total} combinations of "
                          f"values, more than {MAX_CONFIGURATIONS}: sum over fewer, or sample "
                          "them with a score-function estimator")
    return sites


def configurations(sites: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Every combination of the sites' values, as ``{name: value}``."""
    names = list(sites)
    for index in itertools.product(*(range(sites[n].shape[0]) for n in names)):
        yield {name: sites[name][i] for name, i in zip(names, index)}


def fixed(fn: Callable, values: dict[str, torch.Tensor]) -> Callable:
    """``fn`` with the sites in ``values`` fixed (see :class:`FixSites`)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        with FixSites(values):
            return fn(*args, **kwargs)
    run.__self__ = getattr(fn, "__self__", fn)  # the pair's identity, for per-pair caches
    return run


def summed_log_weights(log_weights: Callable[[Callable, Callable], Any], model: Callable,
                       guide: Callable, sites: dict[str, torch.Tensor]) -> torch.Tensor:
    """logsumexp over every configuration c of ``log_weights(model_c, guide_c)`` (``[K, N]``
    each, the pair with the enumerated sites fixed to c): the per-datapoint log-weights with
    the discrete sites summed out."""
    per_configuration = [log_weights(fixed(model, values), fixed(guide, values))
                         for values in configurations(sites)]
    return torch.logsumexp(torch.stack(per_configuration), 0)
