r"""ELBO surgery (Hoffman and Johnson 2016): the mean rate split into the index-code mutual
information and the marginal KL of the aggregate posterior, and the prior-hole check.

On N points x_1..x_N the aggregate posterior is the mixture q(z) = (1/N) Σ_n q(z | x_n), and

.. math::

    \frac1N \sum_m \mathrm{KL}(q(z|x_m) \,\|\, p(z))
    = \underbrace{\frac1N \sum_m \mathbb E_{q(z|x_m)}[\log q(z|x_m) - \log q(z)]}_{I_q(x;\,z)}
    + \underbrace{\mathbb E_{q(z)}[\log q(z) - \log p(z)]}_{\mathrm{KL}(q(z) \,\|\, p(z))}.

Each point's S codes z_ms ~ q(z | x_m) are scored against every point's encoding:
log q(z_ms) = logsumexp_n log q(z_ms | x_n) − log N, the exact density of the mixture, so the
two terms are unbiased Monte Carlo estimates for the aggregate posterior of these N points
(their sum is the Monte Carlo rate of the same codes). That costs S·N² guide densities,
evaluated in blocks of ``code_chunk`` codes by ``batch_size`` encodings: one call of the guide,
conditioned on the codes in a particle plate, per block. Since the mixture holds the code's own
component, log q(z_ms) ≥ log q(z_ms | x_m) − log N, so the estimate of I_q never exceeds log N.
With N a subsample of a larger data set, the terms are those of the subsample's aggregate
posterior: as N grows they converge to the data set's, and I_q is bounded by log N, so an
encoder that tells its points apart saturates at log N.

Prior holes: codes z ~ p(z) (the model run on the first batch in a particle plate, its
guided latents' draws) scored by the same mixture; a draw is in a hole when its log q(z) lies
below the ``hole_percentile`` percentile of the data codes' own log q(z_ms), each of those
taken leave-one-out (the mixture of the other N − 1 encodings, as a fresh draw from q(z) would
see it). The share of prior draws in holes is the part of the prior the decoder was rarely
trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.core.drawing import draw_particles
from pyro_vae.core.particle_plate import in_particle_plate
from pyro_vae.core.traces import is_auxiliary, reduce_to_particles_and_data, site_log_prob
from pyro_vae.util import budget
from pyro_vae.util.errors import ConfigError


def mean_and_stderr(values: torch.Tensor) -> dict[str, float]:
    n = values.shape[0]
    return {
        "mean": values.mean().item(),
        "stderr": values.std().item() / math.sqrt(n) if n > 1 else math.nan,
    }


@dataclass
class Surgery:
    """The decomposition on ``num_points`` points with ``samples`` codes each: per point the
    index-code mutual information term ``mutual_info`` and the marginal KL term
    ``marginal_kl`` (``[N]``; their means are I_q and KL(q(z) ‖ p(z)), and their sum is the
    Monte Carlo rate of the codes), ``rate`` (the rate of the same points from
    :func:`~pyro_vae.evaluate.rate_distortion.rate_distortion`, when it ran this), the data
    codes' leave-one-out log q(z) (``code_log_density``, ``[N·S]``), the prior draws'
    log q(z) (``prior_log_density``, ``[P]``, ``None`` without draws) and the prior draws in
    holes by guide site (``hole_codes``, ``[H, ...]``)."""

    num_points: int
    samples: int
    mutual_info: torch.Tensor
    marginal_kl: torch.Tensor
    hole_percentile: float
    code_log_density: torch.Tensor
    prior_log_density: torch.Tensor | None = None
    hole_codes: dict[str, torch.Tensor] | None = None
    rate: torch.Tensor | None = None

    @property
    def hole_threshold(self) -> float:
        """The ``hole_percentile`` percentile of the data codes' leave-one-out log q(z)."""
        return torch.quantile(self.code_log_density, self.hole_percentile / 100).item()

    @property
    def hole_share(self) -> float | None:
        """The share of prior draws whose log q(z) lies below :attr:`hole_threshold`."""
        if self.prior_log_density is None:
            return None
        return (self.prior_log_density < self.hole_threshold).double().mean().item()

    def summary(self) -> dict[str, Any]:
        """I_q and the marginal KL with standard errors over the points (the points share
        the mixture, so these treat its terms as independent), log N, their sum, the rate
        of the same points and the prior holes."""
        stats = mean_and_stderr
        out: dict[str, Any] = {
            "num_points": self.num_points,
            "samples": self.samples,
            "mutual_info": stats(self.mutual_info),
            "log_num_points": math.log(self.num_points),
            "marginal_kl": stats(self.marginal_kl),
            "rate_monte_carlo": stats(self.mutual_info + self.marginal_kl),
        }
        if self.rate is not None:
            out["rate"] = stats(self.rate)
        if self.prior_log_density is not None:
            out["prior_holes"] = {
                "percentile": self.hole_percentile,
                "threshold": self.hole_threshold,
                "prior_draws": self.prior_log_density.shape[0],
                "share": self.hole_share,
            }
        return out


def _data_axis(value: torch.Tensor, event_dim: int, data_dim: int) -> int:
    """Where the data plate's dimension lies in a site's value (particle dimension first)."""
    return value.dim() - event_dim + data_dim


def _as_codes(value: torch.Tensor, axis: int) -> torch.Tensor:
    """``[k, ..., B (at axis), ...]`` → ``[k, B, ...]``: a code per particle and datapoint."""
    return value.movedim(axis, 1)


def _placed(codes: torch.Tensor, axis: int, rows: int) -> torch.Tensor:
    """``[M, ...]`` codes → ``[M, ..., rows (at axis), ...]``: each code for every row."""
    placed = codes.unsqueeze(axis)
    shape = list(placed.shape)
    shape[axis] = rows
    return placed.expand(shape)


class _Mixture:
    """The guide's densities of given codes under every encoding of a batch of points."""

    def __init__(self, guide: Callable, nesting: int, data_dim: int, axes: dict[str, int]):
        self.guide = poutine.block(guide, hide_types=["param"])
        self.nesting, self.data_dim, self.axes = nesting, data_dim, axes

    def log_q(self, codes: dict[str, torch.Tensor], args: tuple, kwargs: dict, rows: int):
        """log q(code_c | x_n) summed over the guide's sites, ``[M, rows]``."""
        num = next(iter(codes.values())).shape[0]
        values = {name: _placed(c, self.axes[name], rows) for name, c in codes.items()}
        plated = in_particle_plate(self.guide, num, -(self.nesting + 1), True, False)
        trace = poutine.trace(poutine.condition(plated, data=values)).get_trace(*args, **kwargs)
        trace = prune_subsample_sites(trace)
        terms = [
            reduce_to_particles_and_data(
                site_log_prob(trace.nodes[name]), self.nesting + 1, self.data_dim, (num, rows), name
            )
            for name in codes
        ]
        return torch.stack(terms).sum(0).double()


def _refuse(drawn: Any) -> None:
    if drawn.global_latents:
        raise ConfigError(
            f"ELBO surgery needs local latents only: the guide's "
            f"{[s['name'] for s in drawn.global_latents]} lie outside the data plate"
        )
    auxiliary = [s["name"] for s in drawn.guide_latents if is_auxiliary(s)]
    if auxiliary:
        raise ConfigError(
            f"ELBO surgery needs a guide density of the model's latents: the guide's "
            f"auxiliary sites {auxiliary} have no aggregate posterior"
        )


def elbo_surgery(
    model: Callable,
    guide: Callable,
    source: Any,
    *,
    samples: int,
    prior_draws: int,
    hole_percentile: float,
    batch_size: int,
    code_chunk: int,
    max_plate_nesting: int,
    data_plate: str | None,
    **kwargs: Any,
) -> Surgery:
    """The decomposition of the module docstring on every point of ``source`` (a
    :mod:`pyro_vae.data.batches` source of at least two points), random numbers from torch's
    global generator; called by :func:`~pyro_vae.evaluate.rate_distortion.rate_distortion`,
    under ``torch.no_grad()`` and with the modules in eval mode."""
    batches = [(b.args, {**b.kwargs, **kwargs}, b.size) for b in source.ordered(batch_size)]
    num_points = sum(size for _, _, size in batches)
    codes: dict[str, list[torch.Tensor]] = {}
    log_prior, axes, data_dim = [], {}, -1
    for args, call_kwargs, _ in batches:
        drawn = draw_particles(
            model, guide, args, call_kwargs, samples, max_plate_nesting,
            data_plate=data_plate, enumerate_guide=False, compact=True,
        )  # fmt: skip
        _refuse(drawn)
        data_dim = drawn.data_dim
        for site in drawn.guide_latents:
            event_dim = len(site["fn"].event_shape)
            axes[site["name"]] = axis = _data_axis(site["value"], event_dim, data_dim)
            codes.setdefault(site["name"], []).append(_as_codes(site["value"], axis))
        log_prior.append(drawn.log_prior.double())
    data_codes = {name: torch.cat(parts, 1).flatten(0, 1) for name, parts in codes.items()}
    owner = torch.arange(num_points).repeat(samples)
    all_codes = data_codes
    if prior_draws:
        prior = _prior_codes(model, batches[0], prior_draws, max_plate_nesting, axes)
        all_codes = {name: torch.cat([data_codes[name], prior[name]]) for name in data_codes}
        owner = torch.cat([owner, torch.full((prior_draws,), -1)])
    mixture = _Mixture(guide, max_plate_nesting, data_dim, axes)
    total = owner.shape[0]
    full = torch.full((total,), -math.inf, dtype=torch.float64)
    loo, own = full.clone(), torch.zeros(total, dtype=torch.float64)
    start = 0
    blocks = len(batches) * -(-total // code_chunk)
    with budget.aside(), budget.work(blocks, f"ELBO surgery of {num_points:,} points"):
        for args, call_kwargs, rows in batches:
            for first in range(0, total, code_chunk):
                block = slice(first, min(first + code_chunk, total))
                chunk = {name: c[block] for name, c in all_codes.items()}
                log_q = mixture.log_q(chunk, args, call_kwargs, rows).cpu()
                mine = (owner[block, None] - start) == torch.arange(rows)[None]
                own[block] += torch.where(mine, log_q, 0.0).sum(1)
                full[block] = torch.logaddexp(full[block], log_q.logsumexp(1))
                loo[block] = torch.logaddexp(
                    loo[block], log_q.masked_fill(mine, -math.inf).logsumexp(1)
                )
                budget.piece_done()
            start += rows
    num_codes = samples * num_points
    log_q_agg = full[:num_codes] - math.log(num_points)
    prior_log_p = torch.cat(log_prior, 1).flatten().cpu()
    per_code_mi = own[:num_codes] - log_q_agg
    per_code_kl = log_q_agg - prior_log_p
    result = Surgery(
        num_points=num_points,
        samples=samples,
        mutual_info=per_code_mi.reshape(samples, num_points).mean(0),
        marginal_kl=per_code_kl.reshape(samples, num_points).mean(0),
        hole_percentile=hole_percentile,
        code_log_density=loo[:num_codes] - math.log(num_points - 1),
    )
    if prior_draws:
        result.prior_log_density = full[num_codes:] - math.log(num_points)
        holes = result.prior_log_density < result.hole_threshold
        result.hole_codes = {name: c[num_codes:][holes].cpu() for name, c in all_codes.items()}
    return result


def _prior_codes(
    model: Callable, batch: tuple, draws: int, nesting: int, axes: dict[str, int]
) -> dict[str, torch.Tensor]:
    """``draws`` codes z ~ p(z) of the guide's sites: the model run on ``batch`` in a particle
    plate, as many particles as it takes."""
    args, kwargs, rows = batch
    particles = -(-draws // rows)
    plated = in_particle_plate(
        poutine.block(model, hide_types=["param"]), particles, -(nesting + 1), True, False
    )
    trace = prune_subsample_sites(poutine.trace(plated).get_trace(*args, **kwargs))
    out = {}
    for name, axis in axes.items():
        value = trace.nodes[name]["value"]
        out[name] = _as_codes(value, axis).flatten(0, 1)[:draws]
    return out
