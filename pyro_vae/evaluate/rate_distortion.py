r"""The rate–distortion decomposition of the ELBO, per datapoint, for any pair the evaluator
takes: the rate R = KL(q(z|x) ‖ p(z)) (:mod:`pyro_vae.evaluate.rate`: closed form where torch
has one, Monte Carlo otherwise) and the distortion D = −E_q log p(x|z), so R + D = −ELBO; KL
per latent dimension and active units (Burda et al. 2016) of vector sites; and, on a
subsample, ELBO surgery and the prior-hole check (:mod:`pyro_vae.evaluate.surgery`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch

from pyro_vae.data.batches import as_source
from pyro_vae.evaluate.chunks import DEFAULT_PARTICLE_CHUNK, check_finite_inputs, num_chunks
from pyro_vae.evaluate.rate import Drawer, RateSums
from pyro_vae.evaluate.surgery import Surgery, elbo_surgery, mean_and_stderr
from pyro_vae.evaluate.weights import EvaluationError, eval_mode
from pyro_vae.util import budget
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.rng import forked_rng

ACTIVE_THRESHOLD = 0.01


@dataclass
class RateDistortion:
    """Per-datapoint rate and distortion (CPU float64 tensors, ``[N]``) from
    ``num_particles`` draws each; ``site_rate`` and ``methods`` (``"closed form"`` or
    ``"Monte Carlo"``) per local guide latent; ``kl_per_dim``: the mean KL of each latent
    dimension over the data (``[d]``, vector sites whose KL factorizes); ``activity``: the
    variance over the data of the guide's mean E_q[z_d | x] (``[d]``, vector sites), a unit
    active when it exceeds ``active_threshold``; ``global_rate``: E_q[log q(θ) − log p(θ)]
    of the global latents ``global_sites`` (a term of the data set, not of a datapoint);
    ``surgery`` on a subsample, when asked."""

    num_particles: int
    rate: torch.Tensor
    distortion: torch.Tensor
    site_rate: dict[str, torch.Tensor] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    kl_per_dim: dict[str, torch.Tensor] = field(default_factory=dict)
    activity: dict[str, torch.Tensor] = field(default_factory=dict)
    active_threshold: float = ACTIVE_THRESHOLD
    global_rate: float | None = None
    global_sites: tuple[str, ...] = ()
    surgery: Surgery | None = None
    vectorized: bool = True

    @property
    def num_datapoints(self) -> int:
        return self.rate.shape[0]

    @property
    def elbo(self) -> torch.Tensor:
        """−(R + D) per datapoint: the ELBO (its local part, with global latents)."""
        return -(self.rate + self.distortion)

    def active_units(self, site: str) -> int:
        """The number of latent dimensions of ``site`` whose activity exceeds the threshold."""
        return int((self.activity[site] > self.active_threshold).sum())

    def summary(self) -> dict[str, Any]:
        """Means with standard errors over the datapoints, each site's method, KL per
        dimension and active units, the global term and the surgery's summary."""
        out: dict[str, Any] = {
            "num_datapoints": self.num_datapoints,
            "num_particles": self.num_particles,
            "rate": mean_and_stderr(self.rate),
            "distortion": mean_and_stderr(self.distortion),
            "elbo": mean_and_stderr(self.elbo),
            "sites": {},
        }
        for name, rate in self.site_rate.items():
            entry: dict[str, Any] = {"method": self.methods[name], "rate": mean_and_stderr(rate)}
            if name in self.kl_per_dim:
                entry["kl_per_dim"] = self.kl_per_dim[name].tolist()
            if name in self.activity:
                entry["active_units"] = self.active_units(name)
                entry["activity"] = self.activity[name].tolist()
                entry["active_threshold"] = self.active_threshold
            out["sites"][name] = entry
        if self.global_sites:
            out["global"] = {"sites": list(self.global_sites), "rate": self.global_rate}
        if self.surgery is not None:
            out["surgery"] = self.surgery.summary()
        if not self.vectorized:
            out["vectorized"] = False
        return out

    def to_dict(self) -> dict[str, Any]:
        """The summary and the per-datapoint rate and distortion, as lists."""
        return {
            "summary": self.summary(),
            "datapoints": {"rate": self.rate.tolist(), "distortion": self.distortion.tolist()},
        }


def format_rate_distortion(summary: dict[str, Any]) -> str:
    """A plain-text report of :meth:`RateDistortion.summary` (values in nats)."""

    def row(label: str, entry: dict[str, float]) -> str:
        return f"{label:<24}{entry['mean']:>12.4f}{entry['stderr']:>12.4f}  nats"

    lines = [
        f"rate-distortion: {summary['num_datapoints']} datapoints, "
        f"{summary['num_particles']} particles",
        f"{'':<24}{'mean':>12}{'stderr':>12}",
        row("rate R", summary["rate"]),
        row("distortion D", summary["distortion"]),
        row("ELBO = -(R + D)", summary["elbo"]),
    ]
    for name, site in summary["sites"].items():
        lines.append(f"site {name!r}: rate {site['rate']['mean']:.4f} nats ({site['method']})")
        if "active_units" in site:
            lines.append(
                f"  active units {site['active_units']} of {len(site['activity'])} "
                f"(Var_x E_q[z_d] > {site['active_threshold']:g})"
            )
    if "global" in summary:
        term = summary["global"]
        lines.append(f"global latents {term['sites']}: rate {term['rate']:.4f} nats")
    surgery = summary.get("surgery")
    if surgery is not None:
        lines += [
            f"ELBO surgery on {surgery['num_points']} points, {surgery['samples']} code(s) each:",
            row("  I_q(x; z)", surgery["mutual_info"])
            + f" (<= log N = {surgery['log_num_points']:.4f})",
            row("  KL(q(z) || p(z))", surgery["marginal_kl"]),
        ]
        holes = surgery.get("prior_holes")
        if holes is not None:
            lines.append(
                f"  prior holes: {holes['share']:.1%} of {holes['prior_draws']} prior draws below "
                f"percentile {holes['percentile']:g} of the codes' log q(z) "
                f"({holes['threshold']:.4f})"
            )
    return "\n".join(lines)


#: each option's rule: a test of its value and the rule in words
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_particles": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "particle_chunk": (lambda v: v is None or v >= 1, ">= 1"),
    "surgery_points": (lambda v: v is None or v >= 2, ">= 2 (or None)"),
    "surgery_samples": (lambda v: v >= 1, ">= 1"),
    "prior_draws": (lambda v: v >= 0, ">= 0"),
    "hole_percentile": (lambda v: 0 < v < 100, "between 0 and 100"),
    "active_threshold": (lambda v: v >= 0, ">= 0"),
}


def check_options(values: dict[str, Any]) -> None:
    """Refuse an option of :func:`rate_distortion` (those of ``values`` that it takes) that
    breaks its rule in :data:`RULES`, naming the parameter."""
    for name, (ok, rule) in RULES.items():
        if name in values and not ok(values[name]):
            raise ConfigError(f"{name} must be {rule}, got {values[name]}")


@dataclass(frozen=True)
class RateDistortionOptions:
    """The options of :func:`rate_distortion` that a run's evaluation
    (:func:`~pyro_vae.runs.evaluate_run`) passes on, checked when made; batches, chunks and
    the seed are the evaluation's."""

    num_particles: int = 100
    surgery_points: int | None = 1000
    surgery_samples: int = 1
    prior_draws: int = 1000
    hole_percentile: float = 1.0
    active_threshold: float = ACTIVE_THRESHOLD

    def __post_init__(self) -> None:
        check_options(asdict(self))


@torch.no_grad()
def rate_distortion(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    num_particles: int = 100,
    particle_chunk: int | None = DEFAULT_PARTICLE_CHUNK,
    batch_size: int = 100,
    surgery_points: int | None = None,
    surgery_samples: int = 1,
    prior_draws: int = 1000,
    hole_percentile: float = 1.0,
    active_threshold: float = ACTIVE_THRESHOLD,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
    seed: int | None = None,
    collate_fn: Callable | None = None,
    **kwargs: Any,
) -> RateDistortion:
    """Rate and distortion of every datapoint of ``data`` (the forms of
    :func:`~pyro_vae.evaluate.evaluate_dataset`), ``num_particles`` draws z ~ q(z|x) each, in
    batches of ``batch_size`` and chunks of ``particle_chunk`` particles; with
    ``surgery_points`` N, ELBO surgery on the first N datapoints (``surgery_samples`` codes
    each, S·N² guide densities) and the prior-hole check with ``prior_draws`` draws and the
    ``hole_percentile`` percentile (:mod:`pyro_vae.evaluate.surgery`).

    Sites the guide marks for enumeration are sampled here (their rate is their KL like any
    other's); the model's own enumerated sites are summed inside log p(x|z). ``seed`` draws
    everything from ``torch.manual_seed(seed)`` on a fork of the random state (the caller's
    is left alone); without it, from torch's global generator.

    :raises ConfigError: for a bad option, a pair whose sites share no data plate, or
        surgery on a pair with global latents, auxiliary guide sites or networks that see
        the particle dimension.
    :raises DataError: for NaN or infinite data.
    :raises EvaluationError: for a non-finite rate or distortion.
    """
    check_options(locals())
    source = as_source(data, collate_fn)
    pieces = budget.num_batches(source, batch_size) * num_chunks(num_particles, particle_chunk)
    with (
        forked_rng() if seed is not None else nullcontext(),
        eval_mode(model, guide),
        budget.work(pieces, f"the rate and distortion of {num_particles:,} particles"),
    ):
        if seed is not None:
            torch.manual_seed(seed)
        parts, first_index, chunk = [], 0, particle_chunk or num_particles
        drawer = None
        for batch in source.ordered(batch_size):
            call_kwargs = {**batch.kwargs, **kwargs}
            check_finite_inputs(batch.args, call_kwargs)
            if drawer is None:
                drawer = Drawer.probed(
                    model, guide, batch.args, call_kwargs, max_plate_nesting, data_plate
                )
            parts.append(drawer.batch_sums(batch.args, call_kwargs, num_particles, chunk))
            if parts[-1].distortion.shape[0] != batch.size:
                raise ConfigError(
                    f"the data plate has {parts[-1].distortion.shape[0]} entries for a batch "
                    f"of {batch.size} rows: its size must be the batch's length"
                )
            _check_finite(parts[-1], first_index)
            first_index += batch.size
        result = _joined(parts, num_particles, active_threshold, drawer.vectorize)
        if surgery_points is not None:
            if not drawer.vectorize:
                raise ConfigError(
                    "ELBO surgery scores every code under every encoding in a particle plate: "
                    "the pair's networks see the particle dimension"
                )
            with pyro.validation_enabled(False):
                result.surgery = elbo_surgery(
                    model,
                    guide,
                    source.head(surgery_points),
                    samples=surgery_samples,
                    prior_draws=prior_draws,
                    hole_percentile=hole_percentile,
                    batch_size=batch_size,
                    code_chunk=chunk,
                    max_plate_nesting=drawer.nesting,
                    data_plate=data_plate,
                    **kwargs,
                )
            result.surgery.rate = result.rate[: result.surgery.num_points]
        return result


def _check_finite(sums: RateSums, first_index: int) -> None:
    total = sums.distortion + sum(sums.site.values(), torch.zeros_like(sums.distortion))
    bad = ~torch.isfinite(total)
    if bad.any():
        where = (bad.nonzero().flatten()[:5] + first_index).tolist()
        raise EvaluationError(
            f"the rate or distortion of {int(bad.sum())} datapoint(s) is NaN or infinite "
            f"(first: {where}): log p(x, z) or log q(z|x) is not finite"
        )


def _joined(
    parts: list[RateSums], num_particles: int, threshold: float, vectorized: bool
) -> RateDistortion:
    """The batches' sums as per-datapoint means and data-set statistics."""

    def cat(pick: Callable[[RateSums], torch.Tensor]) -> torch.Tensor:
        return torch.cat([pick(part) for part in parts]).cpu() / num_particles

    first = parts[0]
    site_rate = {name: cat(lambda p, n=name: p.site[n]) for name in first.site}
    rate = sum(site_rate.values(), torch.zeros_like(cat(lambda p: p.distortion)))
    means = {name: cat(lambda p, n=name: p.mean[n]) for name in first.mean}
    global_rate = None
    if first.global_names:
        global_rate = sum(p.global_sum for p in parts) / (num_particles * len(parts))
    return RateDistortion(
        num_particles=num_particles,
        rate=rate,
        distortion=cat(lambda p: p.distortion),
        site_rate=site_rate,
        methods={name: first.methods[name] for name in first.methods},
        kl_per_dim={name: cat(lambda p, n=name: p.per_dim[n]).mean(0) for name in first.per_dim},
        activity={name: mean.var(0, correction=0) for name, mean in means.items()},
        active_threshold=threshold,
        global_rate=global_rate,
        global_sites=tuple(first.global_names),
        vectorized=vectorized,
    )
