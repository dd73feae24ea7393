"""HMC annealing of a batch's chains along a schedule β_0, ..., β_T between the guide (β = 0)
and the joint p(x, z) (β = 1), accumulating each chain's log-weight: the machinery behind
forward and reverse AIS (:mod:`pyro_vae.evaluate.ais`, whose docstring states the math).

The chains of every datapoint run as one particle plate around the pair; the local latents move
by leapfrog HMC in their own (real) space, the global ones are held at one draw from the guide;
each datapoint's step size adapts towards a target acceptance rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from torch.distributions import constraints

from pyro_vae.core.log_probs import vectorized_log_probs
from pyro_vae.core.traces import PARTICLE_PLATE, global_latents
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.util import budget
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.rng import forked_rng

SIGMOID_SHARPNESS = 4.0
STEP_GROWTH, STEP_SHRINK = 1.05, 0.95


def sigmoid_schedule(num_steps: int, sharpness: float = SIGMOID_SHARPNESS) -> torch.Tensor:
    """β_0 = 0 < ... < β_T = 1, sigmoidal in t (more steps near both ends)."""
    t = torch.linspace(-sharpness, sharpness, num_steps + 1, dtype=torch.float64)
    s = torch.sigmoid(t)
    return (s - s[0]) / (s[-1] - s[0])


class _Target:
    """log q(z|x) and log p(x, z) of the pair at given local latent values, ``[C, N]`` each,
    differentiable in the values; global latents fixed."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        num_chains: int,
        max_plate_nesting: int,
        fixed: dict[str, torch.Tensor],
        data_plate: str | None = None,
    ):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.num_chains, self.nesting, self.fixed = num_chains, max_plate_nesting, fixed
        self.data_plate = data_plate

    def __call__(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        trace = poutine.Trace()
        for name, value in {**self.fixed, **values}.items():
            trace.add_node(name, type="sample", value=value, is_observed=False, infer={})
        drawn = vectorized_log_probs(
            self.model,
            poutine.replay(self.guide, trace=trace),
            *self.args,
            num_particles=self.num_chains,
            max_plate_nesting=self.nesting,
            data_plate=self.data_plate,
            **self.kwargs,
        )
        return drawn.log_q, drawn.log_p


def _per_point(values: dict[str, torch.Tensor], fn: Callable) -> torch.Tensor:
    """Σ over each value's dimensions beyond [C, N] of ``fn(value)``, ``[C, N]``."""
    return sum(fn(v).reshape(v.shape[0], v.shape[1], -1).sum(-1) for v in values.values())


def _initial(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_chains: int,
    nesting: int,
    data_plate: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Local latents drawn from the guide in the chains' plate, and the global ones at one
    draw from q(θ)."""
    drawn = vectorized_log_probs(
        model,
        guide,
        *args,
        num_particles=num_chains,
        max_plate_nesting=nesting,
        data_plate=data_plate,
        **kwargs,
    )
    globals_ = set(global_latents(drawn.guide_trace, drawn.data_plate))
    fixed = {}
    if globals_:  # one θ ~ q(θ) for every chain, and the chains' z drawn given it
        one = poutine.trace(guide).get_trace(*args, **kwargs)
        fixed = {name: one.nodes[name]["value"].detach() for name in globals_}
        replay = poutine.Trace()
        for name, value in fixed.items():
            replay.add_node(name, type="sample", value=value, is_observed=False, infer={})
        drawn = vectorized_log_probs(
            model,
            poutine.replay(guide, trace=replay),
            *args,
            num_particles=num_chains,
            max_plate_nesting=nesting,
            data_plate=data_plate,
            **kwargs,
        )
    local = {}
    for name, site in drawn.guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name in globals_:
            continue
        if site["fn"].support.is_discrete or not _is_real(site["fn"].support):
            raise ConfigError(
                f"AIS moves the latents by HMC in their own space: guide site "
                f"{name!r} has support {site['fn'].support}, not the real line"
            )
        frames = {
            f.name: f.dim
            for f in site["cond_indep_stack"]
            if f.vectorized and f.name != PARTICLE_PLATE
        }
        if frames and min(frames.values()) != frames.get(drawn.data_plate):
            raise ConfigError("AIS needs the data plate to be the outermost plate")
        value = site["value"].detach()
        local[name] = value.expand(num_chains, *value.shape[1:]).clone()
    return local, fixed


def _is_real(support: Any) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real or isinstance(support, type(constraints.real))


@dataclass(frozen=True)
class Annealing:
    """The chains and their path: ``num_chains`` per datapoint along ``betas`` (β_0, ..., β_T),
    each transition ``leapfrog_steps`` leapfrog steps of a per-datapoint size that starts at
    ``step_size`` and adapts towards the acceptance rate ``target_accept``."""

    num_chains: int
    betas: torch.Tensor
    leapfrog_steps: int
    step_size: float
    target_accept: float


def anneal(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    path: Annealing,
    nesting: int,
    *,
    start: dict[str, torch.Tensor] | None = None,
    prior: bool = False,
    data_plate: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log w per chain and datapoint along ``path.betas`` (rising: forward AIS from the guide,
    or from the prior when ``guide`` is the model's prior and ``prior`` says so; falling:
    reverse AIS from ``start``, exact posterior draws ``[N, ...]`` per site), and the mean
    acceptance rate per datapoint."""
    num_chains, betas, leapfrog_steps = path.num_chains, path.betas, path.leapfrog_steps
    z, fixed = _initial(model, guide, args, kwargs, num_chains, nesting, data_plate)
    if prior and fixed:
        raise ConfigError(
            f"AIS from the prior would draw the global latents {sorted(fixed)} "
            "from their prior too: start from the guide"
        )
    if start is not None:
        if fixed:
            raise ConfigError(
                "reverse AIS starts from exact posterior draws of the local "
                f"latents; the global latents {list(fixed)} have none"
            )
        if set(start) != set(z):
            raise ConfigError(
                f"reverse AIS needs a draw of every local latent {sorted(z)}, got {sorted(start)}"
            )
        z = {k: start[k].to(z[k]).expand_as(z[k]).clone() for k in z}
    target = _Target(model, guide, args, kwargs, num_chains, nesting, fixed, data_plate)

    def log_f(values: dict[str, torch.Tensor], beta: float, grad: bool):
        with torch.enable_grad():
            values = {k: v.detach().requires_grad_(grad) for k, v in values.items()}
            log_q, log_p = target(values)
            total = (1 - beta) * log_q + beta * log_p
            grads = (
                dict(zip(values, torch.autograd.grad(total.sum(), list(values.values()))))
                if grad
                else None
            )
        return total.detach(), (log_p - log_q).detach(), grads

    _, log_ratio, _ = log_f(z, 0.0, False)
    num_data = log_ratio.shape[1]
    eps = log_ratio.new_full((num_data,), path.step_size)
    log_w = torch.zeros_like(log_ratio, dtype=torch.float64)
    accepted = torch.zeros(num_data, dtype=torch.float64, device=log_ratio.device)
    for t in range(1, len(betas)):
        beta, previous = float(betas[t]), float(betas[t - 1])
        log_w += (beta - previous) * log_ratio.double()
        current, _, grads = log_f(z, beta, True)
        shape = lambda v, eps=eps: eps.reshape(1, -1, *([1] * (v.dim() - 2)))  # noqa: E731
        momentum = {k: torch.randn_like(v) for k, v in z.items()}
        kinetic = _per_point(momentum, lambda m: 0.5 * m.square())
        new = dict(z)
        moving = {k: momentum[k] + 0.5 * shape(v) * grads[k] for k, v in z.items()}
        for step in range(leapfrog_steps):
            new = {k: new[k] + shape(new[k]) * moving[k] for k in new}
            proposed, _, grads_new = log_f(new, beta, True)
            half = 0.5 if step == leapfrog_steps - 1 else 1.0
            moving = {k: moving[k] + half * shape(new[k]) * grads_new[k] for k in new}
        log_accept = proposed + _per_point(moving, lambda m: -0.5 * m.square()) - current + kinetic
        accept = torch.rand_like(log_accept).log() < torch.nan_to_num(log_accept, nan=-math.inf)
        z = {
            k: torch.where(accept.reshape(*accept.shape, *([1] * (v.dim() - 2))), new[k], v)
            for k, v in z.items()
        }
        rate = accept.double().mean(0)
        accepted += rate
        eps = torch.where(rate > path.target_accept, eps * STEP_GROWTH, eps * STEP_SHRINK)
        _, log_ratio, _ = log_f(z, beta, False)
        budget.piece_done()
    return log_w, accepted / (len(betas) - 1)


def check_chains(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    nesting: int,
    data_plate: str | None,
) -> None:
    """Refuse, in one line, a pair whose networks see the chains' particle dimension
    (:func:`~pyro_vae.core.vectorization.particle_mismatch`, on a fork of the random state): the
    evaluator scores such a pair one particle at a time, AIS has its chains only as a plate."""
    with forked_rng(), pyro.validation_enabled(False), torch.no_grad():
        reason = particle_mismatch(
            model, guide, args, kwargs, max_plate_nesting=nesting, data_plate=data_plate
        )
    if reason is not None:
        raise ConfigError(
            f"AIS runs the chains of every datapoint as one particle plate, but {reason}: "
            "write the networks to broadcast over leading dimensions, or estimate log p(x) "
            "by importance sampling (the evaluator draws one particle per call for such a "
            "pair)"
        )
