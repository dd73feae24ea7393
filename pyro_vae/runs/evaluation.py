"""Evaluating a run folder: its pair on its data, the files written beside it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro

from pyro_vae.core.protocol import check_batches, check_data, data_plate_name, pair_activation_bytes
from pyro_vae.data import builtin
from pyro_vae.data.batches import as_source, resolve_device
from pyro_vae.data.specs import load_data
from pyro_vae.evaluate.chunks import DEFAULT_PARTICLE_CHUNK
from pyro_vae.evaluate.dataset import DEFAULT_BATCH_SIZE, evaluate_dataset
from pyro_vae.evaluate.khat import tail_size
from pyro_vae.evaluate.rate_distortion import RateDistortionOptions
from pyro_vae.evaluate.results import EvaluationResult, save_evaluation
from pyro_vae.models.config import check_seed
from pyro_vae.runs.diagnostics import holes_figure, holes_file, run_rate_distortion
from pyro_vae.runs.loading import load_run
from pyro_vae.util import memory
from pyro_vae.util.distributed import init_distributed
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.rng import forked_rng

KEEP_LOG_WEIGHTS_MAX = 10_000_000
SPLITS = ("train", "test")


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
    batch_size: int = DEFAULT_BATCH_SIZE
    particle_chunk: int = DEFAULT_PARTICLE_CHUNK
    seed: int = 0
    keep_log_weights: bool | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.particle_chunk >= 1, f"particle_chunk must be >= 1, got {self.particle_chunk}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_seed(self.seed)


def output_label(split: str, data: Any) -> str:
    """The name part of an evaluation's files: the split (``eval-test.json``), or for data
    given instead of the run's split ``data-<file stem>`` (``data-<stem>-<function>`` for
    ``FILE.py:FUNCTION``; ``data`` for data passed as objects), so that an evaluation on other
    data never replaces the split's."""
    if data is None:
        return split
    if not isinstance(data, (str, Path)):
        return "data"
    text = str(data)
    head, colon, function = text.rpartition(":")
    if colon and function.isidentifier() and not Path(text).exists():
        stem = f"{Path(head).stem if head.endswith('.py') else head}-{function}"
    else:
        stem = Path(text).stem
    return "data-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "data")


def checkpoint_epoch(run: Any) -> int:
    """The epoch of the checkpoint a loaded run holds (0: none trained), which its results
    record."""
    return run.history.epoch[-1] if run.history.epoch else 0


def evaluation_data(run: Any, split: str, data: Any, limit: int | None) -> Any:
    """What an evaluation of ``run`` reads, its first ``limit`` datapoints: the run's own
    ``split`` when ``data`` is ``None``; else ``data`` (a spec or data) as a source on the run's
    device and parameter dtype, every batch checked against the likelihood's support
    (:func:`~pyro_vae.core.protocol.check_data`, then
    :func:`~pyro_vae.core.protocol.check_batches`)."""
    if data is None:
        return run.data(split, limit)
    if isinstance(data, (str, Path)):
        data = load_data(str(data))[0]
    param = next(run.model.parameters())
    source = as_source(data).head(limit).to(param.device, param.dtype)
    first = next(iter(source.ordered(DEFAULT_BATCH_SIZE)))
    checks = check_data(run.model, *first.args, **first.kwargs)
    check_batches(checks, source.ordered(DEFAULT_BATCH_SIZE))
    return source


def _require_memory(run: Any, config: EvalConfig, source: Any, keep: bool) -> None:
    """Refuse, before drawing anything, an evaluation whose chunks cannot fit: a chunk's
    activations (of the package's own networks, whose widths are known, or of a user's pair,
    measured on one particle of the first batch), its log-weights, the top-M tails for k-hat
    and, when kept, all K·N log-weights."""
    num_data = source.num_data
    batch = min(config.batch_size, max(num_data, 1))
    chunk = min(config.particle_chunk, config.particles)
    rows = batch * chunk
    measured = _pair_bytes(run, source, batch)
    activations = (
        memory.inference_bytes(0, _width(run), rows) if measured is None else measured * chunk
    )
    nbytes = (
        activations
        + rows * 8
        + (tail_size(config.particles) + 1) * batch * 8
        + (config.particles * num_data * 8 if keep else 0)
    )
    memory.require(
        nbytes,
        f"evaluating {config.particles:,} particles in chunks of "
        f"{min(config.particle_chunk, config.particles):,} on batches of {batch:,}",
        _device(run),
    )


#: float64 copies of the annealing schedule alive while it is built and checked
SCHEDULE_COPIES = 5


def require_ais_memory(run: Any, chains: int, batch_size: int, source: Any, steps: int = 0) -> None:
    """Refuse, before drawing anything, AIS whose batches of ``source`` cannot fit: every step
    holds the activations of chains × batch datapoint-particles with their gradients (the HMC
    moves; a user's pair measured on one particle of the first batch), and the chains'
    positions, momenta and log-weights; the schedule holds a float64 β per step."""
    batch = min(batch_size, max(source.num_data, 1))
    rows = chains * batch
    measured = _pair_bytes(run, source, batch)
    activations = (
        memory.training_bytes(0, _width(run), rows)
        if measured is None
        else measured * chains * memory.TRAIN_ACTIVATION_COPIES // 2
    )
    nbytes = activations + rows * 8 * 8 + (steps + 1) * 8 * SCHEDULE_COPIES
    memory.require(
        nbytes,
        f"AIS of {steps:,} steps with {chains:,} chains on batches of {batch:,}",
        _device(run),
    )


def _pair_bytes(run: Any, source: Any, batch_size: int) -> int | None:
    """The activations of one particle of a user's pair on a batch of ``batch_size``, measured
    on the first (:func:`~pyro_vae.core.protocol.pair_activation_bytes`); ``None`` for the package's
    own networks, sized by their widths."""
    if run.dataset is not None and builtin.is_builtin(run.model):
        return None
    first = next(iter(source.ordered(batch_size)))
    return pair_activation_bytes(run.model, *first.args, **first.kwargs)


def _width(run: Any) -> int:
    """Activations per datapoint-particle: known for the package's own networks, 1 else."""
    return (
        builtin.network_width(run.dataset, run.config)
        if run.dataset is not None and builtin.is_builtin(run.model)
        else 1
    )


def _device(run: Any) -> Any:
    param = next(run.model.parameters(), None)
    return param.device if param is not None else "cpu"


def evaluate_run(
    run_dir: str | Path,
    particles: int = EvalConfig.particles,
    split: str = EvalConfig.split,
    limit: int | None = EvalConfig.limit,
    *,
    batch_size: int = EvalConfig.batch_size,
    particle_chunk: int = EvalConfig.particle_chunk,
    seed: int = EvalConfig.seed,
    out: str | Path | None = None,
    device: str = "auto",
    data_dir: str | None = None,
    keep_log_weights: bool | None = EvalConfig.keep_log_weights,
    progress: bool = False,
    dist_timeout: float | None = None,
    data: Any = None,
    rate_distortion: RateDistortionOptions | None = None,
) -> EvaluationResult:
    """Evaluate a trained run folder on ``split`` (or on ``data``: a data spec or data in any
    form :func:`evaluate_dataset` takes) and write the results into ``out``.

    Loads the run with :func:`pyro_vae.runs.load_run`, evaluates its pair with
    :func:`evaluate_dataset` on the run's data of ``split`` (the first ``limit`` datapoints if
    given): the fixed binarization of the built-in images, or the ``--data`` / ``--test-data``
    a command-line run of a user's pair recorded. Each batch seeded from ``seed`` and its index
    (``batch_seed``) on a fork of
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
    ``dist_timeout`` seconds (see :func:`pyro_vae.util.distributed.init_distributed`).

    With ``rate_distortion`` (:class:`~pyro_vae.evaluate.rate_distortion.RateDistortionOptions`)
    rank 0 also computes the rate–distortion diagnostics of the same data, seeded by ``seed``
    (``result.rate_distortion``; in the JSON and netCDF files, and for the package's VAEs on
    images the decoded prior holes, ``holes-<split>.png``).
    """
    config = EvalConfig(
        particles=particles,
        split=split,
        limit=limit,
        batch_size=batch_size,
        particle_chunk=particle_chunk,
        seed=seed,
        keep_log_weights=keep_log_weights,
    )
    dist = init_distributed(resolve_device(device), dist_timeout)
    with forked_rng():
        run = load_run(run_dir, device=device, data_dir=data_dir)
        source = evaluation_data(run, config.split, data, config.limit)
        keep = (
            particles * source.num_data <= KEEP_LOG_WEIGHTS_MAX
            if config.keep_log_weights is None
            else config.keep_log_weights
        )
        _require_memory(run, config, source, keep)
        with pyro.get_param_store().scope(), pyro.validation_enabled(False):
            result = evaluate_dataset(
                run.model.model,
                run.model.guide,
                source,
                num_particles=config.particles,
                batch_size=config.batch_size,
                particle_chunk=config.particle_chunk,
                keep_log_weights=keep,
                progress=progress,
                batch_seed=config.seed,
                dist=dist,
                data_plate=data_plate_name(run.model),
            )
            if rate_distortion is not None and dist.is_main:
                result.rate_distortion = run_rate_distortion(
                    run, source, rate_distortion, config.batch_size, config.particle_chunk, seed
                )
    if dist.is_main:
        metadata = {
            "run_dir": str(run_dir),
            "checkpoint_epoch": checkpoint_epoch(run),
            "config": asdict(config),
            "data": str(data)
            if isinstance(data, (str, Path))
            else (None if data is None else "given"),
        }
        label, folder = output_label(config.split, data), Path(run_dir if out is None else out)
        figures = (
            {} if rate_distortion is None else holes_figure(run, result.rate_distortion, label)
        )
        result.paths = save_evaluation(result, folder, label, metadata, figures)
        if not figures:  # never an older evaluation's holes beside this one
            (folder / holes_file(label)).unlink(missing_ok=True)
    return result
