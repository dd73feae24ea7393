"""The callbacks of a run of :func:`~pyro_vae.fit`, in the order they run: each one job (the
held-out estimate, the progress bar, early stopping, the learning-rate schedule, the
checkpoint, the user's own, the final estimate, the plots, the logger)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyro_vae.data import builtin
from pyro_vae.runs.config import TrainConfig
from pyro_vae.train.callbacks import (
    Checkpoint,
    EpochFunction,
    FinalEstimate,
    LearningRateSchedule,
    ProgressBar,
    RunFolderPlots,
)
from pyro_vae.train.config import RunOptions
from pyro_vae.train.early_stopping import EarlyStopping
from pyro_vae.train.estimates import HeldOutEstimate
from pyro_vae.train.loggers import LOG_DIR, TensorBoardLogger
from pyro_vae.train.loop import Callback, Loop
from pyro_vae.train.mlflow_logger import MLflowLogger
from pyro_vae.train.wandb_logger import WandbLogger


def make_logger(
    options: RunOptions, run_dir: Path | None, loop: Loop, config: TrainConfig, is_main: bool
) -> Callback | None:
    """The logger ``options.log`` names (``None``: none), made before any training: a store
    that refuses the run does so before anything is trained."""
    if options.log == "tensorboard":
        return TensorBoardLogger(run_dir / LOG_DIR, config.to_dict(), is_main, run_dir)
    if options.log == "mlflow":
        return MLflowLogger(run_dir, loop.history, config.to_dict(), options.log_uri, is_main)
    if options.log == "wandb":
        return WandbLogger(run_dir, loop.history, config.to_dict(), is_main)
    return None


def run_callbacks(
    loop: Loop,
    feed: Any,
    config: TrainConfig,
    options: RunOptions,
    run_dir: Path | None,
    dist: Any,
) -> list[Callback]:
    """The run's callbacks, in order: the held-out estimate (its numbers are then in the
    history the others see), the progress bar, early stopping and the schedule (before the
    checkpoint, which saves their state), the checkpoint, the user's, the final estimate, the
    plots and the logger (last: it logs what the others made). ``feed`` is the run's data
    source (:mod:`pyro_vae.train.sources`)."""
    logger = make_logger(options, run_dir, loop, config, dist.is_main)
    hooks: list[Callback] = []
    if config.estimate_every is not None and loop.held_out is not None:
        hooks.append(
            HeldOutEstimate(
                loop.held_out.source,
                config.estimate_every,
                config.final_particles,
                config.batch_size,
                config.seed,
                dist,
            )
        )
    hooks.append(ProgressBar(loop.epoch + 1, config.epochs, options.progress and dist.is_main))
    stopping, scheduler = None, loop.step.scheduler
    if config.patience is not None:
        stopping = EarlyStopping(config.patience, config.min_delta)
        hooks.append(stopping)
    if scheduler is not None:
        hooks.append(LearningRateSchedule(scheduler))
    if run_dir is not None:
        hooks.append(Checkpoint(run_dir, config, dist.is_main, stopping, scheduler))
    if options.on_epoch is not None:
        hooks.append(EpochFunction(options.on_epoch))
    hooks.extend(options.callbacks)
    if config.final_particles and loop.held_out is not None:
        hooks.append(
            FinalEstimate(
                loop.held_out.source, config.final_particles, config.batch_size, config.seed, dist
            )
        )
    if run_dir is not None and dist.is_main:
        hooks.append(
            RunFolderPlots(run_dir, lambda loop: _plots(run_dir, loop, feed.dataset, config))
        )
    if logger is not None:
        hooks.append(logger)
    return hooks


def _plots(run_dir: Path, loop: Loop, dataset: Any, config: TrainConfig) -> None:
    from pyro_vae.runs.plots import write_run_plots

    images = builtin.evaluation_images(dataset, "test", config) if dataset is not None else None
    write_run_plots(run_dir, loop.model, dataset, loop.history, images)
