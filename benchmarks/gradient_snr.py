"""Gradient signal-to-noise ratio and variance per parameter group, and their course with the
number of draws per datapoint (Rainforth, Kosiorek, Le, Maddison, Igl, Wood and Teh 2018,
*Tighter variational bounds are not necessarily better*).

At fixed parameters, ``draws`` gradients g of an estimator's loss on one fixed batch (each
from fresh draws of the guide) give per parameter element the mean and the sample standard
deviation (n − 1). A group's SNR is the mean over its elements of |E g| / std g (elements
whose draws are all equal skipped), its variance the mean over its elements of var g. The
groups: the encoder (the parameters the guide's density depends on) and the decoder (the
others).

Against T draws per datapoint an estimator spends them as :func:`split` says: P particles
outside the log and K = T importance samples inside it for the single-bound estimators (iwae,
dreg, renyi, ciwae, rws, vimco), M × K = T for the estimators that average M bounds (miwae,
piwae), with M given; a T that an estimator cannot spend (K below its least K, or T not a
multiple of M) is a NaN point.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyro
import torch

from pyro_vae.core.protocol import guide_parameters
from pyro_vae.data.batches import Batch
from pyro_vae.infer import ELBOEstimator
from pyro_vae.infer.registry import CLASSES
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.io import atomic_path
from pyro_vae.util.rng import forked_rng

#: the estimators that average M importance-weighted bounds of K draws each (M × K draws)
MULTI_BOUND = ("miwae", "piwae")
#: the statistics of each group, as keys of :func:`gradient_snr`'s result
STATISTICS = ("snr_encoder", "snr_decoder", "var_encoder", "var_decoder")
#: what :func:`snr_versus_draws` records per estimator: the statistics and the split
SERIES = (*STATISTICS, "particles", "importance_samples")


def _with_kwargs(model: torch.nn.Module, kwargs: dict) -> Any:
    """``model`` whose guide takes ``kwargs`` as given (for :func:`guide_parameters`, which
    passes positional arguments only)."""
    if not kwargs:
        return model
    return SimpleNamespace(parameters=model.parameters, guide=partial(model.guide, **kwargs))


def _group_statistics(draws: torch.Tensor) -> dict[str, float]:
    """SNR and variance of one group's gradient draws ``[draws, elements]``."""
    if draws.shape[1] == 0:
        return {"snr": math.nan, "var": math.nan}
    mean, std = draws.mean(0).abs(), draws.std(0)
    informative = std > 0
    snr = (mean[informative] / std[informative]).mean().item() if informative.any() else math.nan
    return {"snr": snr, "var": draws.var(0).mean().item()}


def importance_estimators() -> tuple[str, ...]:
    """The registered estimators that take importance samples inside the log."""
    return tuple(name for name, cls in CLASSES.items() if cls.importance_hint is None)


def check_estimators(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` if each takes importance samples; else ConfigError naming the first that
    does not and the choices."""
    choices = importance_estimators()
    for name in names:
        if name not in choices:
            raise ConfigError(
                f"snr_estimators: {name!r} takes no importance samples; choose among "
                f"{', '.join(choices)}"
            )
    if not names:
        raise ConfigError("snr_estimators needs at least one estimator")
    return tuple(dict.fromkeys(names))


def split(name: str, draws: int, particles: int, multi_particles: int) -> tuple[int, int] | None:
    """(P, K) with which estimator ``name`` spends ``draws`` draws per datapoint, or ``None``
    where it cannot: P = ``multi_particles`` and K = draws / P for :data:`MULTI_BOUND`, else
    P = ``particles`` and K = ``draws``; K at least the estimator's least K."""
    if name in MULTI_BOUND:
        if draws % multi_particles:
            return None
        particles, draws = multi_particles, draws // multi_particles
    return (particles, draws) if draws >= CLASSES[name].min_importance_samples else None


def gradient_snr(
    model: torch.nn.Module,
    estimator: ELBOEstimator,
    batch: torch.Tensor | Batch,
    draws: int,
    num_data: int | None = None,
) -> dict[str, float]:
    """SNR (mean over parameter elements of |E g| / std g) and variance (mean over elements of
    var g) from ``draws`` gradients of the per-datapoint loss at fixed parameters on ``batch``
    (a tensor of images or a :class:`~pyro_vae.data.batches.Batch`), for the guide's (encoder)
    and the model's (decoder) parameters; NaN for a group with no element (the SNR also where
    no element's draws vary). With ``num_data`` a global latent's term is weighted by the
    batch's share of the data, as in training."""
    batch = batch if isinstance(batch, Batch) else Batch((batch,))
    encoder = guide_parameters(_with_kwargs(model, batch.kwargs), *batch.args)
    encoder_ids = {id(p) for p in encoder}
    decoder = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = {"encoder": encoder, "decoder": decoder}
    params = [p for group in groups.values() for p in group]
    if num_data is not None:
        estimator.global_weight = batch.size / num_data
    samples = []
    for _ in range(draws):
        loss = estimator.differentiable_loss(model.model, model.guide, *batch.args, **batch.kwargs)
        grads = torch.autograd.grad(loss / batch.size, params, allow_unused=True)
        samples.append(
            torch.cat(
                [
                    torch.zeros_like(p).flatten() if g is None else g.flatten()
                    for p, g in zip(params, grads)
                ]
            )
        )
    grads = torch.stack(samples).double()
    out, start = {}, 0
    for key, group in groups.items():
        size = sum(p.numel() for p in group)
        stats = _group_statistics(grads[:, start : start + size])
        out[f"snr_{key}"], out[f"var_{key}"] = stats["snr"], stats["var"]
        start += size
    return out


def snr_versus_draws(
    model: torch.nn.Module,
    make: Callable[[str, int, int], ELBOEstimator],
    batch: Batch,
    names: Sequence[str],
    totals: Sequence[int],
    *,
    particles: int,
    multi_particles: int,
    draws: int,
    num_data: int,
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """Per estimator of ``names`` and total draws of ``totals``: the :data:`STATISTICS` of
    ``make(name, P, K)`` (the :func:`split`; NaN where there is none) at ``model``'s
    parameters, each from the same seed on a fork of the random state, and the split."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in names:
        rows: dict[str, list[float]] = {key: [] for key in SERIES}
        for total in totals:
            shape = split(name, total, particles, multi_particles)
            if shape is None:
                stats = dict.fromkeys(STATISTICS, math.nan)
                shape = (math.nan, math.nan)
            else:
                with pyro.validation_enabled(False), forked_rng():
                    torch.manual_seed(seed)
                    stats = gradient_snr(model, make(name, *shape), batch, draws, num_data)
            for key in STATISTICS:
                rows[key].append(stats[key])
            rows["particles"].append(shape[0])
            rows["importance_samples"].append(shape[1])
        out[name] = rows
    return out


def mean_over_seeds(per_seed: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """One estimator's series of :func:`snr_versus_draws` averaged over seeds (the split is
    the same for every seed)."""
    out = {key: list(per_seed[0][key]) for key in ("particles", "importance_samples")}
    for key in STATISTICS:
        out[key] = [statistics.fmean(values) for values in zip(*(run[key] for run in per_seed))]
    return out


def csv_rows(snr: dict[str, Any]) -> list[dict[str, Any]]:
    """``snr_vs_k`` of ``results.json`` as rows: estimator, draws, P, K and the statistics."""
    rows = []
    for name, series in snr.items():
        if name == "K":
            continue
        for i, total in enumerate(snr["K"]):
            row = {"estimator": name, "draws": total, "P": series["particles"][i]}
            row["K"] = series["importance_samples"][i]
            rows.append(row | {key: series[key][i] for key in STATISTICS})
    return rows


def plot_snr(snr: dict[str, dict[str, list[float]]], totals: Sequence[int], path: Path) -> None:
    """SNR (top) and variance (bottom) of the encoder (left) and decoder (right) gradients
    against the draws per datapoint, one line per estimator."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.6), layout="constrained")
    panels = [
        ("snr_encoder", "mean |E g| / std g", "gradient SNR: encoder (guide)"),
        ("snr_decoder", "mean |E g| / std g", "gradient SNR: decoder (model)"),
        ("var_encoder", "mean var g", "gradient variance: encoder (guide)"),
        ("var_decoder", "mean var g", "gradient variance: decoder (model)"),
    ]
    for i, (key, ylabel, title) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for name, rows in snr.items():
            ax.plot(list(totals), rows[key], marker="o", label=name)
        ax.set(xscale="log", xlabel="draws per datapoint (P·K, M·K)", ylabel=ylabel, title=title)
        if key.startswith("var") and any(v > 0 for rows in snr.values() for v in rows[key]):
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
