"""The per-datapoint result of an evaluation: summary, table, JSON, netCDF and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.evaluate.khat import KHAT_GOOD, KHAT_OK, MIN_KHAT_PARTICLES, arviz_module
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.io import atomic_files, write_in_child

METRICS = ("log_px", "elbo", "gap", "var_log_w", "ess")
INFERENCE_DATA_GROUP = "evaluation"


def _json_safe(value: Any) -> Any:
    """Python floats for JSON; non-finite numbers become ``None`` (JSON ``null``)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(6, 3.5), layout="constrained")


def _plot_khat(khat: torch.Tensor, path: Path, title: str) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    index = torch.arange(khat.shape[0])
    finite = torch.isfinite(khat)
    ax.scatter(index[finite].numpy(), khat[finite].numpy(), s=4, alpha=0.6)
    for level, color in ((KHAT_GOOD, "tab:orange"), (KHAT_OK, "tab:red")):
        ax.axhline(level, color=color, linestyle="--", linewidth=1, label=f"k = {level}")
    hidden = int((~finite).sum())
    note = f" ({hidden} non-finite not shown)" if hidden else ""
    ax.set(xlabel="datapoint", ylabel="PSIS k-hat", title=title + note)
    ax.legend(loc="upper right")
    fig.savefig(path, format="png", dpi=120)


def _plot_gap(gap: torch.Tensor, path: Path, title: str) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(gap.numpy(), bins=min(50, max(5, gap.shape[0] // 5)))
    ax.set(xlabel="gap = log p̂(x) − ELBO (nats)", ylabel="datapoints", title=title)
    fig.savefig(path, format="png", dpi=120)


def format_table(summary: dict[str, Any], observed: str = "x") -> str:
    """A plain-text table of :meth:`EvaluationResult.summary` (values in nats); ``observed``
    names what the model scores in the first row's label, e.g. ``"x, y"`` for a conditional
    VAE, whose log-weights are those of the joint p(x, y)."""
    summed = summary.get("summed_sites")
    labels = {
        "log_px": f"log p_K({observed})",
        "elbo": "E log Σ_c w" if summed else "ELBO",
        "gap": "gap (≈ KL)",
        "var_log_w": "var log w",
        "ess": "ESS / K",
    }
    units = {"log_px": "nats", "elbo": "nats", "gap": "nats", "var_log_w": "nats²", "ess": ""}

    def number(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    width = max(12, max(len(label) for label in labels.values()) + 1)
    lines = [
        f"{summary['num_datapoints']} datapoints, K = {summary['num_particles']} particles",
        f"{'':<{width}}{'mean':>12}{'stderr':>12}",
    ]
    rows = [(label, summary[name], units[name]) for name, label in labels.items()]
    if "trace_enum_elbo" in summary:  # after the summed bound's row
        rows.insert(2, ("ELBO", summary["trace_enum_elbo"], "nats"))
    for label, entry, unit in rows:
        lines.append(
            f"{label:<{width}}{number(entry['mean']):>12}{number(entry['stderr']):>12}"
            f"  {unit}".rstrip()
        )
    if "khat" in summary:
        k = summary["khat"]
        lines.append(
            f"{'k-hat':<{width}}median {number(k['median'])}, max {number(k['max'])}; "
            f"good {k['fraction_good']:.1%}, ok {k['fraction_ok']:.1%}, "
            f"bad (> {KHAT_OK}) {k['fraction_bad']:.1%}"
        )
    elif summary["num_particles"] < MIN_KHAT_PARTICLES:
        lines.append(f"{'k-hat':<{width}}not computed: PSIS needs K >= {MIN_KHAT_PARTICLES}")
    else:
        lines.append(f"{'k-hat':<{width}}not computed")
    if "global" in summary:
        term = summary["global"]
        lines.append(
            f"{'dataset ELBO':<{width}}{number(term['dataset_elbo']):>12}"
            f"{'':>12}  nats (all {summary['num_datapoints']} datapoints, with "
            f"E_q[log p(θ) − log q(θ)] = {number(term['log_p_minus_log_q'])})"
        )
        lines.append(
            f"global latents {term['sites']}: each particle draws θ ~ q(θ) once for "
            f"all datapoints; log p_K({observed}) is the predictive log E_q(θ) "
            f"p({observed} | θ)"
        )
    if summary.get("whole_data_set"):
        lines.append(
            "no pyro.plate holds every observed site: the data set is scored as one "
            "datapoint, and per-datapoint statistics do not apply"
        )
    if summed:
        elbo = (
            "the row 'ELBO' is Σ_c q(c | x)[log w_c − log q(c | x)], TraceEnum_ELBO's "
            "(trace and meanfield train it)"
            if "trace_enum_elbo" in summary
            else "TraceEnum_ELBO's ELBO is not computed for a guide that reuses enumeration "
            "dimensions"
        )
        lines.append(
            f"the guide's sites {summed} are summed inside each weight: the row "
            "'E log Σ_c w' is the bound E log Σ_c p(x, c, z_c)/q(z_c | x, c) "
            f"(log w and the gap use it); {elbo}"
        )
    if not summary.get("vectorized", True):
        lines.append(
            "particles drawn one call at a time: the pair's networks see a particle dimension"
        )
    return "\n".join(lines)


def write_netcdf(inference_data: Any, path: Path) -> None:
    """The netCDF file, written in a child process: the HDF5 library can crash the process
    that writes onto a full disk, which here becomes one :class:`~pyro_vae.util.io.WriteError`."""
    write_in_child(lambda: inference_data.to_netcdf(str(path)), path)


def save_evaluation(
    result: EvaluationResult,
    folder: str | Path,
    split: str,
    metadata: dict[str, Any] | None = None,
    figures: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``eval-<split>.json``, ``eval-<split>.nc``, ``gap-<split>.png`` and (with k-hat)
    ``khat-<split>.png`` into ``folder`` as one set (each to a temporary file, all renamed at
    the end: a failed write, such as a full disk, leaves the previous evaluation's files and
    raises :class:`~pyro_vae.util.io.WriteError`); return their paths by kind. Without k-hat an
    older ``khat-<split>.png`` is removed, so the folder never mixes two evaluations.
    ``figures`` adds files to the set: kind → (file name, function writing it to a path)."""
    folder = Path(folder)
    paths = {
        "json": folder / f"eval-{split}.json",
        "netcdf": folder / f"eval-{split}.nc",
        "gap": folder / f"gap-{split}.png",
    }
    khat_path = folder / f"khat-{split}.png"
    title = f"{split}: N = {result.num_datapoints}, K = {result.num_particles}"
    with atomic_files() as files:
        files.write_json(paths["json"], _json_safe({**(metadata or {}), **result.to_dict()}))
        with files.path(paths["netcdf"]) as tmp:
            write_netcdf(result.to_inference_data(), tmp)
        with files.path(paths["gap"]) as tmp:
            _plot_gap(result.gap, tmp, title)
        if result.khat is not None:
            paths["khat"] = khat_path
            with files.path(khat_path) as tmp:
                _plot_khat(result.khat, tmp, title)
        for kind, (name, write) in (figures or {}).items():
            paths[kind] = folder / name
            with files.path(paths[kind]) as tmp:
                write(tmp)
    if result.khat is None:
        khat_path.unlink(missing_ok=True)
    return paths


@dataclass(frozen=True)
class GlobalTerm:
    """The global latents' part of the dataset ELBO: ``mean`` estimates
    E_q[log p(θ) − log q(θ)] (−KL(q(θ) ‖ p(θ))) from ``draws`` draws of θ ~ q(θ)."""

    sites: tuple[str, ...]
    mean: float
    draws: int

    @classmethod
    def combine(cls, terms: Sequence[GlobalTerm | None]) -> GlobalTerm | None:
        present = [term for term in terms if term is not None]
        if not present:
            return None
        draws = sum(term.draws for term in present)
        return cls(present[0].sites, sum(t.mean * t.draws for t in present) / draws, draws)


@dataclass
class EvaluationResult:
    """Per-datapoint evaluation results (CPU tensors of shape ``[N]``, float64).

    ``log_px`` = log p̂_K(x), ``elbo``, ``var_log_w``, ``ess`` (normalized: (Σw)²/(K Σw²), in
    [1/K, 1]) and ``khat`` (``None`` when not computed); ``gap`` = ``log_px − elbo``.
    ``log_weights`` is ``[K, N]`` when kept, else ``None``. ``paths`` names the files
    :func:`evaluate_run` wrote, by kind (empty otherwise). ``vectorized`` is ``False`` when the
    particles were drawn one call at a time because the pair's networks see a particle
    dimension (:mod:`pyro_vae.core.vectorization`).

    With global latents θ (sites outside the data plate), each particle draws θ_k ~ q(θ) once
    and its datapoints share it: ``log_px`` then estimates the predictive
    log E_q(θ)[p(x | θ)] of each datapoint and ``elbo`` its local part
    E[log p(x, z | θ) − log q(z | x, θ)]; ``global_term`` holds E_q[log p(θ) − log q(θ)], and
    :attr:`dataset_elbo` the whole data set's bound.
    """

    num_particles: int
    log_px: torch.Tensor
    elbo: torch.Tensor
    var_log_w: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    vectorized: bool = True
    global_term: GlobalTerm | None = None
    #: the guide's sites summed out inside each weight: ``elbo`` is then the bound
    #: E log Σ_c w_c, above the ELBO that ``TraceEnum_ELBO`` computes
    summed_sites: tuple[str, ...] = ()
    #: the pair has no data plate: its one "datapoint" is the whole data set
    whole_data_set: bool = False
    #: with ``summed_sites``: per datapoint, the ELBO Σ_c q(c | x)[log w_c − log q(c | x)]
    #: that ``TraceEnum_ELBO`` (and the ``trace`` estimator) computes, averaged over the
    #: particles (``None`` otherwise, or where it is not defined)
    trace_enum_elbo: torch.Tensor | None = None
    #: the rate–distortion diagnostics of the same data, when asked
    #: (:class:`~pyro_vae.evaluate.rate_distortion.RateDistortion`)
    rate_distortion: Any = None

    def __post_init__(self) -> None:
        shape = self.log_px.shape
        assert len(shape) == 1, shape
        for name in ("elbo", "var_log_w", "ess", "khat", "trace_enum_elbo"):
            value = getattr(self, name)
            assert value is None or value.shape == shape, (name, value.shape, shape)
        if self.log_weights is not None:
            assert self.log_weights.shape == (self.num_particles, shape[0]), (
                self.log_weights.shape,
                self.num_particles,
                shape,
            )

    @property
    def num_datapoints(self) -> int:
        return self.log_px.shape[0]

    @property
    def dataset_elbo(self) -> float | None:
        """E_q[log p(θ) − log q(θ)] + Σ_n ELBO(x_n): the evidence bound of the evaluated data
        as one data set (``None`` without global latents)."""
        if self.global_term is None:
            return None
        return self.global_term.mean + self.elbo.double().sum().item()

    @property
    def gap(self) -> torch.Tensor:
        """log p̂_K(x) − ELBO(x) ≥ 0, an estimate of KL(q(z|x) ‖ p(z|x)) (biased low)."""
        return self.log_px - self.elbo

    @classmethod
    def concatenate(cls, parts: Sequence[EvaluationResult]) -> EvaluationResult:
        """Join results of consecutive batches (same K) along the datapoints."""
        if not parts or len({part.num_particles for part in parts}) != 1:
            raise ConfigError("concatenate needs results with the same number of particles")

        def cat(name: str, dim: int = 0) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if any(v is None for v in values) else torch.cat(values, dim)

        return cls(
            num_particles=parts[0].num_particles,
            log_px=cat("log_px"),
            elbo=cat("elbo"),
            var_log_w=cat("var_log_w"),
            ess=cat("ess"),
            khat=cat("khat"),
            log_weights=cat("log_weights", 1),
            vectorized=all(part.vectorized for part in parts),
            global_term=GlobalTerm.combine([part.global_term for part in parts]),
            summed_sites=tuple(dict.fromkeys(site for part in parts for site in part.summed_sites)),
            trace_enum_elbo=cat("trace_enum_elbo"),
            whole_data_set=any(part.whole_data_set for part in parts),
        )

    def summary(self) -> dict[str, Any]:
        """Mean and standard error (std / √N) of each metric; for k-hat the median, the max and
        the fractions of datapoints read as good / ok / bad."""
        out: dict[str, Any] = {
            "num_datapoints": self.num_datapoints,
            "num_particles": self.num_particles,
            "vectorized": self.vectorized,
        }
        if self.summed_sites:
            out["summed_sites"] = list(self.summed_sites)
        if self.whole_data_set:
            out["whole_data_set"] = True
        n = self.num_datapoints
        for name in METRICS:
            values = getattr(self, name).to(torch.float64)
            stderr = values.std().item() / math.sqrt(n) if n > 1 else math.nan
            out[name] = {"mean": values.mean().item(), "stderr": stderr}
        if self.trace_enum_elbo is not None:
            values = self.trace_enum_elbo.to(torch.float64)
            out["trace_enum_elbo"] = {
                "mean": values.mean().item(),
                "stderr": values.std().item() / math.sqrt(n) if n > 1 else math.nan,
            }
        if self.global_term is not None:
            out["global"] = {
                "sites": list(self.global_term.sites),
                "log_p_minus_log_q": self.global_term.mean,
                "draws": self.global_term.draws,
                "dataset_elbo": self.dataset_elbo,
            }
        if self.khat is not None:
            k = self.khat
            out["khat"] = {
                "median": k.median().item(),
                "max": k.max().item(),
                "fraction_good": (k <= KHAT_GOOD).double().mean().item(),
                "fraction_ok": ((k > KHAT_GOOD) & (k <= KHAT_OK)).double().mean().item(),
                "fraction_bad": (~(k <= KHAT_OK)).double().mean().item(),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """The summary and the per-datapoint arrays as lists; safe for JSON (non-finite values,
        such as k = −∞ for constant weights, become ``None``)."""
        names = [*METRICS, "khat"] if self.khat is not None else list(METRICS)
        if self.trace_enum_elbo is not None:
            names.append("trace_enum_elbo")
        datapoints = {name: getattr(self, name).tolist() for name in names}
        out = {"summary": self.summary(), "datapoints": datapoints}
        if self.rate_distortion is not None:
            out["rate_distortion"] = self.rate_distortion.to_dict()
        return _json_safe(out)

    def to_inference_data(self) -> Any:
        """ArviZ ``InferenceData`` with one group, ``evaluation``: every per-datapoint metric
        with dim ``datapoint``, and ``log_weight`` with dims ``("particle", "datapoint")`` when
        the log-weights were kept. Save it with ``.to_netcdf(path)``."""
        import xarray as xr

        data_vars = {name: (("datapoint",), getattr(self, name).numpy()) for name in METRICS}
        coords = {"datapoint": np.arange(self.num_datapoints)}
        if self.khat is not None:
            data_vars["khat"] = (("datapoint",), self.khat.numpy())
        if self.trace_enum_elbo is not None:
            data_vars["trace_enum_elbo"] = (("datapoint",), self.trace_enum_elbo.numpy())
        if self.rate_distortion is not None:
            for name in ("rate", "distortion"):
                data_vars[name] = (("datapoint",), getattr(self.rate_distortion, name).numpy())
        if self.log_weights is not None:
            data_vars["log_weight"] = (("particle", "datapoint"), self.log_weights.numpy())
            coords["particle"] = np.arange(self.num_particles)
        attrs = {
            "num_particles": self.num_particles,
            "khat_good": KHAT_GOOD,
            "khat_ok": KHAT_OK,
            "summary": json.dumps(_json_safe(self.summary())),
        }
        if self.rate_distortion is not None:
            attrs["rate_distortion"] = json.dumps(_json_safe(self.rate_distortion.summary()))
        if self.global_term is not None:
            attrs["global_sites"] = ",".join(self.global_term.sites)
            attrs["global_log_p_minus_log_q"] = self.global_term.mean
            attrs["dataset_elbo"] = self.dataset_elbo
        dataset = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        return arviz_module().InferenceData(**{INFERENCE_DATA_GROUP: dataset})
