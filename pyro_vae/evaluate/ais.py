r"""Annealed importance sampling (AIS) of log p(x) per datapoint, with HMC transitions.

Importance sampling from the guide is only as good as the guide: log p̂_K(x) falls short of
log p(x) by about KL(q(z|x) ‖ p(z|x)) when K is small next to exp(KL). AIS (Neal 2001; for
decoder-based models Wu, Burda, Salakhutdinov and Grosse 2017) moves C chains per datapoint
from q(z|x) to the posterior through the intermediate densities

.. math::

    f_t(z) = q(z \mid x)^{1 - \beta_t}\, p(x, z)^{\beta_t},
    \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

accumulating for each chain
:math:`\log w = \sum_{t=1}^T (\beta_t - \beta_{t-1})\,
[\log p(x, z_{t-1}) - \log q(z_{t-1} \mid x)]`,
where z_t follows z_{t−1} by an HMC transition that leaves f_t invariant. Then
E[w] = p(x), and log p̂_AIS(x) = logsumexp_c log w_c − log C is a stochastic lower bound that
tends to log p(x) as T grows, whatever the guide. The schedule is sigmoidal by default
(Grosse et al. 2015: β_t ∝ σ(δ(2t/T − 1)), δ = 4, rescaled to [0, 1]).

Each transition is one HMC proposal (``leapfrog_steps`` leapfrog steps, unit mass) accepted or
rejected per chain and datapoint; the step size is per datapoint, shared by its chains, and
adapted after every transition towards ``target_accept`` (×1.05 above it, ×0.95 below; Wu et
al.'s code uses 1.02 and 0.98 over thousands of steps; adapting on the chains' own
acceptances is standard practice, and the tests measure the estimate against exact values).
All datapoints and chains are one vectorized call
(the chains are the particle plate); there is no Python loop over either.

Requirements: local latents with real support (Normal, MultivariateNormal, ...), the data
plate the outermost plate. Global latents (outside the data plate) are held fixed at one draw
θ ~ q(θ) shared by every chain and datapoint of a batch: the estimate is then of log p(x | θ).
With the exact posterior as guide every f_t is the posterior, every log w equals log p(x), and
AIS returns it exactly at any T.

``start="prior"`` anneals from the prior instead, f_t(z) = p(z) p(x | z)^β_t (the model run
with its observed sites hidden is the starting density; it must draw every latent the guide
does). It needs no guide at all, at the price of more steps: the prior is usually far from the
posterior. With global latents it is refused (their draw would come from the prior).

Guide sites marked for enumeration (:mod:`pyro_vae.core.enumeration`) are summed out as the
evaluator sums them: AIS runs once per configuration c, with c fixed in model and guide, each
chain's weight estimating p(x, c); chain j's weights are summed over c, so
Σ_c w_jc is unbiased for p(x). Reverse AIS starts from an exact draw of the continuous latents
and has no such sum: it refuses enumerated sites.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from pyro import poutine

from pyro_vae.core import enumeration
from pyro_vae.core.traces import guess_max_plate_nesting
from pyro_vae.data.batches import as_source
from pyro_vae.evaluate.annealing import Annealing, anneal, check_chains, sigmoid_schedule
from pyro_vae.evaluate.khat import MIN_KHAT_PARTICLES, pareto_khat
from pyro_vae.util import budget
from pyro_vae.util.errors import ConfigError

STARTS = ("guide", "prior")


@dataclass
class AISResult:
    """Per-datapoint AIS results (CPU, float64, shape ``[N]``): ``log_px`` = log p̂_AIS(x),
    ``stderr`` its delta-method standard error over the chains, ``ess`` the chains' normalized
    effective sample size, ``khat`` (C ≥ 21, else ``None``), ``accept`` the mean HMC
    acceptance rate; ``log_weights`` ``[C, N]``."""

    log_px: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    accept: torch.Tensor
    log_weights: torch.Tensor
    khat: torch.Tensor | None
    num_steps: int

    def to_inference_data(self) -> Any:
        """ArviZ ``InferenceData`` with one group, ``ais``: ``log_px``, ``stderr``, ``ess``,
        ``accept`` (and ``khat``) with dim ``datapoint``, ``log_weight`` with dims
        ``("chain", "datapoint")``, the summary as attributes."""
        import json

        import xarray as xr

        from pyro_vae.evaluate.khat import arviz_module

        data_vars = {
            name: (("datapoint",), getattr(self, name).numpy())
            for name in ("log_px", "stderr", "ess", "accept")
        }
        if self.khat is not None:
            data_vars["khat"] = (("datapoint",), self.khat.numpy())
        data_vars["log_weight"] = (("chain", "datapoint"), self.log_weights.numpy())
        coords = {
            "datapoint": range(self.log_px.shape[0]),
            "chain": range(self.log_weights.shape[0]),
        }
        dataset = xr.Dataset(
            data_vars,
            coords=coords,
            attrs={"num_steps": self.num_steps, "summary": json.dumps(self.summary())},
        )
        return arviz_module().InferenceData(ais=dataset)

    def summary(self) -> dict[str, Any]:
        n = self.log_px.shape[0]
        return {
            "num_datapoints": n,
            "num_chains": self.log_weights.shape[0],
            "num_steps": self.num_steps,
            "log_px": {
                "mean": self.log_px.mean().item(),
                "stderr": self.log_px.std().item() / math.sqrt(n) if n > 1 else None,
            },
            "accept": self.accept.mean().item(),
            "ess": self.ess.mean().item(),
        }


def ais(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    num_chains: int = 16,
    num_steps: int = 500,
    leapfrog_steps: int = 5,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    schedule: torch.Tensor | None = None,
    start: str = "guide",
    batch_size: int = 100,
    collate_fn: Callable | None = None,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
) -> AISResult:
    """AIS estimates of log p(x) for every datapoint of ``data`` (any form of
    :func:`pyro_vae.evaluate.evaluate_dataset`), batch by batch; see the module docstring.

    ``schedule`` overrides the sigmoidal β's (a 1-D increasing tensor from 0 to 1); ``start``
    is ``"guide"`` (anneal from q(z|x)) or ``"prior"`` (from p(z)).
    """
    path = _path(num_chains, num_steps, leapfrog_steps, step_size, target_accept, schedule)
    if start not in STARTS:
        raise ConfigError(f"start must be one of {STARTS}, got {start!r}")
    betas = path.betas
    source = as_source(data, collate_fn)
    first = next(iter(source.ordered(batch_size)), None)
    runs = (
        1
        if first is None
        else enumeration.num_configurations(  # AIS runs once per each
            enumeration.enumerated_sites(guide, first.args, first.kwargs)
        )
    )
    with budget.work(
        budget.num_batches(source, batch_size) * (len(betas) - 1) * runs,
        f"AIS of {len(betas) - 1:,} steps with {num_chains:,} chains"
        + (f" for each of {runs:,} enumerated configurations" if runs > 1 else ""),
    ):
        return _forward_ais(
            model,
            guide,
            source,
            path,
            start=start,
            batch_size=batch_size,
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
        )


def _path(
    num_chains: int,
    num_steps: int,
    leapfrog_steps: int,
    step_size: float,
    target_accept: float,
    schedule: torch.Tensor | None,
) -> Annealing:
    """The chains and their path from 0 to 1 (the sigmoidal β's unless ``schedule`` is given),
    the counts and the schedule checked."""
    if num_chains < 1 or num_steps < 1 or leapfrog_steps < 1:
        raise ConfigError("num_chains, num_steps and leapfrog_steps must be >= 1")
    betas = sigmoid_schedule(num_steps) if schedule is None else schedule.double()
    if betas[0] != 0 or betas[-1] != 1 or not bool((betas[1:] >= betas[:-1]).all()):
        raise ConfigError("the schedule must rise from 0 to 1")
    return Annealing(num_chains, betas, leapfrog_steps, step_size, target_accept)


def _prepared(
    model: Callable,
    guide: Callable,
    batch: Any,
    max_plate_nesting: int | None,
    data_plate: str | None,
    first: bool,
) -> tuple[int, dict]:
    """A batch's plate nesting (guessed unless given) and the guide's enumerated sites; on the
    ``first`` batch, the pair checked for running its chains as one particle plate."""
    args, kwargs = batch.args, batch.kwargs
    nesting = (
        max_plate_nesting
        if max_plate_nesting is not None
        else guess_max_plate_nesting(model, guide, args, kwargs)
    )
    if first:
        check_chains(model, guide, args, kwargs, nesting, data_plate)
    return nesting, enumeration.enumerated_sites(guide, args, kwargs)


def _forward_ais(
    model: Callable,
    guide: Callable,
    source: Any,
    path: Annealing,
    *,
    start: str,
    batch_size: int,
    max_plate_nesting: int | None,
    data_plate: str | None,
) -> AISResult:
    log_ws, accepts = [], []
    for index, batch in enumerate(source.ordered(batch_size)):
        nesting, sites = _prepared(model, guide, batch, max_plate_nesting, data_plate, index == 0)
        per_configuration = []
        for values in enumeration.configurations(sites) if sites else [{}]:
            model_c = enumeration.fixed(model, values) if values else model
            proposal = enumeration.fixed(guide, values) if values else guide
            if start == "prior":
                proposal = _prior_of(model_c)
            per_configuration.append(
                anneal(
                    model_c,
                    proposal,
                    batch.args,
                    batch.kwargs,
                    path,
                    nesting,
                    prior=start == "prior",
                    data_plate=data_plate,
                )
            )
        log_w = torch.logsumexp(torch.stack([w for w, _ in per_configuration]), 0)
        accept = torch.stack([a for _, a in per_configuration]).mean(0)
        log_ws.append(log_w.cpu())
        accepts.append(accept.cpu())
    log_w = torch.cat(log_ws, dim=1)
    return _result(
        log_w,
        torch.cat(accepts),
        len(path.betas) - 1,
        torch.logsumexp(log_w, 0) - math.log(path.num_chains),
        pareto_khat(log_w) if path.num_chains >= MIN_KHAT_PARTICLES else None,
    )


def _prior_of(model: Callable) -> Callable:
    """The model's latent sites as a starting density: the model run with its observed sites
    (data, factors, fixed discrete sites) hidden from the trace."""

    def prior(*args: Any, **kwargs: Any) -> None:
        with poutine.block(hide_fn=lambda msg: msg["type"] == "sample" and msg["is_observed"]):
            model(*args, **kwargs)

    return prior


def _result(
    log_w: torch.Tensor,
    accept: torch.Tensor,
    num_steps: int,
    log_px: torch.Tensor,
    khat: torch.Tensor | None,
) -> AISResult:
    """An :class:`AISResult` from the chains' log-weights ``[C, N]``: the delta-method
    standard error and the normalized ESS of the weights."""
    num_chains = log_w.shape[0]
    weights = (log_w - log_w.max(0).values).exp()
    normalized = weights / weights.sum(0)
    stderr = (
        weights.std(0) / weights.mean(0) / math.sqrt(num_chains)
        if num_chains > 1
        else torch.full_like(log_px, math.nan)  # one chain has no spread to measure
    )
    return AISResult(
        log_px=log_px,
        stderr=stderr,
        ess=1.0 / (num_chains * normalized.square().sum(0)),
        accept=accept,
        log_weights=log_w,
        khat=khat,
        num_steps=num_steps,
    )


def reverse_ais(
    model: Callable,
    guide: Callable,
    data: Any,
    latents: dict[str, torch.Tensor],
    *,
    num_chains: int = 16,
    num_steps: int = 500,
    leapfrog_steps: int = 5,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    schedule: torch.Tensor | None = None,
    batch_size: int = 100,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
) -> AISResult:
    r"""Reverse AIS (Grosse, Ghahramani and Adams 2015): chains start at exact posterior draws
    ``latents`` (``{site: [N, ...]}``, one per datapoint, e.g. the latents that generated
    simulated data) and are annealed from the posterior back to the guide. Then
    E[w_rev] = 1/p(x), so ``log_px`` = −(logsumexp_c log w_rev − log C) is a stochastic
    *upper* bound on log p(x), which falls towards it as the number of steps grows. With
    :func:`ais` (a lower bound) it brackets log p(x): :func:`pyro_vae.evaluate.bdmc.bdmc`."""
    forward = _path(num_chains, num_steps, leapfrog_steps, step_size, target_accept, schedule)
    betas = forward.betas.flip(0)
    path = replace(forward, betas=betas)
    log_ws, accepts, offset = [], [], 0
    for batch in as_source(data).ordered(batch_size):
        nesting, sites = _prepared(model, guide, batch, max_plate_nesting, data_plate, offset == 0)
        if sites:
            raise ConfigError(
                f"reverse AIS starts from an exact draw of the continuous latents "
                f"and cannot sum out the enumerated sites {list(sites)}"
            )
        start = {k: v[offset : offset + batch.size] for k, v in latents.items()}
        offset += batch.size
        log_w, accept = anneal(
            model,
            guide,
            batch.args,
            batch.kwargs,
            path,
            nesting,
            start=start,
            data_plate=data_plate,
        )
        log_ws.append(log_w.cpu())
        accepts.append(accept.cpu())
    log_w = torch.cat(log_ws, dim=1)
    upper = -(torch.logsumexp(log_w, 0) - math.log(num_chains))
    return _result(log_w, torch.cat(accepts), len(betas) - 1, upper, None)
