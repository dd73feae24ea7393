r"""Evaluation from traces: importance-weighted log p̂(x), ELBO, gap, ESS and PSIS k-hat.

For any Pyro model/guide pair whose sample sites all lie in one data plate, K particles
z_k ~ q(z|x) give per-datapoint log-weights log w_k = log p(x, z_k) − log q(z_k|x)
(:func:`pyro_vae.traces.vectorized_log_probs`). From them, for every datapoint:

.. math::

    \log \hat p_K(x) = \operatorname{logsumexp}_k \log w_k - \log K, \qquad
    \mathrm{ELBO}(x) = \tfrac1K \textstyle\sum_k \log w_k, \qquad
    \mathrm{gap}(x) = \log \hat p_K(x) - \mathrm{ELBO}(x),

the self-consistency ``var_log_w`` = (1/K) Σ_k (log w_k − ELBO)², the normalized effective sample
size (Σ w)² / (K Σ w²) and the Pareto k-hat of the weights' right tail (Vehtari et al., 2024,
"Pareto smoothed importance sampling", JMLR 25(72)), fitted by :func:`arviz.psislw`.

Memory stays bounded: particles are drawn in chunks of ``particle_chunk`` and datapoints in
batches of ``batch_size``; log p̂, ELBO, variance and ESS are accumulated over chunks with a
streaming logsumexp, so only k-hat (which needs every weight of a datapoint) holds a
``[K, batch_size]`` block at once, and the full ``[K, N]`` log-weights are kept only on request.

Random numbers come from torch's global generator in a fixed order (batch by batch, chunk by
chunk), so a run is reproducible for a given seed, ``batch_size`` and ``particle_chunk``. With
``batch_seed`` (as :func:`evaluate_run` does) each batch is instead drawn from its own seed, made
from ``batch_seed`` and the batch's index, so its numbers do not depend on which process
evaluates it: that is what lets ranks under torchrun share the batches out and still reproduce a
single process exactly. Within a batch, a datapoint's log-weights depend only on its own data
and its slice of the draws: changing another datapoint leaves them unchanged, bit for bit. Other
batch or chunk sizes draw different particles with the same distribution (one vectorized draw
per chunk covers the whole batch, so a datapoint's particles depend on its batch): the results
agree in distribution, and exactly (to rounding) when the guide is the exact posterior, where
every log-weight equals log p(x).

Pyro's distribution validation, when enabled, runs once per model/guide call or batch, on a
one-particle call on a copy of the random state (so every batch's data are checked and the
draws are unchanged); the particle chunks run unvalidated, as they see the same data and
parameters. Non-finite log-weights raise :class:`EvaluationError`.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

from .distributed import (EVAL_BATCH_STREAM, SINGLE, DistributedContext, all_gather_objects,
                          derive_seed, init_distributed)
from .config import check_seed
from .errors import ConfigError, DataError, PyroVAEError
from .io import atomic_path, write_json
from .batches import as_source, floating_tensors, resolve_device
from .runs import load_run
from .specs import load_data
from .traces import guess_max_plate_nesting, vectorized_log_probs

KHAT_GOOD = 0.5
KHAT_OK = 0.7
MIN_KHAT_PARTICLES = 21
CONSTANT_WEIGHTS_ULPS = 64
KEEP_LOG_WEIGHTS_MAX = 10_000_000
METRICS = ("log_px", "elbo", "gap", "var_log_w", "ess")
SPLITS = ("train", "test")
INFERENCE_DATA_GROUP = "evaluation"


@dataclass(frozen=True)
class EvalConfig:
    """Defaults of an evaluation run (:func:`evaluate_run` and the ``evaluate`` command).

    ``particles`` is K (5000 is the standard MNIST protocol); ``batch_size`` datapoints and
    ``particle_chunk`` particles are processed per model/guide call; ``limit`` evaluates only the
    first datapoints of ``split``. ``keep_log_weights=None`` keeps the ``[K, N]`` log-weights
    (for the netCDF file) only when K·N ≤ ``KEEP_LOG_WEIGHTS_MAX``.
    """

    particles: int = 5000
    split: str = "test"
    limit: int | None = None
    batch_size: int = 100
    particle_chunk: int = 500
    seed: int = 0
    keep_log_weights: bool | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.particle_chunk >= 1,
             f"particle_chunk must be >= 1, got {self.particle_chunk}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_seed(self.seed)


class EvaluationError(PyroVAEError):
    """The log-weights are not finite: the model or guide returned NaN or ±inf densities."""


def _arviz() -> Any:
    """Import ArviZ without its once-a-day FutureWarning about a coming refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def _check_finite_inputs(args: Sequence[Any], kwargs: dict | None = None) -> None:
    """Refuse floating-point tensor arguments with NaN or ±inf entries, before any trace."""
    for where, value in floating_tensors(tuple(args), kwargs or {}):
        if not bool(torch.isfinite(value).all()):
            raise DataError(f"{where} of the model/guide holds NaN or infinite values")


def _chunk_sizes(total: int, chunk: int | None) -> list[int]:
    chunk = total if chunk is None else chunk
    if chunk < 1:
        raise ConfigError(f"particle_chunk must be >= 1, got {chunk}")
    return [min(chunk, total - start) for start in range(0, total, chunk)]


def _log_weight_chunks(model: Callable, guide: Callable, args: tuple, kwargs: dict, *,
                       num_particles: int, particle_chunk: int | None, max_plate_nesting: int,
                       data_plate: str | None) -> Iterator[torch.Tensor]:
    """Yield ``[k, N]`` blocks of log-weights whose k add up to ``num_particles``.

    With Pyro's validation enabled, the pair is first run once with a single particle, on a copy
    of the random state (so the draws of the chunks are unchanged): that call checks the data
    against every observed site's support and the distributions' parameters. The chunks then run
    with validation off: they see the same data and parameters, and checking every chunk's
    parameters would cost a full pass over the largest tensors (the decoder's ``[k, N, D]``
    output) per chunk. NaN densities are caught by :func:`_check_finite` regardless.

    ``pyro.param`` messages are hidden from the traces (the parameters are read as usual): the
    evaluation needs only the sample sites, and a module registered with
    :func:`pyro_vae.models.register_module` then skips sending its parameters at all.
    """
    model, guide = (poutine.block(fn, hide_types=["param"]) for fn in (model, guide))
    if is_validation_enabled():
        with _forked_rng():
            vectorized_log_probs(model, guide, *args, num_particles=1,
                                 max_plate_nesting=max_plate_nesting, data_plate=data_plate,
                                 compact=True, **kwargs)
    num_data = None
    for size in _chunk_sizes(num_particles, particle_chunk):
        with pyro.validation_enabled(False):  # not across the yield: the caller's setting holds
            log_weights = vectorized_log_probs(
                model, guide, *args, num_particles=size, max_plate_nesting=max_plate_nesting,
                data_plate=data_plate, compact=True, **kwargs).log_weights
        num_data = log_weights.shape[1] if num_data is None else num_data
        assert log_weights.shape == (size, num_data), (log_weights.shape, size, num_data)
        yield log_weights


class _WeightAccumulator:
    """Per-datapoint statistics of log-weights fed in particle chunks (float64 accumulators).

    Keeps logsumexp(log w), logsumexp(2 log w) and the running mean and sum of squared deviations
    of log w (Chan et al.'s pairwise update), so no chunk needs to be kept.
    """

    def __init__(self) -> None:
        self.count = 0
        self.lse = self.lse2 = self.mean = self.m2 = None

    def update(self, log_weights: torch.Tensor) -> None:
        lw = log_weights.to(torch.float64)
        k = lw.shape[0]
        mean = lw.mean(0)
        m2 = (lw - mean).square().sum(0)
        lse, lse2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
        if self.count == 0:
            self.lse, self.lse2, self.mean, self.m2 = lse, lse2, mean, m2
        else:
            total = self.count + k
            delta = mean - self.mean
            self.lse = torch.logaddexp(self.lse, lse)
            self.lse2 = torch.logaddexp(self.lse2, lse2)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * k / total)
            self.mean = self.mean + delta * (k / total)
        self.count += k

    def finalize(self) -> dict[str, torch.Tensor]:
        log_k = math.log(self.count)
        return {
            "log_px": self.lse - log_k,
            "elbo": self.mean,
            "var_log_w": self.m2 / self.count,
            "ess": (2 * self.lse - self.lse2 - log_k).exp(),
        }


def _check_finite(stats: dict[str, torch.Tensor], first_index: int) -> None:
    bad = torch.zeros_like(stats["log_px"], dtype=torch.bool)
    for name in ("log_px", "elbo", "var_log_w", "ess"):
        bad |= ~torch.isfinite(stats[name])
    if bad.any():
        where = (bad.nonzero().flatten()[:5] + first_index).tolist()
        raise EvaluationError(
            f"the log-weights of {int(bad.sum())} datapoint(s) are NaN or infinite (first: "
            f"{where}): log p(x, z) or log q(z|x) is not finite. Check that the data lie in the "
            "likelihood's support and that the model's parameters are finite.")


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _plot_gap(gap: torch.Tensor, path: Path, title: str) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(gap.numpy(), bins=min(50, max(5, gap.shape[0] // 5)))
    ax.set(xlabel="gap = log p̂(x) − ELBO (nats)", ylabel="datapoints", title=title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


@contextmanager
def _forked_rng() -> Iterator[None]:
    """Run a block on a copy of torch's random state (CPU and every CUDA device in use)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def _batch_rng(batch_seed: int | None, index: int) -> Iterator[None]:
    """Batch ``index``'s own random stream when ``batch_seed`` is given (on a fork of torch's
    state); otherwise the global stream, left as it is."""
    if batch_seed is None:
        yield
        return
    with _forked_rng():
        torch.manual_seed(derive_seed(batch_seed, EVAL_BATCH_STREAM, index))
        yield


@torch.no_grad()
def log_weights(model: Callable, guide: Callable, *args: Any, num_particles: int,
                particle_chunk: int | None = None, max_plate_nesting: int | None = None,
                data_plate: str | None = None, **kwargs: Any) -> torch.Tensor:
    """Per-datapoint log-weights log p(x, z_k) − log q(z_k|x), shape ``[K, N]``.

    ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` are called once per chunk of at most
    ``particle_chunk`` particles (all K at once by default), each chunk vectorized by an outer
    particle plate; the chunks are concatenated along K. The data plate is found automatically
    unless ``data_plate`` names it. Gradients are not recorded.

    :raises ConfigError: if no plate contains every sample site (see
        :func:`pyro_vae.traces.find_data_plate`).
    """
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    chunks = list(_log_weight_chunks(model, guide, args, kwargs, num_particles=num_particles,
                                     particle_chunk=particle_chunk,
                                     max_plate_nesting=max_plate_nesting, data_plate=data_plate))
    return torch.cat(chunks)


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS Pareto shape estimate k-hat of each datapoint's importance weights.

    :param log_weights: ``[K, N]`` log-weights, K ≥ ``MIN_KHAT_PARTICLES`` (ArviZ fits the
        ceil(min(K/5, 3√K)) largest weights and needs at least 5 of them).
    :returns: ``[N]`` float64 tensor on the CPU. Reading: k ≤ 0.5 good, 0.5 < k ≤ 0.7 ok (slow
        convergence), k > 0.7 bad (the estimate of p(x) is unreliable). Log-weights that are
        constant to working precision (the guide is the exact posterior) get k = −∞; ArviZ's own
        failures give +∞ and read as bad.
    """
    if log_weights.dim() != 2:
        raise ConfigError(f"log_weights must have shape [K, N], got {list(log_weights.shape)}")
    num_particles, num_data = log_weights.shape
    if num_particles < MIN_KHAT_PARTICLES:
        raise ConfigError(f"k-hat needs at least {MIN_KHAT_PARTICLES} particles, got "
                          f"{num_particles}; use more particles or khat=False")
    eps = torch.finfo(log_weights.dtype).eps if log_weights.is_floating_point() else 0.0
    lw = log_weights.detach().to("cpu", torch.float64)
    spread = lw.amax(0) - lw.amin(0)
    constant = spread <= CONSTANT_WEIGHTS_ULPS * eps * lw.abs().amax(0).clamp(min=1.0)
    khat = torch.full((num_data,), -math.inf, dtype=torch.float64)
    if not constant.all():
        arviz = _arviz()
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            _, k = arviz.psislw(lw[:, ~constant].T.contiguous().numpy())
        khat[~constant] = torch.as_tensor(np.asarray(k, dtype=np.float64)).reshape(-1)
    return khat


def khat_reading(khat: float) -> str:
    """``"good"`` (k ≤ 0.5), ``"ok"`` (0.5 < k ≤ 0.7) or ``"bad"`` (k > 0.7, or NaN)."""
    if khat <= KHAT_GOOD:
        return "good"
    return "ok" if khat <= KHAT_OK else "bad"


def _batch_result(model: Callable, guide: Callable, args: tuple, kwargs: dict, *,
                  num_particles: int, particle_chunk: int | None, max_plate_nesting: int,
                  data_plate: str | None, khat: bool | None, keep_log_weights: bool,
                  first_index: int = 0) -> "EvaluationResult":
    with_khat = num_particles >= MIN_KHAT_PARTICLES if khat is None else khat
    accumulator = _WeightAccumulator()
    blocks: list[torch.Tensor] | None = [] if with_khat or keep_log_weights else None
    for block in _log_weight_chunks(model, guide, args, kwargs, num_particles=num_particles,
                                    particle_chunk=particle_chunk,
                                    max_plate_nesting=max_plate_nesting, data_plate=data_plate):
        accumulator.update(block)
        if blocks is not None:
            blocks.append(block)
    stats = {name: value.cpu() for name, value in accumulator.finalize().items()}
    _check_finite(stats, first_index)
    full = torch.cat(blocks) if blocks is not None else None
    return EvaluationResult(
        num_particles=num_particles, **stats,
        khat=pareto_khat(full) if with_khat else None,
        log_weights=full.cpu() if keep_log_weights else None)


@torch.no_grad()
def evaluate(model: Callable, guide: Callable, *args: Any, num_particles: int,
             particle_chunk: int | None = None, khat: bool | None = None,
             keep_log_weights: bool = True, max_plate_nesting: int | None = None,
             data_plate: str | None = None, **kwargs: Any) -> "EvaluationResult":
    """Evaluate a model/guide pair on all its datapoints at once (one call per particle chunk).

    ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` must put every sample site inside
    one data plate (found automatically unless ``data_plate`` names it). ``khat=None`` computes
    k-hat when ``num_particles >= MIN_KHAT_PARTICLES``; ``True`` demands it, ``False`` skips it.
    With ``keep_log_weights`` the ``[K, N]`` log-weights are kept on the result.

    :raises ConfigError: for a pair without a data plate, or a bad option.
    :raises DataError: if a floating-point tensor argument holds NaN or infinite values.
    :raises EvaluationError: if any datapoint's log-weights are NaN or infinite.
    """
    _check_finite_inputs(args, kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    return _batch_result(model, guide, args, kwargs, num_particles=num_particles,
                         particle_chunk=particle_chunk, max_plate_nesting=max_plate_nesting,
                         data_plate=data_plate, khat=khat, keep_log_weights=keep_log_weights)


@torch.no_grad()
def evaluate_dataset(model: Callable, guide: Callable, data: Any, *, num_particles: int,
                     batch_size: int = EvalConfig.batch_size,
                     particle_chunk: int | None = EvalConfig.particle_chunk,
                     khat: bool | None = None, keep_log_weights: bool = False,
                     max_plate_nesting: int | None = None, data_plate: str | None = None,
                     progress: bool = False, batch_seed: int | None = None,
                     dist: DistributedContext = SINGLE, collate_fn: Callable | None = None,
                     **kwargs: Any) -> "EvaluationResult":
    """Evaluate a pair batch by batch: ``model(*batch_args, **batch_kwargs, **kwargs)``.

    ``data`` takes every form the training engine takes (:func:`pyro_vae.batches.as_source`):
    a tensor or array, a tuple/list of them (positional arguments) or a dict (keyword
    arguments), sliced along their first dimension into batches of ``batch_size`` rows; a
    map-style Dataset collated by ``collate_fn``; or a DataLoader, whose own batches are used.
    Each batch is evaluated with :func:`evaluate` semantics and the per-datapoint results are
    concatenated in order. Peak memory is that of one ``particle_chunk × batch_size``
    model/guide call plus a ``[K, batch_size]`` block for k-hat; ``keep_log_weights=True`` also
    keeps all ``[K, N]`` log-weights (on the CPU). Datapoints are independent given the
    parameters, so batching changes which particles are drawn but not their distribution.

    With ``batch_seed`` batch i draws from torch's generator seeded with
    ``derive_seed(batch_seed, EVAL_BATCH_STREAM, i)`` (:func:`pyro_vae.distributed.derive_seed`;
    on a fork: the caller's random state is left alone), so each batch's numbers depend only on
    the seed, ``batch_size``, ``particle_chunk`` and the batch's own data; with ``batch_size=1``
    datapoint i gets exactly the numbers of :func:`evaluate` on it alone after
    ``torch.manual_seed`` of that seed. Under a ``dist`` of several ranks
    (:func:`~pyro_vae.distributed.init_distributed`), which needs ``batch_seed``, rank r
    evaluates batches r, r + W, r + 2W, ... and every rank returns the gathered result, equal
    per datapoint to a single process's with the same ``batch_seed``.
    """
    if dist.enabled and batch_seed is None:
        raise ConfigError("sharded evaluation needs batch_seed, so that each batch draws the "
                          "same particles whichever rank evaluates it")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    source = as_source(data, collate_fn)
    from tqdm.auto import tqdm

    parts, failure, num_batches, first_index = [], None, 0, 0
    try:
        for index, batch in enumerate(tqdm(source.ordered(batch_size), desc="evaluate",
                                           unit="batch", disable=not progress or not dist.is_main)):
            num_batches, size = index + 1, batch.size
            start, first_index = first_index, first_index + size
            if index % dist.world_size != dist.rank:
                continue
            call_kwargs = {**batch.kwargs, **kwargs}
            _check_finite_inputs(batch.args, call_kwargs)
            if max_plate_nesting is None:
                with nullcontext() if batch_seed is None else _forked_rng():
                    max_plate_nesting = guess_max_plate_nesting(model, guide, batch.args,
                                                                call_kwargs)
            with _batch_rng(batch_seed, index):
                part = _batch_result(model, guide, batch.args, call_kwargs,
                                     num_particles=num_particles, particle_chunk=particle_chunk,
                                     max_plate_nesting=max_plate_nesting, data_plate=data_plate,
                                     khat=khat, keep_log_weights=keep_log_weights,
                                     first_index=start)
            if part.num_datapoints != size:
                raise ConfigError(f"the data plate has {part.num_datapoints} entries for a batch "
                                  f"of {size} rows: its size must be the batch's length")
            parts.append(part)
    except PyroVAEError as exc:
        if not dist.enabled:
            raise
        failure = exc
    if dist.enabled:
        gathered = all_gather_objects((parts, failure), dist, "gathering the evaluation")
        failures = [error for _, error in gathered if error is not None]
        if failures:
            raise failures[0]
        world = dist.world_size
        parts = [gathered[index % world][0][index // world] for index in range(num_batches)]
    return EvaluationResult.concatenate(parts)


def weight_statistics(log_weights: torch.Tensor, khat: bool | None = None) -> "EvaluationResult":
    """All per-datapoint statistics of given ``[K, N]`` log-weights (kept on the result)."""
    if log_weights.dim() != 2 or log_weights.shape[0] < 1:
        raise ConfigError(f"log_weights must have shape [K, N], got {list(log_weights.shape)}")
    num_particles = log_weights.shape[0]
    with_khat = num_particles >= MIN_KHAT_PARTICLES if khat is None else khat
    accumulator = _WeightAccumulator()
    accumulator.update(log_weights.detach())
    stats = {name: value.cpu() for name, value in accumulator.finalize().items()}
    _check_finite(stats, 0)
    return EvaluationResult(num_particles=num_particles, **stats,
                            khat=pareto_khat(log_weights) if with_khat else None,
                            log_weights=log_weights.detach().cpu())


def format_table(summary: dict[str, Any], observed: str = "x") -> str:
    """A plain-text table of :meth:`EvaluationResult.summary` (values in nats); ``observed``
    names what the model scores in the first row's label, e.g. ``"x, y"`` for a conditional
    VAE, whose log-weights are those of the joint p(x, y)."""
    labels = {"log_px": f"log p_K({observed})", "elbo": "ELBO", "gap": "gap (≈ KL)",
              "var_log_w": "var log w", "ess": "ESS / K"}
    units = {"log_px": "nats", "elbo": "nats", "gap": "nats", "var_log_w": "nats²", "ess": ""}

    def number(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    width = max(12, max(len(label) for label in labels.values()) + 1)
    lines = [f"{summary['num_datapoints']} datapoints, K = {summary['num_particles']} particles",
             f"{'':<{width}}{'mean':>12}{'stderr':>12}"]
    for name, label in labels.items():
        entry = summary[name]
        lines.append(f"{label:<{width}}{number(entry['mean']):>12}{number(entry['stderr']):>12}"
                     f"  {units[name]}".rstrip())
    if "khat" in summary:
        k = summary["khat"]
        lines.append(f"{'k-hat':<{width}}median {number(k['median'])}, max {number(k['max'])}; "
                     f"good {k['fraction_good']:.1%}, ok {k['fraction_ok']:.1%}, "
                     f"bad (> {KHAT_OK}) {k['fraction_bad']:.1%}")
    elif summary["num_particles"] < MIN_KHAT_PARTICLES:
        lines.append(f"{'k-hat':<{width}}not computed: PSIS needs K >= {MIN_KHAT_PARTICLES}")
    else:
        lines.append(f"{'k-hat':<{width}}not computed")
    return "\n".join(lines)


def save_evaluation(result: "EvaluationResult", folder: str | Path, split: str,
                    metadata: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``eval-<split>.json``, ``eval-<split>.nc``, ``gap-<split>.png`` and (with k-hat)
    ``khat-<split>.png`` into ``folder``, each atomically; return their paths by kind. Without
    k-hat an older ``khat-<split>.png`` is removed, so the folder never mixes two evaluations."""
    folder = Path(folder)
    paths = {"json": folder / f"eval-{split}.json", "netcdf": folder / f"eval-{split}.nc",
             "gap": folder / f"gap-{split}.png"}
    write_json(paths["json"], _json_safe({**(metadata or {}), **result.to_dict()}))
    with atomic_path(paths["netcdf"]) as tmp:
        result.to_inference_data().to_netcdf(str(tmp))
    title = f"{split}: N = {result.num_datapoints}, K = {result.num_particles}"
    _plot_gap(result.gap, paths["gap"], title)
    khat_path = folder / f"khat-{split}.png"
    if result.khat is not None:
        paths["khat"] = khat_path
        _plot_khat(result.khat, khat_path, title)
    else:
        khat_path.unlink(missing_ok=True)
    return paths


def _given_data(run: Any, data: Any, limit: int | None) -> Any:
    """``data`` (a spec or data) as a source on the run's device and parameter dtype."""
    if isinstance(data, (str, Path)):
        data = load_data(str(data))[0]
    param = next(run.model.parameters())
    return as_source(data).head(limit).to(param.device, param.dtype)


def evaluate_run(run_dir: str | Path, particles: int = EvalConfig.particles,
                 split: str = EvalConfig.split, limit: int | None = EvalConfig.limit, *,
                 batch_size: int = EvalConfig.batch_size,
                 particle_chunk: int = EvalConfig.particle_chunk, seed: int = EvalConfig.seed,
                 out: str | Path | None = None, device: str = "auto",
                 data_dir: str | None = None,
                 keep_log_weights: bool | None = EvalConfig.keep_log_weights,
                 progress: bool = False, dist_timeout: float | None = None,
                 data: Any = None) -> "EvaluationResult":
    """Evaluate a trained run folder on ``split`` (or on ``data``: a data spec or data in any
    form :func:`evaluate_dataset` takes) and write the results into ``out``.

    Loads the run with :func:`pyro_vae.runs.load_run`, evaluates its pair with
    :func:`evaluate_dataset` on the run's data of ``split`` (the first ``limit`` datapoints if
    given): the fixed binarization of the built-in images, or the ``--data`` / ``--test-data``
    a command-line run of a user's pair recorded. Each batch seeded from ``seed`` and its index (``batch_seed``) on a fork of
    torch's random state (the caller's state is left untouched), and with the run's parameters
    in a scope of their own in Pyro's param store (so it works in a process that holds other
    parameters). Pyro's validation is off, as
    in training: the data are checked when the run is loaded, and
    non-finite log-weights still raise :class:`EvaluationError`. Writes the files of
    :func:`save_evaluation` into ``out`` (default: ``run_dir``) and returns the result; print
    ``format_table(result.summary())`` for a report.

    Under torchrun every rank calls this function: the batches are shared out among the ranks
    (:func:`evaluate_dataset` with ``dist``), every rank returns the whole result, identical per
    datapoint to a single process's, and rank 0 alone writes the files. Collectives wait at most
    ``dist_timeout`` seconds (see :func:`pyro_vae.distributed.init_distributed`).
    """
    config = EvalConfig(particles=particles, split=split, limit=limit, batch_size=batch_size,
                        particle_chunk=particle_chunk, seed=seed,
                        keep_log_weights=keep_log_weights)
    dist = init_distributed(resolve_device(device), dist_timeout)
    with _forked_rng():
        run = load_run(run_dir, device=device, data_dir=data_dir)
        source = run.data(config.split, config.limit) if data is None else _given_data(run, data,
                                                                                     config.limit)
        keep = (particles * source.num_data <= KEEP_LOG_WEIGHTS_MAX
                if config.keep_log_weights is None else config.keep_log_weights)
        with pyro.get_param_store().scope(), pyro.validation_enabled(False):
            result = evaluate_dataset(run.model.model, run.model.guide, source,
                                      num_particles=config.particles,
                                      batch_size=config.batch_size,
                                      particle_chunk=config.particle_chunk,
                                      keep_log_weights=keep, progress=progress,
                                      batch_seed=config.seed, dist=dist)
    if dist.is_main:
        metadata = {"run_dir": str(run_dir), "config": asdict(config)}
        result.paths = save_evaluation(result, run_dir if out is None else out, config.split,
                                       metadata)
    return result


@dataclass
class EvaluationResult:
    """Per-datapoint evaluation results (CPU tensors of shape ``[N]``, float64).

    ``log_px`` = log p̂_K(x), ``elbo``, ``var_log_w``, ``ess`` (normalized: (Σw)²/(K Σw²), in
    [1/K, 1]) and ``khat`` (``None`` when not computed); ``gap`` = ``log_px − elbo``.
    ``log_weights`` is ``[K, N]`` when kept, else ``None``. ``paths`` names the files
    :func:`evaluate_run` wrote, by kind (empty otherwise).
    """

    num_particles: int
    log_px: torch.Tensor
    elbo: torch.Tensor
    var_log_w: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = self.log_px.shape
        assert len(shape) == 1, shape
        for name in ("elbo", "var_log_w", "ess", "khat"):
            value = getattr(self, name)
            assert value is None or value.shape == shape, (name, value.shape, shape)
        if self.log_weights is not None:
            assert self.log_weights.shape == (self.num_particles, shape[0]), (
                self.log_weights.shape, self.num_particles, shape)

    @property
    def num_datapoints(self) -> int:
        return self.log_px.shape[0]

    @property
    def gap(self) -> torch.Tensor:
        """log p̂_K(x) − ELBO(x) ≥ 0, an estimate of KL(q(z|x) ‖ p(z|x)) (biased low)."""
        return self.log_px - self.elbo

    @classmethod
    def concatenate(cls, parts: Sequence["EvaluationResult"]) -> "EvaluationResult":
        """Join results of consecutive batches (same K) along the datapoints."""
        if not parts or len({part.num_particles for part in parts}) != 1:
            raise ConfigError("concatenate needs results with the same number of particles")

        def cat(name: str, dim: int = 0) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if any(v is None for v in values) else torch.cat(values, dim)

        return cls(num_particles=parts[0].num_particles, log_px=cat("log_px"), elbo=cat("elbo"),
                   var_log_w=cat("var_log_w"), ess=cat("ess"), khat=cat("khat"),
                   log_weights=cat("log_weights", 1))

    def summary(self) -> dict[str, Any]:
        """Mean and standard error (std / √N) of each metric; for k-hat the median, the max and
        the fractions of datapoints read as good / ok / bad."""
        out: dict[str, Any] = {"num_datapoints": self.num_datapoints,
                               "num_particles": self.num_particles}
        n = self.num_datapoints
        for name in METRICS:
            values = getattr(self, name).to(torch.float64)
            stderr = values.std().item() / math.sqrt(n) if n > 1 else math.nan
            out[name] = {"mean": values.mean().item(), "stderr": stderr}
        if self.khat is not None:
            k = self.khat
            out["khat"] = {
                "median": k.median().item(), "max": k.max().item(),
                "fraction_good": (k <= KHAT_GOOD).double().mean().item(),
                "fraction_ok": ((k > KHAT_GOOD) & (k <= KHAT_OK)).double().mean().item(),
                "fraction_bad": (~(k <= KHAT_OK)).double().mean().item(),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """The summary and the per-datapoint arrays as lists; safe for JSON (non-finite values,
        such as k = −∞ for constant weights, become ``None``)."""
        names = [*METRICS, "khat"] if self.khat is not None else list(METRICS)
        datapoints = {name: getattr(self, name).tolist() for name in names}
        return _json_safe({"summary": self.summary(), "datapoints": datapoints})

    def to_inference_data(self) -> Any:
        """ArviZ ``InferenceData`` with one group, ``evaluation``: every per-datapoint metric
        with dim ``datapoint``, and ``log_weight`` with dims ``("particle", "datapoint")`` when
        the log-weights were kept. Save it with ``.to_netcdf(path)``."""
        import xarray as xr

        data_vars = {name: (("datapoint",), getattr(self, name).numpy()) for name in METRICS}
        coords = {"datapoint": np.arange(self.num_datapoints)}
        if self.khat is not None:
            data_vars["khat"] = (("datapoint",), self.khat.numpy())
        if self.log_weights is not None:
            data_vars["log_weight"] = (("particle", "datapoint"), self.log_weights.numpy())
            coords["particle"] = np.arange(self.num_particles)
        attrs = {"num_particles": self.num_particles, "khat_good": KHAT_GOOD,
                 "khat_ok": KHAT_OK, "summary": json.dumps(_json_safe(self.summary()))}
        dataset = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        return _arviz().InferenceData(**{INFERENCE_DATA_GROUP: dataset})
