"""The pair run inside the outer particle plate, and traces of its draws to replay it on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine

from pyro_vae.core.traces import PARTICLE_PLATE


def in_particle_plate(
    fn: Callable, num_draws: int, particle_dim: int, plated: bool, hide_params: bool
) -> Callable:
    """``fn`` run inside the outer particle plate of ``num_draws`` at ``particle_dim`` (as it
    is, for a single draw with ``plated=False``), its ``pyro.param`` messages hidden when
    ``hide_params``."""
    if hide_params:
        fn = poutine.block(fn, hide_types=["param"])
    if not plated:
        return fn

    def plated_fn(*a: Any, **k: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, num_draws, dim=particle_dim):
            return fn(*a, **k)

    return plated_fn


def mapped_trace(trace: poutine.Trace, view: Callable[[dict], torch.Tensor]) -> poutine.Trace:
    """The unobserved sample sites of ``trace`` (subsample sites included), each with the value
    ``view(site)``, for ``poutine.replay``."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            out.add_node(name, **dict(site, value=view(site)))
    return out


def detached_trace(trace: poutine.Trace, skip: tuple[str, ...] = ()) -> poutine.Trace:
    """The unobserved sample sites of ``trace`` (but those in ``skip``) with detached values."""
    out = mapped_trace(trace, lambda site: site["value"].detach())
    for name in skip:
        out.remove_node(name)
    return out
