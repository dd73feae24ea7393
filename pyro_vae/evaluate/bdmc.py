"""Bidirectional Monte Carlo (Grosse, Ghahramani and Adams 2015): on data simulated from a
model (:func:`simulate`), whose generating latents are exact posterior draws, forward AIS
(:func:`~pyro_vae.evaluate.ais.ais`, a stochastic lower bound on log p(x)) and reverse AIS
(:func:`~pyro_vae.evaluate.ais.reverse_ais`, an upper bound) bracket log p(x)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.data.batches import as_source
from pyro_vae.evaluate.ais import AISResult, ais, reverse_ais
from pyro_vae.util import budget
from pyro_vae.util.errors import ConfigError


@dataclass
class BDMCResult:
    """Bidirectional Monte Carlo: ``lower`` (forward AIS) and ``upper`` (reverse AIS) per
    datapoint; log p(x) lies between them up to Monte Carlo error, and ``gap`` = upper − lower
    bounds how far either is from it."""

    lower: AISResult
    upper: AISResult

    @property
    def gap(self) -> torch.Tensor:
        return self.upper.log_px - self.lower.log_px


def bdmc(
    model: Callable, guide: Callable, data: Any, latents: dict[str, torch.Tensor], **options: Any
) -> BDMCResult:
    """Forward and reverse AIS on the same data with the same options (:func:`ais`,
    :func:`reverse_ais`): on data simulated from the model, whose generating latents are exact
    posterior draws, the two bracket log p(x) (Grosse et al. 2015; Wu et al. 2017 for
    decoder-based models)."""
    steps = (
        options.get("num_steps", 500)
        if options.get("schedule") is None
        else len(options["schedule"]) - 1
    )
    with budget.work(
        2 * steps * budget.num_batches(as_source(data), options.get("batch_size", 100)),
        f"BDMC of {steps:,} steps each way with {options.get('num_chains', 16):,} chains",
    ):
        return BDMCResult(
            lower=ais(model, guide, data, **options),
            upper=reverse_ais(model, guide, data, latents, **options),
        )


def simulate(
    model: Callable, guide: Callable, data: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Data drawn from the model, and the latents that generated them: exact posterior draws
    for :func:`bdmc`. ``model(data)`` must take the data as its one argument and observe it
    at one site; ``data`` only sizes the draw (its values are replaced). Returns the drawn data
    and ``{site: value}`` of the guide's latents."""
    with torch.no_grad():
        conditioned = poutine.trace(model).get_trace(data)
        observed = [
            name
            for name, site in conditioned.nodes.items()
            if site["type"] == "sample" and site["is_observed"]
        ]
        if len(observed) != 1:
            raise ConfigError(
                f"simulating needs a model that observes one site, the data it "
                f"takes; this one observes {observed}"
            )
        drawn = poutine.trace(poutine.uncondition(model)).get_trace(data)
        guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(data))
        guided = [
            name
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        ]
        value = drawn.nodes[observed[0]]["value"]
        if value.shape != data.shape:
            raise ConfigError(
                f"the observed site {observed[0]!r} is not the data: shape "
                f"{list(value.shape)} against {list(data.shape)}"
            )
        return value.detach(), {name: drawn.nodes[name]["value"].detach() for name in guided}
